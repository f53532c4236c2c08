"""One way to open a LanceDB database, for every store memstream keeps.

- ``s3://`` needs explicit storage options with an endpoint: without them the AWS default
  chain would try the cloud instance-metadata address, which memstream never does.
- ``read_consistency_interval=0``: several processes write these tables, so every read sees
  the latest commit of any of them.
"""

from __future__ import annotations

from datetime import timedelta

from memstream.errors import ConfigError


def connect(uri: str, storage_options: dict[str, str] | None = None):
    import lancedb

    if uri.startswith("s3://") and not (storage_options or {}).get("aws_endpoint"):
        raise ConfigError(f"{uri}: pass storage_options with explicit credentials and endpoint "
                          "(S3Config.storage_options()); memstream never falls back to the cloud "
                          "metadata service")
    return lancedb.connect(uri, storage_options=storage_options or None, read_consistency_interval=timedelta(0))


def quote(value: str) -> str:
    """``value`` as an SQL string literal for a LanceDB filter."""
    return "'" + value.replace("'", "''") + "'"
