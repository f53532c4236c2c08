"""Kafka's SASL and TLS settings against a real broker with secure listeners: the SDK, the topic
helpers and the episodic pipeline through SASL_SSL (SCRAM), a wrong password and an untrusted CA
refused quickly and in words, and the settings' validation and sources."""

from __future__ import annotations

import dataclasses
import pickle
import time

import numpy as np
import pytest

from memstream import topics
from memstream.cli import build_parser, common
from memstream.crypto.keys import KeyRing
from memstream.episodic.chain import verify_chain
from memstream.errors import KafkaAuthenticationError, KafkaSecurityError
from memstream.infra import kafka
from memstream.infra.kafka import SecureListener
from memstream.pipelines import kafka_io
from memstream.pipelines.episodic import EpisodicConfig
from memstream.pipelines.log import LogReader
from memstream.sdk import Publisher
from memstream.settings import WINDOW, KafkaSecurity, Settings
from tests import test_episodic as episodic_tests
from tests.conftest import stop_strays
from tests.tls_certs import write_broker_tls, write_untrusted_ca

checkpoint, key_file = episodic_tests.checkpoint, episodic_tests.key_file  # the pipeline test's fixtures

USER, PASSWORD = "memstream-app", "s3cret-pw"
FAST_S = 10.0  # a refusal must come well before a client's 30 s bootstrap timeout


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory):
    """A broker of its own with SASL_SSL (PLAIN and SCRAM users) and SSL listeners on 127.0.0.1."""
    root = tmp_path_factory.mktemp("secure-kafka")
    tls = write_broker_tls(root / "tls")
    svc = kafka.start(root / "kafka", secure=[
        SecureListener("SASL_SSL", keystore=str(tls.keystore), users={USER: PASSWORD}),
        SecureListener("SSL", keystore=str(tls.keystore))])
    try:
        yield svc, tls, root
    finally:
        svc.stop()
        stop_strays(root, "the secure broker")


@pytest.fixture(scope="module")
def sasl(secure_broker) -> tuple[str, KafkaSecurity]:
    svc, tls, root = secure_broker
    pw = root / "kafka-password"
    pw.write_text(PASSWORD + "\n")
    return svc.endpoints["SASL_SSL"], KafkaSecurity("SASL_SSL", "SCRAM-SHA-512", USER, sasl_password_file=str(pw),
                                                    ssl_cafile=str(tls.ca))


def _session_records(bootstrap, security, topic) -> list:
    c = topics.kafka_python("consumer", bootstrap, security, auto_offset_reset="earliest", consumer_timeout_ms=3000,
                            enable_auto_commit=False, max_partition_fetch_bytes=16 << 20)
    try:
        c.subscribe([topic])
        return [m for m in c]
    finally:
        c.close()


def test_pipeline_publishes_and_reads_through_sasl_ssl(sasl, tmp_path, checkpoint, key_file, topic_name):
    """Everything on the secure listener only: topics, the Publisher, the pipeline (its librdkafka
    reads and kafka-python transactions run with the settings it pickled) and read_summaries."""
    bootstrap, security = sasl
    names = {t: f"{topic_name}.{t}" for t in ("latents", "summaries", "deadletter")}
    assert all(r.created for r in topics.create_topics(bootstrap, list(names.values()), partitions=2,
                                                       security=security))
    config = EpisodicConfig(bootstrap=bootstrap, security=security, store_uri=str(tmp_path / "episodic"),
                            key_file=key_file, checkpoint=checkpoint, batch_size=4, until_idle=True,
                            group=f"{topic_name}.group", **{f"{t}_topic": n for t, n in names.items()})
    assert pickle.loads(pickle.dumps(config)).security == security
    assert PASSWORD not in repr(config) and PASSWORD.encode() not in pickle.dumps(config)  # the file's path travels
    n = WINDOW + 300
    x = np.random.default_rng(0).standard_normal((n, 384)).astype(np.float32)
    with Publisher(bootstrap, topic=config.latents_topic, security=security) as pub:
        with pub.session("sec-1") as s:
            s.publish(x)
    assert len(_session_records(bootstrap, security, config.latents_topic)) >= 3  # open, chunks, close
    episodic_tests.prism(config)
    on_topic = read_summaries_until(bootstrap, security, config.summaries_topic, 2)
    assert [(r.window_index, r.seq_start, r.seq_end) for r in on_topic] == [(0, 0, WINDOW), (1, WINDOW, n)]
    assert verify_chain("sec-1", on_topic, KeyRing([config.signing_key()])).ok
    # the pipeline's librdkafka reader reads the same chunks back by position
    first = _session_records(bootstrap, security, config.latents_topic)[0]
    got = LogReader(bootstrap, security).values(config.latents_topic, [(first.partition, first.offset)])
    assert got[(first.partition, first.offset)] == first.value


