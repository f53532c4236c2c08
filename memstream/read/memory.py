"""The unified read interface: one ``read(query_latent, session_id, k)`` over both timescales.

    query latent ──▶ routing policy, stage 1 (learned, small; the session's summary
                     centroids): does the episodic read alone serve? if not: long-term:
                     nearest signed entries (hot, optionally cold) ──▶ stage 2: is the
                     episodic read needed too? ──▶ episodic: the decoder cross-attends over
                     the session's summary window, each summary's decay bias added to its
                     tokens' logits; fragments = the summaries that drew the most attention

Every read is accounted: the session's query and the summaries it returned go to the
:class:`~memstream.episodic.ledger.ReadLedger` (staleness and decay, DAG ``episodic_decay``), long-term
hits to the store's access log (demotion). A configurable fraction of reads runs a second
time against a replica (:class:`Memory` over replica stores); a disagreement is published to
``memstream.read-divergence`` and counted.

The episodic read is the compressor's own decoder (:meth:`Compressor.attend
<memstream.operators.model.Compressor.attend>`) over the session's summary tokens, in two
stages (:mod:`memstream.read.window`: a coarse index over groups of each summary's slots picks
candidate summaries, the decoder reads those whole), or over every token with
``mode="exact"``. A session's tokens are read from storage and verified once, held as fp16
with their index, and kept in a byte-bounded LRU cache of sessions; new summaries are added
and evicted ones dropped without reloading the rest.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch

from memstream.crypto.keys import KeyRing
from memstream.episodic.chain import check_summary
from memstream.episodic.ledger import ReadLedger
from memstream.episodic.store import EpisodicStore
from memstream.errors import ConfigError, IntegrityError, InvalidQueryError, ServiceError, SessionNotFoundError
from memstream.longterm.store import LongTermStore
from memstream.read.routing import RoutePolicy, project
from memstream.read.window import SessionWindow
from memstream.schemas.records import ReadDivergence
from memstream.topics import kafka_python
from memstream.wire.codec import summary_tokens
from memstream.settings import (LEDGER_FLUSH_EVERY, MAX_READ_K, NPROBES, READ_CACHE_BYTES, READ_CANDIDATES,
                                READ_DIVERGENCE_TOPIC, READ_GROUPS, READ_MODE, READ_PROBE_GROUPS, KafkaSecurity)

log = logging.getLogger(__name__)

ROUTES = ("episodic", "longterm", "both")
MODES = ("two_stage", "exact")
Route = Literal["episodic", "longterm", "both"]
MAX_K = MAX_READ_K


# ------------------------------------------------------------------------------ results

@dataclass(frozen=True)
class EpisodicProvenance:
    session_id: str
    window_index: int
    hash: str  # hex of the summary's chain hash
    prev_hash: str
    key_id: str  # the validator key that signed it
    seq_start: int  # latents summarized: [seq_start, seq_end)
    seq_end: int
    partial: bool
    operator_version: str
    verified: bool  # hash recomputed and signature checked against the key ring


@dataclass(frozen=True)
class LongTermProvenance:
    entry_id: str
    validator_key_hash: str
    query_hash: str
    timestamp_ns: int
    supersedes: str | None
    key_id: str


@dataclass(frozen=True)
class Fragment:
    """What one read returned from one place.

    Episodic: ``score`` is the share of the decoder's attention the summary drew (0..1, summed
    over its slots, averaged over the query), ``bias`` the decay bias applied to it,
    ``latent`` the decoder's reconstruction of the query from that summary alone.
    Long-term: ``score`` is the cosine similarity of the entry to the query, ``payload`` its
    stored content."""

    source: Literal["episodic", "longterm"]
    tier: Literal["hot", "cold"]
    score: float
    provenance: EpisodicProvenance | LongTermProvenance
    latent: np.ndarray | None = None
    payload: bytes | None = None
    payload_kind: str | None = None
    bias: float = 0.0

    @property
    def key(self) -> str:
        """A stable name: ``episodic:<window>:<hash hex>`` or ``longterm:<entry id>``."""
        p = self.provenance
        if isinstance(p, EpisodicProvenance):
            return f"episodic:{p.window_index}:{p.hash}"
        return f"longterm:{p.entry_id}"


@dataclass(frozen=True)
class RouteDecision:
    route: Route
    probabilities: dict[str, float]  # the policy's, per route; empty when the caller chose
    chosen_by: Literal["policy", "caller"]


@dataclass(frozen=True)
class ReadResult:
    read_id: str
    session_id: str
    route: RouteDecision
    fragments: list[Fragment]
    reconstruction: np.ndarray | None  # decoder output over the whole window (episodic routes)
    sampled: bool = False  # executed a second time against the replica
    divergent: bool | None = None  # None when not sampled
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class ReadStats:
    reads: int = 0
    by_route: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROUTES, 0))
    sampled: int = 0
    divergent: int = 0
    published: int = 0  # divergence records Kafka acknowledged


# ------------------------------------------------------------------------------ session window

@dataclass
class SessionMemory:
    """One session's stored summaries as the read path holds them: their hashes and
    provenance (verified when loaded) and the :class:`SessionWindow` of their fp16 tokens."""

    session_id: str
    hashes: dict[int, bytes]
    provenance: dict[int, EpisodicProvenance]
    window: SessionWindow
    version: int = -1  # of the summaries table when ``hashes`` were read
    biases: tuple[int, dict[int, float]] = (-1, {})  # (bias table version, the session's decay biases)

    @property
    def windows(self) -> list[int]:
        return self.window.windows

    @property
    def centroids(self) -> np.ndarray:
        """[n, rank]: the mean slot of each summary, in window order (routing features)."""
        return self.window.centroids()

    @property
    def nbytes(self) -> int:
        return self.window.nbytes


# ------------------------------------------------------------------------------ the API

class Memory:
    """``Memory(episodic_uri, longterm_uri)``: reads over a session's episodic window and the
    long-term store, with accounting, routing and read sampling.

    ``keyring``: validator keys; summaries are verified (hash and signature) when first
    loaded, and the long-term store is opened with it. ``replica`` and ``sample_rate``: that
    fraction of reads also runs on ``replica`` (another Memory, e.g. over replica stores),
    and a divergence is published to ``divergence_topic`` on ``kafka_bootstrap`` (with ``kafka_security``).
    ``mode``: "two_stage" (``groups``, ``probe_groups`` and ``candidates`` set it; see
    :mod:`memstream.read.window`) or "exact". ``cache_bytes`` bounds the sessions held in
    memory (least recently read first out; the session being read always stays).
    Thread-safe, and no lock is held across a read; each process opens its own. ``close()``
    flushes the accounting. ``keys``: the store's key table
    (:class:`~memstream.storage.keytable.KeyTable`), which opens sealed summary tokens."""

    def __init__(self, episodic_uri: str, longterm_uri: str | None = None, *,
                 storage_options: dict[str, str] | None = None,
                 longterm_storage_options: dict[str, str] | None = None, keyring=None, model=None,
                 router=None, include_cold: bool = False, nprobes: int = NPROBES, cache_bytes: int = READ_CACHE_BYTES,
                 mode: str = READ_MODE, groups: int = READ_GROUPS, probe_groups: int = READ_PROBE_GROUPS,
                 candidates: int = READ_CANDIDATES,
                 flush_every: int = LEDGER_FLUSH_EVERY, replica: "Memory | None" = None, sample_rate: float = 0.0,
                 kafka_bootstrap: str | None = None, kafka_security: KafkaSecurity | None = None,
                 divergence_topic: str = READ_DIVERGENCE_TOPIC, score_tolerance: float = 1e-3, seed: int | None = None,
                 retention=None, keys=None):
        if not 0.0 <= sample_rate <= 1.0:
            raise ConfigError(f"sample_rate is a fraction of reads, 0..1; got {sample_rate}")
        if sample_rate > 0 and replica is None:
            raise ConfigError("read sampling needs a replica: pass replica=Memory(<replica stores>)")
        if sample_rate > 0 and not kafka_bootstrap:
            raise ConfigError("read sampling publishes divergences to Kafka: pass kafka_bootstrap")
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if min(groups, probe_groups, candidates) < 1 or cache_bytes < 0:
            raise ConfigError("groups, probe_groups and candidates must be >= 1 and cache_bytes >= 0")
        if model is None:
            from memstream.operators.checkpoint import load_default  # torch weights: loaded only when needed

            model = load_default()
        self.model = model.eval()
        self.dim = model.config.dim
        self.uri = episodic_uri
        self.store = EpisodicStore(episodic_uri, storage_options)
        self.keys = keys  # the store's key table: opens sealed summary tokens
        self.ledger = ReadLedger(episodic_uri, storage_options, flush_every=flush_every)
        self.keyring = keyring
        self.longterm = None
        if longterm_uri is not None:
            self.longterm = LongTermStore(longterm_uri, keyring=keyring if keyring is not None else KeyRing(),
                                          storage_options=longterm_storage_options, dim=self.dim, keys=keys)
            if self.longterm.dim != self.dim:
                raise ConfigError(f"the long-term store holds {self.longterm.dim}-d vectors, the compressor reads "
                                  f"{self.dim}-d latents: open a store of the same width")
        if router is None:
            router = RoutePolicy.load()
        self.router = router
        self.include_cold, self.nprobes = include_cold, nprobes
        self.cache_bytes = cache_bytes
        self.mode, self._window_args = mode, {"groups": groups, "probe": probe_groups, "candidates": candidates}
        self.replica, self.sample_rate = replica, sample_rate
        self.kafka_bootstrap, self.divergence_topic = kafka_bootstrap, divergence_topic
        self.kafka_security = kafka_security
        self.score_tolerance = score_tolerance
        self.stats = ReadStats()
        self._rng = random.Random(seed)
        self._cache: collections.OrderedDict[str, SessionMemory] = collections.OrderedDict()
        self._cache_lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = collections.defaultdict(threading.Lock)
        self._stats_lock = threading.Lock()
        self._producer = None
        # Query-time retention (memstream.longterm.retention.Retention): each accounted read is
        # offered to the write policy; the decision and the write happen on its own thread.
        self.retention = retention

    # -- lifecycle ---------------------------------------------------------------------
    def close(self) -> None:
        """Write the buffered accounting (read ledger and long-term access log) and the
        retained entries still pending."""
        if self.retention is not None:
            self.retention.close()
        self.ledger.flush()
        if self.longterm is not None:
            self.longterm.flush_access_log()
        if self._producer is not None:
            self._producer.close(timeout=10)
            self._producer = None

    def __enter__(self) -> "Memory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the read ----------------------------------------------------------------------
    def read(self, query, session_id: str, k: int = 8, *, route: Route | None = None,
             account: bool = True, subjects: frozenset[str] | None = None) -> ReadResult:
        """Read ``k`` fragments (per store consulted) for ``query_latent`` [d] in ``session_id``.
        ``route`` overrides the routing policy; ``account=False`` leaves the accounting alone
        (the replica's side of a sampled read). ``subjects``: long-term search (the routing
        probe included) sees only entries of these subject hashes, the caller's tenant's;
        None: every entry. Whether the caller may read ``session_id`` is decided before
        (:mod:`memstream.access`), so that a refused read is never accounted."""
        started = time.perf_counter()
        q = self._check_query(query)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:
            raise InvalidQueryError(f"k must be an integer in 1..{MAX_K}, got {k!r}")
        if route is not None and route not in ROUTES:
            raise InvalidQueryError(f"route must be one of {', '.join(ROUTES)} (or omitted), got {route!r}")
        if not isinstance(session_id, str) or not session_id:
            raise InvalidQueryError("session_id must be a non-empty string")
        window = self.session_memory(session_id)
        t_window = time.perf_counter()
        timings = {"window_ms": (t_window - started) * 1e3}
        probe = None
        if route is None and self.longterm is None:
            decision = RouteDecision("episodic", {}, "policy")  # nothing else to read
        elif route is None:
            decision, probe = self._route(q, window, int(k), subjects, timings)
        else:
            decision = RouteDecision(route, {}, "caller")
        if decision.route in ("longterm", "both") and self.longterm is None:
            raise InvalidQueryError("this memory has no long-term store: route 'episodic' only")
        fragments: list[Fragment] = []
        reconstruction = None
        if decision.route in ("episodic", "both"):
            t0 = time.perf_counter()
            eps, reconstruction = self._episodic(q, window, int(k))
            fragments += eps
            timings["episodic_ms"] = (time.perf_counter() - t0) * 1e3
        if decision.route in ("longterm", "both"):
            t0 = time.perf_counter()
            fragments += self._longterm(q, int(k), account, probe, subjects)
            timings["longterm_ms"] = (time.perf_counter() - t0) * 1e3
        read_id = uuid.uuid4().hex
        if account:
            self.ledger.record(session_id, [f.provenance.window_index for f in fragments if f.source == "episodic"])
        if account and self.retention is not None:
            t0 = time.perf_counter()
            lt = [f.score for f in fragments if f.source == "longterm"] if decision.route != "episodic" else (
                [1.0 - h.distance for h in probe] if probe is not None else None)
            self.retention.offer(q.numpy(), session_id=session_id, read_id=read_id,
                                 fragments=[(f.key, f.score) for f in fragments], neighbor_sims=lt)
            timings["retain_ms"] = (time.perf_counter() - t0) * 1e3
        result = ReadResult(read_id, session_id, decision, fragments,
                            None if reconstruction is None else reconstruction.numpy(), timings_ms=timings)
        with self._stats_lock:
            self.stats.reads += account
            self.stats.by_route[decision.route] += account
            sample = account and self.replica is not None and self._rng.random() < self.sample_rate
        if sample:
            result = self._sample(result, q, subjects)
        result.timings_ms["total_ms"] = (time.perf_counter() - started) * 1e3
        log.info("read %s session=%s route=%s (%s%s) fragments=%s", read_id, session_id, decision.route,
                 decision.chosen_by, "".join(f" {r}={p:.2f}" for r, p in decision.probabilities.items()),
                 [f.key for f in fragments])
        return result

    def _route(self, q: torch.Tensor, window: SessionMemory, k: int, subjects, timings: dict):
        """The policy's two stages: (decision, the probe's hits or None when the search was skipped).
        ``timings`` gets ``skip_ms`` (stage 1) and, only when the search ran, ``probe_ms``."""
        t0 = time.perf_counter()
        query = q.numpy()
        projected = project(self.model, query.reshape(1, -1))
        centroids = window.centroids
        skip = self.router.skip_probability(query, projected, centroids)
        timings["skip_ms"] = (time.perf_counter() - t0) * 1e3
        if skip >= self.router.skip_threshold:  # confident the episodic read serves: no long-term search
            return RouteDecision("episodic", {"episodic": skip, "longterm": 0.0, "both": 1.0 - skip}, "policy"), None
        t0 = time.perf_counter()
        # Accounted only if its hits are returned.
        probe = self.longterm.search(query, k, include_cold=self.include_cold, nprobes=self.nprobes,
                                     record_access=False, subjects=subjects)
        sims = [1.0 - h.distance for h in probe[:2]] + [float("nan")] * (2 - len(probe[:2]))
        # Then the episodic read, the expensive one, only where it would serve better.
        p = self.router.episodic_probability(query, projected, centroids, sims)
        timings["probe_ms"] = (time.perf_counter() - t0) * 1e3
        rest = 1.0 - skip
        return RouteDecision("both" if p >= self.router.threshold else "longterm",
                             {"episodic": skip, "longterm": rest * (1.0 - p), "both": rest * p}, "policy"), probe

    def _check_query(self, query) -> torch.Tensor:
        try:
            a = np.asarray(query, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise InvalidQueryError(f"the query latent must be a vector of {self.dim} numbers: {e}") from None
        if a.ndim == 2 and a.shape[0] == 1:
            a = a[0]
        if a.shape != (self.dim,):
            raise InvalidQueryError(f"the query latent must have {self.dim} values (the compressor's latent width), "
                                    f"got shape {list(a.shape)}")
        if not np.isfinite(a).all():
            raise InvalidQueryError("the query latent holds NaN or Inf: pass finite values")
        return torch.from_numpy(np.array(a, dtype=np.float32))  # a writable copy

    # -- episodic ----------------------------------------------------------------------
    def _episodic(self, q: torch.Tensor, memory: SessionMemory, k: int) -> tuple[list[Fragment], torch.Tensor]:
        version = self.ledger.biases_version()
        seen, stored = memory.biases
        if seen != version:  # read the biases again only when the table changed
            stored = self.ledger.biases(memory.session_id)
            memory.biases = (version, stored)
        found = memory.window.read(q, stored, k, exact=self.mode == "exact")
        fragments = [Fragment("episodic", "hot", share, memory.provenance[w], latent=latent.numpy(),
                              bias=float(stored.get(w, 0.0)))
                     for w, share, latent in zip(found.windows, found.shares, found.latents)]
        return fragments, found.reconstruction

    def session_memory(self, session_id: str) -> SessionMemory:
        """The session's summaries as held for reading: from the cache while the store holds
        exactly the summaries (window indices and hashes) it holds (unchanged when the table's
        version is); otherwise brought up to date, loading only the summaries it lacks."""
        version = self.store.version()
        with self._cache_lock:
            cached = self._cache.get(session_id)
            if cached is not None and cached.version == version:  # nothing stored since: no query
                self._cache.move_to_end(session_id)
                return cached
        current = self.store.hashes(session_id)
        if not current:
            raise SessionNotFoundError(f"no summaries stored for session {session_id!r} in {self.uri}: publish its "
                                       "latents and run the pipeline (`memstream run`) first")
        with self._cache_lock:
            cached = self._cache.get(session_id)
            if cached is not None and cached.hashes == current:
                cached.version = max(cached.version, version)
                self._cache.move_to_end(session_id)
                return cached
        with self._loading[session_id]:  # one loader per session; other sessions go on
            with self._cache_lock:
                cached = self._cache.get(session_id)
            if cached is None or cached.hashes != current:
                cached = self._load(session_id, current, cached)
            cached.version = version
            with self._cache_lock:
                self._cache[session_id] = cached
                self._cache.move_to_end(session_id)
                total = sum(m.nbytes for m in self._cache.values())
                while total > self.cache_bytes and len(self._cache) > 1:
                    _, dropped = self._cache.popitem(last=False)
                    total -= dropped.nbytes
            return cached

    def cached_bytes(self) -> dict[str, int]:
        """Bytes held per cached session (fp16 tokens and their index)."""
        with self._cache_lock:
            return {s: m.nbytes for s, m in self._cache.items()}

    def _load(self, session_id: str, current: dict[int, bytes], cached: SessionMemory | None) -> SessionMemory:
        """Bring ``cached`` (or a new window) to the stored summaries ``current``. Everything new
        is read and verified before the window changes, so a failed load changes nothing;
        readers of the window meanwhile see it before or after each change, never between."""
        keep = {w for w, h in current.items() if cached is not None and cached.hashes.get(w) == h}
        new = sorted(set(current) - keep)
        records = {r.window_index: r for r in self.store.records(session_id, since_window=new[0])
                   if r.window_index in new} if new else {}
        provenance = {w: cached.provenance[w] for w in keep} if cached is not None else {}
        tokens = []
        for w in new:
            r = records.get(w)
            if r is None or r.hash != current[w]:
                raise ServiceError(f"session {session_id!r} changed while it was being read (window {w}); read again")
            if r.dim != self.dim:
                raise IntegrityError(f"summary {session_id}/{w} has {r.dim}-d tokens, the compressor reads {self.dim}")
            verified = check_summary(r, self.keyring)
            try:
                held = summary_tokens(r, self.keys).astype(np.float16)  # exact for the fp16 the pipeline writes
            except ValueError as e:
                raise IntegrityError(str(e)) from None
            if r.tokens_dtype != "fp16" and not np.isfinite(held).all():
                raise IntegrityError(f"summary {session_id}/{w}: {r.tokens_dtype} tokens beyond the fp16 range the "
                                     "read path holds; write summaries as fp16")
            tokens.append((w, torch.from_numpy(held)))
            provenance[w] = EpisodicProvenance(session_id, w, r.hash.hex(), r.prev_hash.hex(), r.key_id, r.seq_start,
                                               r.seq_end, r.partial, r.operator_version, verified)
        windows = sorted(current)
        for a, b in zip(windows, windows[1:]):  # links between neighbours still stored
            if b == a + 1 and provenance[b].prev_hash != provenance[a].hash:
                raise IntegrityError(f"session {session_id!r}: window {b} does not chain to window {a}")
        if cached is None:
            cached = SessionMemory(session_id, {}, {}, SessionWindow(self.model, **self._window_args))
        cached.provenance = {**cached.provenance, **provenance}  # a superset while the window changes
        for w in set(cached.window.windows) - keep:
            cached.window.remove(w)
        cached.window.add_many(tokens)
        cached.provenance, cached.hashes = provenance, dict(current)
        return cached

    # -- long-term ---------------------------------------------------------------------
    def _longterm(self, q: torch.Tensor, k: int, account: bool, hits=None, subjects=None) -> list[Fragment]:
        if hits is None:
            hits = self.longterm.search(q.numpy(), k, include_cold=self.include_cold, nprobes=self.nprobes,
                                        record_access=account, subjects=subjects)
        elif account:
            self.longterm.record_access(hits)
        out = []
        for h in hits:  # the search returns the provenance columns: no second lookup by id
            prov = LongTermProvenance(h.entry_id, h.validator_key_hash, h.query_hash, h.timestamp_ns, h.supersedes,
                                      h.key_id)
            out.append(Fragment("longterm", h.tier, 1.0 - h.distance, prov, payload=h.payload,
                                payload_kind=h.payload_kind))
        return out

    # -- read sampling -----------------------------------------------------------------
    def _sample(self, result: ReadResult, q: torch.Tensor, subjects: frozenset[str] | None) -> ReadResult:
        reasons: list[str] = []
        replica_keys: list[str] = []
        delta = 0.0
        try:
            other = self.replica.read(q.numpy(), result.session_id, max(1, _k_of(result)),
                                      route=result.route.route, account=False, subjects=subjects)
            replica_keys = [f.key for f in other.fragments]
            reasons, delta = compare(result.fragments, other.fragments, self.score_tolerance)
        except Exception as e:  # a replica that cannot answer diverges too
            reasons = [f"the replica failed: {type(e).__name__}: {e}"]
        divergent = bool(reasons)
        with self._stats_lock:
            self.stats.sampled += 1
            self.stats.divergent += divergent
        if divergent:
            log.warning("read %s diverged on the replica: %s", result.read_id, "; ".join(reasons))
            self._publish_divergence(result, replica_keys, delta, reasons)
        return ReadResult(result.read_id, result.session_id, result.route, result.fragments, result.reconstruction,
                          True, divergent, result.timings_ms)

    def _publish_divergence(self, result: ReadResult, replica_keys: list[str], delta: float,
                            reasons: list[str]) -> None:
        from kafka.errors import KafkaError

        record = ReadDivergence(ReadDivergence.SCHEMA_VERSION, result.read_id, result.session_id, result.route.route,
                                self.uri, self.replica.uri, [f.key for f in result.fragments], replica_keys,
                                float(delta), reasons, time.time_ns() // 1000)
        try:
            with self._stats_lock:
                if self._producer is None:
                    self._producer = kafka_python("producer", self.kafka_bootstrap, self.kafka_security, acks="all")
                producer = self._producer
            producer.send(self.divergence_topic, key=result.session_id.encode(),
                          value=record.to_json()).get(timeout=30)
        except KafkaError as e:
            raise ServiceError(f"publishing the divergence of read {result.read_id} to {self.divergence_topic} at "
                               f"{self.kafka_bootstrap} failed ({e}); it is counted in Memory.stats and logged") from e
        with self._stats_lock:
            self.stats.published += 1


def _k_of(result: ReadResult) -> int:
    by_source = collections.Counter(f.source for f in result.fragments)
    return max(by_source.values(), default=1)


def compare(first: Sequence[Fragment], second: Sequence[Fragment], tolerance: float) -> tuple[list[str], float]:
    """The differences between two executions of one read (fragments, order, scores, content),
    in words, and the largest score difference over the fragments both returned."""
    reasons = []
    a, b = {f.key: f for f in first}, {f.key: f for f in second}
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        reasons.append(f"fragments differ: only first {only_a[:4]}, only replica {only_b[:4]}")
    elif [f.key for f in first] != [f.key for f in second]:
        reasons.append("the same fragments in another order")
    delta = 0.0
    for key in set(a) & set(b):
        fa, fb = a[key], b[key]
        delta = max(delta, abs(fa.score - fb.score))
        if fa.payload != fb.payload:
            reasons.append(f"{key}: payloads differ")
        if fa.latent is not None and fb.latent is not None and not np.allclose(fa.latent, fb.latent, atol=tolerance,
                                                                               rtol=tolerance):
            reasons.append(f"{key}: reconstructed latents differ")
        if fa.tier != fb.tier:
            reasons.append(f"{key}: tier {fa.tier} vs {fb.tier}")
    if delta > tolerance:
        reasons.append(f"scores differ by up to {delta:.3g} (tolerance {tolerance:g})")
    return reasons, delta
