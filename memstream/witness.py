"""The witness: an independent party that cosigns the heads of the operator's logs, in the
manner of Certificate Transparency witnesses (RFC 9162 section 8.1.4, C2SP tlog-cosignature),
and keeps every head it cosigned in storage of its own.

It holds a key of role ``witness`` (never a validator, governance or maintenance key) and a
root (a local folder, or ``s3://bucket/prefix`` in a bucket of its own, ideally versioned or
object-locked) that the operator's store configuration does not name. It cosigns:

* a long-term store's signed tree head, given an RFC 9162 consistency proof from the last
  head it cosigned for that log (:meth:`Witness.cosign_tree_head`);
* a session's episodic chain head (its newest summary), given the summaries that link it to
  the chain head it cosigned before (:meth:`Witness.cosign_chain_head`).

A head that is smaller than one it cosigned (rollback or truncation), or that does not extend
it (fork), is refused with :class:`~memstream.errors.WitnessRefusal`. Heads are only ever
added (conditional puts)::

    logs/<log_id>.json                 a log the witness has seen (for listing)
    tree/<log_id>/<seq>.json           the seq-th cosigned tree head of the log
    sessions/<sha256(session)>.json    a session the witness has seen (for listing)
    chain/<sha256(session)>/<seq>.json the seq-th cosigned chain head of the session

Each new head takes the next sequence number with a conditional put, so two witness processes
never both extend the same head: the one that loses checks again against the winner's.
Auditors read it with :class:`WitnessLog` and the witness's public key only.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Sequence

from memstream.crypto.keys import KeyRing, SigningKey, check_distinct_roles
from memstream.crypto.proof import verify_consistency
from memstream.crypto.signed import CosignedChainHead, CosignedTreeHead, SignedTreeHead
from memstream.episodic.chain import verify_chain
from memstream.errors import ConfigError, IntegrityError, VerificationError, WitnessRefusal
from memstream.schemas.records import SummaryRecord
from memstream.storage.objects import object_store

_SEQ = "{:012d}.json"
_RETRIES = 20


def session_key(session_id: str) -> str:
    """A session's folder name: a hash, so that any session id makes a valid object key."""
    return hashlib.sha256(session_id.encode()).hexdigest()


def _check_log_id(log_id: str) -> str:
    if not log_id or not all(c in "0123456789abcdef" for c in log_id):
        raise ConfigError(f"not a log id: {log_id!r} (a long-term store id, hex)")
    return log_id


