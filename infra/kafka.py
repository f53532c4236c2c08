"""Apache Kafka in KRaft mode (one combined broker and controller), started with ``java``.

The jars come from Maven Central through ``mvn dependency:copy-dependencies`` on
``kafka-pom.xml`` and are cached under ``$MEMSTREAM_CACHE/kafka-<version>/lib``.
"""

from __future__ import annotations

import base64
import subprocess
import uuid
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


def _properties(data: Path, port: int, controller_port: int) -> str:
    return "\n".join([
        "process.roles=broker,controller",
        "node.id=1",
        f"controller.quorum.voters=1@127.0.0.1:{controller_port}",
        f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}",
        "controller.listener.names=CONTROLLER",
        "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "inter.broker.listener.name=PLAINTEXT",
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
          timeout: float = 90.0) -> process.ServiceProcess:
    """Start a broker whose state lives in ``data``; an existing ``data`` folder is restarted as is.

    A restart must reuse the ports of the first start: they are part of the stored quorum.
    """
    java = tools.require("java")
    lib = ensure_jars()
    data.mkdir(parents=True, exist_ok=True)
    props = data / "server.properties"
    if props.exists() and (port is None or controller_port is None):
        kv = dict(line.split("=", 1) for line in props.read_text().splitlines() if "=" in line)
        port = port or int(kv["advertised.listeners"].rsplit(":", 1)[1])
        controller_port = controller_port or int(kv["controller.quorum.voters"].rsplit(":", 1)[1])
    port = port or tools.free_port()
    controller_port = controller_port or tools.free_port()
    props.write_text(_properties(data, port, controller_port))
    log4j = data / "log4j2.yaml"
    log4j.write_text(_LOG4J)
    classpath = f"{lib}/*"
    jvm = [java, "-Xms256m", "-Xmx768m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
           f"-Dlog4j2.configurationFile={log4j}", "-cp", classpath]
    if not (data / "logs" / "meta.properties").exists():
        # "--cluster-id=" form: an id may start with "-", which a separate argument would not survive.
        fmt = subprocess.run(jvm + ["kafka.tools.StorageTool", "format", f"--cluster-id={_cluster_id()}",
                                    "-c", str(props), "--ignore-formatted"],
                             capture_output=True, text=True)
        if fmt.returncode != 0:
            raise ServiceError(f"Kafka storage format failed:\n{fmt.stdout[-2000:]}{fmt.stderr[-2000:]}")
    log = data / "kafka.log"
    proc = process.spawn("kafka", jvm + ["kafka.Kafka", str(props)], log)
    bootstrap = f"127.0.0.1:{port}"
    process.wait_ready("kafka", proc, proc.pid, log, lambda: _ready(bootstrap), timeout)
    return process.ServiceProcess("kafka", proc.pid, str(log), {"bootstrap": bootstrap}, str(data))


def _ready(bootstrap: str) -> bool:
    from kafka import KafkaAdminClient

    if not tools.port_open(int(bootstrap.rsplit(":", 1)[1])):
        return False  # skip kafka-python's noisy reconnect loop until the socket listens

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    try:
        return bool(admin.describe_cluster()["brokers"])
    finally:
        admin.close()
