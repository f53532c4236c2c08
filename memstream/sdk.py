"""The producer SDK: publish latents of a session to Kafka.

    from memstream import Publisher

    with Publisher("127.0.0.1:9092") as pub:
        with pub.session("s1") as session:
            session.publish(latents)          # numpy or torch, [n, d], fp32 / fp16 / bf16

A session is opened with an ``open`` event, its latents go out in chunks under
``max_chunk_bytes`` numbered from 0, and ``close`` (or leaving the ``with``) sends a ``close``
event with the number of latents published. Everything is keyed by session id, so one session
stays in one partition, in order. The Kafka producer is idempotent (broker-side deduplication
of retries), and at most ``max_in_flight_bytes`` wait for acknowledgement: ``publish`` blocks
beyond that, which is the back-pressure.

With ``keys`` (a :class:`~memstream.storage.keytable.KeyTable` of the store the pipeline
writes), opening a session gets or makes the session's data key, and every chunk's payload
is sealed under it (AES-256-GCM): forgetting the session destroys the key, and every copy of
its latents on Kafka becomes unreadable.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from memstream.errors import (BadKeyError, ChunkLimitError, ClosedSessionError, ConfigError, DimMismatchError,
                              DTypeMismatchError, NonFiniteError, PublishError, ServiceError, SessionInUseError,
                              ShapeError, TopicMissingError, UnsupportedDTypeError)
from memstream.schemas.records import HEADER_SIZE, DType, SessionEvent
from memstream.settings import CHUNK_BYTES, IN_FLIGHT_BYTES, LATENTS_TOPIC, MAX_MESSAGE_BYTES
from memstream.settings import KafkaSecurity
from memstream.storage.keytable import KeyTable
from memstream.topics import kafka_python
from memstream.wire.codec import (NUMPY_DTYPES, SEALED_EXTRA, all_finite, encode_chunk, encode_event,
                                  float32_to_bf16_bits)

DEFAULT_CHUNK_BYTES = CHUNK_BYTES
# Room the broker needs around one message in a record batch (batch and record headers, key).
_BATCH_OVERHEAD = 64 << 10


@dataclass
class PublishStats:
    sessions: int = 0
    latents: int = 0
    chunks: int = 0
    bytes: int = 0  # message values sent, headers included


@dataclass(frozen=True)
class PublishResult:
    first_seq: int
    count: int
    chunks: int
    bytes: int


class Publisher:
    """Publishes latent sessions to the latents topic; use it as a context manager."""

    def __init__(self, bootstrap_servers: str, *, topic: str = LATENTS_TOPIC,
                 max_chunk_bytes: int = DEFAULT_CHUNK_BYTES, max_in_flight_bytes: int = IN_FLIGHT_BYTES,
                 linger_ms: int = 5, delivery_timeout_ms: int = 120_000, metadata_timeout_ms: int = 15_000,
                 kafka_config: dict[str, Any] | None = None, keys: KeyTable | None = None,
                 security: KafkaSecurity | None = None):
        if not HEADER_SIZE < max_chunk_bytes <= MAX_MESSAGE_BYTES - _BATCH_OVERHEAD:
            raise ChunkLimitError(f"max_chunk_bytes={max_chunk_bytes}: it must exceed the {HEADER_SIZE}-byte "
                                  f"header and stay within {MAX_MESSAGE_BYTES - _BATCH_OVERHEAD} "
                                  f"(the broker accepts {MAX_MESSAGE_BYTES}-byte batches)")
        if max_in_flight_bytes < max_chunk_bytes:
            raise ConfigError(f"max_in_flight_bytes={max_in_flight_bytes} must be at least "
                              f"max_chunk_bytes={max_chunk_bytes}")
        from kafka.errors import KafkaConfigurationError, KafkaError, KafkaTimeoutError

        self.topic = topic
        self.keys = keys
        self.bootstrap_servers = bootstrap_servers
        self.max_chunk_bytes = max_chunk_bytes
        self.max_in_flight_bytes = max_in_flight_bytes
        self.producer_id = uuid.uuid4().bytes
        self.stats = PublishStats()
        config = dict(client_id="memstream-publisher",
                      enable_idempotence=True, acks="all", max_in_flight_requests_per_connection=5,
                      linger_ms=linger_ms, batch_size=max_chunk_bytes + _BATCH_OVERHEAD,
                      max_request_size=MAX_MESSAGE_BYTES, delivery_timeout_ms=delivery_timeout_ms,
                      max_block_ms=metadata_timeout_ms, bootstrap_timeout_ms=metadata_timeout_ms,
                      allow_auto_create_topics=False)
        config.update(kafka_config or {})
        self.kafka_config = dict(config)  # what the KafkaProducer got besides the bootstrap and security
        self.security = security
        try:
            self._producer = kafka_python("producer", bootstrap_servers, security, **config)
        except KafkaConfigurationError as e:
            raise ConfigError(f"invalid Kafka producer settings: {e}") from e
        except KafkaError as e:
            raise ServiceError(f"no Kafka broker at {bootstrap_servers}: start one with `memstream infra up`") from e
        try:
            self._producer.partitions_for(topic)
        except KafkaTimeoutError:
            self._producer.close(timeout=5)
            raise TopicMissingError(topic, bootstrap_servers) from None
        self._pending: deque[tuple[Any, int]] = deque()  # (future, bytes) in send order
        self._pending_bytes = 0
        self._failure: PublishError | None = None
        self._sessions: dict[str, Session] = {}
        self._closed = False

    # -- sessions ------------------------------------------------------------------------
    def session(self, session_id: str, *, dtype: str | None = None, dim: int | None = None) -> Session:
        """Open a session and send its open event. ``dtype`` (fp32, fp16, bf16) is the wire
        dtype latents are converted to; by default each session keeps its first array's dtype."""
        self._check_open()
        if session_id in self._sessions:
            if self._sessions[session_id].closed:
                raise ClosedSessionError(f"session {session_id!r} is closed: use a new session id")
            raise SessionInUseError(f"session {session_id!r} is open already: publish through the Session "
                                    "that Publisher.session returned")
        key = _session_key(session_id)
        wire = _dtype_arg(dtype)
        if dim is not None and dim < 1:
            raise ShapeError(f"dim={dim} must be >= 1")
        # The key first: a forgotten session id is refused before anything is sent.
        sealed_by = (key, *self.keys.session_key(session_id)) if self.keys is not None else None
        session = Session(self, session_id, key, wire, dim, sealed_by)
        self._sessions[session_id] = session
        self._send_event(session, "open")
        self.stats.sessions += 1
        return session

    # -- sending -------------------------------------------------------------------------
    def _send_event(self, session: Session, kind: str) -> None:
        event = SessionEvent(schema_version=SessionEvent.SCHEMA_VERSION, kind=kind, session_id=session.session_id,
                             producer_id=self.producer_id,
                             dtype=session.dtype.name if session.dtype else None, dim=session.dim,
                             latents=session.next_seq if kind == "close" else 0, event_time_us=_now_us())
        self._send(session.key, encode_event(event))

    def _send(self, key: bytes, value: bytes) -> None:
        if self._failure:
            raise self._failure
        size = len(value)
        # Back-pressure: wait for the oldest sends until this one fits under the in-flight bound.
        while self._pending and (self._pending[0][0].is_done or
                                 self._pending_bytes + size > self.max_in_flight_bytes):
            self._settle(self._pending.popleft())
        from kafka.errors import KafkaTimeoutError

        try:
            future = self._producer.send(self.topic, key=key, value=value)
        except KafkaTimeoutError as e:
            raise PublishError(f"Kafka at {self.bootstrap_servers} did not accept a send in time: {e}") from e
        self._pending.append((future, size))
        self._pending_bytes += size
        self.stats.bytes += size

    def _settle(self, item: tuple[Any, int]) -> None:
        future, size = item
        self._pending_bytes -= size
        from kafka.errors import KafkaError

        try:
            future.get(timeout=None)
        except KafkaError as e:
            # Later sends of the same sessions would leave a hole: refuse them all.
            self._failure = PublishError(f"Kafka did not acknowledge a message on {self.topic!r} after "
                                         f"retries ({e}); the sessions in flight have a gap: publish them "
                                         "again under new session ids")
            raise self._failure from e

    @property
    def in_flight_bytes(self) -> int:
        """Bytes sent and not yet known to be acknowledged (at most max_in_flight_bytes)."""
        return self._pending_bytes

    def flush(self, timeout: float | None = None) -> None:
        """Block until every message sent so far is acknowledged; raise PublishError if one failed."""
        from kafka.errors import KafkaError, KafkaTimeoutError

        try:
            self._producer.flush(timeout)
        except KafkaTimeoutError as e:
            raise PublishError(f"Kafka did not acknowledge every message within {timeout} s: {e}") from e
        except KafkaError:
            pass  # a failed batch: its future, settled below, carries the cause
        while self._pending:
            self._settle(self._pending.popleft())
        if self._failure:  # sticky: a session with a hole stays reported until the publisher closes
            raise self._failure

    def close(self, timeout: float | None = 30.0) -> None:
        """Close the sessions still open, flush, and close the Kafka producer; raise PublishError
        if a message was not acknowledged."""
        if self._closed:
            return
        try:
            if not self._failure:
                for session in self._sessions.values():
                    if not session.closed:
                        session.close()
            self.flush(timeout)
        finally:
            self._closed = True
            self._producer.close(timeout=timeout)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedSessionError("this publisher is closed: create a new Publisher")

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # keep the caller's exception; still release the producer
            try:
                self.close()
            except Exception:
                pass


