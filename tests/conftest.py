"""Session fixtures: real Kafka and S3 (SeaweedFS) on 127.0.0.1, a Prism runner binary.

Services start once per test session in a temporary stack folder and stop by PID at the
end; the teardown then fails the run if any process started under that folder survived.
A missing java/mvn/go fails with a message that names it, it is never skipped.
"""

from __future__ import annotations

import os
import uuid

import pytest

from memstream.infra import process, runners
from memstream.infra.stack import Stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    st = Stack(root)
    try:
        st.up()
        yield st
    finally:
        st.down()
        stop_strays(root, "the test session")


def stop_strays(root, what: str) -> None:
    """Stop every process still naming ``root`` (services a fixture started there), then fail if any was left."""
    strays = process.processes_mentioning(str(root))
    for pid, _ in strays:
        process.stop_pid(pid, timeout=5)
    assert not strays, f"processes outlived {what}: {strays}"


@pytest.fixture(scope="session")
def kafka_bootstrap(stack) -> str:
    return stack.kafka_bootstrap()


@pytest.fixture(scope="session")
def s3_config(stack):
    return stack.s3_config()


@pytest.fixture(scope="session")
def prism_binary():
    return runners.ensure_prism()


@pytest.fixture
def topic_name(request) -> str:
    """A fresh topic name per test, so tests never see each other's messages."""
    base = "".join(c if c.isalnum() else "-" for c in request.node.name)[:60]
    return f"t-{base}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def s3_prefix(request) -> str:
    return f"tests/{request.node.name[:50]}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path):
    """(uri, storage_options) of a fresh store root: a local folder, then a prefix on S3."""
    if request.param == "local":
        return str(tmp_path / "ltm"), {}
    s3 = request.getfixturevalue("s3_config")
    return s3.uri(request.getfixturevalue("s3_prefix")), s3.storage_options()


def pytest_report_header(config):
    return f"memstream cache: {os.environ.get('MEMSTREAM_CACHE', '~/.cache/memstream')}"


@pytest.fixture(scope="session")
def flink_job_endpoint(stack) -> str:
    """The embedded Flink job server, started on first use and stopped with the stack."""
    stack.up(("flink",))
    return stack.flink_job_endpoint()


@pytest.fixture(scope="session")
def worker_pool(stack) -> str:
    """Beam's SDK worker pool (EXTERNAL environment), started on first use."""
    stack.up(("workers",))
    return stack.worker_pool()