def read_summaries_until(bootstrap, security, topic, count, timeout=60.0):
    deadline = time.monotonic() + timeout
    while True:
        got = topics.read_summaries(bootstrap, topic=topic, security=security)
        if len(got) >= count or time.monotonic() > deadline:
            return got
        time.sleep(1)


def test_a_wrong_password_is_refused_quickly_by_every_client(sasl, topic_name):
    bootstrap, security = sasl
    topics.create_topics(bootstrap, [topic_name], security=security)
    wrong = dataclasses.replace(security, sasl_password_file=None, sasl_password="not-the-password")
    clients = {"publisher": lambda: Publisher(bootstrap, topic=topic_name, security=wrong),
               "read_summaries": lambda: topics.read_summaries(bootstrap, topic=topic_name, security=wrong),
               "create_topics": lambda: topics.create_topics(bootstrap, [topic_name + "x"], security=wrong),
               "pipeline partitions": lambda: kafka_io.list_partitions(bootstrap, [topic_name], security=wrong),
               "pipeline reader (librdkafka)": lambda: kafka_io.reader(bootstrap, wrong)}
    for what, make in clients.items():
        started = time.monotonic()
        with pytest.raises(KafkaAuthenticationError) as e:
            make()
        took = time.monotonic() - started
        assert took < FAST_S, f"{what} took {took:.1f}s to say the login was refused"
        msg = str(e.value)
        assert bootstrap in msg and "SASL_SSL" in msg and USER in msg and "password" in msg, (what, msg)
        assert e.value.bootstrap == bootstrap and e.value.protocol == "SASL_SSL"
    # and an unknown user the same way, through PLAIN this time
    stranger = KafkaSecurity("SASL_SSL", "PLAIN", "nobody", "x", ssl_cafile=security.ssl_cafile)
    with pytest.raises(KafkaAuthenticationError, match="PLAIN user 'nobody'"):
        topics.read_summaries(bootstrap, topic=topic_name, security=stranger)


def test_plain_login_and_tls_only_listener(secure_broker, topic_name):
    svc, tls, _ = secure_broker
    plain = KafkaSecurity("SASL_SSL", "PLAIN", USER, PASSWORD, ssl_cafile=str(tls.ca))
    topics.create_topics(svc.endpoints["SASL_SSL"], [topic_name], security=plain)
    ssl_only = KafkaSecurity("SSL", ssl_cafile=str(tls.ca))
    with Publisher(svc.endpoints["SSL"], topic=topic_name, security=ssl_only) as pub:
        with pub.session("tls-1") as s:
            s.publish(np.ones((10, 8), np.float32))
    keys = {m.key for m in _session_records(svc.endpoints["SASL_SSL"], plain, topic_name)}
    assert keys == {b"tls-1"}


def test_an_untrusted_ca_fails_the_handshake_quickly(secure_broker, tmp_path, topic_name):
    svc, tls, _ = secure_broker
    other = KafkaSecurity("SSL", ssl_cafile=str(write_untrusted_ca(tmp_path / "other-ca.pem")))
    for what, make in {"publisher": lambda: Publisher(svc.endpoints["SSL"], topic=topic_name, security=other),
                       "reader": lambda: kafka_io.reader(svc.endpoints["SSL"], other)}.items():
        started = time.monotonic()
        with pytest.raises(KafkaAuthenticationError) as e:
            make()
        assert time.monotonic() - started < FAST_S, what
        assert "ssl_cafile" in str(e.value) and svc.endpoints["SSL"] in str(e.value) and "(SSL)" in str(e.value)
    # TLS spoken to the plaintext listener is a failed handshake too
    with pytest.raises(KafkaAuthenticationError, match="TLS listener"):
        topics.read_summaries(svc.endpoints["bootstrap"], security=KafkaSecurity("SSL", ssl_cafile=str(tls.ca)))


# -- the settings, without a broker ---------------------------------------------------------

@pytest.mark.parametrize("kw, says", [
    ({"security_protocol": "TLS"}, "security_protocol 'TLS' is not one of"),
    ({"security_protocol": "SASL_SSL", "sasl_username": "u", "sasl_password": "p"}, "needs sasl_mechanism"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI", "sasl_username": "u", "sasl_password": "p"},
     "GSSAPI"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_password": "p"}, "needs sasl_username"),
    ({"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_username": "u"},
     "MEMSTREAM_KAFKA_SASL_PASSWORD"),
    ({"security_protocol": "SSL", "ssl_cafile": "/no/such/ca.pem"}, "ssl_cafile '/no/such/ca.pem' is not a file"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": "u",
      "sasl_password_file": "/no/such/pw"}, "sasl_password_file"),
    ({"sasl_username": "u"}, "security_protocol is PLAINTEXT"),
    ({"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_username": "u", "sasl_password": "p",
      "ssl_cafile": __file__}, "set it to SSL or SASL_SSL"),
])
def test_invalid_security_settings_say_what_to_set(kw, says):
    with pytest.raises(KafkaSecurityError, match=says.replace("(", r"\(")):
        KafkaSecurity(**kw)


