"""Every setting of memstream, with its one default, read from the environment and an optional
``memstream.toml``.

Defaults are the constants below; each setting class names them, and every module that
needs a default imports it from here, so no number is written twice.

Sources, later ones winning:

1. the defaults below;
2. ``memstream.toml`` in the working directory, or the file named by ``$MEMSTREAM_CONFIG``:
   one table per section, e.g. ``[kafka] bootstrap = "broker:9092"``;
3. environment variables ``MEMSTREAM_<SECTION>_<NAME>``, e.g. ``MEMSTREAM_KAFKA_BOOTSTRAP``.

A setting class nested in a section (:class:`KafkaSecurity` in ``kafka``) takes its settings
from the section's table and variables, flat: ``[kafka] security_protocol = "SASL_SSL"``,
``MEMSTREAM_KAFKA_SASL_USERNAME``.

A value that does not parse as the setting's type raises :class:`~memstream.errors.ConfigError`
naming the source. Only the standard library is imported here: this module is below everything.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from memstream.errors import ConfigError, KafkaSecurityError

# -- the numbers of the design ----------------------------------------------------------------
WINDOW = 4096  # latents per episodic window
SUMMARY_TOKENS = 256  # summary tokens per window
LATENT_DIM = 384  # width of the latents the default compressor reads (MiniLM)
HORIZON = 1220  # summaries kept per session in the episodic store (1,220 x 4,096: about 5M latents)
DECAY_K = 64  # queries a summary may go unread before it decays
DECAY_SLOPE = 0.125  # attention bias lost per query beyond DECAY_K
DECAY_CUTOFF = -8.0  # summaries whose bias falls below this leave the window
SESSION_RETENTION_HOURS = 24.0 * 7  # idle sessions are collected after this long
COLD_AFTER_DAYS = 90.0  # long-term entries not retrieved for this long go cold
CONSOLIDATE_TOP = 4  # summaries per session that consolidation moves to long-term memory
CONSOLIDATE_MIN_READS = 1  # a summary read fewer times than this is not consolidated
RETAIN_BATCH = 64  # retained entries per long-term append (query-time retention)
RETAIN_LINGER_S = 1.0  # how long a partial retention batch waits for more (each append costs the cores a commit)

# -- Kafka -------------------------------------------------------------------------------------
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # the broker, topics and clients accept messages up to this
CHUNK_BYTES = 1 << 20  # the largest latent chunk a publisher sends by default
IN_FLIGHT_BYTES = 64 << 20  # unacknowledged bytes a publisher keeps in flight at most
PARTITIONS = 4
RETENTION_MS = 7 * 24 * 3600 * 1000

LATENTS_TOPIC = "memstream.latents"  # latent chunks and session events, key = session id
SUMMARIES_TOPIC = "memstream.summaries"
DEADLETTER_TOPIC = "memstream.deadletter"
ATTESTATIONS_TOPIC = "memstream.attestations"
FORGET_TOPIC = "memstream.forget"
READ_DIVERGENCE_TOPIC = "memstream.read-divergence"  # sampled reads whose replica disagreed

# -- pipeline, reads, long-term ----------------------------------------------------------------
BATCH_SIZE = 16  # windows per compressor call
PIPELINE_GROUP = "memstream-episodic"  # the Kafka consumer group whose offsets the pipeline commits
IDLE_TIMEOUT_S = 600.0  # event time without a record after which a session's open window closes
LOG_CACHE_BYTES = 1 << 30  # latents a pipeline worker keeps after reading them, before asking Kafka again
MAX_WINDOW_BYTES = 256 << 20  # a window of a session's latents (as float32) may not exceed this
READ_K = 8  # fragments per store consulted
MAX_READ_K = 64
READ_CACHE_BYTES = 2 << 30  # session windows (fp16 tokens and their index) the read path keeps in memory
READ_MODE = "two_stage"  # or "exact": attend over every token of the window
READ_GROUPS = 32  # slot groups per summary, the coarse stage's index (memstream/read/window.py)
READ_GROUP_ITERS = 4  # k-means steps that form them
READ_PROBE_GROUPS = 1024  # groups whose tokens the coarse stage reads
READ_CANDIDATES = 16  # summaries the exact stage reads whole
READ_UNION_TAIL = 1e-3  # probed slots of other summaries left out of the exact stage: this share of their weight
READ_WORKERS = 4  # threads of `memstream serve` that run reads
LEDGER_FLUSH_EVERY = 32  # reads per append to the read ledger
ACCESS_REFRESH_S = 5.0  # how soon `memstream serve` sees a new or revoked credential
HOST = "127.0.0.1"  # every service memstream starts binds this machine only
SERVE_PORT = 8765
LONGTERM_METRIC = "cosine"
NPROBES = 20
LONGTERM_INDEX = "ivf_hnsw_sq"  # the hot tier's vector index (LongTermStore.build_index)
HNSW_ROWS = 65_536  # entries per IVF partition of an ivf_hnsw_sq index
LONGTERM_EF = 100  # HNSW candidates per probed partition
LONGTERM_REFINE = 4  # re-rank refine * k candidates by the stored vectors
LEASE_TTL_S = 60.0  # leases are renewed by heartbeats every third of it; a dead holder blocks at most this long


def cache_dir() -> Path:
    """``$MEMSTREAM_CACHE``, default ``~/.cache/memstream``: services, stores, latents, keys."""
    return Path(os.environ.get("MEMSTREAM_CACHE") or Path.home() / ".cache" / "memstream")


SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True)
class KafkaSecurity:
    """How memstream's Kafka clients authenticate and encrypt: one of these reaches every client
    (``memstream.topics.kafka_python`` and ``librdkafka_config``). Invalid combinations raise
    :class:`~memstream.errors.KafkaSecurityError` naming the setting to fix, when made.

    The password is best given as a file (``sasl_password_file``, read when a client is made, so
    only its path travels to pipeline workers); ``sasl_password`` is held in memory and never
    printed by ``repr``."""

    security_protocol: str = "PLAINTEXT"  # PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL
    sasl_mechanism: str | None = None  # PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512; required with SASL_*
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    sasl_password_file: str | None = None  # a file holding the password (one line)
    ssl_cafile: str | None = None  # PEM CA bundle the broker's certificate must chain to; None: the system's
    ssl_certfile: str | None = None  # PEM client certificate, for brokers that require TLS client auth
    ssl_keyfile: str | None = None  # its PEM private key (unencrypted)
    ssl_check_hostname: bool = True  # the broker's certificate must name the host dialled

    def __post_init__(self):
        def fail(msg: str):
            raise KafkaSecurityError(f"Kafka security settings: {msg}")

        protocol = (self.security_protocol or "").upper()
        if protocol not in SECURITY_PROTOCOLS:
            fail(f"security_protocol {self.security_protocol!r} is not one of {', '.join(SECURITY_PROTOCOLS)}: "
                 "set [kafka] security_protocol, MEMSTREAM_KAFKA_SECURITY_PROTOCOL or --kafka-security-protocol")
        object.__setattr__(self, "security_protocol", protocol)
        if self.sasl:
            mechanism = (self.sasl_mechanism or "").upper()
            if mechanism not in SASL_MECHANISMS:
                fail(f"{protocol} needs sasl_mechanism, one of {', '.join(SASL_MECHANISMS)} (got "
                     f"{self.sasl_mechanism!r}): set [kafka] sasl_mechanism, MEMSTREAM_KAFKA_SASL_MECHANISM or "
                     "--kafka-sasl-mechanism")
            object.__setattr__(self, "sasl_mechanism", mechanism)
            if not self.sasl_username:
                fail(f"{protocol} needs sasl_username: set [kafka] sasl_username, MEMSTREAM_KAFKA_SASL_USERNAME "
                     "or --kafka-sasl-username")
            if self.sasl_password is None and not self.sasl_password_file:
                fail(f"{protocol} needs a password for {self.sasl_username!r}: set sasl_password_file "
                     "(MEMSTREAM_KAFKA_SASL_PASSWORD_FILE, --kafka-sasl-password-file) or "
                     "MEMSTREAM_KAFKA_SASL_PASSWORD")
            if self.sasl_password is not None and self.sasl_password_file:
                fail("set sasl_password or sasl_password_file, not both")
        elif self.sasl_mechanism or self.sasl_username or self.sasl_password is not None or self.sasl_password_file:
            fail(f"SASL settings are given but security_protocol is {protocol}: set it to SASL_SSL (or "
                 "SASL_PLAINTEXT), or drop the sasl_* settings")
        if not self.tls and (self.ssl_cafile or self.ssl_certfile or self.ssl_keyfile):
            fail(f"ssl_* files are given but security_protocol is {protocol}: set it to SSL or SASL_SSL, or drop "
                 "the ssl_* settings")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            fail("a client certificate needs both ssl_certfile and ssl_keyfile")
        for name in ("sasl_password_file", "ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            value = getattr(self, name)
            if value and not Path(value).is_file():
                fail(f"{name} {value!r} is not a file: set [kafka] {name} (MEMSTREAM_KAFKA_{name.upper()}) to an "
                     "existing file")

    @property
    def sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        return self.security_protocol.endswith("SSL")

    def password(self) -> str | None:
        """The SASL password, from ``sasl_password_file`` when that is set (read now)."""
        if self.sasl_password_file:
            try:
                return Path(self.sasl_password_file).read_text().rstrip("\r\n")
            except OSError as e:
                raise KafkaSecurityError(f"Kafka security settings: sasl_password_file "
                                         f"{self.sasl_password_file!r} is not readable: {e}") from None
        return self.sasl_password


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap: str | None = None  # None: $MEMSTREAM_KAFKA_BOOTSTRAP, else the local stack's broker
    security: KafkaSecurity = field(default_factory=KafkaSecurity)  # flat in [kafka]: security_protocol, sasl_*, ssl_*
    latents_topic: str = LATENTS_TOPIC
    summaries_topic: str = SUMMARIES_TOPIC
    deadletter_topic: str = DEADLETTER_TOPIC
    attestations_topic: str = ATTESTATIONS_TOPIC
    forget_topic: str = FORGET_TOPIC
    read_divergence_topic: str = READ_DIVERGENCE_TOPIC
    partitions: int = PARTITIONS
    retention_ms: int = RETENTION_MS
    max_message_bytes: int = MAX_MESSAGE_BYTES

    def topics(self) -> tuple[str, ...]:
        return (self.latents_topic, self.summaries_topic, self.deadletter_topic, self.attestations_topic,
                self.forget_topic, self.read_divergence_topic)


@dataclass(frozen=True)
class EpisodicSettings:
    store: str | None = None  # a folder or s3://bucket/prefix; None: <cache>/episodic
    window: int = WINDOW
    horizon: int = HORIZON
    decay_k: int = DECAY_K
    decay_slope: float = DECAY_SLOPE
    decay_cutoff: float = DECAY_CUTOFF
    retention_hours: float = SESSION_RETENTION_HOURS


@dataclass(frozen=True)
class PipelineSettings:
    runner: str = "prism"  # prism or flink
    group: str = PIPELINE_GROUP
    batch_size: int = BATCH_SIZE
    idle_timeout_s: float = IDLE_TIMEOUT_S
    device: str = "auto"  # auto: CUDA when present
    checkpoint: str | None = None  # None: the committed compressor checkpoint


@dataclass(frozen=True)
class LongTermSettings:
    store: str | None = None  # a folder or s3://bucket/prefix; None: no long-term store
    dim: int = LATENT_DIM
    metric: str = LONGTERM_METRIC
    nprobes: int = NPROBES
    index: str = LONGTERM_INDEX
    ef: int = LONGTERM_EF
    refine: int = LONGTERM_REFINE
    cold_after_days: float = COLD_AFTER_DAYS
    lease_ttl_s: float = LEASE_TTL_S


@dataclass(frozen=True)
class ReadSettings:
    k: int = READ_K
    max_k: int = MAX_READ_K
    cache_bytes: int = READ_CACHE_BYTES
    mode: str = READ_MODE
    groups: int = READ_GROUPS
    probe_groups: int = READ_PROBE_GROUPS
    candidates: int = READ_CANDIDATES
    workers: int = READ_WORKERS
    ledger_flush_every: int = LEDGER_FLUSH_EVERY
    host: str = HOST
    port: int = SERVE_PORT
    access: str | None = None  # tenants and credentials: a folder or s3://...; None: <episodic store>/_access
    access_refresh_s: float = ACCESS_REFRESH_S


@dataclass(frozen=True)
class Settings:
    """``Settings.load()``: the defaults, then ``memstream.toml``, then ``MEMSTREAM_*`` variables."""

    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    episodic: EpisodicSettings = field(default_factory=EpisodicSettings)
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)
    longterm: LongTermSettings = field(default_factory=LongTermSettings)
    read: ReadSettings = field(default_factory=ReadSettings)

    @classmethod
    def load(cls, path: str | Path | None = None, environ: typing.Mapping[str, str] | None = None) -> "Settings":
        environ = os.environ if environ is None else environ
        path = Path(path) if path else Path(environ.get("MEMSTREAM_CONFIG") or "memstream.toml")
        tables: dict = {}
        if path.is_file():
            try:
                tables = tomllib.loads(path.read_text())
            except (OSError, tomllib.TOMLDecodeError) as e:
                raise ConfigError(f"{path}: not a readable TOML file: {e}") from None
        elif environ.get("MEMSTREAM_CONFIG"):
            raise ConfigError(f"MEMSTREAM_CONFIG names {path}, which does not exist")
        unknown = set(tables) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)}; known: "
                              f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        sections = {}
        for f in dataclasses.fields(cls):
            section_cls = f.default_factory  # type: ignore[misc]
            sections[f.name] = _section(section_cls, f.name, tables.get(f.name, {}), environ, path)
        return cls(**sections)


def _flat_names(section_cls) -> set[str]:
    """The settings of a section as its table spells them: a nested setting class's, flat."""
    hints = typing.get_type_hints(section_cls)
    return {n for f in dataclasses.fields(section_cls)
            for n in (_flat_names(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else {f.name})}


def _section(section_cls, name: str, table: dict, environ: typing.Mapping[str, str], path: Path):
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [{name}] must be a table")
    hints = typing.get_type_hints(section_cls)
    known = _flat_names(section_cls)
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"{path}: [{name}] has unknown setting(s) {sorted(unknown)}; known: {', '.join(sorted(known))}")
    values = {}
    for f in dataclasses.fields(section_cls):
        if dataclasses.is_dataclass(hints[f.name]):
            nested = hints[f.name]
            values[f.name] = _section(nested, name, {k: v for k, v in table.items() if k in _flat_names(nested)},
                                      environ, path)
    for key in (f.name for f in dataclasses.fields(section_cls) if f.name not in values):
        if key in table:
            values[key] = _coerce(hints[key], table[key], f"{path} [{name}] {key}")
        var = f"MEMSTREAM_{name}_{key}".upper()
        if environ.get(var) not in (None, ""):
            values[key] = _coerce(hints[key], environ[var], var)
    return section_cls(**values)


def _coerce(tp, value, where: str):
    optional = typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType"))
    base = next((a for a in typing.get_args(tp) if a is not type(None)), tp) if optional else tp
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if base is int and isinstance(value, bool):
            raise ValueError(value)
        return base(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not a valid {base.__name__}") from None
