"""The episodic pipeline, memstream's main job.

    latents topic ──▶ key by session ──▶ per session: decode, validate, cut windows of 4,096
         (Kafka)          │                    │   then, per bundle: compress (batched across
                          │                    │   sessions), chain and sign in window order
                          └── bad key          └── bad input ──▶ dead-letter topic
                                                   │
                                 episodic store ◀──┴──▶ summaries topic

Exactly-once effects on restart: the episodic store is the commit point. A window whose summary
is already stored is neither recompressed nor re-chained (the cutter and the chainer both read
the session's chain head from the store), and every stored summary not yet acknowledged by
Kafka is published again, byte for byte, so the summaries topic never forks either.
"""

from __future__ import annotations

import logging
import time
import typing
from dataclasses import dataclass, field

import apache_beam as beam
import numpy as np
from apache_beam.coders import PickleCoder
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec

from memstream import topics
from memstream.pipelines.kafka_io import KafkaRecord, ReadFromKafka, WriteToKafkaFn

log = logging.getLogger(__name__)

WINDOW = 4096  # latents per summary window
# Session ids as UTF-8 strings (a standard coder) key the stateful steps: the runner must read
# the key to give each session its own state and to process one session in one bundle at a time.
SessionKeyed = typing.Tuple[str, typing.Any]
DEAD = "dead_letters"


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


class KeyBySession(beam.DoFn):
    """(session_id, record); a record whose key is not a session id goes to the dead letters."""

    def process(self, rec: KafkaRecord):
        from memstream.codec import decode_key
        from memstream.errors import InvalidInputError

        try:
            yield decode_key(rec.key), rec
        except InvalidInputError as e:
            yield beam.pvalue.TaggedOutput(DEAD, _dead_letter(e, rec))


