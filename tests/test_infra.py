"""The real services: Kafka (KRaft), SeaweedFS S3 with LanceDB, process hygiene, packaging."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic

from memstream.errors import ToolMissingError
from memstream.infra import process, tools
from memstream.settings import MAX_MESSAGE_BYTES
from memstream.storage.s3 import S3Config, s3_request

ROOT = Path(__file__).resolve().parents[1]


def create_topic(bootstrap: str, name: str, partitions: int = 1) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        admin.close()


def test_kafka_consumer_group_reads_every_message_once(kafka_bootstrap, topic_name):
    create_topic(kafka_bootstrap, topic_name, partitions=3)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=True, acks="all")
    sent = {(f"s{i % 5}".encode(), f"m{i}".encode()) for i in range(60)}
    for key, value in sorted(sent):
        producer.send(topic_name, key=key, value=value)
    producer.flush()
    producer.close()

    def consume(group: str) -> list:
        consumer = KafkaConsumer(topic_name, bootstrap_servers=kafka_bootstrap, group_id=group,
                                 auto_offset_reset="earliest", enable_auto_commit=False,
                                 consumer_timeout_ms=4000, session_timeout_ms=6000,
                                 heartbeat_interval_ms=1000)
        got = list(consumer)
        consumer.commit()
        consumer.close()
        return got

    group = f"g-{uuid.uuid4().hex[:6]}"
    first = consume(group)
    assert {(m.key, m.value) for m in first} == sent
    # One key always lands on one partition, so per-key order is the send order.
    by_key: dict[bytes, set[int]] = {}
    for m in first:
        by_key.setdefault(m.key, set()).add(m.partition)
    assert all(len(parts) == 1 for parts in by_key.values())
    assert consume(group) == []  # committed offsets: the group has nothing left to read


def test_kafka_takes_8_mib_latent_chunks(kafka_bootstrap, topic_name):
    create_topic(kafka_bootstrap, topic_name)
    payload = np.random.default_rng(0).bytes(8 * 1024 * 1024)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, max_request_size=MAX_MESSAGE_BYTES)
    producer.send(topic_name, key=b"s", value=payload).get(timeout=30)
    producer.close()
    consumer = KafkaConsumer(topic_name, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest",
                             consumer_timeout_ms=5000, max_partition_fetch_bytes=MAX_MESSAGE_BYTES)
    [msg] = list(consumer)
    consumer.close()
    assert msg.value == payload


@pytest.mark.parametrize("where", ["local", "s3"])
def test_lancedb_round_trip(where, tmp_path, s3_config: S3Config, s3_prefix):
    import lancedb

    if where == "s3":
        uri, opts = s3_config.uri(s3_prefix), s3_config.storage_options()
    else:
        uri, opts = str(tmp_path / "db"), None
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((200, 384)).astype(np.float32)
    data = pa.table({"id": pa.array(range(200), pa.int64()),
                     "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 384)})
    lancedb.connect(uri, storage_options=opts).create_table("t", data)
    # A new connection sees what the first one committed.
    table = lancedb.connect(uri, storage_options=opts).open_table("t")
    assert table.count_rows() == 200
    hit = table.search(vectors[17]).limit(1).to_arrow()
    assert hit["id"][0].as_py() == 17
    if where == "s3":
        status, body = s3_request(s3_config, "GET", f"/{s3_config.bucket}?list-type=2&prefix={s3_prefix}/")
        assert status == 200 and b".lance" in body


def test_s3_refuses_a_wrong_secret(s3_config: S3Config):
    wrong = S3Config(s3_config.endpoint, s3_config.bucket, s3_config.access_key, "not-the-secret")
    assert s3_request(wrong, "GET", f"/{wrong.bucket}?list-type=2")[0] == 403
    assert s3_request(s3_config, "GET", f"/{s3_config.bucket}?list-type=2")[0] == 200


@pytest.mark.parametrize("tool", ["java", "mvn", "go"])
def test_a_missing_tool_is_named_with_what_to_install(tool, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ToolMissingError) as err:
        tools.require(tool)
    message = str(err.value)
    assert tool in message and "install" in message and "\n" not in message


def test_cli_reports_a_missing_tool_in_one_line(tmp_path):
    env = {**os.environ, "PATH": str(Path(sys.executable).parent), "MEMSTREAM_CACHE": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "memstream.cli", "infra", "fetch"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "'mvn' not found on PATH: install Apache Maven" in result.stderr


def test_infra_cli_up_and_down_leave_no_process(tmp_path):
    stack_dir = tmp_path / "stack"
    cli = [sys.executable, "-m", "memstream.cli", "infra", "--dir", str(stack_dir)]
    up = subprocess.run(cli + ["up"], capture_output=True, text=True)
    try:
        assert up.returncode == 0, up.stderr
        status = subprocess.run(cli + ["status"], capture_output=True, text=True)
        assert status.returncode == 0 and '"alive": true' in status.stdout
        assert "secret" not in status.stdout
    finally:
        down = subprocess.run(cli + ["down"], capture_output=True, text=True)
    assert down.returncode == 0 and "kafka" in down.stdout and "s3" in down.stdout
    assert process.processes_mentioning(str(stack_dir)) == []


LAYERS = ["memstream.pipelines", "memstream.operators", "memstream.kernels", "memstream.dags",
          "memstream.schemas", "memstream.infra"]


def test_editable_install_imports_every_layer_under_the_namespace(tmp_path):
    # From a folder outside the checkout, as a user would: the layers exist only as memstream.*.
    code = ("import importlib, pathlib\n"
            f"for name in {LAYERS!r}:\n"
            "    m = importlib.import_module(name)\n"
            "    assert pathlib.Path(m.__file__).parent.name == name.split('.')[1], m.__file__\n"
            "for generic in ('operators', 'pipelines', 'kernels', 'schemas', 'dags', 'infra'):\n"
            "    try:\n"
            "        importlib.import_module(generic)\n"
            "    except ModuleNotFoundError:\n"
            "        continue\n"
            "    raise SystemExit(f'{generic} is importable as a top-level module')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr + result.stdout


def test_built_wheel_installs_and_imports(tmp_path):
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist),
                            str(ROOT)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    [wheel] = dist.glob("memstream-*.whl")
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                          "--target", str(target), str(wheel)], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr
    code = ("import importlib, memstream; "
            f"mods = [importlib.import_module(n) for n in {LAYERS!r}]; "
            "print(memstream.__file__); print(all(m.__file__.startswith(memstream.__path__[0]) for m in mods))")
    # Run from an empty folder, with the wheel's files first on the path and not the checkout.
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {code}"],
                         capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    location, all_inside = out.stdout.split()
    assert location.startswith(str(target)) and all_inside == "True"


def _listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket ``pid`` listens on, from /proc (IPv4 and IPv6)."""
    import ipaddress

    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table, width in (("tcp", 4), ("tcp6", 16)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:  # 0A: LISTEN
                continue
            addr, port = f[1].split(":")
            raw = bytes.fromhex(addr)
            # /proc writes each 32-bit word little-endian.
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, width, 4))
            out.append((str(ipaddress.ip_address(raw)), int(port, 16)))
    return out


