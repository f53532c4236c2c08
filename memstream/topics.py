"""memstream's Kafka topics: their names (from :mod:`memstream.settings`), their creation, and the
small producers and readers that every process shares (dead letters out, summaries back).

Session lifecycle events (open, close) share the latents topic: both are keyed by session id,
so they land in the session's partition and are ordered with its chunks. A consumer can then
tell a chunk that follows a close from one that precedes it, which two topics could not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from memstream.errors import ConfigError, PublishError
from memstream.schemas.records import DeadLetterRecord, SummaryRecord
from memstream.settings import (ATTESTATIONS_TOPIC, DEADLETTER_TOPIC, FORGET_TOPIC, LATENTS_TOPIC,
                                MAX_MESSAGE_BYTES, PARTITIONS, READ_DIVERGENCE_TOPIC, RETENTION_MS, SUMMARIES_TOPIC)
from memstream.wire.deadletter import fit_dead_letter

LATENTS, SUMMARIES, DEADLETTER = LATENTS_TOPIC, SUMMARIES_TOPIC, DEADLETTER_TOPIC
ATTESTATIONS, FORGET, READ_DIVERGENCE = ATTESTATIONS_TOPIC, FORGET_TOPIC, READ_DIVERGENCE_TOPIC
DEFAULT_TOPICS = (LATENTS, SUMMARIES, DEADLETTER, ATTESTATIONS, FORGET, READ_DIVERGENCE)


@dataclass(frozen=True)
class TopicResult:
    name: str
    created: bool  # False: it existed already


def create_topics(bootstrap: str, names: tuple[str, ...] | list[str] = DEFAULT_TOPICS, *,
                  partitions: int = PARTITIONS, retention_ms: int = RETENTION_MS,
                  max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[TopicResult]:
    """Create each topic that does not exist yet (replication 1: the local stack has one broker)."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    if partitions < 1:
        raise ConfigError(f"partitions must be >= 1, got {partitions}")
    if not 0 < max_message_bytes <= MAX_MESSAGE_BYTES:
        raise ConfigError(f"max message bytes must be in 1..{MAX_MESSAGE_BYTES} (the broker's limit), "
                          f"got {max_message_bytes}")
    configs = {"retention.ms": str(retention_ms), "max.message.bytes": str(max_message_bytes)}
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    results = []
    try:
        for name in names:
            try:
                admin.create_topics([NewTopic(name, partitions, 1, topic_configs=configs)])
                results.append(TopicResult(name, True))
            except TopicAlreadyExistsError:
                results.append(TopicResult(name, False))
    finally:
        admin.close()
    return results


def write_dead_letters(producer, records: Iterable[DeadLetterRecord], topic: str = DEADLETTER,
                       timeout: float = 30.0) -> int:
    """Send each record as JSON to the dead-letter topic, keyed by the original key, and wait
    for the broker's acknowledgements. ``producer`` is a kafka-python KafkaProducer whose
    ``max_request_size`` admits MAX_DEAD_LETTER_BYTES."""
    from kafka.errors import KafkaError

    futures = [producer.send(topic, key=r.key, value=fit_dead_letter(r)) for r in records]
    producer.flush(timeout)
    for f in futures:
        try:
            f.get(timeout=0)
        except KafkaError as e:
            raise PublishError(f"dead-letter record not written to {topic!r}: {e}") from e
    return len(futures)


def read_summaries(bootstrap: str, session_id: str | None = None, topic: str = SUMMARIES,
                   timeout_ms: int = 3000) -> list[SummaryRecord]:
    """Every summary on the topic up to its current end (of one session when given), in
    topic order, which is window order per session."""
    from kafka import KafkaConsumer, TopicPartition

    # read_committed: the pipeline publishes in transactions, and an aborted one is no summary
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             max_partition_fetch_bytes=MAX_MESSAGE_BYTES, isolation_level="read_committed")
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
