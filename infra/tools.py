"""Finding the external tools memstream needs, and the cache it keeps them in."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from importlib import resources
from pathlib import Path

from memstream.errors import ServiceError, ToolMissingError

HINTS = {
    "java": "install a Java 17+ runtime (Debian: apt-get install openjdk-17-jre-headless)",
    "mvn": "install Apache Maven (Debian: apt-get install maven)",
    "go": "install Go 1.22+ (https://go.dev/doc/install or Debian: apt-get install golang)",
}


def require(tool: str) -> str:
    """Absolute path of ``tool`` on PATH, or a ToolMissingError that says what to install."""
    path = shutil.which(tool)
    if path is None:
        raise ToolMissingError(tool, HINTS.get(tool, f"install {tool}"))
    return path


def cache_dir(*parts: str) -> Path:
    """A folder under the memstream cache (``$MEMSTREAM_CACHE``, default ``~/.cache/memstream``)."""
    root = Path(os.environ.get("MEMSTREAM_CACHE", Path.home() / ".cache" / "memstream"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def maven_classpath(name: str, pom: str) -> Path:
    """Resolve the dependencies of one of our pom files (``memstream.infra`` package data) into
    ``$MEMSTREAM_CACHE/<name>/lib`` with mvn, once; return that folder."""
    home = cache_dir(name)
    lib, done = home / "lib", home / ".complete"
    if done.exists():
        return lib
    mvn = require("mvn")
    require("java")
    with resources.as_file(resources.files("memstream.infra").joinpath(pom)) as pom_path:
        result = subprocess.run([mvn, "-q", "-B", "-f", str(pom_path), "dependency:copy-dependencies",
                                 f"-DoutputDirectory={lib}", "-DincludeScope=runtime"],
                                capture_output=True, text=True)
    if result.returncode != 0:
        raise ServiceError(f"mvn could not resolve {pom} into {lib}:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    done.touch()
    return lib