class SummariseSessions(beam.DoFn):
    """Per session: decode and validate each record in partition order, buffer accepted
    latents and cut exactly 4,096 of them per window (chunks may straddle windows); on close,
    the rest becomes a partial window, so no latent is lost. At the end of each bundle the
    windows it completed, of every session, are compressed in batches and chained.

    Cutting, compressing and chaining sit in one per-session stage on purpose: a session's
    windows never cross a shuffle, so they reach the chain in the order they were cut."""

    VALIDATOR = ReadModifyWriteStateSpec("validator", PickleCoder())
    BUFFER = BagStateSpec("buffer", PickleCoder())  # (first_seq, wire dtype, [n, d] in it) pieces
    # (first sequence number of the open window, latents in it, latest event time, its window index)
    FILL = ReadModifyWriteStateSpec("fill", PickleCoder())

    # Newest window index the store held when this session was first seen (-1: none). On a
    # replay the windows up to it are validated and counted, but not buffered or compressed.
    STORED = ReadModifyWriteStateSpec("stored", PickleCoder())

    def __init__(self, config: EpisodicConfig):
        self.config = config

    def setup(self):
        self._store = self.config.store()
        self._compress = WindowCompressor(self.config)
        self._chain = ChainWriter(self.config, self._store)

    def teardown(self):
        self._chain.close()

    def start_bundle(self):
        self._ready: list[Window] = []

    def finish_bundle(self):
        size = self.config.batch_size
        for i in range(0, len(self._ready), size):
            self._chain.write(self._compress(self._ready[i:i + size]))
        self._ready = []

    def process(self, element, validator_state=beam.DoFn.StateParam(VALIDATOR),
                buffer=beam.DoFn.StateParam(BUFFER), fill_state=beam.DoFn.StateParam(FILL),
                stored_state=beam.DoFn.StateParam(STORED)):
        from memstream.codec import LatentChunk, decode
        from memstream.errors import InvalidInputError
        from memstream.validation import SessionValidator, Verdict

        session_id, rec = element
        stored = stored_state.read()
        if stored is None:
            head = self._store.heads([session_id]).get(session_id)
            stored = head.window_index if head else -1
            stored_state.write(stored)
        validator = validator_state.read() or SessionValidator(session_id)
        try:
            record = decode(rec.key, rec.value)
            verdict = validator.check(record)
        except InvalidInputError as e:
            validator_state.write(validator)  # a gap still moves the session on
            yield beam.pvalue.TaggedOutput(DEAD, _dead_letter(e, rec))
            return
        validator_state.write(validator)
        if verdict is not Verdict.ACCEPTED:
            return  # a producer retry: dropped, idempotently
        seq_start, filled, event_us, index = fill_state.read() or (0, 0, 0, 0)
        if isinstance(record, LatentChunk):
            # Buffered in the wire dtype (half the bytes of float32 for fp16/bf16); widened at the cut.
            latents, first = record.array(), record.first_seq
            if filled and first != seq_start + filled:
                # After a sequence gap (its chunk went to the dead letters) the window so far is
                # closed as partial, and the next one starts where the stream resumed.
                self._emit(session_id, index, seq_start, buffer, True, event_us)
                index, filled = index + 1, 0
            if filled == 0:
                seq_start = first
            event_us = record.header.event_time_us
            while len(latents):
                take = min(WINDOW - filled, len(latents))
                if index > stored:  # a replay skips what the store holds
                    buffer.add((first, record.dtype, latents[:take]))
                first, latents, filled = first + take, latents[take:], filled + take
                if filled == WINDOW:
                    self._emit(session_id, index, seq_start, buffer, False, event_us)
                    index, seq_start, filled = index + 1, seq_start + WINDOW, 0
            fill_state.write((seq_start, filled, event_us, index))
        elif record.kind == "close":
            if filled:
                self._emit(session_id, index, seq_start, buffer, True, record.event_time_us)
            fill_state.write((seq_start + filled, 0, record.event_time_us, index + (1 if filled else 0)))

    def _emit(self, session_id, index, seq_start, buffer, partial, event_us):
        pieces = sorted(buffer.read(), key=lambda p: p[0])
        buffer.clear()
        if pieces:  # empty when the store already had this window
            from memstream.codec import to_float32

            latents = np.concatenate([to_float32(p[2], p[1]) for p in pieces])
            self._ready.append(Window(session_id, index, seq_start, latents, partial, event_us))


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
        for session_id in {r.session_id for r in sealed}:
            self.store.evict(session_id)

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

    def _republish_unacknowledged(self, session_id: str) -> None:
        """Stored summaries whose Kafka write was never acknowledged (a crash between the two
        writes) go out again, byte for byte."""
        records = self.store.unpublished(session_id)
        if records:
            log.info("re-publishing %d stored summaries of session %s", len(records), session_id)
            self._publish(records)


def build(p: beam.Pipeline, config: EpisodicConfig):
    """Wire the pipeline onto ``p``; returns the dead-letter PCollection (for tests)."""
    records = p | "ReadLatents" >> ReadFromKafka(config.bootstrap, [config.latents_topic], start=config.start,
                                                 until_idle=config.until_idle)
    keyed = (records | "KeyBySession" >> beam.ParDo(KeyBySession()).with_output_types(SessionKeyed)
             .with_outputs(DEAD, main="keyed"))
    summarised = (keyed.keyed
                  | "Summarise" >> beam.ParDo(SummariseSessions(config)).with_outputs(DEAD, main="done"))
    dead = (keyed[DEAD], summarised[DEAD]) | "DeadLetters" >> beam.Flatten()
    (dead
     | "DeadLetterJson" >> beam.Map(lambda d: (d.key, d.to_json()))
     | "ToDeadLetterTopic" >> beam.ParDo(WriteToKafkaFn(config.bootstrap, config.deadletter_topic)))
    return dead


def run(config: EpisodicConfig, runner_args: list[str]):
    from apache_beam.options.pipeline_options import PipelineOptions

    with beam.Pipeline(options=PipelineOptions(runner_args)) as p:
        build(p, config)
