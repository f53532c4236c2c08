"""The built wheel works alone: installed into a fresh virtualenv, with no checkout on the path,
it holds every package, runs ``memstream --help``, imports every DAG and runs one with dag.test()."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools leaves build/ and egg-info folders beside the sources.
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                                             "__pycache__", "runs"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp / "dist"), str(src)], check=True, capture_output=True, cwd=tmp)
    (built,) = (tmp / "dist").glob("memstream-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh virtualenv that sees the dependencies and holds the wheel alone; its python."""
    venv = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "_deps.pth").write_text(str(_dependencies()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    str(wheel)], check=True, capture_output=True)
    return python


def _dependencies() -> Path:
    """The folder the dependencies are installed in (the bootstrap's shared virtualenv). The
    checkout's editable install lives in its own .venv, not there; checked, so that what the
    test imports is the wheel."""
    import numpy

    deps = Path(numpy.__file__).resolve().parents[1]
    assert not list(deps.glob("__editable__*memstream*")), f"{deps} holds an editable memstream"
    return deps


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "PYTHONNOUSERSITE": "1", "MEMSTREAM_CACHE": str(tmp / "cache")}


def test_the_wheel_holds_every_package_of_the_tree(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    folders = {"memstream": "memstream", "pipelines": "memstream/pipelines", "operators": "memstream/operators",
               "kernels": "memstream/kernels", "dags": "memstream/dags", "schemas": "memstream/schemas",
               "infra": "memstream/infra"}
    for folder, installed_as in folders.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.relative_to(ROOT / folder).as_posix()
            assert f"{installed_as}/{rel}" in names, f"{folder}/{rel} is not in the wheel"
    for data in ("memstream/operators/checkpoints/compressor.safetensors", "memstream/read/route_policy.npz",
                 "memstream/longterm/write_policy.npz", "memstream/infra/requirements.lock",
                 "memstream/schemas/summary_record.v2.json"):
        assert data in names, data


def test_memstream_help_runs_from_the_wheel(installed, tmp_path):
    out = subprocess.run([str(installed.parent / "memstream"), "--help"], capture_output=True, text=True,
                         cwd=tmp_path, env=_env(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "run" in out.stdout and "verify" in out.stdout and "keys" in out.stdout
    where = subprocess.run([str(installed), "-c", "import memstream; print(memstream.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=_env(tmp_path), check=True).stdout
    assert str(ROOT) not in where and "site-packages" in where  # the wheel, not the checkout


def test_every_dag_imports_and_one_runs_with_dag_test(installed, tmp_path):
    home = tmp_path / "airflow"
    env = {**_env(tmp_path), "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}"}
    code = f"""
import importlib, os, pathlib, pkgutil
import memstream.dags
folder = pathlib.Path(memstream.dags.__file__).parent
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(folder)
from airflow.utils import db
db.resetdb()
names = [m.name for m in pkgutil.iter_modules([str(folder)])]
for name in names:  # every module of the DAG folder imports
    importlib.import_module("memstream.dags." + name)
from airflow.dag_processing.dagbag import BundleDagBag
bag = BundleDagBag(dag_folder=folder, bundle_path=folder, bundle_name="memstream-dags")
assert not bag.import_errors, bag.import_errors
assert sorted(bag.dags) == sorted(n for n in names if n != "dagkit"), sorted(bag.dags)  # one DAG a file
run = bag.dags["episodic_decay"].test(run_conf={{"episodic_uri": {str(tmp_path / 'episodic')!r}}})
print("STATE", run.state)
"""
    out = subprocess.run([str(installed), "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "STATE success" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