class Session:
    """One session of a Publisher: ``publish`` latents, then ``close``. Get it from Publisher.session."""

    def __init__(self, publisher: Publisher, session_id: str, key: bytes, dtype: DType | None, dim: int | None,
                 sealed_by: tuple[bytes, bytes, bytes] | None = None):
        self.publisher = publisher
        self._sealed_by = sealed_by  # (session key, data key id, data key)
        self.session_id = session_id
        self.key = key
        self.dtype = dtype
        self.dim = dim
        self.next_seq = 0  # sequence number of the next latent
        self.closed = False
        self._dtype_fixed = dtype is not None  # an explicit dtype converts; else the first array sets it

    def publish(self, latents) -> PublishResult:
        """Send latents [n, d] (numpy or torch; fp32, fp16, bf16) in chunks; n may be 0."""
        if self.closed:
            raise ClosedSessionError(f"session {self.session_id!r} is closed: open a new session to publish more")
        self.publisher._check_open()
        raw, dtype = _to_wire(latents, self.dtype if self._dtype_fixed else None)
        n, dim = raw.shape
        if self.dim is not None and dim != self.dim:
            raise DimMismatchError(f"latents of dim {dim} for session {self.session_id!r}, which has dim {self.dim}")
        if self.dtype is not None and dtype is not self.dtype:
            raise DTypeMismatchError(f"{dtype.name} latents for session {self.session_id!r}, which is "
                                     f"{self.dtype.name}: convert them, or open the session with dtype=")
        if not all_finite(raw, dtype):
            raise NonFiniteError(f"latents for session {self.session_id!r} hold NaN or Inf; nothing was sent")
        room = self.publisher.max_chunk_bytes - HEADER_SIZE - (SEALED_EXTRA if self._sealed_by else 0)
        per_chunk = room // (dim * dtype.itemsize)
        if per_chunk < 1:
            raise ChunkLimitError(f"one latent of dim {dim} ({dim * dtype.itemsize} bytes) does not fit in "
                                  f"max_chunk_bytes={self.publisher.max_chunk_bytes}: raise it")
        self.dtype, self.dim = dtype, dim
        first, sent, chunks = self.next_seq, 0, 0
        event_time_us = _now_us()
        producer_id = self.publisher.producer_id
        for start in range(0, n, per_chunk):
            part = raw[start:start + per_chunk]
            value = encode_chunk(producer_id=producer_id, dtype=dtype, dim=dim, count=len(part),
                                 first_seq=self.next_seq, event_time_us=event_time_us, payload=part.data.cast("B"),
                                 sealed_by=self._sealed_by)
            self.publisher._send(self.key, value)
            self.next_seq += len(part)
            sent += len(value)
            chunks += 1
        stats = self.publisher.stats
        stats.latents += n
        stats.chunks += chunks
        return PublishResult(first, n, chunks, sent)

    def close(self) -> None:
        """Send the close event (with the number of latents published); idempotent."""
        if self.closed:
            return
        self.publisher._send_event(self, "close")
        self.closed = True

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.publisher._closed and not self.publisher._failure:
            self.close()


