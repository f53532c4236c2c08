"""Restart cost against history: an idle restart after 5x more history, against the one before it.

The pipeline commits, per partition, the oldest offset an open window still needs (Kafka
consumer-group offsets, in the transaction that stores its summaries), so a restart reads only
what is not yet settled. Its cost should not grow with the history behind it.

In one run, on the local Kafka:

1. publish ``--sessions`` sessions of ``--windows`` full windows each (plus an open tail, so
   an open window holds the commit back as in production), run ``memstream run --until-idle``
   to process them;
2. time ``--repeats`` idle restarts (``memstream run --until-idle``, nothing new to do): *before*;
3. publish 4x as many windows again (5x the history in all), process them, and time the idle
   restarts again: *after*.

The figure is median(after) / median(before); the target is at most 1.15. Every run is the
real CLI in a fresh process, so the runner's start-up is included, as a user would see it.
Results and the machine go to bench/results/recovery-<time>.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import common


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--windows", type=int, default=4, help="full windows per session before the first restart")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from memstream import topics
    from memstream.crypto import SigningKey
    from memstream.crypto.keys import write_key_file
    from memstream.infra.stack import Stack
    from memstream.pipelines.episodic import WINDOW
    from memstream.sdk import Publisher

    root = Path(tempfile.mkdtemp(prefix="memstream-bench-recovery-"))
    stack = Stack(root)
    stack.up(("kafka",))
    try:
        bootstrap = stack.kafka_bootstrap()
        names = {t: f"recovery.{t}" for t in ("latents", "summaries", "deadletter")}
        topics.create_topics(bootstrap, list(names.values()))
        key_file = root / "validator.pem"
        write_key_file(key_file, SigningKey.generate(), "validator")
        store = root / "episodic"
        cli = [sys.executable, "-m", "memstream.cli", "run", "--until-idle", "--bootstrap", bootstrap,
               "--episodic", str(store), "--key-file", str(key_file),
               *(f"--{t}-topic={n}" for t, n in names.items())]
        rng = np.random.default_rng(0)
        sessions = [f"r{i}" for i in range(args.sessions)]

        publisher = Publisher(bootstrap, topic=names["latents"])
        open_sessions = {sid: publisher.session(sid) for sid in sessions}  # open for the whole run

        def publish(windows: int, tail: int) -> None:
            for s in open_sessions.values():
                s.publish(rng.standard_normal((windows * WINDOW + tail, 384)).astype(np.float16))
            publisher.flush()

        def pipeline() -> float:
            t0 = time.perf_counter()
            done = subprocess.run(cli, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            took = time.perf_counter() - t0
            if done.returncode:
                raise SystemExit(f"memstream run failed ({done.returncode}):\n{done.stderr[-3000:]}")
            return took

        # the first half of a window stays open at the end, holding its partition's commit back
        publish(args.windows, WINDOW // 2)
        first_s = pipeline()
        before = [pipeline() for _ in range(args.repeats)]
        publish(4 * args.windows, 0)
        second_s = pipeline()
        after = [pipeline() for _ in range(args.repeats)]
        publisher.close()
        from memstream.episodic.store import EpisodicStore

        episodic = EpisodicStore(str(store))
        stored = episodic.count()
        if stored != args.sessions * 5 * args.windows:
            from kafka import KafkaConsumer

            from memstream.schemas.records import DeadLetterRecord

            per = {sid: [(r.window_index, r.seq_start, r.seq_end, r.cut) for r in episodic.records(sid)]
                   for sid in sessions}
            c = KafkaConsumer(names["deadletter"], bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                              consumer_timeout_ms=4000, isolation_level="read_committed",
                              max_partition_fetch_bytes=64 << 20)
            letters = [(d.reason, d.offset, d.message[:160]) for d in map(DeadLetterRecord.from_json,
                                                                            (m.value for m in c))]
            c.close()
            raise SystemExit(f"{stored} summaries stored: {per}\ndead letters: {letters}")
    finally:
        stack.down()

    history = {"before": args.sessions * args.windows, "after": args.sessions * 5 * args.windows}
    assert stored == history["after"], f"{stored} summaries stored, {history['after']} expected"
    ratio = statistics.median(after) / statistics.median(before)
    res = {"benchmark": "recovery", "sessions": args.sessions, "windows_of_history": history,
           "seconds": {"first_run": first_s, "second_run": second_s, "idle_restart_before": before,
                       "idle_restart_after": after},
           "ratio_after_to_before": ratio, "target": 1.15,
           "machine": common.machine_info("apache-beam", "kafka-python", "lancedb")}
    m = res["machine"]
    lines = [f"# Idle restart against history ({m['date_utc']})", "",
             f"{args.sessions} sessions; `memstream run --until-idle` on Prism {m.get('apache-beam')}, each run a "
             "fresh process (runner start-up included); an open half window at the end of every session.", "",
             "| history (windows processed) | idle restarts (s) | median (s) |", "|---:|---|---:|",
             f"| {history['before']} | {', '.join(f'{x:.2f}' for x in before)} | {statistics.median(before):.2f} |",
             f"| {history['after']} | {', '.join(f'{x:.2f}' for x in after)} | {statistics.median(after):.2f} |", "",
             f"Restart after 5x the history / restart before: **{ratio:.2f}** (target <= 1.15).", "",
             f"Processing runs: {first_s:.1f} s for the first {history['before']} windows, {second_s:.1f} s for the "
             f"next {history['after'] - history['before']}.", "",
             common.machine_line(m) + f"; commit {m.get('git_commit', '')[:10]}."]
    common.save(res, "recovery", lines, common.RESULTS)
    print(f"ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
