"""The key table: every session's and subject's data key, wrapped under the master key, one
object each under ``<store>/_datakeys/`` (a local folder or ``s3://``).

One object per key, so that destroying a key is deleting one object: no table version,
compaction or index keeps a copy. Destroying writes a tombstone first (``<key id>.destroyed``,
no key bytes), so that the key is never made again for the same owner and a consumer can
tell a forgotten key (:class:`~memstream.errors.KeyDestroyedError`) from one it was never
given (:class:`~memstream.errors.KeyUnavailableError`). A versioned S3 bucket keeps deleted
objects: use one without versioning, or expire old versions.
"""

from __future__ import annotations

import json
import threading
import time

from memstream.crypto.datakeys import MasterKey, new_data_key, session_key_id, subject_key_id
from memstream.errors import ConfigError, IntegrityError, KeyDestroyedError, KeyUnavailableError
from memstream.storage.objects import object_store

PREFIX = "_datakeys"
# A consumer re-reads a cached key after this long, so a running pipeline stops opening a
# forgotten session's records soon after the key is destroyed, not only after a restart.
CACHE_TTL_S = 30.0


class KeyTable:
    """``KeyTable(uri, storage_options, master)``: get, make and destroy data keys."""

    def __init__(self, uri: str, storage_options: dict[str, str] | None, master: MasterKey):
        self.uri = uri.rstrip("/")
        self.storage_options = storage_options
        self._objects = object_store(self.uri, storage_options)
        self._master = master
        self._cache: dict[bytes, tuple[bytes, float]] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, uri: str, storage_options: dict[str, str] | None, master_key_file: str) -> "KeyTable":
        """The key table of the store at ``uri``, unlocked by the master key in that file."""
        return cls(uri, storage_options, MasterKey.from_file(master_key_file))

    @property
    def location(self) -> str:
        """Where the key objects are (for the proof scan)."""
        return f"{self.uri}/{PREFIX}"

    @staticmethod
    def _name(key_id: bytes) -> str:
        return f"{PREFIX}/{key_id.hex()}"

    def destroyed(self, key_id: bytes) -> bool:
        return self._objects.get(self._name(key_id) + ".destroyed") is not None

    # -- owners ---------------------------------------------------------------------------
    def session_key(self, session_id: str) -> tuple[bytes, bytes]:
        """(key id, data key) of a session, made on first use; KeyDestroyedError once forgotten."""
        return self.owner_key(session_key_id(session_id), f"session {session_id!r}")

    def subject_key(self, subject_hash: str) -> tuple[bytes, bytes]:
        """(key id, data key) of a long-term subject (its ``subject_hash``), made on first use."""
        return self.owner_key(subject_key_id(subject_hash), f"subject {subject_hash[:12]}")

    def owner_key(self, key_id: bytes, owner: str) -> tuple[bytes, bytes]:
        try:
            return key_id, self.data_key(key_id)
        except KeyUnavailableError:
            pass
        except KeyDestroyedError:
            raise KeyDestroyedError(f"{owner} was forgotten and its data key destroyed: use a new id") from None
        if self.destroyed(key_id):
            raise KeyDestroyedError(f"{owner} was forgotten and its data key destroyed: use a new id")
        # Two producers may make it at once: the first put wins, the other reads the winner's.
        self._objects.put_if_absent(self._name(key_id), self._master.wrap(key_id, new_data_key()))
        return key_id, self.data_key(key_id)

    # -- consumers ------------------------------------------------------------------------
    def data_key(self, key_id: bytes) -> bytes:
        """The data key; KeyDestroyedError once destroyed, KeyUnavailableError when unknown."""
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key_id)
        if hit is not None and now - hit[1] < CACHE_TTL_S:
            return hit[0]
        wrapped = self._objects.get(self._name(key_id))
        if wrapped is None or self.destroyed(key_id):
            with self._lock:
                self._cache.pop(key_id, None)
            if wrapped is not None:  # made again by a producer racing the destroy: it goes too
                self._objects.delete(self._name(key_id))
            if self.destroyed(key_id):
                raise KeyDestroyedError(f"data key {key_id.hex()} was destroyed by a forget request: what it "
                                        "sealed can never be read again")
            raise KeyUnavailableError(f"no data key {key_id.hex()} in the key table at {self.location}: the "
                                      "record was sealed against another store, or its key table was lost")
        try:
            key = self._master.unwrap(key_id, wrapped)
        except IntegrityError:
            raise ConfigError(f"data key {key_id.hex()} at {self.location} is wrapped under another master key than "
                              f"{self._master.key_id}: pass this store's master key file") from None
        with self._lock:
            self._cache[key_id] = (key, now)
        return key

    def destroy(self, key_id: bytes, reason: str = "forget") -> bool:
        """Destroy a data key (tombstone, then delete); True when a key was there."""
        self._objects.put_if_absent(self._name(key_id) + ".destroyed",
                                    json.dumps({"reason": reason, "destroyed_at_us": time.time_ns() // 1000}).encode())
        existed = self._objects.get(self._name(key_id)) is not None
        self._objects.delete(self._name(key_id))
        with self._lock:
            self._cache.pop(key_id, None)
        return existed

    def wrapped(self, key_id: bytes) -> bytes | None:
        """The stored (wrapped) bytes of a key, for the proof scan's markers."""
        return self._objects.get(self._name(key_id))