def _now_us() -> int:
    return time.time_ns() // 1000


def _session_key(session_id: str) -> bytes:
    if not isinstance(session_id, str) or not session_id:
        raise BadKeyError(f"session id must be a non-empty string, got {session_id!r}")
    try:
        return session_id.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadKeyError(f"session id {session_id!r} is not encodable as UTF-8: {e.reason}") from None


def _dtype_arg(dtype: str | None) -> DType | None:
    if dtype is None:
        return None
    try:
        return DType[dtype]
    except KeyError:
        raise UnsupportedDTypeError(f"dtype={dtype!r}: choose one of {', '.join(DType.__members__)}") from None


_NUMPY_TO_WIRE = {np.dtype(np.float32): DType.fp32, np.dtype(np.float16): DType.fp16}


def _to_wire(latents, want: DType | None) -> tuple[np.ndarray, DType]:
    """A C-contiguous little-endian array in the wire dtype (bf16 as uint16 bits), and that dtype."""
    if type(latents).__module__.split(".")[0] == "torch":
        latents, have = _torch_to_numpy(latents)
    elif isinstance(latents, np.ndarray):
        have = _NUMPY_TO_WIRE.get(latents.dtype.newbyteorder("="))
        if have is None:
            raise UnsupportedDTypeError(f"numpy {latents.dtype} latents: use float32 or float16 (or a torch "
                                        "bfloat16 tensor); cast with .astype(np.float32)")
    else:
        raise UnsupportedDTypeError(f"latents must be a numpy array or torch tensor, not {type(latents).__name__}")
    if latents.ndim != 2 or latents.shape[1] < 1:
        raise ShapeError(f"latents must have shape [n, d] with d >= 1, got {list(latents.shape)}")
    want = want or have
    if want is not have:
        as32 = latents.astype(np.float32) if have is not DType.bf16 else (
            latents.astype(np.uint32) << 16).view(np.float32)
        latents = float32_to_bf16_bits(as32) if want is DType.bf16 else as32
    return np.ascontiguousarray(latents, dtype=NUMPY_DTYPES[want]), want


def _torch_to_numpy(t) -> tuple[np.ndarray, DType]:
    import torch

    names = {torch.float32: DType.fp32, torch.float16: DType.fp16, torch.bfloat16: DType.bf16}
    if t.dtype not in names:
        raise UnsupportedDTypeError(f"torch {t.dtype} latents: use float32, float16 or bfloat16")
    t = t.detach().cpu().contiguous()
    have = names[t.dtype]
    if have is DType.bf16:
        return t.view(torch.int16).numpy().view(np.uint16), have
    return t.numpy(), have
