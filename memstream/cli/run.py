"""``memstream run``: the episodic pipeline, Kafka -> windows of 4,096 latents -> signed summaries."""

from __future__ import annotations

import sys
import time

from memstream.cli import common
from memstream.infra import runners
from memstream.infra.stack import Stack
from memstream.settings import BATCH_SIZE, DEADLETTER_TOPIC, HORIZON, LATENTS_TOPIC, SUMMARIES_TOPIC


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
    p.add_argument("--runner", choices=["prism", "flink"], default=None, help="default: prism")
    p.add_argument("--job-endpoint", help="Flink job server (default: the local stack's)")
    p.add_argument("--latents-topic", default=None, help=f"default: {LATENTS_TOPIC}")
    p.add_argument("--summaries-topic", default=None, help=f"default: {SUMMARIES_TOPIC}")
    p.add_argument("--deadletter-topic", default=None, help=f"default: {DEADLETTER_TOPIC}")
    p.add_argument("--until-idle", action="store_true",
                   help="bounded mode: stop once the topic is drained up to its end at start-up")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from memstream.pipelines.episodic import EpisodicConfig, run

    s = common.settings()
    uri, options = common.episodic(args)
    config = EpisodicConfig(
        bootstrap=common.bootstrap(args), store_uri=uri, storage_options=options, key_file=args.key_file,
        key_env=args.key_env, checkpoint=args.checkpoint or s.pipeline.checkpoint,
        device=args.device or s.pipeline.device, batch_size=args.batch_size or s.pipeline.batch_size,
        horizon=args.horizon or s.episodic.horizon, until_idle=args.until_idle,
        latents_topic=args.latents_topic or s.kafka.latents_topic,
        summaries_topic=args.summaries_topic or s.kafka.summaries_topic,
        deadletter_topic=args.deadletter_topic or s.kafka.deadletter_topic)
    config.signing_key()  # fail now, not inside a worker, when the key is missing
    if (args.runner or s.pipeline.runner) == "flink":
        runner_args = runners.flink_options(args.job_endpoint or Stack().flink_job_endpoint(),
                                            streaming=not args.until_idle, extra=["--parallelism=1"])
    else:
        runner_args = runners.prism_options(streaming=not args.until_idle)
    started = time.monotonic()
    run(config, runner_args)
    print(f"pipeline finished in {time.monotonic() - started:.1f}s", file=sys.stderr)
    return 0
