"""Ed25519 keys (``cryptography``) and a key ring of public keys by key id.

Key ids (:attr:`VerifyKey.key_id`): the first 32 hex digits (128 bits) of SHA-256 over the
raw 32-byte Ed25519 public key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path
from typing import Iterable, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from memstream.errors import ConfigError, KeyPermissionError, KeyRoleError, SignatureError

KEY_ID_HEX_CHARS = 32
# What a key may sign. A key file names its role, and memstream refuses a key for another role.
ROLES = ("validator", "governance", "maintenance", "witness")
_ROLE_LINE = b"memstream-role: "


class VerifyKey:
    """An Ed25519 public key."""

    __slots__ = ("_key", "raw", "key_id")

    def __init__(self, raw: bytes):
        if len(raw) != 32:
            raise ConfigError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
        self.raw = bytes(raw)
        self._key = Ed25519PublicKey.from_public_bytes(self.raw)
        self.key_id = hashlib.sha256(self.raw).hexdigest()[:KEY_ID_HEX_CHARS]

    @classmethod
    def parse(cls, text: str | bytes) -> "VerifyKey":
        """A public key as PEM, or as the raw 32 bytes in hex or base64."""
        data = text.encode() if isinstance(text, str) else bytes(text)
        if b"-----BEGIN" in data:
            key = serialization.load_pem_public_key(data)
            if not isinstance(key, Ed25519PublicKey):
                raise ConfigError("the PEM public key is not Ed25519")
            return cls(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
        return cls(_raw32(data.strip(), "public key"))

    def verify(self, signature: bytes, message: bytes) -> None:
        """Raise :class:`SignatureError` unless ``signature`` is this key's over ``message``."""
        try:
            self._key.verify(bytes(signature), message)
        except InvalidSignature:
            raise SignatureError(f"signature does not verify under key {self.key_id}") from None

    def hex(self) -> str:
        return self.raw.hex()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"VerifyKey(key_id={self.key_id!r})"


class SigningKey:
    """An Ed25519 private key. Its bytes never appear in ``repr``, ``str`` or logs. ``role``
    is the role it was loaded for (its key file's, or the one asked for), None when unknown."""

    __slots__ = ("_key", "verify_key", "role")

    def __init__(self, key: Ed25519PrivateKey, role: str | None = None):
        self._key = key
        self.role = role
        self.verify_key = VerifyKey(key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw))

    @classmethod
    def generate(cls) -> "SigningKey":
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def parse(cls, text: str | bytes) -> "SigningKey":
        """A private key as PKCS#8 PEM, or as the raw 32-byte seed in hex or base64."""
        data = text.encode() if isinstance(text, str) else bytes(text)
        if b"-----BEGIN" in data:
            try:
                key = serialization.load_pem_private_key(data, password=None)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"cannot read the PEM private key: {e}") from None
            if not isinstance(key, Ed25519PrivateKey):
                raise ConfigError("the PEM private key is not Ed25519: generate one with SigningKey.generate()")
            return cls(key)
        return cls(Ed25519PrivateKey.from_private_bytes(_raw32(data.strip(), "private key")))

    @classmethod
    def from_file(cls, path: str | Path, role: str | None = None) -> "SigningKey":
        """The key in ``path`` (a file ``memstream keys new`` wrote, or a bare PEM/hex/base64
        key). Refused when others than its owner may read it, or when it names another role."""
        path = Path(path)
        try:
            mode = path.stat().st_mode
            data = path.read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read the signing key file {path}: {e.strerror}") from None
        if mode & 0o077:
            raise KeyPermissionError(f"the signing key file {path} is open to its group or others (mode "
                                     f"{mode & 0o777:o}): restrict it with `chmod 600 {path}`")
        stated = key_file_role(data)
        if role is not None and stated is not None and stated != role:
            raise KeyRoleError(f"{path} holds a {stated} key; this needs a {role} key (roles never share a key)")
        key = cls.parse(data)
        key.role = stated or role
        return key

    @classmethod
    def from_env(cls, var: str, role: str | None = None) -> "SigningKey":
        value = os.environ.get(var)
        if not value:
            raise ConfigError(f"environment variable {var} is not set: put an Ed25519 key (PEM, hex or base64) in it")
        stated = key_file_role(value.encode())
        if role is not None and stated is not None and stated != role:
            raise KeyRoleError(f"{var} holds a {stated} key; this needs a {role} key (roles never share a key)")
        key = cls.parse(value)
        key.role = stated or role
        return key

    @property
    def key_id(self) -> str:
        return self.verify_key.key_id

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def private_pem(self) -> bytes:
        """PKCS#8 PEM, for writing a key file (mode 0600 is the caller's job)."""
        return self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())

    def __repr__(self) -> str:
        return f"SigningKey(key_id={self.key_id!r}, private=<redacted>)"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("SigningKey is not picklable: load it from its file or env var in each process")


