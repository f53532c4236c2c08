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


# Prism 2.77 splits a slow stateful bundle and lets the residual's keys run in a new bundle while
# the primary still holds them (engine/elementmanager.go, splitBundle): two bundles then read and
# write one key's state, and state forks (tests/test_runners.py reproduces it; apache/beam#35771 is
# where that code came from). This experiment turns off Prism's dynamic splits.
PRISM_EXPERIMENTS = ("prism_disable_sdf_split",)


def prism_options(streaming: bool = True, extra: list[str] | None = None) -> list[str]:
    """Pipeline arguments that run on the locally built Prism binary."""
    args = ["--runner=PrismRunner", f"--prism_location={ensure_prism()}", "--prism_log_level=warn",
            "--environment_type=LOOPBACK", *(f"--experiments={e}" for e in PRISM_EXPERIMENTS)]
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
    # Each job runs on a Flink cluster of its own, whose REST endpoint binds 127.0.0.1; a range,
    # since a cancelled job's cluster may still hold its port while the next one starts.
    (conf / "flink-conf.yaml").write_text(
        f"rest.address: 127.0.0.1\nrest.bind-address: 127.0.0.1\nrest.bind-port: {rest}-{rest + 20}\n"
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


def flink_options(job_endpoint: str, streaming: bool = True, parallelism: int = 2,
                  checkpoint_interval_ms: int | None = 5000, worker_pool: str | None = None,
                  extra: list[str] | None = None) -> list[str]:
    """Pipeline arguments that submit to a running Flink job server: ``parallelism`` parallel
    instances of every step, checkpoints of keyed state and source offsets every
    ``checkpoint_interval_ms`` (streaming), and SDK workers from the worker pool at
    ``worker_pool`` (host:port, :func:`start_worker_pool`), else the submitting process."""
    args = ["--runner=PortableRunner", f"--job_endpoint={job_endpoint}", f"--parallelism={parallelism}",
            f"--sdk_worker_parallelism={parallelism}"]  # one SDK worker per slot
    if worker_pool:
        args += ["--environment_type=EXTERNAL", f"--environment_config={worker_pool}"]
    else:
        args.append("--environment_type=LOOPBACK")
    if streaming:
        args.append("--streaming")
        if checkpoint_interval_ms:  # FlinkPipelineOptions, passed through by the job server
            args += [f"--checkpointing_interval={checkpoint_interval_ms}", "--execution_retry_delay=1000"]
    return args + list(extra or [])


def start_worker_pool(data: Path, timeout: float = 60.0) -> process.ServiceProcess:
    """Beam's SDK worker pool: the runner asks it for a Python SDK worker per stage and slot,
    and it starts each as a process of its own (so a worker can die without the pool)."""
    import sys

    data.mkdir(parents=True, exist_ok=True)
    port = tools.free_port()
    log = data / "worker-pool.log"
    # The pool starts each worker as `python -c ...`: this interpreter's, which imports memstream.
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = process.spawn("worker-pool", [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
                                         f"--service_port={port}"], log, env=env)
    process.wait_ready("beam worker pool", proc, proc.pid, log, lambda: tools.port_open(port), timeout)
    return process.ServiceProcess("workers", proc.pid, str(log), {"worker_pool": f"127.0.0.1:{port}"}, str(data))
