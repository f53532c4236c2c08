"""Dead-letter records: a rejected record of the latents topic, its reason and its original
bytes, cut to fit one Kafka message. Writing them to Kafka is :func:`memstream.topics.write_dead_letters`."""

from __future__ import annotations

import dataclasses
import time
from typing import Protocol

from memstream.errors import InvalidInputError
from memstream.schemas.records import DeadLetterRecord
from memstream.settings import MAX_MESSAGE_BYTES

# A dead-letter message stays this far below the broker's limit (room for the batch headers).
MAX_DEAD_LETTER_BYTES = MAX_MESSAGE_BYTES - (64 << 10)


class KafkaRecord(Protocol):
    """What a consumed record offers (kafka-python's ConsumerRecord fits)."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None


def dead_letter(error: InvalidInputError, *, topic: str, partition: int, offset: int, key: bytes | None,
                value: bytes | None, timestamp_ms: int) -> DeadLetterRecord:
    return DeadLetterRecord(schema_version=DeadLetterRecord.SCHEMA_VERSION, reason=error.reason,
                            message=str(error), topic=topic, partition=partition, offset=offset,
                            key=None if key is None else bytes(key),
                            value=None if value is None else bytes(value), value_size=len(value or b""),
                            timestamp_ms=timestamp_ms, detected_at_us=time.time_ns() // 1000)


def fit_dead_letter(record: DeadLetterRecord, max_bytes: int = MAX_DEAD_LETTER_BYTES) -> bytes:
    """The record's JSON, its value cut short when the whole would exceed ``max_bytes``
    (base64 makes a value 4/3 as large, so a chunk near the broker's limit cannot travel whole)."""
    data = record.to_json()
    if len(data) <= max_bytes or not record.value:
        return data
    room = max_bytes - (len(data) - 4 * -(-len(record.value) // 3))  # bytes left for the base64 value
    return dataclasses.replace(record, value=record.value[:max(room, 0) // 4 * 3]).to_json()
