"""Objects under a store root, a local folder or ``s3://bucket/prefix``: conditional puts (the
lock primitive of :mod:`~memstream.storage.lease`), reads, deletes and listings, and walks
over every object (what the erasure scan reads)."""

from __future__ import annotations

import html
import os
import re
import threading
from pathlib import Path
from typing import Iterator, Protocol
from urllib.parse import quote, urlencode

from memstream.errors import ConfigError, ServiceError
from memstream.storage.s3 import REGION, S3Config, s3_request


class ObjectStore(Protocol):
    def put_if_absent(self, key: str, body: bytes) -> bool: ...
    def put(self, key: str, body: bytes) -> None: ...
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

    def put(self, key: str, body: bytes) -> None:
        """Replace ``key`` whole: readers see the old body or the new one, never a part."""
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(body)
        os.replace(tmp, path)

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
        # Dot files are the temporaries of put(), renamed into place.
        return [f"{prefix.rstrip('/')}/{p.name}" for p in folder.iterdir()
                if p.is_file() and not p.name.startswith(".")]


class S3Objects:
    """Conditional put, get, delete and list on an S3 store that honours ``If-None-Match``."""

    def __init__(self, uri: str, storage_options: dict[str, str]):
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

    def put(self, key: str, body: bytes) -> None:
        status, text = self._request("PUT", key, body)
        if status not in (200, 201):
            raise ServiceError(f"S3 PUT {key} answered {status}: {text[:200]!r}")

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
        full = f"{self.prefix}/{prefix}".lstrip("/").rstrip("/") + "/"
        keys, token = [], None
        while True:  # a listing answers at most 1,000 keys: follow the continuation tokens
            status, body = self._request_list(full, token)
            if status != 200:
                raise ServiceError(f"S3 LIST {full} answered {status}: {body[:200]!r}")
            keys += re.findall(rb"<Key>([^<]+)</Key>", body)
            more = re.search(rb"<NextContinuationToken>([^<]+)</NextContinuationToken>", body)
            if b"<IsTruncated>true</IsTruncated>" not in body or more is None:
                break
            token = html.unescape(more.group(1).decode())
        return [html.unescape(k.decode())[len(self.prefix) + 1 if self.prefix else 0:] for k in keys]

    def _request_list(self, full_prefix: str, token: str | None = None) -> tuple[int, bytes]:
        query = f"list-type=2&prefix={quote(full_prefix, safe='')}"
        if token is not None:
            query += f"&continuation-token={quote(token, safe='')}"
        return s3_request(self.cfg, "GET", f"/{self.cfg.bucket}?{query}")


def object_store(uri: str, storage_options: dict[str, str] | None) -> ObjectStore:
    if uri.startswith("s3://"):
        return S3Objects(uri, storage_options or {})
    if "://" in uri and not uri.startswith("file://"):
        raise ConfigError(f"unsupported storage URI {uri!r}: use a local folder or s3://bucket/prefix")
    return LocalObjects(uri.removeprefix("file://"))


def iter_objects(uri: str, storage_options: dict[str, str] | None = None) -> Iterator[tuple[str, int]]:
    """(path or key, size) of every object under ``uri``: a local folder or s3://bucket/prefix."""
    if uri.startswith("s3://"):
        yield from _s3_objects(uri, storage_options or {})
        return
    if "://" in uri and not uri.startswith("file://"):
        raise ConfigError(f"unsupported storage URI {uri!r}: use a local folder or s3://bucket/prefix")
    root = Path(uri.removeprefix("file://"))
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            yield str(p), p.stat().st_size


def read_object(uri: str, key: str, storage_options: dict[str, str] | None = None) -> bytes:
    if not uri.startswith("s3://"):
        return Path(key).read_bytes()
    bucket = uri[len("s3://"):].partition("/")[0]
    status, body = s3_request(_s3_config(storage_options or {}, bucket), "GET",
                              f"/{bucket}/{quote(key, safe='/-_.~')}")
    if status != 200:
        raise ServiceError(f"S3 GET {key} answered {status}: {body[:200]!r}")
    return body


def _s3_config(options: dict[str, str], bucket: str):
    try:
        return S3Config(options["aws_endpoint"], bucket, options["aws_access_key_id"],
                        options["aws_secret_access_key"], options.get("aws_region", REGION))
    except KeyError as e:
        raise ConfigError(f"storage options lack {e}: pass S3Config.storage_options()") from None


def _s3_objects(uri: str, options: dict[str, str]) -> Iterator[tuple[str, int]]:
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    cfg = _s3_config(options, bucket)
    prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
    token = None
    while True:
        query = {"list-type": "2", "prefix": prefix, **({"continuation-token": token} if token else {})}
        status, body = s3_request(cfg, "GET", f"/{bucket}?{urlencode(query)}")
        if status != 200:
            raise ServiceError(f"S3 LIST {uri} answered {status}: {body[:200]!r}")
        for block in re.findall(rb"<Contents>(.*?)</Contents>", body, re.S):
            key = re.search(rb"<Key>([^<]+)</Key>", block).group(1).decode()
            size = int(re.search(rb"<Size>(\d+)</Size>", block).group(1))
            yield key.replace("&amp;", "&"), size
        m = re.search(rb"<NextContinuationToken>([^<]+)</NextContinuationToken>", body)
        if not re.search(rb"<IsTruncated>true</IsTruncated>", body) or not m:
            return
        token = m.group(1).decode()
