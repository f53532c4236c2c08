"""Default Kafka topic names, in one place, and topic creation.

Session lifecycle events (open, close) share the latents topic: both are keyed by session id,
so they land in the session's partition and are ordered with its chunks. A consumer can then
tell a chunk that follows a close from one that precedes it, which two topics could not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from memstream.errors import ConfigError
from memstream.infra.kafka import MAX_MESSAGE_BYTES

LATENTS = "memstream.latents"  # latent chunks and session events, key = session id
SUMMARIES = "memstream.summaries"
DEADLETTER = "memstream.deadletter"
ATTESTATIONS = "memstream.attestations"
FORGET = "memstream.forget"
READ_DIVERGENCE = "memstream.read-divergence"  # sampled reads whose replica disagreed
DEFAULT_TOPICS = (LATENTS, SUMMARIES, DEADLETTER, ATTESTATIONS, FORGET, READ_DIVERGENCE)

DEFAULT_PARTITIONS = 4
DEFAULT_RETENTION_MS = 7 * 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicResult:
    name: str
    created: bool  # False: it existed already


def default_bootstrap() -> str:
    """$MEMSTREAM_BOOTSTRAP, else the broker of the local stack (`memstream infra up`)."""
    env = os.environ.get("MEMSTREAM_BOOTSTRAP")
    if env:
        return env
    from memstream.infra.stack import Stack

    return Stack().kafka_bootstrap()


def create_topics(bootstrap: str, names: tuple[str, ...] | list[str] = DEFAULT_TOPICS, *,
                  partitions: int = DEFAULT_PARTITIONS, retention_ms: int = DEFAULT_RETENTION_MS,
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
