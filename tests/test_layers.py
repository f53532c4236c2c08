"""The layer contract: imports point one way, schemas -> pure core -> stores -> processes -> entry
points, with no cycles, and only entry points and tests reach the dev services of ``infra``.

Every import counts, at the top of a module or inside a function. The table below is the
picture at the top of docs/ARCHITECTURE.md."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Module (or package prefix) -> layer. The longest matching prefix decides.
LAYERS = {
    # 0: records, errors, settings
    "memstream.schemas": 0, "memstream.errors": 0, "memstream.settings": 0, "memstream.faults": 0,
    # 1: pure core: wire format, cryptography, windows, chains, decay, policies, the compressor
    "memstream.wire": 1, "memstream.crypto": 1, "memstream.episodic.window": 1, "memstream.episodic.chain": 1,
    "memstream.episodic.decay": 1, "memstream.episodic.progress": 1, "memstream.longterm.entry": 1, "memstream.longterm.policy": 1,
    "memstream.longterm.train_policy": 1, "memstream.read.routing": 1, "memstream.read.train_routing": 1,
    "memstream.read.window": 1, "memstream.access.grants": 1,
    "memstream.operators": 1, "memstream.kernels": 1, "memstream.text_latents": 1,
    # 2: stores and the Kafka topics
    "memstream.storage": 2, "memstream.episodic.store": 2, "memstream.episodic.ledger": 2,
    "memstream.longterm.store": 2, "memstream.topics": 2, "memstream.access.registry": 2,
    "memstream.witness": 2,
    # 3: processes
    "memstream.pipelines": 3, "memstream.read.memory": 3, "memstream.maintenance": 3, "memstream.sdk": 3,
    # 4: entry points
    "memstream.cli": 4, "memstream.read.http": 4, "memstream.dags": 4, "memstream.demo": 4,
    # the package's own __init__ files only describe (and lazily re-export) what is below them
    "memstream": 0, "memstream.episodic": 0, "memstream.longterm": 2, "memstream.read": 0,
    "memstream.access": 0,
}
DEV = "memstream.infra"  # dev services: outside the layers, imported by entry points and tests only
MAY_IMPORT_DEV = ("memstream.cli", "memstream.demo", DEV)


def _roots() -> dict[str, str]:
    """Folder -> package, read from setup.py (the one place the mapping is written)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "ROOTS":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no ROOTS")


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in _roots().items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def imports(name: str, path: Path) -> set[str]:
    """Every memstream module ``path`` imports, anywhere in it."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m == "memstream" or m.startswith("memstream.")}


def layer(module: str) -> int | None:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    return LAYERS[best] if best else None


def graph() -> dict[str, set[str]]:
    mods = modules()
    edges = {}
    for name, path in mods.items():
        # "from memstream.x import y" names either a module or an attribute: keep the modules
        edges[name] = {m for m in imports(name, path) if m in mods and m != name}
    return edges


def test_every_module_has_a_layer():
    unplaced = [m for m in modules() if not m.startswith(DEV) and layer(m) is None]
    assert not unplaced, f"place these modules in LAYERS (and docs/ARCHITECTURE.md): {unplaced}"


def test_imports_point_down_the_layers():
    wrong = []
    for name, deps in graph().items():
        if name.startswith(DEV):
            continue
        for dep in deps:
            if dep.startswith(DEV) or dep in ("memstream",):
                continue
            if layer(dep) > layer(name):
                wrong.append(f"{name} (layer {layer(name)}) imports {dep} (layer {layer(dep)})")
    assert not wrong, "\n".join(sorted(wrong))


def test_only_entry_points_and_tests_import_the_dev_services():
    wrong = sorted(f"{name} imports {dep}" for name, deps in graph().items() for dep in deps
                   if dep.startswith(DEV) and not name.startswith(MAY_IMPORT_DEV))
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges.get(node, ())):
            # A package's __init__ re-exporting its own modules is not a cycle of logic.
            if state.get(dep) == 1 and not (dep.startswith(node + ".") or node.startswith(dep + ".")):
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_contract_catches_a_wrong_arrow(tmp_path):
    assert layer("memstream.episodic.window") == 1 and layer("memstream.episodic.store") == 2
    assert layer("memstream.cli.run") == 4 and layer("memstream.wire.codec") == 1
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from memstream.pipelines.episodic import run\n")
    assert imports("memstream.wire.bad", bad) >= {"memstream.pipelines.episodic"}
