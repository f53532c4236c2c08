"""The episodic pipeline, memstream's main job, on Beam's keyed state and timers.

    latents topic ─▶ Read (one reader per partition, from the group's committed offsets)
                     ─▶ Decode: stateless checks; bad records ─────────────────────────────┐
                     ─▶ keyed by session: CutWindows (state: the session's CutterState;     │
                        timer: idle windows) ── acks and pins of every record ─────────────┤
                     ─▶ Summarise: the window's latents read back by offset, compressed     │
                     ─▶ keyed by partition: Commit ◀──────────────────────────────────────┘
                        seal each session's windows in order (chain, sign), store them
                        insert-if-absent, then one Kafka transaction per partition and bundle:
                        the summaries, the dead letters and the consumer group's offsets

Only references to latent chunks cross the shuffles (:mod:`memstream.pipelines.log`). The
committed offset of a partition is the lowest one that a stored window does not yet cover
(:class:`~memstream.episodic.progress.PartitionProgress`), so a restart reads from there: its
cost follows the open windows, not the history. A session whose keyed state is empty is
resumed from its stored chain head (:meth:`CutterState.resume`), however old; a collected
session stays collected. Summaries carry no machine clock, so a replay makes them byte for
byte, and insert-if-absent makes a second writer harmless; a newer pipeline instance fences
an older one (an epoch in the store, and each partition's Kafka transactional id).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import signal
import threading
import time
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import apache_beam as beam
import numpy as np
from apache_beam.coders import BytesCoder, PickleCoder
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

from memstream.crypto.keys import SigningKey
from memstream.episodic.chain import seal
from memstream.episodic.progress import PartitionProgress
from memstream.episodic.store import EpisodicStore
from memstream.episodic.window import CutterState, Window, WindowCutter
from memstream.faults import crash_point
from memstream.errors import (CollectedSessionError, ConfigError, FencedError, IntegrityError, InvalidInputError,
                              KeyDestroyedError, OperatorWidthError, OutOfRangeError, PublishError, StateLostError,
                              UnknownSessionError, WindowTooLargeError)
from memstream.pipelines.kafka_io import KafkaRecord, ReadFromKafka
from memstream.pipelines.log import LogReader, close_readers
from memstream.schemas.records import DeadLetterReason, DeadLetterRecord, DType, SessionEvent, SummaryRecord
from memstream.settings import (BATCH_SIZE, DEADLETTER_TOPIC, HORIZON, IDLE_TIMEOUT_S, LATENTS_TOPIC,
                                MAX_MESSAGE_BYTES, MAX_WINDOW_BYTES, PIPELINE_GROUP, SUMMARIES_TOPIC, WINDOW,
                                KafkaSecurity)
from memstream.topics import kafka_python
from memstream.wire.codec import ChunkMeta, LatentChunk, decode, seal_tokens, to_float32, write_float32
from memstream.wire.deadletter import fit_dead_letter
from memstream.wire.validation import Verdict

log = logging.getLogger(__name__)

FP16_MAX = 65504.0
NS = "memstream"  # the namespace of the pipeline's Beam metrics


@dataclass(frozen=True)
class EpisodicConfig:
    """Everything the pipeline needs; picklable (the signing key travels as a file path or an
    environment variable name, never as bytes)."""

    bootstrap: str
    store_uri: str
    security: KafkaSecurity | None = None  # SASL and TLS of the cluster (a password travels as its file's path)
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
    group: str = PIPELINE_GROUP
    until_idle: bool = False
    start: str = "committed"  # committed, earliest or latest
    window: int = WINDOW
    idle_timeout_s: float = IDLE_TIMEOUT_S
    max_window_bytes: int = MAX_WINDOW_BYTES
    epoch: int = 0  # taken by run(); the Commit step stops when a newer one exists
    discover_s: float = 30.0
    master_key_file: str | None = None  # opens sealed chunks with the store's key table

    def data_keys(self):
        """The store's key table, or None without a master key (sealed chunks are then dead letters)."""
        if not self.master_key_file:
            return None
        from memstream.storage.keytable import KeyTable

        return KeyTable.open(self.store_uri, self.storage_options, self.master_key_file)

    def signing_key(self) -> SigningKey:
        if self.key_file:
            return SigningKey.from_file(self.key_file, role="validator")
        if self.key_env:
            return SigningKey.from_env(self.key_env)
        raise ConfigError("no validator key: pass --key-file PATH (make one with `memstream keys new --role "
                          "validator`) or --key-env VAR")

    def store(self) -> EpisodicStore:
        return EpisodicStore(self.store_uri, self.storage_options, self.horizon)

    def transactional_id(self, partition: int) -> str:
        return f"memstream.{self.group}.{self.latents_topic}.{partition}"


