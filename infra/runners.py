"""Beam runners that really stream: Prism (built with ``go install``) and Beam's Flink job server,
which runs each job on a Flink cluster embedded in its own JVM (``[local]``: one machine).

Prism is handed to Beam with ``--prism_location``; Beam's own PrismRunner would download it
from a host that is not reachable here.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from memstream.errors import ServiceError
from memstream.infra import process, tools

BEAM_VERSION = "2.77.0"
PRISM_MODULE = "github.com/apache/beam/sdks/v2/go/cmd/prism"


def ensure_prism() -> Path:
    """Build the Prism runner for the pinned Beam version once (``go install``); return its path."""
    home = tools.cache_dir(f"prism-{BEAM_VERSION}")
    binary = home / "prism"
    if binary.exists():
        return binary
    go = tools.require("go")
    env = {**os.environ, "GOBIN": str(home), "GOFLAGS": "-mod=mod", "CGO_ENABLED": "0"}
    result = subprocess.run([go, "install", f"{PRISM_MODULE}@v{BEAM_VERSION}"],
                            capture_output=True, text=True, env=env)
    if result.returncode != 0 or not binary.exists():
        raise ServiceError(f"go install of Prism {BEAM_VERSION} failed:\n{result.stderr[-3000:]}")
    return binary


def prism_options(streaming: bool = True, extra: list[str] | None = None) -> list[str]:
    """Pipeline arguments that run on the locally built Prism binary."""
    args = ["--runner=PrismRunner", f"--prism_location={ensure_prism()}",
            "--environment_type=LOOPBACK"]
    if streaming:
        args.append("--streaming")
    return args + list(extra or [])


# The embedded Flink job server: Beam's FlinkJobServerDriver on a classpath that mvn resolves
# from flink-pom.xml (see there for why the Java side is 2.62.0).
FLINK_RUNNER = "flink-1.19-beam-2.62.0"


def ensure_flink() -> Path:
    return tools.maven_classpath(FLINK_RUNNER, "flink-pom.xml")


def start_flink(data: Path, timeout: float = 120.0) -> process.ServiceProcess:
    """Start the job server; every Flink job it runs is an embedded (``[local]``) Flink cluster."""
    java = tools.require("java")
    lib = ensure_flink()
    data.mkdir(parents=True, exist_ok=True)
    conf = data / "flink-conf"
    conf.mkdir(exist_ok=True)
    rest = tools.free_port()
    # Flink's REST endpoint of each job: on 127.0.0.1 and at a known port (cancel goes there).
    (conf / "flink-conf.yaml").write_text(
        f"rest.address: 127.0.0.1\nrest.bind-address: 127.0.0.1\nrest.bind-port: {rest}\n"
        "taskmanager.memory.process.size: 1024m\n")
    job, artifact = tools.free_port(), tools.free_port()
    cmd = [java, "-Xmx1g", "-cp", f"{lib}/*", "org.apache.beam.runners.flink.FlinkJobServerDriver",
           "--job-host=127.0.0.1", f"--job-port={job}", f"--artifact-port={artifact}", "--expansion-port=-1",
           f"--artifacts-dir={data / 'artifacts'}", f"--flink-conf-dir={conf}", "--flink-master=[local]"]
    log = data / "flink-job-server.log"
    proc = process.spawn("flink", cmd, log)
    process.wait_ready("flink job server", proc, proc.pid, log,
                       lambda: "JobService started" in log.read_text(errors="replace"), timeout)
    return process.ServiceProcess("flink", proc.pid, str(log), {
        "job_endpoint": f"127.0.0.1:{job}", "rest": f"http://127.0.0.1:{rest}"}, str(data))


def flink_options(job_endpoint: str, streaming: bool = True, extra: list[str] | None = None) -> list[str]:
    """Pipeline arguments that submit to a running embedded-Flink job server."""
    args = ["--runner=PortableRunner", f"--job_endpoint={job_endpoint}", "--environment_type=LOOPBACK"]
    if streaming:
        args.append("--streaming")
    return args + list(extra or [])
