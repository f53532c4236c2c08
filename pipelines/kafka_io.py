"""Kafka source and sink for Beam in Python, for every runner.

Beam's own ``ReadFromKafka`` is a cross-language Java transform that needs an expansion
service jar; this splittable DoFn needs only Python clients from PyPI: the records are read
with librdkafka (``confluent-kafka``), partitions, group offsets and writes go through
kafka-python.

Offsets: each topic partition is one restriction ``[start, stop)`` of offsets, read by one
reader in offset order (the runner may checkpoint the unclaimed remainder, ``defer_remainder``,
but never splits it). ``start`` is where the read begins: the consumer group's committed offset
(``start="committed"``, falling back to the earliest retained offset), the earliest, or the
latest. ``stop`` is unbounded when streaming, or the high-water mark at start-up in bounded
(``until_idle``) mode. The source itself commits nothing: a downstream step commits the group's
offsets once what they cover is durable (the episodic pipeline does it in a Kafka transaction).

Each record says which offsets it accounts for (``first`` .. ``offset``: offsets without a
record, such as transaction markers, belong to the record after them), so a downstream
tracker can tell when every offset below one is handled. Element timestamps are the records'
Kafka timestamps, made strictly increasing within a partition (ties broken by a microsecond),
so a runner that orders pending elements by time keeps each partition's order.

In streaming mode the partitions are listed again every ``discover_s`` seconds
(:class:`WatchPartitions`), and a partition added to the topic is read from its start.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterable

import apache_beam as beam
from apache_beam.coders import BytesCoder
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.transforms.periodicsequence import PeriodicImpulse
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
from apache_beam.utils.timestamp import Duration, Timestamp

from memstream.errors import ServiceError, TopicMissingError
from memstream.settings import MAX_MESSAGE_BYTES, KafkaSecurity
from memstream.topics import check_login, kafka_python, librdkafka_config

log = logging.getLogger(__name__)

# A reader's bundle ends past this many bytes of records or this long after it began.
BUNDLE_BYTES = 64 * 1024 * 1024
BUNDLE_S = 0.5
CONSUME_S = 0.01

# Largest offset a partition can have; an unbounded read's restriction ends here.
UNBOUNDED = 2**63 - 1
STARTS = ("committed", "earliest", "latest")


@dataclass(frozen=True)
class KafkaRecord:
    """One consumed message, with where it came from (dead letters need all of it). The record
    accounts for the offsets ``first`` .. ``offset`` of its partition."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp: int  # milliseconds since the epoch, as kafka-python names it
    first: int = -1  # the first offset this record accounts for (-1: not known)
    start: int = -1  # where this run began reading the partition


@dataclass(frozen=True)
class PartitionSpec:
    topic: str
    partition: int
    start: int
    stop: int


def consumer(bootstrap: str, security: KafkaSecurity | None = None, **extra):
    """A kafka-python consumer that commits nothing by itself and fetches large messages."""
    return kafka_python("consumer", bootstrap, security, enable_auto_commit=False,
                        max_partition_fetch_bytes=2 * MAX_MESSAGE_BYTES, fetch_max_bytes=4 * MAX_MESSAGE_BYTES,
                        consumer_timeout_ms=1000, **extra)


def reader(bootstrap: str, security: KafkaSecurity | None = None):
    """A librdkafka consumer for reading partitions by position: assigned, never a group
    member, committing nothing. The pipeline's bulk reads go through it (the latents' bytes
    cost a fraction of kafka-python's CPU); metadata, group offsets and transactions stay with
    kafka-python."""
    from confluent_kafka import Consumer

    check_login(bootstrap, security)
    return Consumer({**librdkafka_config(bootstrap, security),
                     "group.id": "memstream-reader",  # required by the client; never joined
                     "enable.auto.commit": False, "enable.auto.offset.store": False,
                     "enable.partition.eof": True,  # the end of a bounded read is seen, not waited for
                     "auto.offset.reset": "earliest", "isolation.level": "read_uncommitted",
                     "max.partition.fetch.bytes": 2 * MAX_MESSAGE_BYTES, "fetch.max.bytes": 4 * MAX_MESSAGE_BYTES,
                     "receive.message.max.bytes": 4 * MAX_MESSAGE_BYTES + (1 << 20)},
                    logger=logging.getLogger("memstream.kafka"))


