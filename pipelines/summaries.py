"""Reading summary records back from the summaries topic (for verification and tests)."""

from __future__ import annotations

from memstream import topics
from memstream.schemas.records import SummaryRecord


def read_summaries(bootstrap: str, session_id: str | None = None, topic: str = topics.SUMMARIES,
                   timeout_ms: int = 3000) -> list[SummaryRecord]:
    """Every summary on the topic up to its current end (of one session when given), in
    topic order, which is window order per session."""
    from kafka import KafkaConsumer, TopicPartition

    from memstream.infra.kafka import MAX_MESSAGE_BYTES

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             max_partition_fetch_bytes=MAX_MESSAGE_BYTES)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        end = consumer.end_offsets(parts)
        want = session_id.encode() if session_id is not None else None
        out: list[SummaryRecord] = []
        while any(consumer.position(tp) < end[tp] for tp in parts):
            batches = consumer.poll(timeout_ms=timeout_ms)
            if not batches:
                break
            for tp, msgs in batches.items():
                out += [SummaryRecord.from_json(m.value) for m in msgs
                        if m.offset < end[tp] and (want is None or m.key == want)]
        return out
    finally:
        consumer.close()