# -- elements --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """A record of the latents topic as the session rules see it: where it is, and its header
    or event, without its latents."""

    partition: int
    offset: int
    first: int  # the first offset it accounts for
    start: int  # where this run began reading the partition
    timestamp_ms: int
    record: ChunkMeta | SessionEvent


@dataclass(frozen=True)
class Rejected:
    """A record for the dead-letter topic; its original bytes are read back by offset."""

    offset: int
    key: bytes | None
    timestamp_ms: int
    reason: str
    message: str


@dataclass(frozen=True)
class Ack:
    """Offsets ``first..last`` of a partition are handled; ``pin``: (session, window) needs the
    record at ``last``; ``rejected``: it goes to the dead letters; ``unsent``: (session, window
    indexes) stored by an earlier attempt that Kafka may not have got, for Commit to publish."""

    start: int
    first: int
    last: int
    pin: tuple[str, int] | None = None
    rejected: Rejected | None = None
    unsent: tuple[str, tuple[int, ...]] | None = None


@dataclass(frozen=True)
class Compressed:
    """A window with its summary tokens, on its way to be chained, signed and stored."""

    start: int
    window: Window
    tokens: bytes  # token_count x dim little-endian fp16
    token_count: int
    dim: int
    operator_version: str

    @property
    def last_offset(self) -> int:
        return self.window.last_ref[1]


def _rejected(error: InvalidInputError, offset: int, key: bytes | None, timestamp_ms: int) -> Rejected:
    return Rejected(offset, key, timestamp_ms, error.reason.value, str(error))


# -- the operator ----------------------------------------------------------------------------

@dataclass(frozen=True)
class OperatorLimits:
    """What the compressor accepts: latents of width ``dim``, and small enough that its summary
    tokens fit fp16 (for an encoder whose slots are means of projected latents, every token
    coordinate is at most ``max_norm``-bounded by the latents' norm)."""

    dim: int
    max_norm: float


def operator_version(checkpoint: str | None) -> str:
    """``compressor-<sha256 prefix of the checkpoint file>``: which weights made a summary."""
    from memstream.operators.checkpoint import DEFAULT_CHECKPOINT

    path = checkpoint or DEFAULT_CHECKPOINT
    return f"compressor-{hashlib.sha256(open(path, 'rb').read()).hexdigest()[:16]}"


def operator_limits(model) -> OperatorLimits:
    import torch

    with torch.no_grad():
        gain = float(torch.linalg.matrix_norm(model.proj.float(), ord=2))  # largest stretch of the projection
        shift = float(model.shift.norm())
    return OperatorLimits(model.config.dim, 0.95 * FP16_MAX / max(gain, 1e-6) - shift)


class WindowCompressor:
    """The compression operator over windows of many sessions at once: one [B, 4096, d] call
    (zero padding plus lengths for partial windows), on the GPU when one is present. On the CPU
    a window's tokens do not depend on the batch it was in (checked by a test)."""

    def __init__(self, config: EpisodicConfig):
        import torch

        from memstream.operators.checkpoint import load_compressor

        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_compressor(config.checkpoint, device=device).eval()
        self.device = device
        self.version = operator_version(config.checkpoint)
        self.window = config.window
        self._batch = None  # the input batch, kept between calls: a fresh one costs its page faults

    def __call__(self, latents: list) -> np.ndarray:
        """Windows -> tokens [B, 256, d] (fp16). A window is its latents [n, d] (float32), or
        its pieces in order as (raw array, wire dtype) pairs, converted straight into the batch."""
        import torch

        d = self.model.config.dim
        if self._batch is None or len(self._batch) < len(latents):
            self._batch = torch.empty((len(latents), self.window, d), dtype=torch.float32)
        x = self._batch[:len(latents)]
        xn = x.numpy()  # the same memory
        lengths = []
        for i, w in enumerate(latents):
            pos = 0
            for raw, dtype in ([(w, DType.fp32)] if isinstance(w, np.ndarray) else w):
                write_float32(raw, dtype, xn[i, pos:pos + len(raw)])
                pos += len(raw)
            xn[i, pos:] = 0
            lengths.append(pos)
        lengths = torch.tensor(lengths)
        with torch.inference_mode():
            tokens = self.model.encode(x.to(self.device), lengths.to(self.device)).to(torch.float16).cpu().numpy()
        if not np.isfinite(tokens).all():  # the input checks should make this impossible
            raise IntegrityError("the compressor made non-finite fp16 tokens: the latent norm check missed a case")
        return tokens


# -- steps -----------------------------------------------------------------------------------

class Decode(beam.DoFn):
    """Stateless checks of every record (:func:`~memstream.wire.codec.decode`, and the operator's
    width and range); good records go on keyed by session, bad ones to the dead letters. The
    record's bytes stay with the log (:class:`~memstream.pipelines.log.LogReader`)."""

    DEAD = "dead"

    def __init__(self, config: EpisodicConfig):
        self.config = config

    def setup(self):
        from memstream.operators.checkpoint import load_compressor

        self._log = LogReader(self.config.bootstrap, self.config.security)
        self._limits = operator_limits(load_compressor(self.config.checkpoint))
        self._keys = self.config.data_keys()
    def process(self, rec: KafkaRecord):
        self._log.remember(rec.topic, rec.partition, rec.offset, rec.value)
        try:
            record = decode(rec.key, rec.value, keys=self._keys)
            if isinstance(record, LatentChunk):
                self._check(record)
                record = record.meta()
            elif record.dim is not None:
                self._check_width(record.dim, record.session_id)
        except InvalidInputError as e:
            yield beam.pvalue.TaggedOutput(self.DEAD, (rec.partition, Ack(
                rec.start, rec.first, rec.offset, rejected=_rejected(e, rec.offset, rec.key, rec.timestamp))))
            return
        yield record.session_id, Entry(rec.partition, rec.offset, rec.first, rec.start, rec.timestamp, record)

    def _check_width(self, dim: int, session_id: str) -> None:
        if dim * 4 * self.config.window > self.config.max_window_bytes:
            raise WindowTooLargeError(f"session {session_id!r}: a window of {self.config.window} latents of width "
                                      f"{dim} takes {dim * 4 * self.config.window} bytes, more than the limit of "
                                      f"{self.config.max_window_bytes}")
        if dim != self._limits.dim:
            raise OperatorWidthError(f"session {session_id!r} has latents of width {dim}; the compressor reads "
                                     f"{self._limits.dim}")

    def _check(self, chunk: LatentChunk) -> None:
        self._check_width(chunk.dim, chunk.session_id)
        raw = chunk.array()
        peak = float(np.abs(to_float32(raw, chunk.dtype) if chunk.dtype.name == "bf16" else raw).max())
        if peak * np.sqrt(chunk.dim) > self._limits.max_norm:  # only then is the exact norm needed
            with np.errstate(over="ignore"):  # an overflow is an infinite norm: too large, as it should be
                norm = float(np.linalg.norm(chunk.to_float32().astype(np.float64), axis=1).max())
            if norm > self._limits.max_norm:
                raise OutOfRangeError(f"chunk {chunk.first_seq}..{chunk.end_seq - 1} of session {chunk.session_id!r} "
                                      f"holds a latent of norm {norm:.4g}; summary tokens hold fp16 values, so the "
                                      f"compressor takes norms up to {self._limits.max_norm:.4g}")


class CutWindows(beam.DoFn):
    """Keyed by session: the session's :class:`CutterState` in keyed state, fed one record at a
    time in offset order; an event-time timer closes a window left idle. Emits the windows it
    cuts, and for every record an :class:`Ack` (with its pin or its dead letter) keyed by
    partition.

    Beam does not promise the order in which a key's elements arrive (a runner may hand a
    later bundle over first), so records wait in keyed state until the watermark passes their
    timestamp: the source stamps a partition's records with strictly increasing times, so by
    then every earlier record of the session has arrived, and they are fed sorted by offset."""

    CUTTER = ReadModifyWriteStateSpec("cutter", BytesCoder())
    START = ReadModifyWriteStateSpec("start", PickleCoder())  # (partition, run start) of the session
    PENDING = BagStateSpec("pending", PickleCoder())  # (timestamp us, Entry) not yet fed
    ORDER = TimerSpec("order", TimeDomain.WATERMARK)
    IDLE = TimerSpec("idle", TimeDomain.WATERMARK)
    ACKS = "acks"

    def __init__(self, config: EpisodicConfig):
        self.config = config

    def setup(self):
        self._store = self.config.store()
        self._log = LogReader(self.config.bootstrap, self.config.security)
        self._idle_us = int(self.config.idle_timeout_s * 1e6)
        self._windows = Metrics.counter(NS, "windows_cut")
        self._resumed = Metrics.counter(NS, "sessions_resumed")
        self._gaps = Metrics.counter(NS, "sequence_gaps")

    def _cutter(self, session_id: str, raw: bytes | None) -> tuple[WindowCutter, bool, tuple[int, ...]]:
        """The session's cutter; on empty state, resumed from the store. True when it was, and
        then the stored windows Kafka has not acknowledged."""
        if raw is not None:
            return WindowCutter(CutterState.from_bytes(raw), self.config.window, self._idle_us), False, ()
        head = self._store.head_record(session_id)
        unsent: tuple[int, ...] = ()
        if head is not None:
            self._resumed.inc()
            state = CutterState.resume(head)
            # Resumed past them, this state never cuts these windows again, so Commit would never
            # see them replayed: a job restored in place (Flink, after a worker died between the
            # store write and the transaction) gets no start-up republish either. Commit sends them.
            unsent = tuple(self._store.unpublished_windows(session_id))
        else:
            state = CutterState.new(session_id)
            if self._store.collected(session_id):
                state.validator.state = "collected"
        return WindowCutter(state, self.config.window, self._idle_us), True, unsent

    def process(self, kv, timestamp=beam.DoFn.TimestampParam, pending=beam.DoFn.StateParam(PENDING),
                order=beam.DoFn.TimerParam(ORDER)):
        _, entry = kv
        pending.add((timestamp.micros, entry))
        order.set(timestamp)  # a later set moves it; the drain re-arms it for what it leaves

    @on_timer(ORDER)
    def on_order(self, key=beam.DoFn.KeyParam, timer_ts=beam.DoFn.TimestampParam,
                 cutter_state=beam.DoFn.StateParam(CUTTER), start_state=beam.DoFn.StateParam(START),
                 pending=beam.DoFn.StateParam(PENDING), order=beam.DoFn.TimerParam(ORDER),
                 idle=beam.DoFn.TimerParam(IDLE)):
        yield from self._drain(key, timer_ts.micros, cutter_state, start_state, pending, order, idle)

    def _drain(self, session_id: str, upto_us: int, cutter_state, start_state, pending, order, idle):
        """Feed the pending records stamped at or before ``upto_us`` (the watermark has passed
        them), in offset order; the later ones wait for their own timer."""
        items = list(pending.read())
        ready = sorted((e for t, e in items if t <= upto_us), key=lambda e: e.offset)
        if not ready:
            return
        later = [(t, e) for t, e in items if t > upto_us]
        pending.clear()
        for item in later:
            pending.add(item)
        if later:
            order.set(Timestamp(micros=max(t for t, _ in later)))
        cutter, fresh, unsent = self._cutter(session_id, cutter_state.read())
        changed = fresh
        for entry in ready:
            outputs, accepted = self._feed(session_id, cutter, fresh, entry, (session_id, unsent) if unsent else None)
            yield from outputs
            fresh, unsent = False, ()
            if accepted:
                changed = True
                start_state.write((entry.partition, entry.start))
                if not self.config.until_idle:
                    # Streaming only: at the end of a bounded run the watermark jumps to the end of
                    # time, which is not idleness (the next record's time decides then, in feed()).
                    idle.set(Timestamp(micros=entry.timestamp_ms * 1000 + self._idle_us))
        if changed:
            cutter_state.write(cutter.state.to_bytes())

    def _feed(self, session_id: str, cutter: WindowCutter, fresh: bool, entry: Entry,
              unsent: tuple[str, tuple[int, ...]] | None = None) -> tuple[list, bool]:
        """One record through the cutter: its outputs, and whether the state accepted it. Its
        Ack carries ``unsent``, in the same partition's transaction as its offset."""
        state = cutter.state
        if state.last_ref is not None and entry.offset <= state.last_ref[1]:
            # Fed in offset order, an offset at or behind the last one applied is a record this
            # state has seen already (a replay from a committed offset inside a stored window).
            return [beam.pvalue.TaggedOutput(self.ACKS, (entry.partition, Ack(entry.start, entry.first, entry.offset,
                                                                              unsent=unsent)))], False
        if state.validator.state == "collected":
            fed_error = CollectedSessionError(f"session {session_id!r} was collected by session GC: publish "
                                              "under a new session id")
            fed = None
        else:
            fed = cutter.feed(entry.record, (entry.partition, entry.offset))
            fed_error = fed.error
            if fresh and (fed.verdict is Verdict.GAP or isinstance(fed.error, UnknownSessionError)):
                self._check_not_lost(session_id, entry)
        rejected = None
        if fed_error is not None:
            rejected = _rejected(fed_error, entry.offset, session_id.encode(), entry.timestamp_ms)
        if fed is not None and fed.verdict is Verdict.GAP:
            self._gaps.inc()
        pin = (session_id, fed.pin) if fed is not None and fed.pin is not None else None
        out = [beam.pvalue.TaggedOutput(self.ACKS, (entry.partition, Ack(entry.start, entry.first, entry.offset, pin,
                                                                          rejected, unsent)))]
        for window in fed.windows if fed is not None else ():
            self._windows.inc()
            out.append((window, entry.start))
        return out, fed is not None and fed.verdict.accepted

    @on_timer(IDLE)
    def on_idle(self, key=beam.DoFn.KeyParam, timer_ts=beam.DoFn.TimestampParam,
                cutter_state=beam.DoFn.StateParam(CUTTER), start_state=beam.DoFn.StateParam(START),
                pending=beam.DoFn.StateParam(PENDING), order=beam.DoFn.TimerParam(ORDER),
                idle=beam.DoFn.TimerParam(IDLE)):
        # Records stamped before the idle time come first, whichever timer fires first.
        yield from self._drain(key, timer_ts.micros, cutter_state, start_state, pending, order, idle)
        raw = cutter_state.read()
        if raw is None:
            return
        cutter = WindowCutter(CutterState.from_bytes(raw), self.config.window, self._idle_us)
        if cutter.state.closed:
            if not list(pending.read()):
                cutter_state.clear()  # a closed session: its stored close resumes it, if it is ever needed
                start_state.clear()
            return
        windows = cutter.idle(timer_ts.micros)
        _, start = start_state.read()
        for window in windows:
            self._windows.inc()
            yield window, start
        if not windows and cutter.state.filled:  # the records' clock lags the log's: look again later
            idle.set(Timestamp(micros=max(timer_ts.micros, cutter.state.event_time_us) + self._idle_us))
        cutter_state.write(cutter.state.to_bytes())

    def _check_not_lost(self, session_id: str, entry: Entry) -> None:
        """A fresh state whose first record looks like a gap (or a session never opened): were
        there records of this session earlier in this run? Then the runner lost the state."""
        earlier = self._log.session_records(self.config.latents_topic, entry.partition, entry.start,
                                            entry.offset - 1, session_id.encode())
        if earlier:
            raise StateLostError(f"session {session_id!r}: its keyed state is empty at offset {entry.offset}, but "
                                 f"this run already read its records at {earlier[:3]}: the runner lost or forked "
                                 "the state (Prism: see --experiments=prism_disable_sdf_split)")


class Summarise(beam.DoFn):
    """Reads each window's latents back by offset (:class:`LogReader`), compresses windows in
    batches, and sends them on keyed by partition."""

    def __init__(self, config: EpisodicConfig):
        self.config = config

    def setup(self):
        self._log = LogReader(self.config.bootstrap, self.config.security)
        self._compress = WindowCompressor(self.config)
        self._keys = self.config.data_keys()
        self._operator_ms = Metrics.distribution(NS, "operator_ms")

    def start_bundle(self):
        self._pending: list[tuple[Window, int, list]] = []

    def process(self, item):
        window, start = item
        if not window.pieces:  # a close or idle mark with no latents: nothing to compress
            yield window.last_ref[0], Compressed(start, window, b"", 0, self._dim(), self._compress.version)
            return
        try:
            latents = self._latents(window)
        except KeyDestroyedError:  # forgotten while its window was open: nothing to compress, ever
            yield window.last_ref[0], Compressed(start, window, b"", 0, self._dim(), self._compress.version)
            return
        self._pending.append((window, start, latents))
        if len(self._pending) >= self.config.batch_size:
            yield from self._flush()

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindow
        from apache_beam.utils.windowed_value import WindowedValue

        for out in self._flush():
            yield WindowedValue(out, Timestamp.of(time.time()), [GlobalWindow()])

    def _dim(self) -> int:
        return self._compress.model.config.dim

    def _latents(self, window: Window) -> list[tuple[np.ndarray, DType]]:
        """The window's latents as pieces of their chunks (views, in wire dtype)."""
        positions = sorted({p.ref for p in window.pieces})
        values = self._log.values(self.config.latents_topic, positions)
        parts = []
        for p in window.pieces:
            chunk = decode(window.session_id.encode(), values[p.ref], keys=self._keys)
            parts.append((chunk.array()[p.start:p.start + p.count], chunk.dtype))
        return parts

    def _flush(self):
        if not self._pending:
            return
        started = time.perf_counter()
        tokens = self._compress([x for _, _, x in self._pending])
        self._operator_ms.update(int((time.perf_counter() - started) * 1000))
        dim = self._dim()
        for (window, start, _), t in zip(self._pending, tokens):
            yield window.last_ref[0], Compressed(start, window, t.astype("<f2").tobytes(), t.shape[0], dim,
                                                 self._compress.version)
        self._pending = []


# -- the commit --------------------------------------------------------------------------------

# A transaction lasts one bundle's sends and commit; one a killed worker left open hides what
# follows it from read_committed consumers until the broker aborts it after this long.
TRANSACTION_TIMEOUT_MS = 10_000
PRODUCER_BATCH_BYTES = 1 << 20
_PRODUCERS: dict[str, object] = {}  # transactional id -> KafkaProducer, one per worker process
_PRODUCERS_LOCK = threading.Lock()


def _transactional_producer(bootstrap: str, security: KafkaSecurity | None, transactional_id: str,
                            fresh: bool = False):
    with _PRODUCERS_LOCK:
        producer = _PRODUCERS.get(transactional_id)
        if producer is not None and not fresh:
            return producer
        if producer is not None:
            producer.close(timeout=5)
        producer = kafka_python("producer", bootstrap, security, transactional_id=transactional_id,
                                enable_idempotence=True, acks="all", max_request_size=MAX_MESSAGE_BYTES,
                                linger_ms=5, transaction_timeout_ms=TRANSACTION_TIMEOUT_MS,
                                # a summary is about 260 KB: batch several into one request
                                batch_size=PRODUCER_BATCH_BYTES)
        producer.init_transactions()  # fences any older producer of this partition
        _PRODUCERS[transactional_id] = producer
        return producer


@dataclass
class _Work:
    """What one bundle leaves for a partition: records to store and publish, dead letters, and
    the offset the group may then commit."""

    sealed: list[SummaryRecord] = field(default_factory=list)
    replayed: list[tuple[str, int]] = field(default_factory=list)  # stored windows seen again
    rejected: list[Rejected] = field(default_factory=list)
    commit: int | None = None
    acked: int = 0  # every offset below it is handled, its dead letter (if any) sent with this work


class Commit(beam.DoFn):
    """Keyed by partition: chains and signs each session's windows in order, tracks the
    partition's progress, and makes a bundle's work durable in ``finish_bundle``: the store
    first (insert-if-absent), then one Kafka transaction with the summaries, the dead letters and
    the consumer group's offset. A failure fails the bundle, whose state changes the runner then
    drops, and the retry makes the same records (they are deterministic)."""

    PROGRESS = ReadModifyWriteStateSpec("progress", BytesCoder())
    HEADS = ReadModifyWriteStateSpec("heads", PickleCoder())  # session -> (window index, hash)
    WAITING = BagStateSpec("waiting", PickleCoder())  # windows ahead of their predecessor
    # Offsets below this had their dead letters sent already: the committed offset's metadata
    # says so (it travels in the same transaction), so a restart does not send them twice.
    LETTERS_SENT = ReadModifyWriteStateSpec("letters_sent", PickleCoder())

    def __init__(self, config: EpisodicConfig):
        self.config = config

    def setup(self):
        self._store = self.config.store()
        self._key = self.config.signing_key()
        self._keys = self.config.data_keys()
        self._log = LogReader(self.config.bootstrap, self.config.security)
        self._sink_ms = Metrics.distribution(NS, "sink_ms")
        self._sealed = Metrics.counter(NS, "summaries_stored")
        # Counted here, where they become final, not where they are read: a replayed record
        # or dead letter is not counted twice. (Prism reports no counters of the steps fused
        # with its Kafka read either.)
        self._records = Metrics.counter(NS, "records")
        self._committed = {}
        self._meta: dict[int, dict] = {}  # partition -> its committed offset's metadata when first seen

    def start_bundle(self):
        self._work: dict[int, _Work] = collections.defaultdict(_Work)

    def process(self, kv, progress_state=beam.DoFn.StateParam(PROGRESS), heads_state=beam.DoFn.StateParam(HEADS),
                waiting=beam.DoFn.StateParam(WAITING), letters_state=beam.DoFn.StateParam(LETTERS_SENT)):
        partition, msg = kv
        raw = progress_state.read()
        progress = PartitionProgress.from_bytes(raw) if raw else PartitionProgress(msg.start)
        if partition not in self._meta:
            self._meta[partition] = committed_metadata(self.config, [partition])[partition]
        sent = letters_state.read()
        if sent is None:
            # a run from the earliest or latest offset is a new reading: all its dead letters go out
            sent = self._meta[partition].get("acked", -1) if self.config.start == "committed" else -1
            letters_state.write(sent)
        work = self._work[partition]
        if isinstance(msg, Ack):
            if msg.pin is not None:
                progress.pin(msg.pin[0], msg.pin[1], msg.last)
            if msg.last >= progress.frontier:  # not a repeat of records handled before
                self._records.inc(msg.last - max(msg.first, progress.frontier) + 1)
            progress.ack(msg.first, msg.last)
            if msg.rejected is not None and msg.rejected.offset >= sent:
                work.rejected.append(msg.rejected)
            if msg.unsent is not None:
                work.replayed += [(msg.unsent[0], w) for w in msg.unsent[1]]
        else:
            heads = heads_state.read() or {}
            self._chain(msg, heads, progress, work, waiting)
            heads_state.write(heads)
        progress_state.write(progress.to_bytes())
        work.commit, work.acked = progress.committable(), progress.frontier

    def _chain(self, msg: Compressed, heads: dict, progress: PartitionProgress, work: _Work, waiting) -> None:
        sid = msg.window.session_id
        if sid not in heads:
            head = self._store.heads([sid]).get(sid)
            heads[sid] = (head.window_index, head.hash) if head else (-1, b"")
            if head is not None:  # an earlier attempt's windows, maybe never sent: they go out first
                work.replayed += [(sid, w) for w in self._store.unpublished_windows(sid)]
        index, prev = heads[sid]
        w = msg.window.window_index
        if w <= index:  # stored already (a replay after a restore): make sure it was published
            work.replayed.append((sid, w))
            progress.seal(sid, w, msg.last_offset)
            return
        if w > index + 1:  # its predecessor is still on its way
            waiting.add(msg)
            return
        ready = [msg]
        held = list(waiting.read())
        while ready:
            m = ready.pop()
            record = self._seal(m, prev)
            if record is not None:
                work.sealed.append(record)
                prev = record.hash
            progress.seal(sid, m.window.window_index, m.last_offset)
            index = m.window.window_index
            ready = [h for h in held if h.window.session_id == sid and h.window.window_index == index + 1]
            held = [h for h in held if h not in ready]
        heads[sid] = (index, prev)
        waiting.clear()
        for h in held:
            waiting.add(h)

    def _seal(self, m: Compressed, prev_hash: bytes) -> SummaryRecord | None:
        """The window's signed summary; None for a session forgotten while it was in flight."""
        w = m.window
        tokens = m.tokens  # sealed under the session's data key when the store has a key table
        if self._keys is not None:
            try:
                tokens = seal_tokens(w.session_id, w.window_index, tokens, *self._keys.session_key(w.session_id))
            except KeyDestroyedError:
                return None
        return seal(SummaryRecord(
            schema_version=SummaryRecord.SCHEMA_VERSION, session_id=w.session_id, window_index=w.window_index,
            seq_start=w.seq_start, seq_end=w.seq_end, cut=w.cut, token_count=m.token_count, dim=m.dim,
            tokens_dtype="fp16", tokens=tokens, operator_version=m.operator_version, producer_id=w.producer_id,
            latents_dtype=w.latents_dtype, latent_dim=w.latent_dim, event_time_us=w.event_time_us,
            prev_hash=prev_hash, hash=b"", signature=b"", key_id=""), self._key)

    def finish_bundle(self):
        """The bundle's work, durable in order: every partition's new summaries in one store
        write, one Kafka transaction per partition, then one publish mark for all of them (the
        store's costs are per bundle, not per partition or session)."""
        if not self._work:
            return
        started = time.perf_counter()
        self._store.check_epoch(self.config.group, self.config.epoch)
        sealed = [r for work in self._work.values() for r in work.sealed]
        if sealed:
            self._store.append(sealed)
            stored = self._store.stored_hashes([(r.session_id, r.window_index) for r in sealed])
            forked = sorted((r.session_id, r.window_index) for r in sealed
                            if stored.get((r.session_id, r.window_index)) != r.hash)
            if forked:
                raise FencedError(f"the store holds other summaries for {forked[:5]} than this pipeline made: "
                                  "another writer is at work; this one stops")
            self._sealed.inc(len(sealed))
            crash_point("after-store")  # fault tests: stored, not yet published
        published: list[SummaryRecord] = []
        # The partitions' transactions are independent (a producer each): run them side by side,
        # so that the bundle waits for the broker's round trips once, not once per partition.
        parts = sorted(self._work.items())
        if len(parts) > 1:
            with ThreadPoolExecutor(len(parts), thread_name_prefix="commit") as pool:
                sent = list(pool.map(lambda pw: self._send(*pw), parts))
        else:
            sent = [self._send(*pw) for pw in parts]
        for records, letters in sent:
            published += records
            for d in letters:  # counted here: Beam's metrics belong to the bundle's own thread
                Metrics.counter(NS, f"dead_letters_{DeadLetterReason(d.reason).value}").inc()
        if published:
            self._store.mark_published(published)
            heads: dict[str, int] = {}
            for r in published:
                heads[r.session_id] = max(r.window_index, heads.get(r.session_id, -1))
            self._store.evict_beyond_horizon(heads)
        self._sink_ms.update(int((time.perf_counter() - started) * 1000))

    def _send(self, partition: int, work: _Work) -> tuple[list[SummaryRecord], list[DeadLetterRecord]]:
        """One partition's transaction: its new summaries, replayed ones Kafka never got, its
        dead letters and its offset. Returns the summaries and the dead letters it sent."""
        publish = list(work.sealed)
        by_session = collections.defaultdict(list)
        for sid, w in work.replayed:
            by_session[sid].append(w)
        unmarked = []
        for sid, windows in by_session.items():
            done = self._store.published(sid, windows)
            unmarked += [r for r in self._store.records(sid, since_window=min(windows))
                         if r.window_index in windows and r.window_index not in done]
        if unmarked:  # stored, maybe sent by a transaction that committed just before a crash
            sent = on_topic(self.config, unmarked, self._meta[partition].get("summaries"))
            self._store.mark_published([r for r in unmarked if r.hash in sent])
            publish += [r for r in unmarked if r.hash not in sent]
            # A replayed window can be older than a new one of its session: the topic keeps each
            # session's chain in window order, whichever way the windows reached this bundle.
            publish.sort(key=lambda r: (r.session_id, r.window_index))
        letters = self._letters(partition, work.rejected)
        mark = (work.commit, work.acked)
        if publish or letters or mark != self._committed.get(partition):
            self._transact(partition, publish, letters, mark)
            self._committed[partition] = mark
            if publish:
                crash_point("after-transaction")  # fault tests: summaries sent, not yet marked in the store
        return publish, letters

    def _letters(self, partition: int, rejected: list[Rejected]) -> list[DeadLetterRecord]:
        if not rejected:
            return []
        topic = self.config.latents_topic
        values = self._log.values(topic, [(partition, r.offset) for r in rejected])
        return [DeadLetterRecord(DeadLetterRecord.SCHEMA_VERSION, r.reason, r.message, topic, partition, r.offset,
                                 r.key, values[(partition, r.offset)], len(values[(partition, r.offset)] or b""),
                                 r.timestamp_ms, time.time_ns() // 1000) for r in rejected]

    def _transact(self, partition: int, publish: list[SummaryRecord], letters: list[DeadLetterRecord],
                  offset: tuple[int, int]) -> None:
        import json

        from kafka import TopicPartition
        from kafka.errors import KafkaError, ProducerFencedError
        from kafka.structs import OffsetAndMetadata

        txn_id = self.config.transactional_id(partition)
        fresh = False
        for attempt in range(6):
            producer = _transactional_producer(self.config.bootstrap, self.config.security, txn_id, fresh)
            try:
                producer.begin_transaction()
                sent = [producer.send(self.config.summaries_topic, key=r.session_id.encode(), value=r.to_json())
                        for r in publish]
                for d in letters:
                    producer.send(self.config.deadletter_topic, key=d.key, value=fit_dead_letter(d))
                commit, acked = offset
                # The metadata travels with the offset, atomically: the dead letters below
                # ``acked`` are sent, and where on the summaries topic this transaction's
                # records begin (a restart looks there before sending unmarked ones again).
                meta = {"acked": acked, "summaries": self._meta[partition].get("summaries", {})}
                if sent:
                    producer.flush()  # the records' offsets, before the commit that makes them visible
                    meta["summaries"] = first_offsets(f.get(timeout=60) for f in sent)
                producer.send_offsets_to_transaction(
                    {TopicPartition(self.config.latents_topic, partition):
                     OffsetAndMetadata(commit, json.dumps(meta), -1)}, self.config.group)
                producer.commit_transaction()
                self._meta[partition]["summaries"] = {int(k): v for k, v in meta["summaries"].items()}
                return
            except ProducerFencedError:
                self._store.check_epoch(self.config.group, self.config.epoch)  # a newer instance: FencedError
                fresh = True  # our own older producer (another worker of this pipeline): take the id back
            except KafkaError as e:
                log.warning("partition %d: transaction failed (%s), retrying", partition, e)
                try:
                    producer.abort_transaction()
                except KafkaError:
                    fresh = True
                time.sleep(min(0.2 * 2 ** attempt, 5))
        raise PublishError(f"partition {partition}: the Kafka transaction of this bundle failed 6 times; the bundle "
                           "fails and is run again")


# -- the pipeline ----------------------------------------------------------------------------

def build(p: beam.Pipeline, config: EpisodicConfig):
    """Wire the pipeline onto ``p``."""
    records = p | "ReadLatents" >> ReadFromKafka(config.bootstrap, [config.latents_topic], start=config.start,
                                                 until_idle=config.until_idle, group_id=config.group,
                                                 discover_s=config.discover_s, security=config.security)
    decoded = records | "Decode" >> beam.ParDo(Decode(config)).with_outputs(Decode.DEAD, main="entries")
    cut = (decoded.entries
           | "CutWindows" >> beam.ParDo(CutWindows(config)).with_input_types(typing.Tuple[str, typing.Any])
           .with_outputs(CutWindows.ACKS, main="windows"))
    summaries = cut.windows | "Summarise" >> beam.ParDo(Summarise(config))
    return ((summaries, cut[CutWindows.ACKS], decoded[Decode.DEAD])
            | "Merge" >> beam.Flatten()
            | "Commit" >> beam.ParDo(Commit(config)).with_input_types(typing.Tuple[int, typing.Any]))


def close_clients() -> None:
    """Close this process's Kafka clients of the pipeline's steps, once its job has ended."""
    with _PRODUCERS_LOCK:
        for producer in _PRODUCERS.values():
            producer.close(timeout=5)
        _PRODUCERS.clear()
    close_readers()


def committed_metadata(config: EpisodicConfig, partitions: list[int] | None = None) -> dict[int, dict]:
    """Latents partition (all of them by default) -> the metadata of the group's committed
    offset, as that partition's last transaction wrote it: ``acked`` (dead letters below it are
    sent) and ``summaries`` (summaries partition -> the offset where that transaction's records
    begin); empty when none is committed. One consumer reads them all."""
    import json

    from kafka import TopicPartition

    c = kafka_python("consumer", config.bootstrap, config.security, group_id=config.group, enable_auto_commit=False)
    try:
        if partitions is None:
            partitions = sorted(c.partitions_for_topic(config.latents_topic) or ())
        metas = {p: c.committed(TopicPartition(config.latents_topic, p), metadata=True) for p in partitions}
    finally:
        c.close()
    out: dict[int, dict] = {}
    for p, meta in metas.items():
        try:
            raw = json.loads(meta.metadata) if meta is not None and meta.metadata else {}
            out[p] = {"acked": int(raw.get("acked", -1)),
                      "summaries": {int(k): int(v) for k, v in raw.get("summaries", {}).items()}}
        except (ValueError, TypeError, AttributeError):
            out[p] = {}
    return out


def first_offsets(metadata) -> dict[str, int]:
    """Summaries partition -> the lowest offset among these sends' RecordMetadata."""
    first: dict[str, int] = {}
    for md in metadata:
        first[str(md.partition)] = min(md.offset, first.get(str(md.partition), md.offset))
    return first


def on_topic(config: EpisodicConfig, records: list[SummaryRecord], since: dict[int, int] | None) -> set[bytes]:
    """Hashes of ``records`` already on the summaries topic (committed), looked for from
    ``since`` (summaries partition -> offset) to the end; nothing is looked for without it."""
    from kafka import TopicPartition

    if not records or not since:
        return set()
    wanted = {r.hash for r in records}
    c = kafka_python("consumer", config.bootstrap, config.security, enable_auto_commit=False,
                     isolation_level="read_committed", max_partition_fetch_bytes=MAX_MESSAGE_BYTES,
                     auto_offset_reset="earliest")
    found: set[bytes] = set()
    try:
        parts = [TopicPartition(config.summaries_topic, p) for p in sorted(since)]
        c.assign(parts)
        end = c.end_offsets(parts)  # read_committed: the last stable offset
        for tp in parts:
            c.seek(tp, since[tp.partition])
        while any(c.position(tp) < end[tp] for tp in parts):
            batches = c.poll(timeout_ms=5000)
            if not batches:
                break
            for tp, msgs in batches.items():
                for m in msgs:
                    if m.offset < end[tp]:
                        h = SummaryRecord.from_json(m.value).hash
                        if h in wanted:
                            found.add(h)
    finally:
        c.close()
    return found


def republish_unacknowledged(config: EpisodicConfig, store: EpisodicStore) -> int:
    """Stored summaries that Kafka never acknowledged go out again, byte for byte, before the
    pipeline starts, unless the transaction that sent them committed just before a crash
    (they are then on the topic, after where the committed offsets' metadata says)."""
    records = store.unpublished_all()
    if not records:
        return 0
    since: dict[int, int] = {}
    for partition, meta in committed_metadata(config).items():
        # Taking each partition's transactional id aborts what a killed instance left open, so
        # the topic's last stable offset moves past it; then the lowest start of any partition's
        # last transaction bounds where a sent-but-unmarked summary can be.
        _transactional_producer(config.bootstrap, config.security, config.transactional_id(partition))
        for sp, offset in meta.get("summaries", {}).items():
            since[sp] = min(offset, since.get(sp, offset))
    sent = on_topic(config, records, since)
    if sent:
        store.mark_published([r for r in records if r.hash in sent])
        records = [r for r in records if r.hash not in sent]
    if not records:
        return 0
    producer = kafka_python("producer", config.bootstrap, config.security, acks="all", enable_idempotence=True,
                            max_request_size=MAX_MESSAGE_BYTES)
    try:
        futures = [producer.send(config.summaries_topic, key=r.session_id.encode(), value=r.to_json())
                   for r in records]
        producer.flush()
        for f in futures:
            f.get(timeout=60)
    finally:
        producer.close()
    store.mark_published(records)
    log.info("re-published %d stored summaries Kafka had not acknowledged", len(records))
    return len(records)


# How often a running instance looks for a newer one, whether or not its bundles reach Commit.
EPOCH_CHECK_S = 5.0


def _watch_epoch(config: EpisodicConfig, store: EpisodicStore, result, fenced: list, done: threading.Event) -> None:
    """Cancel the job once a newer instance of the group has started. Commit checks the epoch
    before every write, but an instance with nothing to commit (its input done before the newer
    one started) would otherwise run on idle beside the newer one."""
    while not done.wait(EPOCH_CHECK_S):
        try:
            store.check_epoch(config.group, config.epoch)
        except FencedError as e:
            log.error("FencedError: %s", e)
            fenced.append(e)
            result.cancel()
            return
        except Exception as e:  # the store out of reach for a moment: Commit still checks before each write
            log.warning("could not read the pipeline's epoch from the store (%s); trying again", e)


def run(config: EpisodicConfig, runner_args: list[str], on_started=None):
    """Run the pipeline to its end (bounded) or until it fails or is stopped (streaming).
    ``on_started(result)`` is called once the job runs (the CLI serves metrics from it)."""
    store = config.store()
    config = dataclasses.replace(config, epoch=store.claim_epoch(config.group))
    republish_unacknowledged(config, store)
    p = beam.Pipeline(options=PipelineOptions(runner_args))
    build(p, config)
    result = p.run()
    if on_started is not None:
        on_started(result)
    stopping = []

    def stop(signum, frame):  # a SIGTERM or ^C cancels the job, and run() returns
        stopping.append(signum)
        result.cancel()

    main = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
    fenced: list[FencedError] = []
    done = threading.Event()
    threading.Thread(target=_watch_epoch, args=(config, store, result, fenced, done), name="memstream-epoch",
                     daemon=True).start()
    try:
        result.wait_until_finish()
    except Exception:
        if not fenced:  # cancelled because fenced: the FencedError below says why, not the runner's error
            raise
    finally:
        done.set()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    close_clients()
    if fenced:
        raise fenced[0]
    state = str(result.state)
    if "DONE" not in state and not stopping:
        raise PublishError(f"the pipeline ended in state {state}: the runner's log above says why")
    return result


