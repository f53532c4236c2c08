"""S3 access without an SDK: where a store is (:class:`S3Config`) and SigV4-signed requests
(stdlib only), for conditional puts, listings and reads that LanceDB does not do for us.

LanceDB always gets an endpoint and credentials explicitly (:meth:`S3Config.storage_options`),
never the AWS default chain, which would probe the cloud instance-metadata address."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from dataclasses import dataclass

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
