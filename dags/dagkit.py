"""What the DAG files in ``dags/`` share: their Params (JSON-schema validated), assets and
defaults, and how a task turns its Params into store handles. Importing this module does no
work beyond building those objects; the stores are opened inside tasks only.

Defaults come from the environment at parse time (``MEMSTREAM_EPISODIC_URI``,
``MEMSTREAM_LONGTERM_URI``, ``MEMSTREAM_BOOTSTRAP``), else local folders under the memstream
cache, so that scheduled runs have valid Params; a triggered run overrides any of them.
Credentials never need to be in a run's configuration: ``storage_options_env`` names an
environment variable holding the storage options as JSON, and the signing keys are read from
the file or environment variable that ``key_file``/``key_env`` (the maintenance key) and
``validator_key_file``/``validator_key_env`` (the validator key, for DAGs that write long-term
entries) name. The two are distinct keys: a store refuses one key in both roles.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

from airflow.sdk import Asset, Param

from memstream.maintenance import signing_key, storage_options
from memstream.settings import Settings, cache_dir

START = datetime(2026, 1, 1, tzinfo=timezone.utc)
DEFAULT_ARGS = {"owner": "memstream", "retries": 2, "retry_delay": timedelta(minutes=1)}
TAGS = ["memstream", "maintenance"]

EPISODIC_STORE = Asset(name="memstream_episodic_store", uri="memstream://episodic/store")
LONGTERM_STORE = Asset(name="memstream_longterm_store", uri="memstream://longterm/store")

URI_PATTERN = r"^(s3://[a-z0-9][a-z0-9.\-]{1,62}(/.*)?|/.+|file:///.+)$"


def _uri(description: str, env: str, default_folder: str) -> Param:
    return Param(os.environ.get(env) or str(cache_dir() / "stores" / default_folder), type="string",
                 pattern=URI_PATTERN, description=description)


def episodic_uri() -> Param:
    return _uri("the episodic store: an absolute folder or s3://bucket/prefix", "MEMSTREAM_EPISODIC_URI", "episodic")


def longterm_uri() -> Param:
    return _uri("the long-term store root: an absolute folder or s3://bucket/prefix", "MEMSTREAM_LONGTERM_URI",
                "longterm")


def storage_params() -> dict[str, Param]:
    return {
        "storage_options": Param({}, type="object", additionalProperties={"type": "string"},
                                 description="LanceDB storage options (S3: endpoint, region, credentials, "
                                             "allow_http); prefer storage_options_env for credentials"),
        "storage_options_env": Param(None, type=["null", "string"], pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                     description="environment variable holding the storage options as JSON"),
    }


def dry_run() -> Param:
    return Param(False, type="boolean", description="compute and log what would change, change nothing")


def key_params() -> dict[str, Param]:
    return {
        "key_env": Param("MEMSTREAM_MAINTENANCE_KEY", type=["null", "string"], pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                         description="environment variable holding the maintenance Ed25519 signing key"),
        "key_file": Param(None, type=["null", "string"], minLength=1,
                          description="file holding the maintenance signing key (wins over key_env)"),
    }


def validator_key_params() -> dict[str, Param]:
    return {
        "validator_key_env": Param("MEMSTREAM_VALIDATOR_KEY", type=["null", "string"],
                                   pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                   description="environment variable holding the validator Ed25519 signing key, "
                                               "which signs long-term entries and tree heads"),
        "validator_key_file": Param(None, type=["null", "string"], minLength=1,
                                    description="file holding the validator signing key (wins over "
                                                "validator_key_env)"),
    }


def longterm_params() -> dict[str, Param]:
    return {
        "longterm_uri": longterm_uri(),
        "cold_uri": Param(None, type=["null", "string"], pattern=URI_PATTERN,
                          description="cold tier root (default: <longterm_uri>/cold)"),
        "validator_keys": Param([], type="array", items={"type": "string", "minLength": 1},
                                description="validator public keys (files, or hex/base64) whose signatures "
                                            "the store accepts"),
        "governance_keys": Param([], type="array", items={"type": "string", "minLength": 1},
                                 description="governance public keys (approved removals, forget requests)"),
        "governance_threshold": Param(None, type=["null", "integer"], minimum=1,
                                      description="M of the M-of-N governance policy (default: all keys)"),
        "lease_timeout_s": Param(300, type="number", minimum=1, maximum=3600,
                                 description="how long to wait for writers to leave before maintenance gives up"),
    }


def witness_params() -> dict[str, Param]:
    """Where the witness keeps what it cosigned and where its key is: its own folder or bucket
    and its own credentials, never the store's."""
    return {
        "witness_uri": Param(None, type=["null", "string"], pattern=URI_PATTERN,
                             description="the witness's root (its own folder or s3://bucket/prefix); "
                                         "null: no witness"),
        "witness_storage_options_env": Param(None, type=["null", "string"], pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                             description="environment variable holding the witness's storage "
                                                         "options as JSON (its own credentials)"),
        "witness_key_env": Param("MEMSTREAM_WITNESS_KEY", type=["null", "string"],
                                 pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                 description="environment variable holding the witness's Ed25519 signing key"),
        "witness_key_file": Param(None, type=["null", "string"], minLength=1,
                                  description="file holding the witness key (role witness; wins over "
                                              "witness_key_env)"),
    }