def test_security_settings_come_from_toml_then_environment_then_flags(tmp_path, monkeypatch):
    ca, pw = tmp_path / "ca.pem", tmp_path / "pw"
    ca.write_text("x")
    pw.write_text("from-file\n")
    toml = tmp_path / "memstream.toml"
    toml.write_text('[kafka]\nbootstrap = "kafka.example:9093"\nsecurity_protocol = "sasl_ssl"\n'
                    f'sasl_mechanism = "scram-sha-256"\nsasl_username = "toml-user"\nssl_cafile = "{ca}"\n'
                    'ssl_check_hostname = false\n')
    s = Settings.load(toml, environ={"MEMSTREAM_KAFKA_SASL_PASSWORD": "from-env"})
    assert s.kafka.bootstrap == "kafka.example:9093"
    assert s.kafka.security == KafkaSecurity("SASL_SSL", "SCRAM-SHA-256", "toml-user", "from-env",
                                             ssl_cafile=str(ca), ssl_check_hostname=False)
    assert "from-env" not in repr(s)
    env = {"MEMSTREAM_KAFKA_SASL_USERNAME": "env-user", "MEMSTREAM_KAFKA_SASL_PASSWORD_FILE": str(pw),
           "MEMSTREAM_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512"}
    s = Settings.load(toml, environ=env).kafka.security
    assert (s.sasl_username, s.sasl_mechanism, s.password()) == ("env-user", "SCRAM-SHA-512", "from-file")
    with pytest.raises(KafkaSecurityError, match="needs a password"):
        Settings.load(toml, environ={})
    # flags win over both; the command reads memstream.toml through $MEMSTREAM_CONFIG
    monkeypatch.setenv("MEMSTREAM_CONFIG", str(toml))
    monkeypatch.setenv("MEMSTREAM_KAFKA_SASL_PASSWORD", "from-env")
    args = build_parser().parse_args(["verify", "chain", "--session", "s1", "--kafka-sasl-username", "flag-user",
                                      "--kafka-sasl-password-file", str(pw), "--kafka-sasl-mechanism", "PLAIN"])
    s = common.kafka_security(args)
    assert (s.sasl_username, s.sasl_mechanism, s.password(), s.ssl_check_hostname) == \
        ("flag-user", "PLAIN", "from-file", False)
    args = build_parser().parse_args(["verify", "chain", "--session", "s1", "--kafka-security-protocol", "PLAINTEXT"])
    with pytest.raises(KafkaSecurityError, match="security_protocol is PLAINTEXT"):
        common.kafka_security(args)  # the toml's SASL settings with the flag's PLAINTEXT do not fit
    with pytest.raises(Exception, match="unknown setting"):
        toml.write_text('[kafka]\nsasl_passwd = "x"\n')
        Settings.load(toml, environ={})


def test_client_configs_map_every_setting(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    s = KafkaSecurity("SASL_SSL", "SCRAM-SHA-256", "u", "p", ssl_cafile=str(ca), ssl_check_hostname=False)
    assert topics.kafka_python_config(s) == {
        "security_protocol": "SASL_SSL", "ssl_cafile": str(ca), "ssl_certfile": None, "ssl_keyfile": None,
        "ssl_check_hostname": False, "sasl_mechanism": "SCRAM-SHA-256", "sasl_plain_username": "u",
        "sasl_plain_password": "p"}
    assert topics.librdkafka_config("h:1", s) == {
        "bootstrap.servers": "h:1", "security.protocol": "sasl_ssl", "ssl.endpoint.identification.algorithm": "none",
        "ssl.ca.location": str(ca), "sasl.mechanism": "SCRAM-SHA-256", "sasl.username": "u", "sasl.password": "p"}
    assert topics.kafka_python_config(None) == {"security_protocol": "PLAINTEXT"}
    assert topics.librdkafka_config("h:1", None) == {"bootstrap.servers": "h:1", "security.protocol": "plaintext"}


def test_the_pipelines_sink_and_lag_use_the_settings(sasl, topic_name):
    from memstream.pipelines.metrics import lag

    bootstrap, security = sasl
    topics.create_topics(bootstrap, [topic_name], partitions=1, security=security)
    sink = kafka_io.WriteToKafkaFn(bootstrap, topic_name, security)
    sink = pickle.loads(pickle.dumps(sink))  # as a runner hands it to a worker
    sink.setup()
    try:
        for i in range(3):
            sink.process((b"k", b"v%d" % i))
        sink.finish_bundle()
    finally:
        sink.teardown()
    assert [m.value for m in _session_records(bootstrap, security, topic_name)] == [b"v0", b"v1", b"v2"]
    assert lag(bootstrap, topic_name, f"{topic_name}.group", security) == {0: 3}
