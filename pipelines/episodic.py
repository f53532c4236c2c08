"""The episodic pipeline, memstream's main job.

    latents topic ──▶ key by session ──▶ decode, validate, cut windows of 4,096 ──▶ compress
         (Kafka)          │                    │ (per-session state)                 (RunInference)
                          └── bad key          └── bad input ──▶ dead-letter topic
                                                                       │
    summaries topic ◀── episodic store ◀── chain and sign (per-session, in window order) ◀──┘

Exactly-once effects on restart: the episodic store is the commit point. A window whose summary
is already stored is neither recompressed nor re-chained (the cutter and the chainer both read
the session's chain head from the store), and every stored summary not yet acknowledged by
Kafka is published again, byte for byte, so the summaries topic never forks either.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import typing
from dataclasses import dataclass, field

import apache_beam as beam
import numpy as np
from apache_beam.coders import PickleCoder
from apache_beam.ml.inference.base import ModelHandler, RunInference
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
    """A compressed window, before it is chained; ``processing_time_us`` is fixed here, so a
    retried chaining bundle reproduces the very same record."""

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


class CutWindows(beam.DoFn):
    """Per session: decode and validate each record in partition order, buffer accepted
    latents and emit exactly 4,096 of them per window (chunks may straddle windows); on
    close, the rest becomes a partial window, so no latent is lost."""

    VALIDATOR = ReadModifyWriteStateSpec("validator", PickleCoder())
    BUFFER = BagStateSpec("buffer", PickleCoder())  # (first_seq, float32 [n, d]) pieces
    # (first sequence number of the open window, latents in it, latest event time, its window index)
    FILL = ReadModifyWriteStateSpec("fill", PickleCoder())

    # Newest window index the store held when this session was first seen (-1: none). On a
    # replay the windows up to it are validated and counted, but not buffered or compressed.
    STORED = ReadModifyWriteStateSpec("stored", PickleCoder())

    def __init__(self, config: EpisodicConfig):
        self.config = config

    def setup(self):
        self._store = self.config.store()

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
            latents, first = record.to_float32(), record.first_seq
            if filled and first != seq_start + filled:
                # After a sequence gap (its chunk went to the dead letters) the window so far is
                # closed as partial, and the next one starts where the stream resumed.
                yield from self._emit(session_id, index, seq_start, buffer, True, event_us)
                index, filled = index + 1, 0
            if filled == 0:
                seq_start = first
            event_us = record.header.event_time_us
            while len(latents):
                take = min(WINDOW - filled, len(latents))
                if index > stored:  # a replay skips what the store holds
                    buffer.add((first, latents[:take]))
                first, latents, filled = first + take, latents[take:], filled + take
                if filled == WINDOW:
                    yield from self._emit(session_id, index, seq_start, buffer, False, event_us)
                    index, seq_start, filled = index + 1, seq_start + WINDOW, 0
            fill_state.write((seq_start, filled, event_us, index))
        elif record.kind == "close":
            if filled:
                yield from self._emit(session_id, index, seq_start, buffer, True, record.event_time_us)
            fill_state.write((seq_start + filled, 0, record.event_time_us, index + (1 if filled else 0)))

    def _emit(self, session_id, index, seq_start, buffer, partial, event_us):
        pieces = sorted(buffer.read(), key=lambda p: p[0])
        buffer.clear()
        if pieces:  # empty when the store already had this window
            yield Window(session_id, index, seq_start, np.concatenate([p[1] for p in pieces]), partial, event_us)


class CompressorHandler(ModelHandler):
    """RunInference model handler around the compression operator: ready windows of many
    sessions are batched into one [B, 4096, d] call (zero padding plus lengths for partial
    windows); on the GPU when one is present."""

    def __init__(self, config: EpisodicConfig):
        super().__init__(min_batch_size=1, max_batch_size=config.batch_size)
        self.config = config

    def load_model(self):
        import torch

        from memstream.operators.checkpoint import load_compressor

        device = self.config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_compressor(self.config.checkpoint, device=device).eval()
        model.memstream_version = operator_version(self.config.checkpoint)
        return model

    def run_inference(self, batch, model, inference_args=None):
        import torch

        device = next(model.parameters()).device
        d = model.config.dim
        lengths = torch.tensor([len(w.latents) for w in batch])
        x = torch.zeros((len(batch), WINDOW, d), dtype=torch.float32)
        for i, w in enumerate(batch):
            x[i, :len(w.latents)] = torch.from_numpy(w.latents)
        with torch.inference_mode():
            tokens = model.encode(x.to(device), lengths.to(device)).to(torch.float16).cpu().numpy()
        return [Summary(w, tokens[i].astype("<f2").tobytes(), tokens.shape[1], d, model.memstream_version)
                for i, w in enumerate(batch)]


def operator_version(checkpoint: str | None) -> str:
    """``compressor-<sha256 prefix of the checkpoint file>``: which weights made a summary."""
    import hashlib

    from memstream.operators.checkpoint import DEFAULT_CHECKPOINT

    path = checkpoint or DEFAULT_CHECKPOINT
    return f"compressor-{hashlib.sha256(open(path, 'rb').read()).hexdigest()[:16]}"


class ChainAndSign(beam.DoFn):
    """Per session, in window order: chain each summary to the head, sign it, and at the end
    of the bundle write the batch to the store (the commit point), then to Kafka.

    The head lives in per-session state (a runner processes one key in one bundle at a time);
    when the state is empty (first sight of the session, or after a restart) it is read from
    the store, and stored summaries that Kafka never acknowledged are published again."""

    HEAD = ReadModifyWriteStateSpec("head", PickleCoder())  # (window_index, hash) of the newest summary
    PENDING = BagStateSpec("pending", PickleCoder())  # summaries that arrived ahead of their turn

    def __init__(self, config: EpisodicConfig):
        self.config = config

    def setup(self):
        from kafka import KafkaProducer

        from memstream.infra.kafka import MAX_MESSAGE_BYTES

        self._key = self.config.signing_key()
        self._store = self.config.store()
        self._producer = KafkaProducer(bootstrap_servers=self.config.bootstrap, acks="all",
                                       enable_idempotence=True, max_request_size=MAX_MESSAGE_BYTES, linger_ms=5)

    def teardown(self):
        self._producer.close()

    def start_bundle(self):
        self._sealed: list = []

    def process(self, element, head_state=beam.DoFn.StateParam(HEAD), pending=beam.DoFn.StateParam(PENDING)):
        session_id, summary = element
        head = head_state.read()
        if head is None:
            stored = self._store.heads([session_id]).get(session_id)
            head = (stored.window_index, stored.hash) if stored else (-1, b"")
            self._republish_unacknowledged(session_id)
        index, prev_hash = head
        waiting = {s.window.window_index: s for s in pending.read()}
        waiting[summary.window.window_index] = summary
        waiting = {i: s for i, s in waiting.items() if i > index}  # stored already: a replay
        while index + 1 in waiting:
            record = self._seal(waiting.pop(index + 1), prev_hash)
            self._sealed.append(record)
            index, prev_hash = record.window_index, record.hash
        head_state.write((index, prev_hash))
        pending.clear()
        for s in waiting.values():
            pending.add(s)

    def _seal(self, s: Summary, prev_hash: bytes):
        from memstream.chain import seal
        from memstream.schemas.records import SummaryRecord

        w = s.window
        return seal(SummaryRecord(
            schema_version=SummaryRecord.SCHEMA_VERSION, session_id=w.session_id, window_index=w.window_index,
            seq_start=w.seq_start, seq_end=w.seq_end, partial=w.partial, token_count=s.token_count, dim=s.dim,
            tokens_dtype="fp16", tokens=s.tokens, operator_version=s.operator_version,
            event_time_us=w.event_time_us, processing_time_us=s.processing_time_us, prev_hash=prev_hash,
            hash=b"", signature=b"", key_id=""), self._key)

    def finish_bundle(self):
        if not self._sealed:
            return
        self._store.append(self._sealed)
        self._publish(self._sealed)
        for session_id in {r.session_id for r in self._sealed}:
            self._store.evict(session_id)

    def _publish(self, records) -> None:
        futures = [self._producer.send(self.config.summaries_topic, key=r.session_id.encode(), value=r.to_json())
                   for r in records]
        self._producer.flush()
        for f in futures:
            f.get(timeout=60)
        self._store.mark_published(records)

    def _republish_unacknowledged(self, session_id: str) -> None:
        """Stored summaries whose Kafka write was never acknowledged (a crash between the two
        writes) go out again, byte for byte."""
        records = self._store.unpublished(session_id)
        if records:
            log.info("re-publishing %d stored summaries of session %s", len(records), session_id)
            self._publish(records)


def build(p: beam.Pipeline, config: EpisodicConfig):
    """Wire the pipeline onto ``p``; returns the dead-letter PCollection (for tests)."""
    records = p | "ReadLatents" >> ReadFromKafka(config.bootstrap, [config.latents_topic], start=config.start,
                                                 until_idle=config.until_idle)
    keyed = (records | "KeyBySession" >> beam.ParDo(KeyBySession()).with_output_types(SessionKeyed)
             .with_outputs(DEAD, main="keyed"))
    cut = keyed.keyed | "CutWindows" >> beam.ParDo(CutWindows(config)).with_outputs(DEAD, main="windows")
    summaries = cut.windows | "Compress" >> RunInference(CompressorHandler(config))
    (summaries
     # BatchElements (inside RunInference) stamps its batches with the end of the window: put
     # each summary back at its window's event time.
     | "AtEventTime" >> beam.Map(lambda s: beam.window.TimestampedValue(s, s.window.event_time_us / 1e6))
     | "KeyBySessionAgain" >> beam.Map(lambda s: (s.window.session_id, s)).with_output_types(SessionKeyed)
     | "ChainAndSign" >> beam.ParDo(ChainAndSign(config)))
    dead = (keyed[DEAD], cut[DEAD]) | "DeadLetters" >> beam.Flatten()
    (dead
     | "DeadLetterJson" >> beam.Map(lambda d: (d.key, d.to_json()))
     | "ToDeadLetterTopic" >> beam.ParDo(WriteToKafkaFn(config.bootstrap, config.deadletter_topic)))
    return dead


def run(config: EpisodicConfig, runner_args: list[str]):
    from apache_beam.options.pipeline_options import PipelineOptions

    with beam.Pipeline(options=PipelineOptions(runner_args)) as p:
        build(p, config)
