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

from memstream import topics
from memstream.pipelines.kafka_io import KafkaRecord, ReadFromKafka

log = logging.getLogger(__name__)

WINDOW = 4096  # latents per summary window


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
    batch_size: int = 16
    store_window: int = 1220
    latents_topic: str = topics.LATENTS
    summaries_topic: str = topics.SUMMARIES
    deadletter_topic: str = topics.DEADLETTER
    until_idle: bool = False
    start: str = "earliest"
    # Names this run's worker-side state, so two pipelines in one process never share it.
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def signing_key(self):
        from memstream.crypto import SigningKey
        from memstream.errors import ConfigError

        if self.key_file:
            return SigningKey.from_file(self.key_file)
        if self.key_env:
            return SigningKey.from_env(self.key_env)
        raise ConfigError("no validator key: pass --key-file PATH or --key-env VAR")

    def store(self):
        from memstream.episodic import EpisodicStore

        return EpisodicStore(self.store_uri, self.storage_options, self.store_window)


@dataclass
class Window:
    """Latents [n, d] (float32) of one window, n == 4096 unless the session closed early."""

    session_id: str
    window_index: int
    seq_start: int
    latents: np.ndarray
    partial: bool
    event_time_us: int

    @property
    def seq_end(self) -> int:
        return self.seq_start + len(self.latents)


