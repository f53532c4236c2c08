"""Maintenance of the memory, as importable functions the Airflow DAGs in ``dags/`` call.

Every function takes explicit store locations and settings (nothing global), is safe to run
again after a crash or a retry (each one recomputes what is left to do from what the stores
hold), and returns a dict of counts that the DAG logs and passes on as its XCom.

* :mod:`memstream.maintenance.episodic`: decay of episodic summaries, session GC.
* :mod:`memstream.maintenance.longterm`: cold demotion, compaction and index maintenance,
  anchoring of signed tree heads.
* :mod:`memstream.maintenance.purge`: the forget purge and its proof of erasure
  (:mod:`memstream.maintenance.scan`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from memstream.crypto.keys import KeyRing, SigningKey, VerifyKey
from memstream.errors import ConfigError


def signing_key(key_env: str | None = None, key_file: str | None = None, role: str = "maintenance") -> SigningKey:
    """A signing key from a key file or an environment variable (never from a DAG's run
    configuration): by default the maintenance key, which signs GC and consolidation records
    and purge attestations; ``role="validator"`` for the key that signs long-term entries and
    tree heads (consolidation writes entries)."""
    if key_file:
        return SigningKey.from_file(key_file, role=role)
    if key_env:
        return SigningKey.from_env(key_env, role=role)
    prefix = "" if role == "maintenance" else f"{role}_"
    raise ConfigError(f"no {role} signing key: set the {prefix}key_file or {prefix}key_env Param")


def open_witness(uri: str, storage_options: dict[str, str] | None = None, *, log_keys: KeyRing,
                 key_env: str | None = None, key_file: str | None = None):
    """The witness at ``uri`` (its own folder or bucket), with its key of role ``witness``
    from a key file or an environment variable; ``log_keys`` are the validator public keys."""
    from memstream.witness import Witness

    if key_file:
        key = SigningKey.from_file(key_file, role="witness")
    elif key_env:
        key = SigningKey.from_env(key_env)
    else:
        raise ConfigError("no witness key: set witness_key_file or witness_key_env (make one with "
                          "`memstream keys new --role witness`)")
    return Witness(uri, storage_options, key=key, log_keys=log_keys)


def storage_options(options: dict | None = None, options_env: str | None = None) -> dict[str, str] | None:
    """Storage options given directly, or as JSON in an environment variable (which keeps
    credentials out of Airflow's metadata database)."""
    if options_env:
        raw = os.environ.get(options_env)
        if not raw:
            raise ConfigError(f"environment variable {options_env} (storage options as JSON) is not set")
        try:
            options = json.loads(raw)
        except ValueError as e:
            raise ConfigError(f"{options_env} does not hold a JSON object of storage options: {e}") from None
    if not options:
        return None
    return {str(k): str(v) for k, v in dict(options).items()}


def keyring(keys: list[str] | tuple[str, ...] = (), signer: SigningKey | None = None) -> KeyRing:
    """A key ring of validator public keys, each a file (PEM, hex or base64) or the key text."""
    ring = KeyRing()
    for text in keys:
        path = Path(text)
        ring.add(VerifyKey.parse(path.read_bytes() if path.is_file() else text))
    if signer is not None:
        ring.add(signer)
    return ring
