"""Leases on the store's own storage: the lock that keeps cleanup away from writers, and the
sequencer that orders Merkle log appends, with fencing tokens and heartbeats.

Objects live under ``<store root>/_leases/``; creating one is a conditional put
(``If-None-Match: *`` on S3, ``O_CREAT | O_EXCL`` on a local folder), so exactly one of two
racing creators wins, with no lock service beside the storage itself.

Protocol (a readers-writer lock where writers are the "readers"):

* a **writer** creates its own ``writers/<uuid>`` lease, then checks that no live
  ``maintenance`` lease exists; if one does, it removes its lease and waits. Writers never
  exclude each other: Lance's conditional-put commits already keep concurrent appends.
* **maintenance** (compaction, cleanup of old versions, demotion, governance removal) takes
  the exclusive ``maintenance`` lease, then waits until no live writer lease remains, breaking
  (deleting) dead ones. Whichever of the two puts lands second sees the other.
* the **sequencer** is an exclusive lease that orders Merkle log appends.

**Fencing tokens.** An exclusive lease is the object ``fenced/<name>/<token>``: taking it is
the conditional put of the token after the highest one listed, allowed only once that one's
holder is dead (released, expired, or a process of this machine that no longer exists). Of
two takers of the same token one wins, so tokens only grow, and the current holder is the one
with the highest token. A writer's token is its lease object, which maintenance deletes when
it breaks it.

**Heartbeats.** A holder renews its expiry from a background thread every third of the TTL,
so an operation may run longer than the TTL; a holder that stops (paused, swapped out,
partitioned) stops renewing and its lease expires. :meth:`Lease.check`, called right before
each protected commit, raises :class:`~memstream.errors.FencedError` once a successor holds
the lease, or once this holder's own expiry is less than a quarter of the TTL away (its renewals
failed or it was paused), so that a commit lands before anyone may take over. What remains is
a pause of more than that quarter TTL between a check and the commit it guards; the writes are
laid out so that even then the store can be repaired (see ``LongTermStore.append``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Iterator

from memstream.errors import FencedError, LeaseError, ServiceError
from memstream.storage.objects import ObjectStore

log = logging.getLogger(__name__)

_TOKEN_DIGITS = 20


def _machine() -> str:
    """This boot of this machine and this PID namespace: lease holders with the same value
    can be told dead by their PID alone."""
    try:
        boot = open("/proc/sys/kernel/random/boot_id").read().strip()
        return f"{boot}:{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""  # no /proc: holders are dead only once expired


_MACHINE = _machine()


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError):
        return False
    return False


def holder_dead(body: bytes | None, now: float | None = None) -> bool:
    """Whether the lease stored as ``body`` no longer protects anything."""
    if body is None:
        return True
    try:
        state = json.loads(body)
        if state.get("released") or state["expires"] < (time.time() if now is None else now):
            return True
        return bool(_MACHINE) and state.get("machine") == _MACHINE and _pid_gone(int(state["pid"]))
    except (ValueError, KeyError, TypeError):
        return True


class Lease:
    """A held lease: its fencing token, its heartbeat, and the check a protected write makes."""

    def __init__(self, leases: "Leases", key: str, token: int | None, what: str, exclusive: str | None):
        self.leases = leases
        self.key = key
        self.token = token
        self.what = what
        self._exclusive = exclusive  # the prefix of an exclusive lease's tokens
        self.owner = uuid.uuid4().hex
        self.expires = 0.0
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def body(self, released: bool = False) -> bytes:
        return json.dumps({"owner": self.owner, "token": self.token, "pid": os.getpid(), "machine": _MACHINE,
                           "expires": self.expires, "released": released}).encode()

    def start(self) -> "Lease":
        if self.leases.heartbeat:
            self._thread = threading.Thread(target=self._beat, name=f"lease-heartbeat-{self.what}", daemon=True)
            self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.leases.ttl_s / 3):
            try:
                self.renew()
            except FencedError:
                return
            except ServiceError as e:  # storage unreachable: try again; check() fences once too late
                log.warning("renewing the %s lease %s failed: %s", self.what, self.key, e)

    def renew(self) -> None:
        """Extend the expiry by a TTL (the heartbeat does this; long operations may too)."""
        now = time.time()
        if self._lost is None and now > self.expires - self.leases.margin_s:
            # Others may break it from ``expires`` on: renewing now could revive a broken lease.
            self._lost = "its expiry came too close without a renewal: the process was paused or partitioned"
        if self._lost is not None:
            raise self._fenced()
        if self._exclusive is None and self.leases.objects.get(self.key) is None:
            self._lost = "maintenance broke it as expired"
            raise self._fenced()
        expires = now + self.leases.ttl_s
        previous, self.expires = self.expires, expires
        try:
            self.leases.objects.put(self.key, self.body())
        except ServiceError:
            self.expires = previous
            raise

    def check(self) -> None:
        """Raise :class:`FencedError` unless this lease is still held with margin left: call
        right before each commit it protects."""
        if self._lost is None and time.time() > self.expires - self.leases.margin_s:
            self._lost = "its expiry is too close: renewals failed or the process was paused"
        if self._lost is None:
            if self._exclusive is not None:
                newest = self.leases.newest_token(self._exclusive)
                if newest != self.token:
                    self._lost = f"a newer holder took it (token {newest}, this holder's {self.token})"
            elif self.leases.objects.get(self.key) is None:
                self._lost = "maintenance broke it as expired"
        if self._lost is not None:
            raise self._fenced()

    def _fenced(self) -> FencedError:
        token = f" (fencing token {self.token})" if self.token is not None else ""
        return FencedError(f"the {self.what} lease {self.key}{token} is no longer held: {self._lost}. This "
                           "process commits nothing more under it. Retry the operation: an append stopped this way "
                           "is finished or dropped by the next append or open of the store, so retry appends with "
                           "append(..., if_absent=True)")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._exclusive is None:
            self.leases.objects.delete(self.key)
        else:  # kept, marked released, so that the next token counts on from it
            self.leases.objects.put(self.key, self.body(released=True))


class Leases:
    """Writer, maintenance and sequencer leases of one store."""

    def __init__(self, objects: ObjectStore, ttl_s: float = 60.0, poll_s: float = 0.05, heartbeat: bool = True):
        if ttl_s <= 0:
            raise LeaseError(f"a lease TTL must be positive, got {ttl_s}")
        self.objects = objects
        self.ttl_s = ttl_s
        self.margin_s = ttl_s / 4
        self.poll_s = poll_s
        self.heartbeat = heartbeat

    def _tokens(self, prefix: str) -> list[int]:
        return [int(name) for k in self.objects.list(prefix)
                if (name := k.rsplit("/", 1)[-1]).isdigit() and len(name) == _TOKEN_DIGITS]

    def newest_token(self, prefix: str) -> int:
        return max(self._tokens(prefix), default=0)

    def _key(self, prefix: str, token: int) -> str:
        return f"{prefix}/{token:0{_TOKEN_DIGITS}d}"

    def _exclusive_dead(self, prefix: str) -> tuple[bool, int, list[int]]:
        tokens = self._tokens(prefix)
        newest = max(tokens, default=0)
        return (newest == 0 or holder_dead(self.objects.get(self._key(prefix, newest)))), newest, tokens

    def _take(self, name: str, timeout_s: float) -> Lease:
        prefix = f"_leases/fenced/{name}"
        deadline = time.monotonic() + timeout_s
        while True:
            dead, newest, tokens = self._exclusive_dead(prefix)
            if dead:
                lease = Lease(self, self._key(prefix, newest + 1), newest + 1, name, prefix)
                lease.expires = time.time() + self.ttl_s
                if self.objects.put_if_absent(lease.key, lease.body()):
                    for t in tokens:  # keep the predecessor: tokens count on from the newest
                        if t < newest:
                            self.objects.delete(self._key(prefix, t))
                    return lease.start()
            if time.monotonic() > deadline:
                raise LeaseError(f"could not take the {name} lease in {timeout_s:.0f}s: another process holds it "
                                 f"(token {newest}); if that process died its lease expires within {self.ttl_s:.0f}s "
                                 "of its last heartbeat: retry then")
            time.sleep(self.poll_s)

    def maintenance_held(self) -> bool:
        return not self._exclusive_dead("_leases/fenced/maintenance")[0]

    @contextmanager
    def writer(self, timeout_s: float = 120.0) -> Iterator[Lease]:
        deadline = time.monotonic() + timeout_s
        while True:
            lease = Lease(self, f"_leases/writers/{uuid.uuid4().hex}", None, "writer", None)
            lease.expires = time.time() + self.ttl_s
            if not self.objects.put_if_absent(lease.key, lease.body()):
                raise LeaseError(f"writer lease {lease.key} already exists: uuid collision, retry")
            if not self.maintenance_held():
                break
            self.objects.delete(lease.key)
            if time.monotonic() > deadline:
                raise LeaseError(f"maintenance held the store for more than {timeout_s:.0f}s: retry the write later")
            time.sleep(self.poll_s)
        lease.start()
        try:
            yield lease
        finally:
            lease.release()

    @contextmanager
    def maintenance(self, timeout_s: float = 300.0) -> Iterator[Lease]:
        lease = self._take("maintenance", timeout_s)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                alive = False
                for k in self.objects.list("_leases/writers"):
                    if holder_dead(self.objects.get(k)):
                        self.objects.delete(k)  # broken: its holder's check() now fails
                    else:
                        alive = True
                if not alive:
                    break
                if time.monotonic() > deadline:
                    raise LeaseError(f"writers still active after {timeout_s:.0f}s: maintenance gave up, retry later")
                time.sleep(self.poll_s)
            yield lease
        finally:
            lease.release()

    @contextmanager
    def sequencer(self, timeout_s: float = 120.0) -> Iterator[Lease]:
        lease = self._take("sequencer", timeout_s)
        try:
            yield lease
        finally:
            lease.release()
