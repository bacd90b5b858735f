"""The package's import graph: imports point down the layers only, and no module imports itself back.

Every `import` and `from ... import` is read from the source with `ast`, function bodies included (a
lazy import that dodges a cycle is still a cycle). The layers, lowest first:

    s3_errors, precision, faults  <  endpoints, storage, models, diffusion  <  flops  <  dynamic  <  accel  <  config, config_files, config_types  <  paths, shardset, network,
    lease, run_config, capacity, estimate  <  data, train, sample, eval  <  pipeline, preflight, resolve, cli  <  jobs

Modules of one layer may import each other as long as no cycle forms.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYERS = [
    ("s3_errors", "precision", "faults"),
    ("endpoints", "storage", "models", "diffusion"),
    ("flops",),
    ("dynamic",),
    ("accel",),
    ("config", "config_files", "config_types"),
    ("paths", "shardset", "network", "pretrained", "lease", "run_config", "capacity", "estimate"),
    ("data", "train", "sample", "eval"),
    ("pipeline", "preflight", "resolve", "cli"),
    ("jobs",),
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def module_files() -> dict[str, Path]:
    files = {}
    for top in ("dydit_dist", "jobs"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(parts)] = path
    return files


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports (the most specific known module of each imported name)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import submodule` depends on the submodule; `from pkg import name` on pkg itself
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {name: imports_of(name, path, known) for name, path in files.items()}


def layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] == "jobs":
        return RANK["jobs"]
    return RANK.get(parts[1]) if len(parts) > 1 else None


def test_every_module_has_a_layer():
    unplaced = [m for m in graph() if m != "dydit_dist" and layer(m) is None]
    assert not unplaced, f"modules outside every layer (add them to LAYERS): {unplaced}"


def test_imports_point_down_the_layers():
    upward = []
    for module, deps in graph().items():
        for dep in deps:
            if dep != "dydit_dist" and layer(module) is not None and layer(dep) > layer(module):
                upward.append(f"{module} -> {dep}")
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_lazy_imports(tmp_path):
    """The graph reads function bodies and relative imports: a lazy upward import is found."""
    path = tmp_path / "fake.py"
    path.write_text("def f():\n    from ..accel import methods\n    from dydit_dist import cli\n")
    deps = imports_of("dydit_dist.models.fake", path, set(module_files()))
    assert {"dydit_dist.accel.methods", "dydit_dist.cli"} <= deps
