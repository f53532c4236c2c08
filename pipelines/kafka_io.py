"""Kafka source and sink for Beam in pure Python (kafka-python), for every runner.

Beam's own ``ReadFromKafka`` is a cross-language Java transform that needs an expansion
service jar; this splittable DoFn needs nothing but kafka-python.

Offset semantics: each topic partition is one restriction ``[start, stop)`` of offsets.
The runner checkpoints the unclaimed remainder (``defer_remainder``) and the source itself
commits nothing to Kafka: exactly-once effects come from idempotent sinks keyed by
(session, window index) downstream. ``start`` is where the read begins (earliest, latest,
or committed offsets of a consumer group); ``stop`` is unbounded in streaming mode, or the
high-water mark at start-up in bounded (``until_idle``) mode.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

import apache_beam as beam
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.utils.timestamp import Duration, Timestamp

from memstream.errors import ServiceError
from memstream.settings import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

# Largest offset a partition can have; an unbounded read's restriction ends here.
UNBOUNDED = 2**63 - 1


@dataclass(frozen=True)
class KafkaRecord:
    """One consumed message, with where it came from (dead letters need all of it)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp: int  # milliseconds since the epoch, as kafka-python names it


@dataclass(frozen=True)
class PartitionSpec:
    topic: str
    partition: int
    start: int
    stop: int


def _consumer(bootstrap: str, **extra):
    from kafka import KafkaConsumer

    return KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                         max_partition_fetch_bytes=32 * 1024 * 1024, fetch_max_bytes=64 * 1024 * 1024,
                         consumer_timeout_ms=1000, **extra)


def list_partitions(bootstrap: str, topics: Iterable[str], start: str = "earliest",
                    until_idle: bool = False, group_id: str | None = None) -> list[PartitionSpec]:
    """Partitions of ``topics`` with their start (and, when bounded, stop) offsets."""
    from kafka import TopicPartition

    consumer = _consumer(bootstrap, group_id=group_id)
    try:
        tps = []
        for topic in topics:
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                raise ServiceError(f"topic {topic!r} does not exist on {bootstrap}: create it first "
                                   "(memstream topics create)")
            tps += [TopicPartition(topic, p) for p in sorted(parts)]
        begin, end = consumer.beginning_offsets(tps), consumer.end_offsets(tps)
        specs = []
        for tp in tps:
            if start == "committed" and group_id:
                committed = consumer.committed(tp)
                first = committed if committed is not None else begin[tp]
            elif start == "latest":
                first = end[tp]
            else:
                first = begin[tp]
            specs.append(PartitionSpec(tp.topic, tp.partition, first, end[tp] if until_idle else UNBOUNDED))
        return specs
    finally:
        consumer.close()


class PartitionTracker(OffsetRestrictionTracker):
    """Offsets of one partition; it yields checkpoints (``defer_remainder``) but refuses the
    runner's dynamic splits, so a partition is only ever read by one reader, in offset order."""

    def try_split(self, fraction_of_remainder):
        return super().try_split(0) if fraction_of_remainder == 0 else None


class _PartitionRestrictions(RestrictionProvider):
    def initial_restriction(self, spec: PartitionSpec) -> OffsetRange:
        return OffsetRange(spec.start, max(spec.start, spec.stop))

    def create_tracker(self, restriction: OffsetRange) -> OffsetRestrictionTracker:
        return PartitionTracker(restriction)

    def restriction_size(self, spec, restriction: OffsetRange) -> int:
        # An unbounded restriction has no meaningful size; report a constant so runners do not
        # try to split it by size.
        return 1 if restriction.stop == UNBOUNDED else restriction.size()

    def split(self, spec, restriction):
        yield restriction  # one reader per partition keeps Kafka's per-partition order


