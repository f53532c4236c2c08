"""Beam runners that really stream: Prism (built with ``go install``) and embedded Flink.

Prism is handed to Beam with ``--prism_location``; Beam's own PrismRunner would download it
from a host that is not reachable here.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from memstream.errors import ServiceError
from memstream.infra import tools

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
