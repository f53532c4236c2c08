"""Apache Kafka in KRaft mode (one combined broker and controller), started with ``java``.

The jars come from Maven Central through ``mvn dependency:copy-dependencies`` on
``kafka-pom.xml`` and are cached under ``$MEMSTREAM_CACHE/kafka-<version>/lib``.

Besides its PLAINTEXT listener (the stack's, and the one brokers and controllers talk over), a
broker can have secure listeners (:class:`SecureListener`: SSL, SASL_PLAINTEXT or SASL_SSL, on
127.0.0.1), so that memstream's SASL and TLS settings are tested against a real broker. SCRAM
users are written into the metadata log when the storage is formatted (first start only);
PLAIN users live in the listener's JAAS configuration.
"""

from __future__ import annotations

import base64
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from memstream.errors import ServiceError
from memstream.infra import process, tools
from memstream.settings import MAX_MESSAGE_BYTES

KAFKA_VERSION = "4.1.1"

_LOG4J = """\
Configuration:
  Appenders:
    Console:
      name: STDOUT
      PatternLayout: {Pattern: "[%d] %p %m (%c)%n"}
  Loggers:
    Root: {level: INFO, AppenderRef: [{ref: STDOUT}]}
    Logger:
      - {name: kafka.log, level: WARN}
      - {name: org.apache.kafka.storage, level: WARN}
      - {name: state.change.logger, level: WARN}
"""


def ensure_jars() -> Path:
    """Resolve the broker's jars with mvn once; return the folder that holds them."""
    return tools.maven_classpath(f"kafka-{KAFKA_VERSION}", "kafka-pom.xml")


def _cluster_id() -> str:
    # Kafka's Uuid text form: URL-safe base64 of 16 bytes, unpadded.
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


@dataclass(frozen=True)
class SecureListener:
    """A listener of ``protocol`` (SSL, SASL_PLAINTEXT or SASL_SSL) on 127.0.0.1:``port`` (None:
    a free one). TLS needs ``keystore``: a PEM file holding the broker's unencrypted private key
    and its certificate chain. SASL enables ``mechanisms`` for ``users`` (name -> password)."""

    protocol: str
    port: int | None = None
    keystore: str | None = None
    users: dict[str, str] = field(default_factory=dict)
    mechanisms: tuple[str, ...] = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")

    @property
    def name(self) -> str:
        return self.protocol  # one listener per protocol: its name is the protocol's

    def properties(self) -> list[str]:
        lines, prefix = [], f"listener.name.{self.name.lower()}"
        if self.protocol.endswith("SSL"):
            if not self.keystore:
                raise ServiceError(f"a {self.protocol} listener needs keystore: a PEM file with the broker's key and "
                                   "certificate chain")
            lines += [f"{prefix}.ssl.keystore.type=PEM", f"{prefix}.ssl.keystore.location={self.keystore}",
                      f"{prefix}.ssl.client.auth=none"]
        if self.protocol.startswith("SASL_"):
            lines.append(f"{prefix}.sasl.enabled.mechanisms={','.join(self.mechanisms)}")
            for mech in self.mechanisms:
                if mech == "PLAIN":
                    users = " ".join(f'user_{u}="{pw}"' for u, pw in self.users.items())
                    jaas = f"org.apache.kafka.common.security.plain.PlainLoginModule required {users};"
                else:
                    jaas = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
                lines.append(f"{prefix}.{mech.lower()}.sasl.jaas.config={jaas}")
        return lines

    def scram_credentials(self) -> list[str]:
        """``kafka-storage format --add-scram`` arguments for the SCRAM users."""
        return [f"{mech}=[name={u},password={pw}]" for mech in self.mechanisms if mech.startswith("SCRAM-")
                for u, pw in self.users.items()] if self.protocol.startswith("SASL_") else []