@dataclass
class Summary:
    """A compressed window, before it is chained."""

    window: Window
    tokens: bytes  # [256, d] little-endian fp16
    token_count: int
    dim: int
    operator_version: str
    processing_time_us: int = field(default_factory=lambda: time.time_ns() // 1000)


def _dead_letter(error, rec: KafkaRecord):
    from memstream.validation import dead_letter

    return dead_letter(error, topic=rec.topic, partition=rec.partition, offset=rec.offset, key=rec.key,
                       value=rec.value, timestamp_ms=rec.timestamp)


@dataclass
class SessionState:
    """One session's place in its stream: the validator, where the stored chain ended when the
    session was first seen (-1: nothing stored; a replay skips windows up to it), and the
    latents of the open window, kept in their wire dtype until the cut."""

    validator: object
    stored: int
    seq_start: int = 0
    filled: int = 0
    event_us: int = 0
    index: int = 0
    pieces: list = field(default_factory=list)  # (first_seq, wire dtype, [n, d]) in sequence order


@dataclass
class PartitionState:
    """Everything the pipeline holds for one partition of the latents topic, in offset order."""

    lock: threading.Lock = field(default_factory=threading.Lock)  # guards the fields below
    write_lock: threading.Lock = field(default_factory=threading.Lock)  # one writer at a time
    last_offset: int = -1  # records at or below it were processed: a retried bundle skips them
    sessions: dict = field(default_factory=dict)
    ready: list = field(default_factory=list)  # windows cut but not yet durably written
    dead: list = field(default_factory=list)  # dead letters not yet acknowledged by Kafka


# Per worker process, per pipeline run: the partitions this worker reads. A partition has one
# reader (its restriction is never split), so its records arrive here in offset order.
_PARTITIONS: dict[tuple[str, str, int], PartitionState] = {}
_PARTITIONS_LOCK = threading.Lock()


def _partition(run_id: str, topic: str, partition: int) -> PartitionState:
    with _PARTITIONS_LOCK:
        return _PARTITIONS.setdefault((run_id, topic, partition), PartitionState())


class Summarise(beam.DoFn):
    """Per session, in partition order: decode and validate each record, buffer accepted
    latents and cut exactly 4,096 of them per window (chunks may straddle windows); on close,
    the rest becomes a partial window, so no latent is lost; bad input becomes a dead letter.
    At the end of each bundle the windows cut so far, of every session, are compressed in
    batches, chained, signed and written, and the dead letters are sent.

    Session state sits with the partition's reader rather than in the runner's keyed state:
    each session lives in one partition, which one reader consumes in offset order, so no
    shuffle can reorder a session, and Prism 2.77 was seen to lose keyed state between
    bundles. A restarted pipeline re-reads the topic and rebuilds this state; windows the
    store already holds are skipped without being compressed."""

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
        from memstream.codec import LatentChunk, decode
        from memstream.errors import InvalidInputError
        from memstream.validation import SessionValidator, Verdict

        try:
            record = decode(rec.key, rec.value)
            state = part.sessions.get(record.session_id)
            if state is None:
                head = self._store.heads([record.session_id]).get(record.session_id)
                state = part.sessions[record.session_id] = SessionState(
                    SessionValidator(record.session_id), head.window_index if head else -1)
            verdict = state.validator.check(record)
        except InvalidInputError as e:
            part.dead.append(_dead_letter(e, rec))  # a gap still moves the session on
            return
        if verdict is not Verdict.ACCEPTED:
            return  # a producer retry: dropped, idempotently
        if isinstance(record, LatentChunk):
            latents, first = record.array(), record.first_seq
            if state.filled and first != state.seq_start + state.filled:
                # After a sequence gap (its chunk went to the dead letters) the window so far is
                # closed as partial, and the next one starts where the stream resumed.
                self._cut(part, record.session_id, state, partial=True)
            if state.filled == 0:
                state.seq_start = first
            state.event_us = record.header.event_time_us
            while len(latents):
                take = min(WINDOW - state.filled, len(latents))
                if state.index > state.stored:  # a replay skips what the store holds
                    state.pieces.append((first, record.dtype, latents[:take]))
                first, latents, state.filled = first + take, latents[take:], state.filled + take
                if state.filled == WINDOW:
                    self._cut(part, record.session_id, state, partial=False)
        elif record.kind == "close":
            state.event_us = record.event_time_us
            if state.filled:
                self._cut(part, record.session_id, state, partial=True)

    @staticmethod
    def _cut(part: PartitionState, session_id: str, state: SessionState, partial: bool) -> None:
        from memstream.codec import to_float32

        if state.pieces:  # empty when the store already had this window
            latents = np.concatenate([to_float32(p[2], p[1]) for p in state.pieces])
            part.ready.append(Window(session_id, state.index, state.seq_start, latents, partial, state.event_us))
        state.seq_start += state.filled
        state.index, state.filled, state.pieces = state.index + 1, 0, []

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

    def __call__(self, windows: list[Window]) -> list[Summary]:
        import torch

        d = self.model.config.dim
        lengths = torch.tensor([len(w.latents) for w in windows])
        x = torch.zeros((len(windows), WINDOW, d), dtype=torch.float32)
        for i, w in enumerate(windows):
            x[i, :len(w.latents)] = torch.from_numpy(w.latents)
        with torch.inference_mode():
            tokens = self.model.encode(x.to(self.device), lengths.to(self.device)).to(torch.float16).cpu().numpy()
        return [Summary(w, tokens[i].astype("<f2").tobytes(), tokens.shape[1], d, self.version)
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

        from memstream.infra.kafka import MAX_MESSAGE_BYTES

        self.config, self.store = config, store
        self.key = config.signing_key()
        self.producer = KafkaProducer(bootstrap_servers=config.bootstrap, acks="all", enable_idempotence=True,
                                      max_request_size=MAX_MESSAGE_BYTES, linger_ms=5)
        self._seen: set[str] = set()  # sessions whose unacknowledged summaries were re-published

    def close(self):
        self.producer.close()

    def write(self, summaries: list[Summary]) -> None:
        from memstream.errors import ServiceError

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

    def _seal(self, s: Summary, prev_hash: bytes):
        from memstream.chain import seal
        from memstream.schemas.records import SummaryRecord

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
        from memstream.validation import write_dead_letters

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
    from apache_beam.options.pipeline_options import PipelineOptions

    with beam.Pipeline(options=PipelineOptions(runner_args)) as p:
        build(p, config)
