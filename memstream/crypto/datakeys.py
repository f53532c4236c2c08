"""Data keys for crypto-shredding: each session (and each long-term subject) has its own
AES-256 key; forgetting destroys the key, which leaves every copy of its ciphertext (Kafka
logs, store files, backups) unreadable.

* :class:`MasterKey` wraps data keys at rest (AES-256-GCM, the key id as associated data),
  read from a key file that only its owner may read.
* :func:`seal` / :func:`unseal`: AES-256-GCM with a random 96-bit nonce, for latent chunks.
* :func:`seal_deterministic` / :func:`unseal_deterministic`: AES-256-GCM-SIV, whose nonce is
  derived from what the ciphertext is of (e.g. session and window): a replay makes the same
  ciphertext byte for byte, and a nonce used twice leaks only that two plaintexts are equal
  (SIV is nonce-misuse resistant), never the key stream.

Key ids are 16 bytes derived from the owner's name, so a producer and the pipeline agree on a
session's key id without asking each other; the key itself is random.
"""

from __future__ import annotations

import os
from pathlib import Path

from memstream.crypto.hashing import domain_hash
from memstream.errors import ConfigError, IntegrityError

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_ID_BYTES = 16
SEALED_OVERHEAD = NONCE_BYTES + TAG_BYTES  # bytes seal() adds to a plaintext


def session_key_id(session_id: str) -> bytes:
    """The key id of an episodic session's data key."""
    return domain_hash("memstream.datakey.session.v1", session_id.encode())[:KEY_ID_BYTES]


def subject_key_id(subject_hash: str) -> bytes:
    """The key id of a long-term subject's data key (``subject_hash`` as entries store it)."""
    return domain_hash("memstream.datakey.subject.v1", subject_hash.encode())[:KEY_ID_BYTES]


def new_data_key() -> bytes:
    return os.urandom(KEY_BYTES)


def _aesgcm(key: bytes):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


def encrypt(key: bytes, plaintext: bytes | memoryview, aad: bytes) -> tuple[bytes, bytes]:
    """(random nonce, AES-256-GCM ciphertext and tag) of ``plaintext``, bound to ``aad``: the
    parts of :func:`seal`, for a caller that writes them out without joining them first."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce, _aesgcm(key).encrypt(nonce, plaintext, aad)


def seal(key: bytes, plaintext: bytes | memoryview, aad: bytes) -> bytes:
    """nonce || AES-256-GCM ciphertext and tag of ``plaintext``, bound to ``aad``."""
    return b"".join(encrypt(key, plaintext, aad))


def unseal(key: bytes, sealed: bytes | memoryview, aad: bytes) -> bytes:
    """The plaintext of :func:`seal`; IntegrityError when it does not authenticate."""
    from cryptography.exceptions import InvalidTag

    sealed = memoryview(sealed)
    try:
        return _aesgcm(key).decrypt(bytes(sealed[:NONCE_BYTES]), sealed[NONCE_BYTES:], aad)
    except InvalidTag:
        raise IntegrityError("ciphertext does not authenticate under its data key: it was altered, or "
                             "sealed for another owner or position") from None


def _siv(key: bytes):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV

    return AESGCMSIV(key)


def seal_deterministic(key: bytes, plaintext: bytes, context: bytes) -> bytes:
    """nonce || AES-256-GCM-SIV ciphertext and tag; the nonce is derived from ``context``,
    which also is the associated data (same key, context and plaintext: same bytes)."""
    nonce = domain_hash("memstream.datakey.siv-nonce.v1", context)[:NONCE_BYTES]
    return nonce + _siv(key).encrypt(nonce, plaintext, context)


def unseal_deterministic(key: bytes, sealed: bytes, context: bytes) -> bytes:
    from cryptography.exceptions import InvalidTag

    try:
        return _siv(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], context)
    except InvalidTag:
        raise IntegrityError("sealed tokens do not authenticate under their data key and context") from None


class MasterKey:
    """The key that wraps data keys where they are stored. Its file holds 32 random bytes in
    hex and must be readable by its owner only."""

    def __init__(self, raw: bytes):
        if len(raw) != KEY_BYTES:
            raise ConfigError(f"a master key has {KEY_BYTES} bytes, got {len(raw)}")
        self._raw = raw
        self.key_id = domain_hash("memstream.datakey.master.v1", raw)[:8].hex()

    @classmethod
    def generate(cls) -> "MasterKey":
        return cls(os.urandom(KEY_BYTES))

    @classmethod
    def from_file(cls, path: str | Path) -> "MasterKey":
        path = Path(path)
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise ConfigError(f"no master key file at {path}: make one with `memstream keys new --role master "
                              f"--out {path}`") from None
        if mode & 0o077:
            raise ConfigError(f"the master key file {path} is readable by others (mode {mode & 0o777:o}): "
                              f"restrict it with `chmod 600 {path}`")
        try:
            return cls(bytes.fromhex(path.read_text().strip()))
        except ValueError:
            raise ConfigError(f"{path} is not a master key file (64 hex digits)") from None

    def write(self, path: str | Path) -> Path:
        """Write the key file with mode 0600; never overwrites an existing file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self._raw.hex() + "\n")
        return path

    def wrap(self, key_id: bytes, data_key: bytes) -> bytes:
        return seal(self._raw, data_key, b"memstream.datakey.wrap.v1" + key_id)

    def unwrap(self, key_id: bytes, wrapped: bytes) -> bytes:
        return unseal(self._raw, wrapped, b"memstream.datakey.wrap.v1" + key_id)

    def __repr__(self) -> str:
        return f"MasterKey({self.key_id})"

    def __reduce__(self):
        raise TypeError("a MasterKey is not pickled: pass its file path to the workers instead")
