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
from pathlib import Path
from typing import Iterator, Protocol
from urllib.parse import quote

from memstream.errors import ConfigError, LeaseError, ServiceError


class ObjectStore(Protocol):
    def put_if_absent(self, key: str, body: bytes) -> bool: ...
    def get(self, key: str) -> bytes | None: ...
    def delete(self, key: str) -> None: ...
    def list(self, prefix: str) -> list[str]: ...


class LocalObjects:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def put_if_absent(self, key: str, body: bytes) -> bool:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        return True

    def get(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        try:
            (self.root / key).unlink()
        except FileNotFoundError:
            pass

    def list(self, prefix: str) -> list[str]:
        folder = self.root / prefix
        if not folder.is_dir():
            return []
        return [f"{prefix.rstrip('/')}/{p.name}" for p in folder.iterdir() if p.is_file()]


class S3Objects:
    """Conditional put, get, delete and list on an S3 store that honours ``If-None-Match``."""

    def __init__(self, uri: str, storage_options: dict[str, str]):
        from memstream.infra.s3 import REGION, S3Config

        bucket, _, prefix = uri[len("s3://"):].partition("/")
        try:
            self.cfg = S3Config(storage_options["aws_endpoint"], bucket, storage_options["aws_access_key_id"],
                                storage_options["aws_secret_access_key"],
                                storage_options.get("aws_region", REGION))
        except KeyError as e:
            raise ConfigError(f"storage_options for {uri} lack {e}: pass S3Config.storage_options()") from None
        self.prefix = prefix.strip("/")

    def _path(self, key: str) -> str:
        return f"/{self.cfg.bucket}/{quote(f'{self.prefix}/{key}'.lstrip('/'), safe='/-_.~')}"

    def _request(self, method: str, key: str, body: bytes = b"", headers=None) -> tuple[int, bytes]:
        from memstream.infra.s3 import s3_request

        try:
            return s3_request(self.cfg, method, self._path(key), body, headers)
        except OSError as e:
            raise ServiceError(f"S3 {method} {key} at {self.cfg.endpoint} failed: {e}") from None

    def put_if_absent(self, key: str, body: bytes) -> bool:
        status, text = self._request("PUT", key, body, {"if-none-match": "*"})
        if status in (200, 201):
            return True
        if status in (409, 412):
            return False
        raise ServiceError(f"S3 conditional PUT {key} answered {status}: {text[:200]!r}")

    def get(self, key: str) -> bytes | None:
        status, body = self._request("GET", key)
        if status == 404:
            return None
        if status != 200:
            raise ServiceError(f"S3 GET {key} answered {status}: {body[:200]!r}")
        return body

    def delete(self, key: str) -> None:
        status, body = self._request("DELETE", key)
        if status not in (200, 204, 404):
            raise ServiceError(f"S3 DELETE {key} answered {status}: {body[:200]!r}")

    def list(self, prefix: str) -> list[str]:
        import re

        full = f"{self.prefix}/{prefix}".lstrip("/").rstrip("/") + "/"
        status, body = self._request_list(full)
        if status != 200:
            raise ServiceError(f"S3 LIST {full} answered {status}: {body[:200]!r}")
        keys = re.findall(rb"<Key>([^<]+)</Key>", body)
        return [k.decode()[len(self.prefix) + 1 if self.prefix else 0:] for k in keys]

    def _request_list(self, full_prefix: str) -> tuple[int, bytes]:
        from memstream.infra.s3 import s3_request

        return s3_request(self.cfg, "GET", f"/{self.cfg.bucket}?list-type=2&prefix={quote(full_prefix, safe='')}")


def object_store(uri: str, storage_options: dict[str, str] | None) -> ObjectStore:
    if uri.startswith("s3://"):
        return S3Objects(uri, storage_options or {})
    if "://" in uri and not uri.startswith("file://"):
        raise ConfigError(f"unsupported storage URI {uri!r}: use a local folder or s3://bucket/prefix")
    return LocalObjects(uri.removeprefix("file://"))


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
