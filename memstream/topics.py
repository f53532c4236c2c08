"""memstream's Kafka topics: their names (from :mod:`memstream.settings`), their creation, and the
small producers and readers that every process shares (dead letters out, summaries back).

Session lifecycle events (open, close) share the latents topic: both are keyed by session id,
so they land in the session's partition and are ordered with its chunks. A consumer can then
tell a chunk that follows a close from one that precedes it, which two topics could not.

Every Kafka client memstream makes comes from here (:func:`kafka_python`, or a librdkafka client
configured by :func:`librdkafka_config`), so the cluster's security settings
(:class:`~memstream.settings.KafkaSecurity`: SASL and TLS) reach them all, and a refused login
or a failed TLS handshake is one :class:`~memstream.errors.KafkaAuthenticationError`, raised
within :data:`AUTH_PROBE_S` rather than after a client's whole bootstrap timeout.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Iterable

from memstream.errors import ConfigError, KafkaAuthenticationError, PublishError
from memstream.schemas.records import DeadLetterRecord, SummaryRecord
from memstream.settings import (ATTESTATIONS_TOPIC, DEADLETTER_TOPIC, FORGET_TOPIC, LATENTS_TOPIC,
                                MAX_MESSAGE_BYTES, PARTITIONS, READ_DIVERGENCE_TOPIC, RETENTION_MS, SUMMARIES_TOPIC,
                                KafkaSecurity)
from memstream.wire.deadletter import fit_dead_letter

LATENTS, SUMMARIES, DEADLETTER = LATENTS_TOPIC, SUMMARIES_TOPIC, DEADLETTER_TOPIC
ATTESTATIONS, FORGET, READ_DIVERGENCE = ATTESTATIONS_TOPIC, FORGET_TOPIC, READ_DIVERGENCE_TOPIC
DEFAULT_TOPICS = (LATENTS, SUMMARIES, DEADLETTER, ATTESTATIONS, FORGET, READ_DIVERGENCE)


# -- clients ---------------------------------------------------------------------------------

AUTH_PROBE_S = 5.0  # how long a secured cluster gets to accept the login and handshake before clients are made
_CLIENTS = {"producer": "KafkaProducer", "consumer": "KafkaConsumer", "admin": "KafkaAdminClient"}
_PROBED: set[tuple[str, KafkaSecurity]] = set()  # (bootstrap, security) this process logged in to once
_PROBED_LOCK = threading.Lock()


def kafka_python_config(security: KafkaSecurity | None) -> dict:
    """kafka-python's names for the security settings."""
    s = security or KafkaSecurity()
    config: dict = {"security_protocol": s.security_protocol}
    if s.tls:
        config.update(ssl_cafile=s.ssl_cafile, ssl_certfile=s.ssl_certfile, ssl_keyfile=s.ssl_keyfile,
                      ssl_check_hostname=s.ssl_check_hostname)
    if s.sasl:
        config.update(sasl_mechanism=s.sasl_mechanism, sasl_plain_username=s.sasl_username,
                      sasl_plain_password=s.password())
    return config


def librdkafka_config(bootstrap: str, security: KafkaSecurity | None) -> dict:
    """librdkafka's (confluent-kafka's) configuration of the bootstrap and the security settings."""
    s = security or KafkaSecurity()
    config: dict = {"bootstrap.servers": bootstrap, "security.protocol": s.security_protocol.lower()}
    if s.tls:
        config["ssl.endpoint.identification.algorithm"] = "https" if s.ssl_check_hostname else "none"
        for key, value in (("ssl.ca.location", s.ssl_cafile), ("ssl.certificate.location", s.ssl_certfile),
                           ("ssl.key.location", s.ssl_keyfile)):
            if value:
                config[key] = value
    if s.sasl:
        config.update({"sasl.mechanism": s.sasl_mechanism, "sasl.username": s.sasl_username,
                       "sasl.password": s.password()})
    return config


def kafka_python(kind: str, bootstrap: str, security: KafkaSecurity | None = None, **kw):
    """A kafka-python client (``kind`` producer, consumer or admin) of ``bootstrap`` with the
    security settings; ``kw`` are the client's own settings. KafkaAuthenticationError when the
    cluster refuses the login or the TLS handshake."""
    import kafka
    from kafka.errors import SaslAuthenticationFailedError

    if kind not in _CLIENTS:
        raise ConfigError(f"a Kafka client is one of {', '.join(_CLIENTS)}, not {kind!r}")
    check_login(bootstrap, security)
    try:
        return getattr(kafka, _CLIENTS[kind])(bootstrap_servers=bootstrap, **kafka_python_config(security), **kw)
    except SaslAuthenticationFailedError as e:
        raise _refused(bootstrap, security or KafkaSecurity(), str(e)) from None


