"""The latents topic as a log the pipeline reads twice: once in order (the source), and again
by position, for the latents of the windows it compresses and the bytes of dead letters.

The pipeline moves only references to latent chunks between its steps: a window is a list of
(partition, offset) pieces, so what crosses a runner's shuffle is a few hundred bytes a record,
however large the chunks, and a backlog can never pack gigabytes into one bundle. The bytes come
from Kafka, the source of truth. :class:`LogReader` reads them there by offset, behind a
bounded cache that the source fills as it reads (so where source and compressor share a worker,
as in the embedded runners, nothing is read twice); a miss, an eviction or a step on another
worker costs one more read from Kafka, never a wrong or missing byte: a record at an offset
never changes.
"""

from __future__ import annotations

import collections
import threading
import time
import weakref

from memstream.errors import ServiceError
from memstream.pipelines.kafka_io import CONSUME_S, read_error, reader
from memstream.settings import LOG_CACHE_BYTES, KafkaSecurity


class _Cache:
    """Record values by (topic, partition, offset), least recently used out past ``limit`` bytes."""

    def __init__(self, limit: int):
        self.limit, self.size = limit, 0
        self._items: collections.OrderedDict[tuple, bytes] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def put(self, key: tuple, value: bytes) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self.size += len(value)
            while self.size > self.limit and self._items:
                _, old = self._items.popitem(last=False)
                self.size -= len(old)

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
            else:
                self.hits += 1
                self._items.move_to_end(key)
            return value

    def drop(self, keys) -> None:
        with self._lock:
            for key in keys:
                value = self._items.pop(key, None)
                if value is not None:
                    self.size -= len(value)


READ_TIMEOUT_S = 30.0  # a read by position that sees neither its record nor the partition's end fails

CACHE = _Cache(LOG_CACHE_BYTES)  # one per worker process: what its source has read


_READERS: "weakref.WeakSet[LogReader]" = weakref.WeakSet()


class LogReader:
    """Values of records of one Kafka cluster by position: from :data:`CACHE`, else from Kafka."""

    def __init__(self, bootstrap: str, security: KafkaSecurity | None = None):
        self.bootstrap, self.security = bootstrap, security
        self._consumer = None
        self._lock = threading.Lock()
        _READERS.add(self)

    def remember(self, topic: str, partition: int, offset: int, value: bytes) -> None:
        CACHE.put((self.bootstrap, topic, partition, offset), value)

    def forget(self, topic: str, positions) -> None:
        CACHE.drop((self.bootstrap, topic, p, o) for p, o in positions)

    def values(self, topic: str, positions: list[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        """(partition, offset) -> value, for every position asked for."""
        out, missing = {}, []
        for pos in positions:
            value = CACHE.get((self.bootstrap, topic, *pos))
            if value is None:
                missing.append(pos)
            else:
                out[pos] = value
        if missing:
            out.update(self._fetch(topic, missing))
        return out

    def _reader(self):
        if self._consumer is None:
            self._consumer = reader(self.bootstrap, self.security)
        return self._consumer

    def _scan(self, topic: str, partition: int, offset: int):
        """Records of the partition from ``offset`` on, in order, until the caller stops or the
        partition's end (then None is yielded once)."""
        from confluent_kafka import TopicPartition

        c = self._reader()
        c.assign([TopicPartition(topic, partition, offset)])
        where = f"{topic}[{partition}]"
        deadline = time.monotonic() + READ_TIMEOUT_S
        while time.monotonic() < deadline:
            for m in c.consume(64, CONSUME_S):
                if read_error(m, where):
                    yield None
                    return
                yield m
        raise ServiceError(f"{where}: no record and no end of the partition came in {READ_TIMEOUT_S:.0f}s from "
                           f"offset {offset}: is the broker up?")

    def _fetch(self, topic: str, positions: list[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        out: dict[tuple[int, int], bytes] = {}
        with self._lock:
            by_partition: dict[int, set[int]] = collections.defaultdict(set)
            for p, o in positions:
                by_partition[p].add(o)
            for partition, wanted in sorted(by_partition.items()):
                pending = set(wanted)
                for offset in sorted(wanted):
                    if offset not in pending:
                        continue
                    for m in self._scan(topic, partition, offset):  # a later read may hold the next ones
                        if m is None or m.offset() > max(pending):
                            break
                        if m.offset() in pending:
                            pending.discard(m.offset())
                            out[(partition, m.offset())] = m.value()
                        if m.offset() >= offset and (m.offset() + 1) not in pending:
                            break
                if pending:
                    raise ServiceError(f"{topic}[{partition}] no longer holds offsets {sorted(pending)[:5]}: the "
                                       "topic's retention deleted records a window still needs; raise the retention "
                                       "above the longest a session's window stays open")
        return out

    def session_records(self, topic: str, partition: int, first: int, last: int, key: bytes,
                        limit: int = 100_000) -> list[int]:
        """Offsets in ``first..last`` (inclusive) of records keyed ``key``; at most ``limit``
        records are read (None when the range is longer: the question is then not answered)."""
        if last < first:
            return []
        if last - first + 1 > limit:
            return None
        found = []
        with self._lock:
            for m in self._scan(topic, partition, first):
                if m is None or m.offset() > last:
                    break
                if m.key() == key:
                    found.append(m.offset())
        return found

    def close(self) -> None:
        with self._lock:
            if self._consumer is not None:
                self._consumer.close()
                self._consumer = None


def close_readers() -> None:
    """Close the Kafka consumers of every reader of this process (a runner may never tear its
    steps down: the embedded ones leave that to the process's end)."""
    for reader in list(_READERS):
        reader.close()
