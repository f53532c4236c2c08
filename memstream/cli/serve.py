"""``memstream serve``: the read API over HTTP on 127.0.0.1, every read authenticated and
authorized against the access registry unless ``--insecure-no-auth`` says otherwise."""

from __future__ import annotations

import logging

from memstream.cli import access, common
from memstream.errors import ConfigError
from memstream.settings import HOST, LEDGER_FLUSH_EVERY, SERVE_PORT

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the read API over HTTP (FastAPI, OpenAPI at /openapi.json)")
    common.add_episodic(p)
    p.add_argument("--longterm", default=None, help="long-term store root (a folder or s3://bucket/prefix)")
    common.add_public_keys(p)
    p.add_argument("--include-cold", action="store_true", help="long-term reads search the cold tier too")
    p.add_argument("--replica-store", default=None, help="episodic store of a replica to sample reads against")
    p.add_argument("--replica-longterm", default=None, help="long-term store of that replica")
    p.add_argument("--sample-rate", type=float, default=0.0, help="fraction of reads executed on the replica too")
    common.add_bootstrap(p)
    p.add_argument("--flush-every", type=int, default=LEDGER_FLUSH_EVERY, help="reads per append to the read ledger")
    p.add_argument("--master-key-file", default=None,
                   help="the master key of the store's key table: reads open summary tokens sealed under each "
                        "session's data key (`memstream run --master-key-file`)")
    p.add_argument("--host", default=HOST, help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=SERVE_PORT)
    access.add_access(p)
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="serve without authentication: anyone who reaches the port reads every session "
                        "(and drives its decay); for a closed test setup only")
    p.add_argument("--workers", type=int, default=None,
                   help="threads that run reads (default: the read.workers setting, MEMSTREAM_READ_WORKERS)")
    p.set_defaults(func=_serve)


def _serve(args) -> int:
    import os

    import torch
    import uvicorn

    from memstream.read.http import create_app
    from memstream.read.memory import Memory

    uri, options = common.episodic(args)
    keyring = common.keyring(args.public_key) if args.public_key else None
    read = common.settings().read
    reading = {"cache_bytes": read.cache_bytes, "mode": read.mode, "groups": read.groups,
               "probe_groups": read.probe_groups, "candidates": read.candidates}
    replica = None
    if args.replica_store:  # read as the primary reads, so that a divergence means different data
        replica = Memory(args.replica_store, args.replica_longterm, storage_options=options,
                         longterm_storage_options=options, keyring=keyring, include_cold=args.include_cold, **reading)
    bootstrap = common.bootstrap(args) if args.sample_rate > 0 else None
    keys = None
    if args.master_key_file:
        from memstream.storage.keytable import KeyTable

        keys = KeyTable.open(uri, options, args.master_key_file)
    if args.port < 0 or args.port > 65535:
        raise ConfigError(f"--port must be 0..65535, got {args.port}")
    memory = Memory(uri, args.longterm, storage_options=options, longterm_storage_options=options, keyring=keyring,
                    include_cold=args.include_cold, replica=replica, sample_rate=args.sample_rate,
                    kafka_bootstrap=bootstrap, kafka_security=common.kafka_security(args) if bootstrap else None,
                    flush_every=args.flush_every, keys=keys, **reading)
    guard = None
    if args.insecure_no_auth:
        log.warning("--insecure-no-auth: the read API on %s:%d answers anyone, for every session", args.host,
                    args.port)
    else:
        from memstream.access.registry import AccessGuard

        reg = access.registry(args)
        guard = AccessGuard(reg, read.access_refresh_s)
        if not guard.grants.credentials:
            log.warning("the access registry %s holds no credentials yet: every read will get 401; issue one with "
                        "`memstream credentials issue --tenant <tenant>`", reg.uri)
    workers = args.workers or read.workers
    # Reads run side by side on the worker threads: each gets a share of the cores for torch.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    log.info("serving %s (long-term %s) on http://%s:%d with %d read threads", uri, args.longterm, args.host,
             args.port, workers)
    uvicorn.run(create_app(memory, workers, access=guard, insecure_no_auth=args.insecure_no_auth), host=args.host,
                port=args.port, log_level="warning")
    if replica is not None:
        replica.close()
    return 0