class WitnessLog:
    """What a witness cosigned, read from its root and checked with its public keys."""

    def __init__(self, uri: str, storage_options: dict[str, str] | None = None, *, witness_keys: KeyRing):
        if not len(witness_keys):
            raise ConfigError("a witness log needs the witness's public key to check its cosignatures")
        self.uri = uri.rstrip("/")
        self.storage_options = storage_options
        self.witness_keys = witness_keys
        self._objects = object_store(self.uri, storage_options)
        self._tails: dict[str, tuple[int, bytes | None]] = {}  # folder -> (heads, newest head's JSON)

    def _sequence(self, folder: str) -> list[tuple[int, bytes]]:
        out = []
        for key in self._objects.list(folder):
            name = key.rsplit("/", 1)[-1]
            if name.endswith(".json") and name[:-5].isdigit():
                body = self._objects.get(key)
                if body is not None:
                    out.append((int(name[:-5]), body))
        out.sort()
        if [s for s, _ in out] != list(range(len(out))):
            raise VerificationError(f"the witness's heads under {self.uri}/{folder} are not numbered 0..n-1: "
                                    "some were removed from its storage")
        return out

    def _latest(self, folder: str) -> tuple[int, bytes | None]:
        """How many heads the folder holds and the newest: the whole listing is read once per
        process, then only the next sequence numbers are probed (one GET each), so cosigning
        costs the same however many heads were cosigned before."""
        n, last = self._tails.get(folder, (None, None))
        if n is None:
            seq = self._sequence(folder)
            n, last = len(seq), (seq[-1][1] if seq else None)
        while (body := self._objects.get(f"{folder}/{_SEQ.format(n)}")) is not None:
            n, last = n + 1, body
        self._tails[folder] = (n, last)
        return n, last

    def _checked(self, body: bytes, cls, field: str, value: str):
        head = cls.from_json(body)
        if getattr(head, field) != value:
            raise VerificationError(f"the witness's heads of {value!r} hold a head of {getattr(head, field)!r}")
        head.verify(self.witness_keys)
        return head

    def _all(self, folder: str, cls, field: str, value: str) -> list:
        return [self._checked(b, cls, field, value) for _, b in self._sequence(folder)]

    def _newest(self, folder: str, cls, field: str, value: str) -> tuple[int, object]:
        n, body = self._latest(folder)
        return n, (self._checked(body, cls, field, value) if body is not None else None)

    def tree_heads(self, log_id: str) -> list[CosignedTreeHead]:
        """Every tree head cosigned for the log, oldest first, each cosignature checked."""
        return self._all(f"tree/{_check_log_id(log_id)}", CosignedTreeHead, "log_id", log_id)

    def latest_tree_head(self, log_id: str) -> CosignedTreeHead | None:
        return self._newest(f"tree/{_check_log_id(log_id)}", CosignedTreeHead, "log_id", log_id)[1]

    def logs(self) -> list[str]:
        return sorted(k.rsplit("/", 1)[-1][:-5] for k in self._objects.list("logs") if k.endswith(".json"))

    def chain_heads(self, session_id: str) -> list[CosignedChainHead]:
        """Every chain head cosigned for the session, oldest first, each cosignature checked."""
        return self._all(f"chain/{session_key(session_id)}", CosignedChainHead, "session_id", session_id)

    def latest_chain_head(self, session_id: str) -> CosignedChainHead | None:
        return self._newest(f"chain/{session_key(session_id)}", CosignedChainHead, "session_id", session_id)[1]

    def sessions(self) -> list[str]:
        """Sessions the witness cosigned a chain head of."""
        out = []
        for key in self._objects.list("sessions"):
            body = self._objects.get(key)
            if body is not None:
                out.append(json.loads(body)["session_id"])
        return sorted(out)