def check_login(bootstrap: str, security: KafkaSecurity | None, timeout: float = AUTH_PROBE_S) -> None:
    """Log in to a secured cluster once per process (PLAINTEXT needs nothing): the broker's answer
    to a refused login or an untrusted certificate comes in milliseconds, where kafka-python's
    clients would retry it until their bootstrap timeout. A cluster that does not answer at all
    is left to the client, which says so in its own words."""
    if security is None or security.security_protocol == "PLAINTEXT" or (bootstrap, security) in _PROBED:
        return
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient

    failures: list[tuple[str, str]] = []  # (sasl or tls, librdkafka's words)

    def on_error(err):
        if err.code() == KafkaError._AUTHENTICATION:
            failures.append(("sasl", err.str()))
        elif err.code() == KafkaError._SSL or "SSL handshake" in err.str():
            failures.append(("tls", err.str()))

    admin = AdminClient({**librdkafka_config(bootstrap, security), "error_cb": on_error,
                         "socket.connection.setup.timeout.ms": int(timeout * 1000), "log_level": 0})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not failures:
        try:
            admin.list_topics(timeout=min(0.2, max(0.05, deadline - time.monotonic())))
            with _PROBED_LOCK:
                _PROBED.add((bootstrap, security))
            return
        except KafkaException:  # no answer yet; error_cb says whether it was refused
            admin.poll(0)
    if failures:
        raise _refused(bootstrap, security, failures[0][1], failures[0][0])


def _refused(bootstrap: str, security: KafkaSecurity, cause: str, kind: str = "sasl") -> KafkaAuthenticationError:
    checks = []
    if kind == "sasl" and security.sasl:
        checks.append(f"the {security.sasl_mechanism} user {security.sasl_username!r} and its password "
                      "(sasl_username, sasl_password_file), and that the listener enables that mechanism")
    if kind == "tls" and security.tls:
        checks.append("that ssl_cafile holds the CA that signed the broker's certificate, that the certificate "
                      "names the host in the bootstrap (or ssl_check_hostname = false), and that the port is a TLS "
                      "listener")
    return KafkaAuthenticationError(bootstrap, security.security_protocol, cause, "; ".join(checks))


@dataclass(frozen=True)
class TopicResult:
    name: str
    created: bool  # False: it existed already


def create_topics(bootstrap: str, names: tuple[str, ...] | list[str] = DEFAULT_TOPICS, *,
                  partitions: int = PARTITIONS, retention_ms: int = RETENTION_MS,
                  max_message_bytes: int = MAX_MESSAGE_BYTES, security: KafkaSecurity | None = None,
                  replication: int = 1) -> list[TopicResult]:
    """Create each topic that does not exist yet (replication 1 by default: the local stack has one broker)."""
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    if partitions < 1:
        raise ConfigError(f"partitions must be >= 1, got {partitions}")
    if not 0 < max_message_bytes <= MAX_MESSAGE_BYTES:
        raise ConfigError(f"max message bytes must be in 1..{MAX_MESSAGE_BYTES} (the broker's limit), "
                          f"got {max_message_bytes}")
    configs = {"retention.ms": str(retention_ms), "max.message.bytes": str(max_message_bytes)}
    admin = kafka_python("admin", bootstrap, security, request_timeout_ms=15000)
    results = []
    try:
        for name in names:
            try:
                admin.create_topics([NewTopic(name, partitions, replication, topic_configs=configs)])
                results.append(TopicResult(name, True))
            except TopicAlreadyExistsError:
                results.append(TopicResult(name, False))
    finally:
        admin.close()
    return results


def write_dead_letters(producer, records: Iterable[DeadLetterRecord], topic: str = DEADLETTER,
                       timeout: float = 30.0) -> int:
    """Send each record as JSON to the dead-letter topic, keyed by the original key, and wait
    for the broker's acknowledgements. ``producer`` is a kafka-python KafkaProducer whose
    ``max_request_size`` admits MAX_DEAD_LETTER_BYTES."""
    from kafka.errors import KafkaError

    futures = [producer.send(topic, key=r.key, value=fit_dead_letter(r)) for r in records]
    producer.flush(timeout)
    for f in futures:
        try:
            f.get(timeout=0)
        except KafkaError as e:
            raise PublishError(f"dead-letter record not written to {topic!r}: {e}") from e
    return len(futures)


def read_summaries(bootstrap: str, session_id: str | None = None, topic: str = SUMMARIES,
                   timeout_ms: int = 3000, security: KafkaSecurity | None = None) -> list[SummaryRecord]:
    """Every summary on the topic up to its current end (of one session when given), in
    topic order, which is window order per session."""
    from kafka import TopicPartition

    # read_committed: the pipeline publishes in transactions, and an aborted one is no summary
    consumer = kafka_python("consumer", bootstrap, security, enable_auto_commit=False,
                            max_partition_fetch_bytes=MAX_MESSAGE_BYTES, isolation_level="read_committed")
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        end = consumer.end_offsets(parts)
        want = session_id.encode() if session_id is not None else None
        out: list[SummaryRecord] = []
        while any(consumer.position(tp) < end[tp] for tp in parts):
            batches = consumer.poll(timeout_ms=timeout_ms)
            if not batches:
                break
            for tp, msgs in batches.items():
                out += [SummaryRecord.from_json(m.value) for m in msgs
                        if m.offset < end[tp] and (want is None or m.key == want)]
        return out
    finally:
        consumer.close()
