"""``memstream run``: the episodic pipeline, Kafka -> windows of 4,096 latents -> signed summaries."""

from __future__ import annotations

import logging
import sys
import time

from memstream.cli import common
from memstream.infra import runners
from memstream.infra.stack import Stack
from memstream.settings import (BATCH_SIZE, DEADLETTER_TOPIC, HORIZON, IDLE_TIMEOUT_S, LATENTS_TOPIC, PIPELINE_GROUP,
                                SUMMARIES_TOPIC)

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("run", help="run the episodic pipeline: Kafka -> windows of 4,096 -> signed summaries")
    common.add_bootstrap(p)
    common.add_episodic(p)
    common.add_signing_key(p, "validator")
    p.add_argument("--checkpoint", help="compressor checkpoint (default: the committed one)")
    p.add_argument("--device", default=None, help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--batch-size", type=int, default=None, help=f"windows per operator call (default {BATCH_SIZE})")
    p.add_argument("--horizon", type=int, default=None, help=f"summaries kept per session in the store "
                                                             f"(default {HORIZON})")
    p.add_argument("--group", default=None, help=f"the consumer group whose offsets it commits "
                                                 f"(default {PIPELINE_GROUP}); one group, one pipeline")
    p.add_argument("--start", choices=["committed", "earliest", "latest"], default="committed",
                   help="where to read from: the group's committed offsets (default; the earliest when none), "
                        "or the start or end of the topic")
    p.add_argument("--idle-timeout", type=float, default=None,
                   help=f"seconds of event time without a latent after which a session's open window closes "
                        f"(default {IDLE_TIMEOUT_S:g})")
    p.add_argument("--discover-seconds", type=float, default=30.0,
                   help="how often a streaming run looks for new partitions of the latents topic")
    p.add_argument("--runner", choices=["prism", "flink"], default=None, help="default: prism")
    p.add_argument("--job-endpoint", help="Flink job server (default: the local stack's)")
    p.add_argument("--parallelism", type=int, default=None, help="Flink: parallelism of the job (default 2)")
    p.add_argument("--checkpoint-interval-ms", type=int, default=5000,
                   help="Flink: interval of its checkpoints of keyed state and offsets")
    p.add_argument("--environment", default=None, metavar="TYPE[=CONFIG]",
                   help="Beam SDK harness environment, e.g. EXTERNAL=127.0.0.1:50000 for a worker pool "
                        "(default LOOPBACK)")
    p.add_argument("--runner-option", action="append", default=[], metavar="--NAME=VALUE",
                   help="another Beam or runner option, passed through as is; repeat")
    p.add_argument("--latents-topic", default=None, help=f"default: {LATENTS_TOPIC}")
    p.add_argument("--summaries-topic", default=None, help=f"default: {SUMMARIES_TOPIC}")
    p.add_argument("--deadletter-topic", default=None, help=f"default: {DEADLETTER_TOPIC}")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on 127.0.0.1:PORT (lag per partition, windows, dead letters, "
                        "operator and sink latency)")
    p.add_argument("--master-key-file", default=None,
                   help="the master key (`memstream keys new --role master`) that unlocks the store's key table: "
                        "sealed chunks are opened and summary tokens sealed under each session's data key")
    p.add_argument("--until-idle", action="store_true",
                   help="bounded mode: stop once the topic is drained up to its end at start-up")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from memstream.pipelines.episodic import EpisodicConfig, run
    from memstream.pipelines.metrics import MetricsServer

    s = common.settings()
    uri, options = common.episodic(args)
    config = EpisodicConfig(
        bootstrap=common.bootstrap(args), security=common.kafka_security(args), store_uri=uri,
        storage_options=options, key_file=args.key_file,
        key_env=args.key_env, checkpoint=args.checkpoint or s.pipeline.checkpoint,
        device=args.device or s.pipeline.device, batch_size=args.batch_size or s.pipeline.batch_size,
        horizon=args.horizon or s.episodic.horizon, until_idle=args.until_idle, start=args.start,
        group=args.group or s.pipeline.group, idle_timeout_s=args.idle_timeout or s.pipeline.idle_timeout_s,
        discover_s=args.discover_seconds, master_key_file=args.master_key_file,
        latents_topic=args.latents_topic or s.kafka.latents_topic,
        summaries_topic=args.summaries_topic or s.kafka.summaries_topic,
        deadletter_topic=args.deadletter_topic or s.kafka.deadletter_topic)
    config.signing_key()  # fail now, not inside a worker, when the key is missing
    config.data_keys()
    streaming = not args.until_idle
    extra = list(args.runner_option)
    if args.environment:
        kind, _, env_config = args.environment.partition("=")
        extra += [f"--environment_type={kind}", *([f"--environment_config={env_config}"] if env_config else [])]
    if (args.runner or s.pipeline.runner) == "flink":
        runner_args = runners.flink_options(args.job_endpoint or Stack().flink_job_endpoint(), streaming=streaming,
                                            parallelism=args.parallelism or 2,
                                            checkpoint_interval_ms=args.checkpoint_interval_ms, extra=extra)
    else:
        runner_args = runners.prism_options(streaming=streaming, extra=extra)
    server = MetricsServer(config, args.metrics_port) if args.metrics_port is not None else None
    started = time.monotonic()
    try:
        run(config, runner_args, on_started=server.watch if server else None)
    finally:
        if server:
            server.close()
    print(f"pipeline finished in {time.monotonic() - started:.1f}s", file=sys.stderr)
    return 0
