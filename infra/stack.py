"""Bring memstream's services up and down as one stack, with their state on disk.

The state file (``stack.json`` in the stack folder) records each service's PID, log and
endpoints, so ``memstream infra down`` in another process stops exactly what ``up`` started.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from memstream.errors import ServiceError
from memstream.infra import kafka, runners, s3, tools
from memstream.infra.process import ServiceProcess

SERVICES = ("kafka", "s3")
OPTIONAL = ("flink", "workers")  # the Flink job server and Beam's SDK worker pool: when asked for


class Stack:
    """The services of one stack folder (``$MEMSTREAM_CACHE/stack`` by default)."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else tools.cache_dir("stack")
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_file = self.root / "stack.json"

    # -- state ---------------------------------------------------------------------------
    def services(self) -> dict[str, ServiceProcess]:
        if not self.state_file.exists():
            return {}
        raw = json.loads(self.state_file.read_text())
        return {name: ServiceProcess(**entry) for name, entry in raw.items()}

    def _save(self, services: dict[str, ServiceProcess]) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({n: asdict(s) for n, s in services.items()}, indent=2))
        tmp.replace(self.state_file)

    # -- lifecycle -----------------------------------------------------------------------
    def up(self, which: tuple[str, ...] = SERVICES) -> dict[str, ServiceProcess]:
        """Start each named service that is not already running; return all running ones."""
        running = {n: s for n, s in self.services().items() if s.alive()}
        starters = {"kafka": lambda: kafka.start(self.root / "kafka"),
                    "s3": lambda: s3.start(self.root / "s3"),
                    "flink": lambda: runners.start_flink(self.root / "flink"),
                    "workers": lambda: runners.start_worker_pool(self.root / "workers")}
        try:
            for name in which:
                if name not in starters:
                    raise ServiceError(f"unknown service {name!r}; choose from {', '.join(SERVICES + OPTIONAL)}")
                if name not in running:
                    running[name] = starters[name]()
                    self._save(running)
        except BaseException:
            self._save(running)
            raise
        return running

    def down(self) -> list[str]:
        """Stop every recorded service by PID; return the names stopped."""
        stopped = []
        for name, svc in self.services().items():
            if svc.alive():
                svc.stop()
                stopped.append(name)
        self.state_file.unlink(missing_ok=True)
        return stopped

    def status(self) -> dict[str, dict]:
        out = {}
        for name, svc in self.services().items():
            out[name] = {"pid": svc.pid, "alive": svc.alive(), "log": svc.log, **svc.endpoints}
        return out

    def kafka_bootstrap(self) -> str:
        svc = self.services().get("kafka")
        if not svc or not svc.alive():
            raise ServiceError("Kafka is not running: start it with `memstream infra up`")
        return svc.endpoints["bootstrap"]

    def kafka_log_dirs(self) -> list[str]:
        """The broker's ``log.dirs``: where every topic's records are on disk (the forget scan)."""
        svc = self.services().get("kafka")
        if not svc or not svc.alive():
            raise ServiceError("Kafka is not running: start it with `memstream infra up`")
        return [str(Path(svc.data_dir) / "logs")]

    def s3_config(self) -> s3.S3Config:
        svc = self.services().get("s3")
        if not svc or not svc.alive():
            raise ServiceError("S3 (SeaweedFS) is not running: start it with `memstream infra up`")
        return s3.S3Config.from_endpoints(svc.endpoints)

    def flink_job_endpoint(self) -> str:
        svc = self.services().get("flink")
        if not svc or not svc.alive():
            raise ServiceError("the Flink job server is not running: start it with `memstream infra up flink`")
        return svc.endpoints["job_endpoint"]

    def worker_pool(self) -> str:
        svc = self.services().get("workers")
        if not svc or not svc.alive():
            raise ServiceError("the Beam worker pool is not running: start it with `memstream infra up workers`")
        return svc.endpoints["worker_pool"]

    def restart(self, name: str) -> ServiceProcess:
        """Stop one service and start it again on the same data and ports (fault tests)."""
        services = self.services()
        svc = services[name]
        svc.stop()
        time.sleep(0.5)
        if name != "kafka":
            raise ServiceError("only Kafka restarts in place (S3 ports are chosen at start)")
        services[name] = kafka.start(Path(svc.data_dir))
        self._save(services)
        return services[name]

