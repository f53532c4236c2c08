"""Airflow on 127.0.0.1 with memstream's maintenance DAGs (``memstream airflow up|down|status``).

What ``airflow standalone`` runs (SQLite metadata database, LocalExecutor, the simple auth
manager with a generated admin password), with two differences: every component is started
here, as its own process group recorded in a state file, so ``down`` stops exactly these
processes by PID; and nothing listens beyond 127.0.0.1: the API server binds 127.0.0.1, and
the scheduler runs with ``--skip-serve-logs`` (its log server binds every interface; task
logs are local files the API server reads itself). Parallelism is 2: the default of 32
forks about 40 processes. No triggerer is started: no maintenance task defers.

Stopping sends SIGINT to each component's process group (SIGTERM left children behind in
our tests), waits, then SIGTERM/SIGKILL whatever is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from memstream.errors import ServiceError, ServiceNotReadyError
from memstream.infra import process, tools

COMPONENTS = ("scheduler", "dag-processor", "api-server")
PASSWORDS = "simple_auth_manager_passwords.json.generated"


def dags_folder() -> Path:
    import memstream.dags

    return Path(memstream.dags.__file__).resolve().parent


class LocalAirflow:
    """The Airflow of one home folder (``$MEMSTREAM_CACHE/airflow`` by default)."""

    def __init__(self, home: Path | None = None):
        self.home = Path(home) if home else tools.cache_dir("airflow")
        self.home.mkdir(parents=True, exist_ok=True)
        self.state_file = self.home / "memstream-airflow.json"

    # -- state ---------------------------------------------------------------------------
    def state(self) -> dict:
        return json.loads(self.state_file.read_text()) if self.state_file.exists() else {}

    def url(self) -> str:
        st = self.state()
        if not st:
            raise ServiceError(f"Airflow is not running from {self.home}: start it with `memstream airflow up`")
        return f"http://127.0.0.1:{st['port']}"

    def env(self, port: int) -> dict[str, str]:
        base = f"http://127.0.0.1:{port}"
        return {
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.home / 'airflow.db'}",
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder()),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "2",
            "AIRFLOW__CORE__AUTH_MANAGER":
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{base}/execution/",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API__BASE_URL": base,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
        }

    # -- lifecycle -----------------------------------------------------------------------
    def up(self, timeout: float = 240.0) -> dict:
        """Start the components unless they run already; return once the API reports the
        scheduler and the DAG processor healthy."""
        st = self.state()
        if st and all(process.pid_alive(p) for p in st["pids"].values()):
            return st
        if st:
            self.down()
        port = tools.free_port()
        env = self.env(port)
        logs = self.home / "logs"
        logs.mkdir(exist_ok=True)
        migrate = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env={**os.environ, **env},
                                 stdout=open(logs / "db-migrate.log", "ab"), stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL)
        if migrate.returncode:
            raise ServiceError(f"airflow db migrate failed; see {logs / 'db-migrate.log'}:\n"
                               f"{process.tail(logs / 'db-migrate.log')}")
        args = {"scheduler": ["--skip-serve-logs"], "dag-processor": [],
                "api-server": ["--host", "127.0.0.1", "--port", str(port)]}
        pids = {}
        try:
            for name in COMPONENTS:
                proc = process.spawn(name, [sys.executable, "-m", "airflow", name, *args[name]],
                                     logs / f"{name}.log", env=env, cwd=self.home)
                pids[name] = proc.pid
                st = {"port": port, "pids": pids, "home": str(self.home)}
                self.state_file.write_text(json.dumps(st, indent=2))
            deadline = time.monotonic() + timeout
            process.wait_ready("airflow", None, pids["api-server"], logs / "api-server.log", self.healthy,
                               max(1.0, deadline - time.monotonic()))
            for name, pid in pids.items():
                if not process.pid_alive(pid):
                    raise ServiceNotReadyError(f"airflow {name} exited; last log lines:\n"
                                               f"{process.tail(logs / f'{name}.log')}")
        except BaseException:
            self.down()
            raise
        return st

    def down(self, timeout: float = 60.0) -> list[str]:
        """SIGINT each component's process group, then force what is left; returns the names stopped."""
        st = self.state()
        pids = st.get("pids", {})
        for pid in pids.values():
            try:
                os.killpg(pid, signal.SIGINT)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(process.pid_alive(p) or process.group_alive(p)
                                                  for p in pids.values()):
            time.sleep(0.2)
        for pid in pids.values():
            process.stop_pid(pid, timeout=10)
        self.state_file.unlink(missing_ok=True)
        return list(pids)

    # -- REST API ------------------------------------------------------------------------
    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.url()}/api/v2/monitor/health", timeout=5) as resp:
            return json.loads(resp.read())

    def healthy(self) -> bool:
        h = self.health()
        return all((h.get(c) or {}).get("status") == "healthy" for c in ("metadatabase", "scheduler", "dag_processor"))

    def admin_password(self) -> str:
        path = self.home / PASSWORDS
        return json.loads(path.read_text())["admin"]

    def token(self) -> str:
        req = urllib.request.Request(f"{self.url()}/auth/token", method="POST",
                                     data=json.dumps({"username": "admin", "password": self.admin_password()}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())["access_token"]

    def get(self, path: str) -> dict:
        req = urllib.request.Request(f"{self.url()}/api/v2/{path.lstrip('/')}",
                                     headers={"Authorization": f"Bearer {self.token()}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def dag_ids(self) -> list[str]:
        return sorted(d["dag_id"] for d in self.get("dags?limit=100")["dags"])

    def status(self) -> dict:
        st = self.state()
        out = {"home": str(self.home), "running": bool(st), "components": {}}
        for name, pid in st.get("pids", {}).items():
            out["components"][name] = {"pid": pid, "alive": process.pid_alive(pid)}
        if st:
            out["url"] = self.url()
            try:
                out["health"] = self.health()
            except OSError as e:
                out["health"] = f"unreachable: {e}"
        return out
