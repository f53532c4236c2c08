"""`memstream airflow up|status|down`: Airflow on 127.0.0.1 with the maintenance DAGs listed
over the REST API (v2, token from the generated admin password), stopped leaving no process."""

from __future__ import annotations

import json
import os
import time

from memstream import cli
from memstream.infra import process
from memstream.infra.airflow import LocalAirflow

DAG_IDS = ["episodic_decay", "forget_purge", "longterm_anchoring", "longterm_cold_demotion", "longterm_compaction",
           "session_consolidation", "session_forget", "session_gc"]


def listening_addresses(pids: list[int]) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of the listening TCP sockets of ``pids``."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # LISTEN
                out.add(f[1].rsplit(":", 1)[0])
    return out


def test_airflow_up_lists_the_dags_and_down_leaves_no_process(tmp_path, capsys):
    home = tmp_path / "airflow"
    af = LocalAirflow(home)
    try:
        started = time.monotonic()
        assert cli.main(["airflow", "--dir", str(home), "up"]) == 0
        up_s = time.monotonic() - started
        pids = list(af.state()["pids"].values())
        tree = pids + [c for p in pids for c in process.descendants(p)]
        # every listening socket is on 127.0.0.1 (hex 0100007F), none on 0.0.0.0 or ::
        assert listening_addresses(tree) == {"0100007F"}
        assert cli.main(["airflow", "--dir", str(home), "status"]) == 0
        status = json.loads(capsys.readouterr().out.split("\n", 2)[-1])
        assert status["health"]["scheduler"]["status"] == "healthy"
        deadline = time.monotonic() + 120
        while af.dag_ids() != DAG_IDS and time.monotonic() < deadline:  # the DAG processor parses in the background
            time.sleep(2)
        assert af.dag_ids() == DAG_IDS
        assert af.get("dags/forget_purge")["is_paused"] is True
    finally:
        assert cli.main(["airflow", "--dir", str(home), "down"]) == 0
    assert not any(process.pid_alive(p) for p in tree)
    assert process.processes_mentioning(str(home)) == []
    print(f"airflow healthy after {up_s:.1f}s")