def _properties(data: Path, port: int, controller_port: int, secure: tuple[SecureListener, ...] = ()) -> str:
    extra = "".join(f",{s.name}://127.0.0.1:{s.port}" for s in secure)
    protocols = "".join(f",{s.name}:{s.protocol}" for s in secure)
    return "\n".join([
        "process.roles=broker,controller",
        "node.id=1",
        f"controller.quorum.voters=1@127.0.0.1:{controller_port}",
        f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}{extra}",
        f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}{extra}",
        "controller.listener.names=CONTROLLER",
        f"listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT{protocols}",
        "inter.broker.listener.name=PLAINTEXT",
        *[line for s in secure for line in s.properties()],
        f"log.dirs={data / 'logs'}",
        "num.partitions=4",
        "auto.create.topics.enable=false",
        "offsets.topic.replication.factor=1",
        "offsets.topic.num.partitions=4",
        "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1",
        "share.coordinator.state.topic.replication.factor=1",
        "share.coordinator.state.topic.min.isr=1",
        "group.initial.rebalance.delay.ms=0",
        f"message.max.bytes={MAX_MESSAGE_BYTES}",
        f"replica.fetch.max.bytes={MAX_MESSAGE_BYTES}",
        f"socket.request.max.bytes={4 * MAX_MESSAGE_BYTES}",
        "log.retention.hours=168",
        "",
    ])


def start(data: Path, port: int | None = None, controller_port: int | None = None,
          timeout: float = 90.0, secure: tuple[SecureListener, ...] | list[SecureListener] = ()
          ) -> process.ServiceProcess:
    """Start a broker whose state lives in ``data``; an existing ``data`` folder is restarted as is.
    ``secure`` listeners are added to the PLAINTEXT one; their bootstraps are the endpoints
    named by protocol (``endpoints["SASL_SSL"]``). SCRAM users are only added at the first start.

    A restart must reuse the ports of the first start: they are part of the stored quorum.
    """
    java = tools.require("java")
    lib = ensure_jars()
    data.mkdir(parents=True, exist_ok=True)
    props = data / "server.properties"
    if props.exists() and (port is None or controller_port is None):
        kv = dict(line.split("=", 1) for line in props.read_text().splitlines() if "=" in line)
        plain = next(a for a in kv["advertised.listeners"].split(",") if a.startswith("PLAINTEXT://"))
        port = port or int(plain.rsplit(":", 1)[1])
        controller_port = controller_port or int(kv["controller.quorum.voters"].rsplit(":", 1)[1])
    port = port or tools.free_port()
    controller_port = controller_port or tools.free_port()
    secure = tuple(s if s.port else SecureListener(s.protocol, tools.free_port(), s.keystore, s.users, s.mechanisms)
                   for s in secure)
    props.write_text(_properties(data, port, controller_port, secure))
    log4j = data / "log4j2.yaml"
    log4j.write_text(_LOG4J)
    classpath = f"{lib}/*"
    jvm = [java, "-Xms256m", "-Xmx768m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
           f"-Dlog4j2.configurationFile={log4j}", "-cp", classpath]
    if not (data / "logs" / "meta.properties").exists():
        # "--cluster-id=" form: an id may start with "-", which a separate argument would not survive.
        scram = [arg for s in secure for cred in s.scram_credentials() for arg in ("--add-scram", cred)]
        fmt = subprocess.run(jvm + ["kafka.tools.StorageTool", "format", f"--cluster-id={_cluster_id()}",
                                    "-c", str(props), "--ignore-formatted", *scram],
                             capture_output=True, text=True)
        if fmt.returncode != 0:
            raise ServiceError(f"Kafka storage format failed:\n{fmt.stdout[-2000:]}{fmt.stderr[-2000:]}")
    log = data / "kafka.log"
    proc = process.spawn("kafka", jvm + ["kafka.Kafka", str(props)], log)
    bootstrap = f"127.0.0.1:{port}"
    process.wait_ready("kafka", proc, proc.pid, log, lambda: _ready(bootstrap), timeout)
    endpoints = {"bootstrap": bootstrap, **{s.name: f"127.0.0.1:{s.port}" for s in secure}}
    return process.ServiceProcess("kafka", proc.pid, str(log), endpoints, str(data))


def _ready(bootstrap: str) -> bool:
    from kafka import KafkaAdminClient

    if not tools.port_open(int(bootstrap.rsplit(":", 1)[1])):
        return False  # skip kafka-python's noisy reconnect loop until the socket listens

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    try:
        return bool(admin.describe_cluster()["brokers"])
    finally:
        admin.close()