def read_error(message, where: str) -> bool:
    """True for the end-of-partition event; raises ServiceError for any other error event."""
    from confluent_kafka import KafkaError

    err = message.error()
    if err is None:
        return False
    if err.code() == KafkaError._PARTITION_EOF:
        return True
    raise ServiceError(f"reading {where} from Kafka failed: {err.str()}; the step fails and is run again")


def list_partitions(bootstrap: str, topics: Iterable[str], start: str = "committed", until_idle: bool = False,
                    group_id: str | None = None, security: KafkaSecurity | None = None) -> list[PartitionSpec]:
    """Partitions of ``topics`` with their start (and, when bounded, stop) offsets."""
    from kafka import TopicPartition

    if start not in STARTS:
        raise ServiceError(f"start must be one of {', '.join(STARTS)}, not {start!r}")
    c = consumer(bootstrap, security, group_id=group_id)
    try:
        tps = []
        for topic in topics:
            parts = c.partitions_for_topic(topic)
            if not parts:
                raise TopicMissingError(topic, bootstrap)
            tps += [TopicPartition(topic, p) for p in sorted(parts)]
        begin, end = c.beginning_offsets(tps), c.end_offsets(tps)
        specs = []
        for tp in tps:
            first = begin[tp]
            if start == "committed" and group_id:
                committed = c.committed(tp)
                first = max(committed, begin[tp]) if committed is not None else begin[tp]
            elif start == "latest":
                first = end[tp]
            specs.append(PartitionSpec(tp.topic, tp.partition, first, end[tp] if until_idle else UNBOUNDED))
        return specs
    finally:
        c.close()


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

    def __init__(self, bootstrap: str, poll_ms: int = 200, max_records: int = 64,
                 bundle_bytes: int = BUNDLE_BYTES, bundle_s: float = BUNDLE_S, security: KafkaSecurity | None = None):
        self.bootstrap, self.security, self.poll_ms, self.max_records = bootstrap, security, poll_ms, max_records
        self.bundle_bytes, self.bundle_s = bundle_bytes, bundle_s
        self._consumers: dict = {}
        self._next: dict = {}  # (topic, partition) -> the offset its consumer delivers next

    def teardown(self):
        for c in self._consumers.values():
            c.close()
        self._consumers.clear()

    def _assigned(self, spec: PartitionSpec, offset: int):
        from confluent_kafka import TopicPartition

        key = (spec.topic, spec.partition)
        if key not in self._consumers:
            self._consumers[key] = reader(self.bootstrap, self.security)
        if self._next.get(key) != offset:  # a new assignment drops the prefetched records: only when needed
            self._consumers[key].assign([TopicPartition(spec.topic, spec.partition, offset)])
            self._next[key] = offset
        return self._consumers[key]

    @beam.DoFn.unbounded_per_element()
    def process(self, spec: PartitionSpec,
                tracker=beam.DoFn.RestrictionParam(_PartitionRestrictions()),
                watermark=beam.DoFn.WatermarkEstimatorParam(ManualWatermarkEstimator.default_provider())):
        restriction = tracker.current_restriction()
        if restriction.start >= restriction.stop:
            return
        key = (spec.topic, spec.partition)
        c = self._assigned(spec, restriction.start)
        where = f"{spec.topic}[{spec.partition}]"
        first = restriction.start
        # Read until the bundle is worth its fixed costs downstream (each bundle of the later
        # steps pays state round trips, a store write and a Kafka transaction per partition),
        # or until the partition has nothing more to give right now.
        began = time.monotonic()
        read = size = 0
        while True:
            # consume() waits its whole timeout unless max_records come: ask often, briefly
            messages = c.consume(self.max_records, CONSUME_S)
            end = None
            for m in messages:
                if read_error(m, where):
                    end = m.offset()  # the partition's end as it stands now
                    continue
                offset = m.offset()
                if not tracker.try_claim(offset):
                    self._next[key] = None  # the consumer is past what was claimed: assign again
                    return
                # Strictly increasing within the partition: a runner ordering by time keeps offset order.
                last = watermark.current_watermark()
                ts = Timestamp(micros=max(m.timestamp()[1] * 1000, last.micros + 1 if last is not None else 0))
                watermark.set_watermark(ts)
                value = m.value() or b""
                yield beam.window.TimestampedValue(
                    KafkaRecord(spec.topic, spec.partition, offset, m.key(), value, m.timestamp()[1], first,
                                spec.start), ts)
                first = self._next[key] = offset + 1
                size += len(value)
                read += 1
            if restriction.stop != UNBOUNDED and max(first, end or 0) >= restriction.stop:
                # Nothing left below stop (the end offset at start-up): the restriction is done.
                tracker.try_claim(restriction.stop)
                return
            waited = time.monotonic() - began
            if end is not None or size >= self.bundle_bytes or waited >= self.bundle_s:
                break
            if not messages and (read or waited >= self.poll_ms / 1000):
                break  # nothing more for now
        if not read:
            # Idle partition: the event-time clock follows the wall clock, so timers downstream fire.
            now = Timestamp.now() - Duration(seconds=1)
            current = watermark.current_watermark()
            if current is None or now > current:
                watermark.set_watermark(now)
        tracker.defer_remainder(Duration(seconds=0 if read else self.poll_ms / 1000))