class Witness(WitnessLog):
    """The cosigning side: ``key`` is the witness key, ``log_keys`` the validator public keys
    whose heads it accepts. The two never share a key."""

    def __init__(self, uri: str, storage_options: dict[str, str] | None = None, *, key: SigningKey,
                 log_keys: KeyRing):
        check_distinct_roles({"validator": log_keys, "witness": [key]})
        if not len(log_keys):
            raise ConfigError("a witness needs the validator public keys whose heads it cosigns")
        super().__init__(uri, storage_options, witness_keys=KeyRing([key]))
        self.key = key
        self.log_keys = log_keys

    def _append(self, folder: str, seq: int, body: bytes) -> bool:
        return self._objects.put_if_absent(f"{folder}/{_SEQ.format(seq)}", body)

    def cosign_tree_head(self, sth: SignedTreeHead, proof: Sequence[bytes]) -> CosignedTreeHead:
        """Cosign ``sth`` when ``proof`` proves it extends the last head cosigned for its log
        (any proof for the first head of a log). Cosigning a head already cosigned returns the
        stored cosignature. WitnessRefusal otherwise."""
        log_id = _check_log_id(sth.log_id)
        try:
            sth.verify(self.log_keys)
        except IntegrityError as e:
            raise WitnessRefusal("signature", f"tree head {sth.tree_size} of log {log_id}: {e}") from None
        folder = f"tree/{log_id}"
        for _ in range(_RETRIES):
            n, last = self._newest(folder, CosignedTreeHead, "log_id", log_id)
            if last is not None:
                if sth.tree_size < last.tree_size:
                    raise WitnessRefusal("rollback", f"log {log_id}: a head of size {sth.tree_size} is smaller than "
                                                     f"the head of size {last.tree_size} this witness cosigned: the "
                                                     "log was rolled back or truncated")
                if sth.tree_size == last.tree_size:
                    if sth.root_hash != last.root_hash:
                        raise WitnessRefusal("fork", f"log {log_id}: a head of size {sth.tree_size} with another "
                                                     "root than the one this witness cosigned: the log forked")
                    return last
                try:
                    verify_consistency(last.tree_size, sth.tree_size, last.root_hash, sth.root_hash, proof)
                except VerificationError as e:
                    raise WitnessRefusal("fork", f"log {log_id}: the head of size {sth.tree_size} does not extend "
                                                 f"the cosigned head of size {last.tree_size}: {e}") from None
            cosigned = CosignedTreeHead.cosign(sth, self.key, time.time_ns())
            self._objects.put_if_absent(f"logs/{log_id}.json", json.dumps({"log_id": log_id}).encode())
            if self._append(folder, n, cosigned.to_json()):
                return cosigned
        raise WitnessRefusal("contended", f"log {log_id}: other witness processes kept extending the log")

    def cosign_chain_head(self, records: Sequence[SummaryRecord]) -> CosignedChainHead:
        """Cosign a session's chain head, ``records[-1]``. ``records`` are that session's
        summaries in window order, linking it to the head cosigned before: from that head,
        or from the window after it (the head alone for a session seen the first time)."""
        if not records:
            raise ConfigError("cosign_chain_head needs the session's summaries, its chain head last")
        head = records[-1]
        sid = head.session_id
        windows = [r.window_index for r in records]
        if windows != list(range(windows[0], windows[0] + len(windows))):
            raise WitnessRefusal("unlinked", f"session {sid!r}: the summaries given skip windows (evicted?): a "
                                             "link needs every window from the cosigned head to the new one")
        report = verify_chain(sid, records, self.log_keys, anchored=False)
        if not report.ok:
            raise WitnessRefusal("proof", f"session {sid!r}: the summaries given do not chain: {report.fault}")
        folder = f"chain/{session_key(sid)}"
        for _ in range(_RETRIES):
            n, last = self._newest(folder, CosignedChainHead, "session_id", sid)
            if last is not None:
                if head.window_index < last.window_index:
                    raise WitnessRefusal("rollback", f"session {sid!r}: a chain head at window {head.window_index} is "
                                                     f"behind window {last.window_index}, which this witness "
                                                     "cosigned: the episodic store was rolled back")
                if head.window_index == last.window_index:
                    if head.hash != last.head_hash:
                        raise WitnessRefusal("fork", f"session {sid!r}: window {head.window_index} has another hash "
                                                     "than the one this witness cosigned: the chain forked")
                    return last
                at = {r.window_index: r for r in records}
                if last.window_index in at:
                    linked = at[last.window_index].hash == last.head_hash
                elif last.window_index + 1 == records[0].window_index:
                    linked = records[0].prev_hash == last.head_hash
                else:
                    raise WitnessRefusal("unlinked", f"session {sid!r}: the summaries given start at window "
                                                     f"{records[0].window_index}; the link from cosigned window "
                                                     f"{last.window_index} needs every window after it")
                if not linked:
                    raise WitnessRefusal("fork", f"session {sid!r}: the chain does not pass through window "
                                                 f"{last.window_index} as this witness cosigned it: the chain forked")
            cosigned = CosignedChainHead.cosign(sid, head.window_index, head.hash, head.seq_end, head.key_id,
                                                head.signature, self.key, time.time_ns())
            self._objects.put_if_absent(f"sessions/{session_key(sid)}.json", json.dumps({"session_id": sid}).encode())
            if self._append(folder, n, cosigned.to_json()):
                return cosigned
        raise WitnessRefusal("contended", f"session {sid!r}: other witness processes kept extending the chain")
