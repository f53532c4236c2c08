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


def erase_deleted(table, delete_unverified: bool = False) -> None:
    """Make a table's deletes physical: rewrite every fragment with deleted rows, then drop
    every old version (a delete alone leaves the rows in data files and old versions).
    ``delete_unverified`` also removes files no version names; only safe with writers
    excluded (it corrupted tables that other processes appended to)."""
    table.to_lance().optimize.compact_files(materialize_deletions_threshold=0.0)
    table.checkout_latest()
    table.to_lance().cleanup_old_versions(older_than=timedelta(0), delete_unverified=delete_unverified)
    table.checkout_latest()
