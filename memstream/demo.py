"""``memstream demo``: the README's main job, end to end on embedded defaults.

It starts the services it needs in a fresh stack folder, checks each one with a real round
trip (a Kafka produce and consume, a LanceDB table written to and read back from S3, the
Prism runner binary), prints what it found and stops everything by PID.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path


def register(sub) -> None:
    demo = sub.add_parser("demo", help="run the main job end to end on embedded defaults")
    demo.add_argument("--keep", action="store_true", help="leave the services running afterwards")
    demo.set_defaults(func=run)


def run(args) -> int:
    from memstream.infra import runners
    from memstream.infra.stack import Stack

    root = Path(tempfile.mkdtemp(prefix="memstream-demo-"))
    stack = Stack(root)
    started = time.monotonic()
    try:
        services = stack.up()
        rows = [("kafka", services["kafka"].pid, _kafka_round_trip(stack.kafka_bootstrap())),
                ("s3", services["s3"].pid, _lancedb_round_trip(stack))]
        rows.append(("prism", "-", f"binary {runners.ensure_prism()}"))
        print(f"{'service':8} {'pid':>7}  check")
        for name, pid, check in rows:
            print(f"{name:8} {pid!s:>7}  {check}")
        print(f"all healthy in {time.monotonic() - started:.1f}s (stack folder {root})")
    finally:
        if not args.keep:
            stack.down()
            print("services stopped")
    return 0


def _kafka_round_trip(bootstrap: str) -> str:
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic("memstream.demo", 1, 1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    t0 = time.monotonic()
    producer.send("memstream.demo", key=b"demo", value=b"hello").get(timeout=30)
    producer.close()
    consumer = KafkaConsumer("memstream.demo", bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             consumer_timeout_ms=10000)
    got = [next(consumer).value]
    consumer.close()
    assert got == [b"hello"], got
    return f"produce+consume round trip {1000 * (time.monotonic() - t0):.0f} ms at {bootstrap}"


def _lancedb_round_trip(stack) -> str:
    import lancedb
    import pyarrow as pa

    cfg = stack.s3_config()
    t0 = time.monotonic()
    db = lancedb.connect(cfg.uri("demo"), storage_options=cfg.storage_options())
    db.create_table("health", pa.table({"id": [1, 2, 3]}), mode="overwrite")
    rows = lancedb.connect(cfg.uri("demo"), storage_options=cfg.storage_options()).open_table("health").count_rows()
    assert rows == 3, rows
    return f"LanceDB table on {cfg.uri('demo')} written and read back in {1000 * (time.monotonic() - t0):.0f} ms"
