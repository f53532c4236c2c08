"""``memstream run`` (the episodic pipeline) and ``memstream verify chain``."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone


def register(sub) -> None:
    run = sub.add_parser("run", help="run the episodic pipeline: Kafka -> windows of 4,096 -> signed summaries")
    run.add_argument("--bootstrap", help="Kafka bootstrap servers (default: the local stack's broker)")
    add_store_args(run)
    run.add_argument("--key-file", help="the validator's Ed25519 signing key (PEM, hex or base64)")
    run.add_argument("--key-env", help="...or the environment variable that holds it")
    run.add_argument("--checkpoint", help="compressor checkpoint (default: the committed one)")
    run.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    run.add_argument("--batch-size", type=int, default=16, help="windows per operator call")
    run.add_argument("--store-window", type=int, default=1220, help="summaries kept per session in the store")
    run.add_argument("--runner", choices=["prism", "flink"], default="prism")
    run.add_argument("--job-endpoint", help="Flink job server (default: the local stack's)")
    run.add_argument("--latents-topic", default=None, help="default: memstream.latents")
    run.add_argument("--summaries-topic", default=None, help="default: memstream.summaries")
    run.add_argument("--deadletter-topic", default=None, help="default: memstream.deadletter")
    run.add_argument("--until-idle", action="store_true",
                     help="bounded mode: stop once the topic is drained up to its end at start-up")
    run.set_defaults(func=_run)


def add_store_args(parser) -> None:
    parser.add_argument("--store", default=None,
                        help="episodic store: a folder (default $MEMSTREAM_CACHE/episodic) or s3://bucket/prefix")
    parser.add_argument("--s3-from-stack", action="store_true",
                        help="take the S3 endpoint and credentials of the local stack (for s3:// stores)")


def store_location(args) -> tuple[str, dict | None]:
    from memstream.infra import tools
    from memstream.infra.stack import Stack

    uri = args.store or str(tools.cache_dir("episodic"))
    options = Stack().s3_config().storage_options() if uri.startswith("s3://") and args.s3_from_stack else None
    return uri, options


def _run(args) -> int:
    from memstream.infra import runners
    from memstream.infra.stack import Stack
    from memstream.pipelines.episodic import EpisodicConfig, run

    uri, options = store_location(args)
    config = EpisodicConfig(
        bootstrap=args.bootstrap or Stack().kafka_bootstrap(), store_uri=uri, storage_options=options,
        key_file=args.key_file, key_env=args.key_env, checkpoint=args.checkpoint, device=args.device,
        batch_size=args.batch_size, store_window=args.store_window, until_idle=args.until_idle,
        **{f"{t}_topic": getattr(args, f"{t}_topic") for t in ("latents", "summaries", "deadletter")
           if getattr(args, f"{t}_topic")})
    config.signing_key()  # fail now, not inside a worker, when the key is missing
    if args.runner == "flink":
        runner_args = runners.flink_options(args.job_endpoint or Stack().flink_job_endpoint(),
                                            streaming=not args.until_idle, extra=["--parallelism=1"])
    else:
        runner_args = runners.prism_options(streaming=not args.until_idle)
    started = time.monotonic()
    run(config, runner_args)
    print(f"pipeline finished in {time.monotonic() - started:.1f}s", file=sys.stderr)
    return 0


def register_verify(verbs) -> None:
    chain = verbs.add_parser("chain", help="check a session's hash chain and signatures")
    chain.add_argument("--session", required=True)
    chain.add_argument("--at", help="reconstruct the chain head as of this time (ISO 8601 or epoch seconds)")
    chain.add_argument("--from", dest="source", choices=["kafka", "store"], default="kafka")
    chain.add_argument("--bootstrap", help="Kafka bootstrap servers (default: the local stack's broker)")
    chain.add_argument("--topic", default=None, help="summaries topic (default: memstream.summaries)")
    add_store_args(chain)
    chain.add_argument("--public-key", action="append", default=[],
                       help="a validator public key file (repeat for rotated keys)")
    chain.add_argument("--key-file", help="derive the public key from this signing key file")
    chain.add_argument("--json", action="store_true")
    chain.set_defaults(func=_verify_chain)


def _parse_time(text: str) -> int:
    try:
        return int(float(text) * 1_000_000)
    except ValueError:
        dt = datetime.fromisoformat(text)
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        return int(dt.timestamp() * 1_000_000)


def _verify_chain(args) -> int:
    from pathlib import Path

    from memstream.chain import head_at, verify_chain
    from memstream.crypto import KeyRing, SigningKey, VerifyKey
    from memstream.errors import ConfigError
    from memstream.infra.stack import Stack
    from memstream.pipelines.summaries import read_summaries

    ring = KeyRing(VerifyKey.parse(Path(p).read_bytes()) for p in args.public_key)
    if args.key_file:
        ring.add(SigningKey.from_file(args.key_file))
    if not len(ring):
        raise ConfigError("no public key to verify with: pass --public-key FILE (or --key-file)")
    if args.source == "kafka":
        records = read_summaries(args.bootstrap or Stack().kafka_bootstrap(), args.session,
                                 **({"topic": args.topic} if args.topic else {}))
    else:
        from memstream.episodic import EpisodicStore

        uri, options = store_location(args)
        records = EpisodicStore(uri, options).records(args.session)
    if args.at:
        cutoff = _parse_time(args.at)
        records = [r for r in records if r.processing_time_us <= cutoff]
    report = verify_chain(args.session, records, ring, anchored=args.source == "kafka" or
                          bool(records) and records[0].window_index == 0)
    head = head_at(records, _parse_time(args.at)) if args.at else None
    out = {"session": args.session, "source": args.source, "ok": report.ok, "records": report.records,
           "duplicates": report.duplicates, "first_window": report.first_index, "head_window": report.head_index,
           "head_hash": report.head_hash.hex(), "key_ids": sorted(report.key_ids),
           "fault": str(report.fault) if report.fault else None}
    if head is not None:
        out["head_at"] = {"time": args.at, "window": head.window_index, "hash": head.hash.hex()}
    if args.json:
        print(json.dumps(out, indent=2))
    elif report.ok:
        print(f"session {args.session}: {report.records} summaries verify "
              f"(windows {report.first_index}..{report.head_index}, head {report.head_hash.hex()[:16]}…)")
    else:
        print(f"session {args.session}: BROKEN at {report.fault}")
    return 0 if report.ok else 1
