"""The episodic pipeline, memstream's main job.

    latents topic ──▶ one reader per partition ──▶ per session, in offset order: decode,
        (Kafka)          (splittable DoFn)          validate, cut windows of 4,096 latents
                                                        │                 │
                                      bad input ──▶ dead-letter topic     │ per bundle: compress
                                                                          ▼ (batched), chain, sign
                                            episodic store (commit point) ──▶ summaries topic

Exactly-once effects on restart: the episodic store is the commit point. A window whose summary
is already stored is neither recompressed nor re-chained (the cutter and the chainer both read
the session's chain head from the store), and every stored summary not yet acknowledged by
Kafka is published again, byte for byte, so the summaries topic never forks either.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

from memstream.crypto.keys import SigningKey
from memstream.episodic.chain import seal
from memstream.episodic.store import EpisodicStore
from memstream.episodic.window import CutterState, Window, WindowCutter
from memstream.errors import ConfigError, InvalidInputError, ServiceError
from memstream.pipelines.kafka_io import KafkaRecord, ReadFromKafka
from memstream.schemas.records import SummaryRecord
from memstream.settings import (BATCH_SIZE, DEADLETTER_TOPIC, HORIZON, LATENTS_TOPIC, MAX_MESSAGE_BYTES,
                                SUMMARIES_TOPIC, WINDOW)
from memstream.topics import write_dead_letters
from memstream.wire.codec import LatentChunk, decode, to_float32
from memstream.wire.deadletter import dead_letter
from memstream.wire.validation import Verdict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpisodicConfig:
    """Everything the pipeline needs; picklable (the signing key travels as a file path or an
    environment variable name, never as bytes)."""

    bootstrap: str
    store_uri: str
    storage_options: dict[str, str] | None = None
    key_file: str | None = None
    key_env: str | None = None
    checkpoint: str | None = None  # None: the default committed checkpoint
    device: str = "auto"  # "auto": CUDA when present
    batch_size: int = BATCH_SIZE
    horizon: int = HORIZON
    latents_topic: str = LATENTS_TOPIC
    summaries_topic: str = SUMMARIES_TOPIC
    deadletter_topic: str = DEADLETTER_TOPIC
    until_idle: bool = False
    start: str = "earliest"
    # Names this run's worker-side state, so two pipelines in one process never share it.
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def signing_key(self) -> SigningKey:
        if self.key_file:
            return SigningKey.from_file(self.key_file, role="validator")
        if self.key_env:
            return SigningKey.from_env(self.key_env)
        raise ConfigError("no validator key: pass --key-file PATH (make one with `memstream keys new --role "
                          "validator`) or --key-env VAR")

    def store(self) -> EpisodicStore:
        return EpisodicStore(self.store_uri, self.storage_options, self.horizon)


@dataclass
class Latents:
    """A window the cutter closed, with its latents [n, d] (float32) assembled from its pieces."""

    window: Window
    latents: np.ndarray


@dataclass
class Summary:
    """A compressed window, before it is chained."""

    window: Window
    tokens: bytes  # [256, d] little-endian fp16
    token_count: int
    dim: int
    operator_version: str
    processing_time_us: int = field(default_factory=lambda: time.time_ns() // 1000)


def _dead_letter(error: InvalidInputError, rec: KafkaRecord):
    return dead_letter(error, topic=rec.topic, partition=rec.partition, offset=rec.offset, key=rec.key,
                       value=rec.value, timestamp_ms=rec.timestamp)


@dataclass
class PartitionState:
    """Everything the pipeline holds for one partition of the latents topic, in offset order:
    each session's :class:`CutterState`, the chunks the open windows still need (by offset),
    the windows cut but not yet durably written, and dead letters not yet acknowledged."""

    lock: threading.Lock = field(default_factory=threading.Lock)  # guards the fields below
    write_lock: threading.Lock = field(default_factory=threading.Lock)  # one writer at a time
    last_offset: int = -1  # records at or below it were processed: a retried bundle skips them
    sessions: dict[str, CutterState] = field(default_factory=dict)
    chunks: dict[int, tuple] = field(default_factory=dict)  # offset -> (wire dtype, [n, d] in it)
    ready: list[Latents] = field(default_factory=list)
    dead: list = field(default_factory=list)


# Per worker process, per pipeline run: the partitions this worker reads. A partition has one
# reader (its restriction is never split), so its records arrive here in offset order.
_PARTITIONS: dict[tuple[str, str, int], PartitionState] = {}
_PARTITIONS_LOCK = threading.Lock()


def _partition(run_id: str, topic: str, partition: int) -> PartitionState:
    with _PARTITIONS_LOCK:
        return _PARTITIONS.setdefault((run_id, topic, partition), PartitionState())


class Summarise(beam.DoFn):
    """Per session, in partition order: decode each record and feed it to the session's
    :class:`~memstream.episodic.window.WindowCutter`; bad input becomes a dead letter. At the
    end of each bundle the windows cut so far, of every session, are compressed in batches,
    chained, signed and written, and the dead letters are sent.

    Session state sits with the partition's reader rather than in the runner's keyed state:
    each session lives in one partition, which one reader consumes in offset order, so no
    shuffle can reorder a session. A restarted pipeline re-reads the topic and rebuilds this
    state; windows the store already holds are skipped without being compressed."""

    def __init__(self, config: EpisodicConfig):
        self.config = config

    def setup(self):
        self._store = self.config.store()
        self._compress = WindowCompressor(self.config)
        self._chain = ChainWriter(self.config, self._store)

    def teardown(self):
        self._chain.close()

    def start_bundle(self):
        self._touched: set = set()

    def process(self, rec: KafkaRecord):
        part = _partition(self.config.run_id, rec.topic, rec.partition)
        self._touched.add((rec.topic, rec.partition))
        with part.lock:
            if rec.offset <= part.last_offset:
                return
            part.last_offset = rec.offset
            self._consume(part, rec)

    def _consume(self, part: PartitionState, rec: KafkaRecord) -> None:
        try:
            record = decode(rec.key, rec.value)
        except InvalidInputError as e:
            part.dead.append(_dead_letter(e, rec))
            return
        state = part.sessions.get(record.session_id)
        if state is None:
            head = self._store.heads([record.session_id]).get(record.session_id)
            state = part.sessions[record.session_id] = CutterState.new(
                record.session_id, stored_through=head.window_index if head else -1)
        cutter = WindowCutter(state)
        fed = cutter.feed(record, rec.offset)  # a chunk is named by its offset
        if fed.error is not None:
            part.dead.append(_dead_letter(fed.error, rec))
        if fed.verdict is Verdict.ACCEPTED and isinstance(record, LatentChunk):
            part.chunks[rec.offset] = (record.dtype, record.array())
        for window in fed.windows:
            pieces = [to_float32(part.chunks[p.ref][1][p.start:p.start + p.count], part.chunks[p.ref][0])
                      for p in window.pieces]
            part.ready.append(Latents(window, np.concatenate(pieces)))
        still = cutter.referenced()
        for ref in {rec.offset} | {p.ref for w in fed.windows for p in w.pieces}:
            if ref not in still:  # no open window needs this chunk any more
                part.chunks.pop(ref, None)

    def finish_bundle(self):
        for topic, partition in sorted(self._touched):
            part = _partition(self.config.run_id, topic, partition)
            # One writer per partition at a time keeps windows in order; the state lock is held
            # only to take and drop them, so records keep being consumed while a batch compresses.
            # A window is dropped only once durable: a failure leaves it for the bundle's retry,
            # which skips the records already consumed.
            with part.write_lock:
                while True:
                    with part.lock:
                        batch = part.ready[:self.config.batch_size]
                    if not batch:
                        break
                    self._chain.write(self._compress(batch))
                    with part.lock:
                        del part.ready[:len(batch)]
                with part.lock:
                    dead, part.dead = part.dead, []
                try:
                    if dead:
                        self._chain.send_dead_letters(dead)
                except BaseException:
                    with part.lock:
                        part.dead[:0] = dead
                    raise


class WindowCompressor:
    """The compression operator over windows of many sessions at once: one [B, 4096, d] call
    (zero padding plus lengths for partial windows), on the GPU when one is present."""

    def __init__(self, config: EpisodicConfig):
        import torch

        from memstream.operators.checkpoint import load_compressor

        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_compressor(config.checkpoint, device=device).eval()
        self.device = device
        self.version = operator_version(config.checkpoint)

    def __call__(self, windows: list[Latents]) -> list[Summary]:
        import torch

        d = self.model.config.dim
        lengths = torch.tensor([len(w.latents) for w in windows])
        x = torch.zeros((len(windows), WINDOW, d), dtype=torch.float32)
        for i, w in enumerate(windows):
            x[i, :len(w.latents)] = torch.from_numpy(w.latents)
        with torch.inference_mode():
            tokens = self.model.encode(x.to(self.device), lengths.to(self.device)).to(torch.float16).cpu().numpy()
        return [Summary(w.window, tokens[i].astype("<f2").tobytes(), tokens.shape[1], d, self.version)
                for i, w in enumerate(windows)]


def operator_version(checkpoint: str | None) -> str:
    """``compressor-<sha256 prefix of the checkpoint file>``: which weights made a summary."""
    import hashlib

    from memstream.operators.checkpoint import DEFAULT_CHECKPOINT

    path = checkpoint or DEFAULT_CHECKPOINT
    return f"compressor-{hashlib.sha256(open(path, 'rb').read()).hexdigest()[:16]}"


class ChainWriter:
    """Chains summaries to each session's stored head, signs them, and writes them to the
    store (the commit point) and then to Kafka.

    The store decides: a summary is inserted only if its (session, window) is absent, and is
    published only if the stored record is this writer's. A writer that lost a race (a
    runner retrying or overlapping bundles) raises, its bundle is retried, and the retry
    continues from the stored head, so neither the store nor the topic ever forks."""

    def __init__(self, config: EpisodicConfig, store):
        from kafka import KafkaProducer

        self.config, self.store = config, store
        self.key = config.signing_key()
        self.producer = KafkaProducer(bootstrap_servers=config.bootstrap, acks="all", enable_idempotence=True,
                                      max_request_size=MAX_MESSAGE_BYTES, linger_ms=5)
        self._seen: set[str] = set()  # sessions whose unacknowledged summaries were re-published

    def close(self):
        self.producer.close()

    def write(self, summaries: list[Summary]) -> None:
        sessions = sorted({s.window.session_id for s in summaries})
        for session_id in sessions:
            if session_id not in self._seen:
                self._republish_unacknowledged(session_id)
                self._seen.add(session_id)
        heads = {sid: (h.window_index, h.hash) for sid, h in self.store.heads(sessions).items()}
        sealed = []
        for s in sorted(summaries, key=lambda s: (s.window.session_id, s.window.window_index)):
            index, prev_hash = heads.get(s.window.session_id, (-1, b""))
            if s.window.window_index <= index:
                continue  # stored already: a replay
            if s.window.window_index != index + 1:
                raise ServiceError(f"session {s.window.session_id!r}: window {s.window.window_index} is not "
                                   f"next after the stored head {index}; the bundle will be retried")
            record = self._seal(s, prev_hash)
            sealed.append(record)
            heads[s.window.session_id] = (record.window_index, record.hash)
        if not sealed:
            return
        self.store.append(sealed)
        by_session: dict[str, list] = {}
        for r in sealed:
            by_session.setdefault(r.session_id, []).append(r)
        lost = []
        for session_id, records in by_session.items():
            stored = self.store.hashes(session_id, since_window=records[0].window_index)
            lost += [r for r in records if stored.get(r.window_index) != r.hash]
        if lost:
            raise ServiceError(f"another writer stored {len(lost)} of these summaries first (session "
                               f"{lost[0].session_id!r}, window {lost[0].window_index}); retrying from the stored head")
        self._publish(sealed)
        for session_id, records in by_session.items():
            self.store.evict(session_id, records[-1].window_index)

    def _seal(self, s: Summary, prev_hash: bytes) -> SummaryRecord:
        w = s.window
        return seal(SummaryRecord(
            schema_version=SummaryRecord.SCHEMA_VERSION, session_id=w.session_id, window_index=w.window_index,
            seq_start=w.seq_start, seq_end=w.seq_end, partial=w.partial, token_count=s.token_count, dim=s.dim,
            tokens_dtype="fp16", tokens=s.tokens, operator_version=s.operator_version,
            event_time_us=w.event_time_us, processing_time_us=s.processing_time_us, prev_hash=prev_hash,
            hash=b"", signature=b"", key_id=""), self.key)

    def _publish(self, records) -> None:
        futures = [self.producer.send(self.config.summaries_topic, key=r.session_id.encode(), value=r.to_json())
                   for r in records]
        self.producer.flush()
        for f in futures:
            f.get(timeout=60)
        self.store.mark_published(records)

    def send_dead_letters(self, letters) -> None:
        write_dead_letters(self.producer, letters, topic=self.config.deadletter_topic)

    def _republish_unacknowledged(self, session_id: str) -> None:
        """Stored summaries whose Kafka write was never acknowledged (a crash between the two
        writes) go out again, byte for byte."""
        records = self.store.unpublished(session_id)
        if records:
            log.info("re-publishing %d stored summaries of session %s", len(records), session_id)
            self._publish(records)


def build(p: beam.Pipeline, config: EpisodicConfig):
    """Wire the pipeline onto ``p``."""
    return (p
            | "ReadLatents" >> ReadFromKafka(config.bootstrap, [config.latents_topic], start=config.start,
                                             until_idle=config.until_idle)
            | "Summarise" >> beam.ParDo(Summarise(config)))


def run(config: EpisodicConfig, runner_args: list[str]):
    with beam.Pipeline(options=PipelineOptions(runner_args)) as p:
        build(p, config)