def _raw32(data: bytes, what: str) -> bytes:
    text = data.decode("ascii", errors="replace")
    if len(text) == 64:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error:
        raw = b""
    if len(raw) != 32:
        raise ConfigError(f"an Ed25519 {what} must be PEM, or 32 bytes as 64 hex digits or base64")
    return raw


class KeyRing:
    """Public keys by key id. Rotation adds a key and keeps the old ones, so signatures made
    before a rotation still verify; retiring a key is removing it."""

    def __init__(self, keys: Iterable[VerifyKey | SigningKey] = ()):
        self._keys: dict[str, VerifyKey] = {}
        for k in keys:
            self.add(k)

    def add(self, key: VerifyKey | SigningKey) -> str:
        vk = key.verify_key if isinstance(key, SigningKey) else key
        self._keys[vk.key_id] = vk
        return vk.key_id

    def remove(self, key_id: str) -> None:
        self._keys.pop(key_id, None)

    def get(self, key_id: str) -> VerifyKey:
        try:
            return self._keys[key_id]
        except KeyError:
            raise SignatureError(f"unknown key id {key_id!r}: add its public key to the key ring") from None

    def verify(self, key_id: str, signature: bytes, message: bytes) -> None:
        self.get(key_id).verify(signature, message)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self):
        return iter(self._keys.values())

    def __repr__(self) -> str:
        return f"KeyRing({sorted(self._keys)})"


def key_file_role(data: bytes) -> str | None:
    """The role a key file states (``memstream-role: <role>``), or None for a bare key."""
    for line in data.splitlines():
        if line.startswith(_ROLE_LINE):
            return line[len(_ROLE_LINE):].strip().decode("ascii", errors="replace")
    return None


def write_key_file(path: str | Path, key: SigningKey, role: str) -> Path:
    """Write ``key`` for ``role`` as PKCS#8 PEM behind a role line, readable by its owner only."""
    if role not in ROLES:
        raise KeyRoleError(f"unknown key role {role!r}: choose one of {', '.join(ROLES)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = (f"# memstream {role} key (Ed25519), key id {key.key_id}\n".encode() + _ROLE_LINE + role.encode()
            + b"\n" + key.private_pem())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never widen an existing file
    with os.fdopen(fd, "wb") as f:
        f.write(body)
    return path


def check_distinct_roles(roles: Mapping[str, Iterable["VerifyKey | SigningKey"] | None]) -> None:
    """Refuse one key in two roles (``{"validator": ring, "governance": ring, ...}``): a
    validator key that is also a governance key would let one holder both write and approve
    removals, and M-of-N would count it twice over. A key file states its role; a bare key,
    or the same key under two files, is caught here, where the roles meet."""
    seen: dict[str, str] = {}
    for role, keys in roles.items():
        if role not in ROLES:
            raise ConfigError(f"unknown key role {role!r}: choose one of {', '.join(ROLES)}")
        for key in keys or ():
            vk = key.verify_key if isinstance(key, SigningKey) else key
            other = seen.setdefault(vk.key_id, role)
            if other != role:
                raise KeyRoleError(f"key {vk.key_id} is configured as both a {other} key and a {role} key: roles "
                                  f"never share a key; make a {role} key with `memstream keys new --role {role}`")