class ReadPartitionFn(beam.DoFn):
    """Reads one partition from its restriction's start offset, claiming each offset it emits."""

    def __init__(self, bootstrap: str, poll_ms: int = 200, max_records: int = 500):
        self.bootstrap, self.poll_ms, self.max_records = bootstrap, poll_ms, max_records
        self._consumers: dict = {}

    def teardown(self):
        for consumer in self._consumers.values():
            consumer.close()
        self._consumers.clear()

    def _assigned(self, spec: PartitionSpec):
        from kafka import TopicPartition

        key = (spec.topic, spec.partition)
        if key not in self._consumers:
            c = _consumer(self.bootstrap)
            c.assign([TopicPartition(spec.topic, spec.partition)])
            self._consumers[key] = c
        return self._consumers[key], TopicPartition(spec.topic, spec.partition)

    @beam.DoFn.unbounded_per_element()
    def process(self, spec: PartitionSpec,
                tracker=beam.DoFn.RestrictionParam(_PartitionRestrictions()),
                watermark=beam.DoFn.WatermarkEstimatorParam(ManualWatermarkEstimator.default_provider())):
        restriction = tracker.current_restriction()
        if restriction.start >= restriction.stop:
            return
        consumer, tp = self._assigned(spec)
        if consumer.position(tp) != restriction.start:  # a seek drops the prefetched batch: only when needed
            consumer.seek(tp, restriction.start)
        records = consumer.poll(timeout_ms=self.poll_ms, max_records=self.max_records).get(tp, [])
        for rec in records:
            if not tracker.try_claim(rec.offset):
                return
            ts = Timestamp(micros=rec.timestamp * 1000)
            watermark.set_watermark(max(watermark.current_watermark() or Timestamp(0), ts))
            yield beam.window.TimestampedValue(
                KafkaRecord(rec.topic, rec.partition, rec.offset, rec.key, rec.value, rec.timestamp), ts)
        if restriction.stop != UNBOUNDED and consumer.position(tp) >= restriction.stop:
            tracker.try_claim(restriction.stop)  # nothing left below stop: the restriction is done
            return
        if not records:
            # Idle partition: the event-time clock follows the wall clock, so timers downstream fire.
            watermark.set_watermark(max(watermark.current_watermark() or Timestamp(0),
                                        Timestamp.now() - Duration(seconds=1)))
        tracker.defer_remainder(Duration(seconds=0 if records else self.poll_ms / 1000))


class ReadFromKafka(beam.PTransform):
    """``p | ReadFromKafka(bootstrap, topics)`` → PCollection[KafkaRecord], unbounded unless
    ``until_idle`` (then it ends at the topics' high-water marks taken at pipeline start)."""

    def __init__(self, bootstrap: str, topics: list[str], start: str = "earliest",
                 until_idle: bool = False, group_id: str | None = None):
        super().__init__()
        self.bootstrap, self.topics, self.start = bootstrap, list(topics), start
        self.until_idle, self.group_id = until_idle, group_id

    def expand(self, pbegin):
        specs = list_partitions(self.bootstrap, self.topics, self.start, self.until_idle, self.group_id)
        return (pbegin
                | "Partitions" >> beam.Create(specs)
                | "Read" >> beam.ParDo(ReadPartitionFn(self.bootstrap)))


class WriteToKafkaFn(beam.DoFn):
    """Sends (key, value) byte pairs to ``topic`` and flushes at the end of each bundle, so a
    bundle's output is durable before the runner checkpoints past it."""

    def __init__(self, bootstrap: str, topic: str):
        self.bootstrap, self.topic = bootstrap, topic
        self._producer = None

    def setup(self):
        from kafka import KafkaProducer

        self._producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5,
                                       max_request_size=MAX_MESSAGE_BYTES, retries=10)

    def process(self, kv):
        key, value = kv
        self._producer.send(self.topic, key=key, value=value)

    def finish_bundle(self):
        self._producer.flush()

    def teardown(self):
        if self._producer is not None:
            self._producer.close()


def write_to_kafka(bootstrap: str, topic: str) -> beam.PTransform:
    return beam.ParDo(WriteToKafkaFn(bootstrap, topic))