def test_seaweedfs_listens_on_loopback_only_and_its_filer_refuses_anonymous_requests(stack, s3_config):
    """Every port of the S3 service is on 127.0.0.1; WebDAV and the catalog ports are not
    started; the filer and volume servers (which S3 needs) refuse requests without a JWT,
    while S3 itself works with its credentials."""
    import urllib.error
    import urllib.request

    svc = stack.services()["s3"]
    ports = _listening(svc.pid)
    assert ports and all(addr == "127.0.0.1" for addr, _ in ports), ports
    # Master, volume, filer, S3, admin and metrics, and the gRPC ports of the first five:
    # WebDAV (default 7333) and the Iceberg (8181) and Lance (9101) catalogs are not started.
    assert len(ports) <= 11 and not {7333, 8181, 9101} & {p for _, p in ports}, ports
    for url, method, data in [(f"{svc.endpoints['filer']}/buckets/{s3_config.bucket}/", "GET", None),
                              (f"{svc.endpoints['filer']}/anonymous.txt", "PUT", b"x"),
                              (f"{svc.endpoints['filer']}/anonymous.txt", "POST", b"x")]:
        req = urllib.request.Request(url, data=data, method=method)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 401, (url, method, e.value.code)
    key = f"tests/listeners-{uuid.uuid4().hex[:8]}"
    assert s3_request(s3_config, "PUT", f"/{s3_config.bucket}/{key}", b"through S3")[0] == 200
    assert s3_request(s3_config, "GET", f"/{s3_config.bucket}/{key}") == (200, b"through S3")
    security = Path(svc.data_dir) / "security.toml"
    assert security.stat().st_mode & 0o077 == 0


def test_s3_listing_follows_continuation_past_1000_keys(s3_config: S3Config, s3_prefix):
    """An S3 listing answers at most 1,000 keys per request: S3Objects.list returns them all."""
    from concurrent.futures import ThreadPoolExecutor

    from memstream.storage.objects import S3Objects

    objects = S3Objects(s3_config.uri(s3_prefix), s3_config.storage_options())
    names = [f"many/k{i:04d}&.json" for i in range(1005)]  # '&' comes back XML-escaped
    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(lambda n: objects.put_if_absent(n, b"{}"), names))
    first = objects._request_list(f"{s3_prefix}/many/")[1]
    assert b"<IsTruncated>true</IsTruncated>" in first  # one request does not hold them all
    assert sorted(objects.list("many")) == sorted(names)