def master_key_param() -> dict[str, Param]:
    return {"master_key_file": Param(None, type=["null", "string"], minLength=1,
                                     description="the master key file (mode 0600) of the episodic store's key "
                                                 "table, which holds the sessions' and subjects' data keys")}


def bootstrap_param() -> Param:
    return Param(os.environ.get("MEMSTREAM_BOOTSTRAP"), type=["null", "string"], pattern=r"^[^\s,]+(,[^\s,]+)*$",
                 description="Kafka bootstrap servers (host:port,...); null: no Kafka")


# -- inside tasks --------------------------------------------------------------------------

def options(p) -> dict[str, str] | None:
    return storage_options(p.get("storage_options"), p.get("storage_options_env"))


def signer(p, required: bool = True, role: str = "maintenance"):
    """The maintenance key (``role="validator"``: the validator key) the Params name."""
    prefix = "" if role == "maintenance" else f"{role}_"
    file, env = p.get(f"{prefix}key_file"), p.get(f"{prefix}key_env")
    if not required and not (file or (env and os.environ.get(env))):
        return None
    return signing_key(env, file, role=role)


def witness(p, log_keys):
    """The witness the Params name, or None without ``witness_uri``."""
    if not p.get("witness_uri"):
        return None
    from memstream.maintenance import open_witness

    return open_witness(p["witness_uri"], storage_options(None, p.get("witness_storage_options_env")),
                        log_keys=log_keys, key_env=p.get("witness_key_env"), key_file=p.get("witness_key_file"))


def key_table(p, required: bool = False):
    """The episodic store's key table, unlocked by ``master_key_file``; None without it."""
    from memstream.errors import ConfigError
    from memstream.storage.keytable import KeyTable

    if not p.get("master_key_file"):
        if required:
            raise ConfigError("set the master_key_file Param: this task opens data keys of the store's key table")
        return None
    return KeyTable.open(p["episodic_uri"], options(p), p["master_key_file"])


def longterm_store(p, *, signer=None, maintenance=None, kafka: bool = False, keys=None):
    """The long-term store; ``signer`` the validator key that writes entries, ``maintenance``
    the maintenance key whose purge attestations it accepts, ``keys`` the key table that seals
    and opens subject-bound payloads."""
    # Stores load pyarrow and LanceDB: inside tasks only, so that parsing a DAG file stays cheap.
    from memstream.maintenance.longterm import open_store

    so = options(p)
    extra = {"tree_head_topic": p["attestations_topic"]} if kafka and p.get("attestations_topic") else {}
    return open_store(p["longterm_uri"], so, validator_keys=p.get("validator_keys") or (),
                      signer=signer, cold_uri=p.get("cold_uri"), cold_storage_options=so,
                      maintenance_keys=[maintenance] if maintenance is not None else (),
                      kafka_bootstrap=p.get("kafka_bootstrap") if kafka else None,
                      # SASL and TLS come from the worker's settings (memstream.toml, MEMSTREAM_KAFKA_*),
                      # never from a DAG run's params, which Airflow stores and shows
                      kafka_security=Settings.load().kafka.security if kafka else None,
                      governance_keys=p.get("governance_keys") or (),
                      governance_threshold=p.get("governance_threshold"), keys=keys,
                      **extra)