class WatchPartitions(beam.DoFn):
    """Keyed by topic: emits each partition the first time a listing shows it (from where the
    consumer group stands, or from the partition's start when it is new), and remembers the
    partitions it emitted in keyed state."""

    SEEN = ReadModifyWriteStateSpec("seen", BytesCoder())

    def __init__(self, bootstrap: str, start: str, group_id: str | None, security: KafkaSecurity | None = None):
        self.bootstrap, self.start, self.group_id, self.security = bootstrap, start, group_id, security

    def process(self, kv, seen=beam.DoFn.StateParam(SEEN)):
        topic, _ = kv
        known = set(int(p) for p in (seen.read() or b"").split(b",") if p)
        first_listing = not known
        specs = list_partitions(self.bootstrap, [topic], self.start if first_listing else "committed",
                                group_id=self.group_id, security=self.security)
        new = [s for s in specs if s.partition not in known]
        if new:
            if not first_listing:
                log.info("topic %s has new partitions %s: reading them", topic, [s.partition for s in new])
            seen.write(b",".join(str(p).encode() for p in sorted(known | {s.partition for s in new})))
        yield from new


class ReadFromKafka(beam.PTransform):
    """``p | ReadFromKafka(bootstrap, topics)`` → PCollection[KafkaRecord]. Bounded when
    ``until_idle`` (it ends at the topics' high-water marks taken at pipeline start); else it
    streams, and picks up partitions added while it runs."""

    def __init__(self, bootstrap: str, topics: list[str], start: str = "committed", until_idle: bool = False,
                 group_id: str | None = None, discover_s: float = 30.0, security: KafkaSecurity | None = None):
        super().__init__()
        self.bootstrap, self.topics, self.start, self.security = bootstrap, list(topics), start, security
        self.until_idle, self.group_id, self.discover_s = until_idle, group_id, discover_s

    def expand(self, pbegin):
        if self.until_idle:
            specs = list_partitions(self.bootstrap, self.topics, self.start, True, self.group_id, self.security)
            partitions = pbegin | "Partitions" >> beam.Create(specs)
        else:
            # fail now if a topic is missing or the login is refused
            list_partitions(self.bootstrap, self.topics, self.start, False, self.group_id, self.security)
            topics = self.topics
            partitions = (pbegin
                          | "Every" >> PeriodicImpulse(fire_interval=self.discover_s)
                          | "Topics" >> beam.FlatMap(lambda _: [(t, None) for t in topics])
                          | "WatchPartitions" >> beam.ParDo(WatchPartitions(self.bootstrap, self.start,
                                                                            self.group_id, self.security)))
        return partitions | "Read" >> beam.ParDo(ReadPartitionFn(self.bootstrap, security=self.security))


class WriteToKafkaFn(beam.DoFn):
    """Sends (key, value) byte pairs to ``topic`` and flushes at the end of each bundle, so a
    bundle's output is durable before the runner checkpoints past it."""

    def __init__(self, bootstrap: str, topic: str, security: KafkaSecurity | None = None):
        self.bootstrap, self.topic, self.security = bootstrap, topic, security
        self._producer = None

    def setup(self):
        self._producer = kafka_python("producer", self.bootstrap, self.security, acks="all", linger_ms=5,
                                      max_request_size=MAX_MESSAGE_BYTES, retries=10)

    def process(self, kv):
        key, value = kv
        self._producer.send(self.topic, key=key, value=value)

    def finish_bundle(self):
        self._producer.flush()

    def teardown(self):
        if self._producer is not None:
            self._producer.close()


def write_to_kafka(bootstrap: str, topic: str, security: KafkaSecurity | None = None) -> beam.PTransform:
    return beam.ParDo(WriteToKafkaFn(bootstrap, topic, security))
