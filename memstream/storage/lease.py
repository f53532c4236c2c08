"""Leases on the store's own storage: the lock that keeps cleanup away from writers.

Objects live under ``<store root>/_leases/``; creating one is a conditional put
(``If-None-Match: *`` on S3, ``O_CREAT | O_EXCL`` on a local folder), so exactly one of two
racing creators wins, with no lock service beside the storage itself.

Protocol (a readers-writer lock where writers are the "readers"):

* a **writer** creates its own ``writers/<uuid>`` lease, then checks that no
  ``maintenance`` lease exists; if one does, it removes its lease and waits. Writers never
  exclude each other: Lance's conditional-put commits already keep concurrent appends.
* **maintenance** (compaction, cleanup of old versions, demotion, governance removal)
  creates the single ``maintenance`` lease by conditional put, then waits until no live
  writer lease remains. Whichever of the two puts lands second sees the other.
* the **sequencer** lease is a short exclusive lease that orders Merkle log appends.

Every lease records its owner and an expiry; one past its expiry (a crashed holder) is
broken by deleting it. Holders of long operations must use a TTL longer than the operation.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from contextlib import contextmanager
from typing import Iterator

from memstream.errors import LeaseError
from memstream.storage.objects import ObjectStore


class Leases:
    """Writer, maintenance and sequencer leases of one store."""

    def __init__(self, objects: ObjectStore, ttl_s: float = 600.0, poll_s: float = 0.05):
        self.objects = objects
        self.ttl_s = ttl_s
        self.poll_s = poll_s

    def _body(self, owner: str) -> bytes:
        return json.dumps({"owner": owner, "pid": os.getpid(), "expires": time.time() + self.ttl_s}).encode()

    def _alive(self, key: str) -> bool:
        """Whether the lease at ``key`` exists and has not expired; an expired one is broken."""
        body = self.objects.get(key)
        if body is None:
            return False
        try:
            expired = json.loads(body)["expires"] < time.time()
        except (ValueError, KeyError):
            expired = True
        if expired:
            self.objects.delete(key)
            return False
        return True

    def _take(self, key: str, timeout_s: float, what: str) -> str:
        owner = uuid.uuid4().hex
        deadline = time.monotonic() + timeout_s
        while not self.objects.put_if_absent(key, self._body(owner)):
            self._alive(key)  # breaks it if its holder died
            if time.monotonic() > deadline:
                raise LeaseError(f"could not take the {what} lease {key} in {timeout_s:.0f}s: another process "
                                 f"holds it; if that process died the lease expires after {self.ttl_s:.0f}s")
            time.sleep(self.poll_s)
        return owner

    @contextmanager
    def writer(self, timeout_s: float = 120.0) -> Iterator[None]:
        key = f"_leases/writers/{uuid.uuid4().hex}"
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.objects.put_if_absent(key, self._body(key)):
                raise LeaseError(f"writer lease {key} already exists: uuid collision, retry")
            if not self._alive("_leases/maintenance"):
                break
            self.objects.delete(key)
            if time.monotonic() > deadline:
                raise LeaseError(f"maintenance held the store for more than {timeout_s:.0f}s: retry the write later")
            time.sleep(self.poll_s)
        try:
            yield
        finally:
            self.objects.delete(key)

    @contextmanager
    def maintenance(self, timeout_s: float = 300.0) -> Iterator[None]:
        key = "_leases/maintenance"
        self._take(key, timeout_s, "maintenance")
        try:
            deadline = time.monotonic() + timeout_s
            while any(self._alive(k) for k in self.objects.list("_leases/writers")):
                if time.monotonic() > deadline:
                    raise LeaseError(f"writers still active after {timeout_s:.0f}s: maintenance gave up, retry later")
                time.sleep(self.poll_s)
            yield
        finally:
            self.objects.delete(key)

    @contextmanager
    def sequencer(self, timeout_s: float = 120.0) -> Iterator[None]:
        key = "_leases/sequencer"
        self._take(key, timeout_s, "sequencer")
        try:
            yield
        finally:
            self.objects.delete(key)
