"""The package's layers, read from its source with ``ast``: imports point down only, no cycles.

Layers, top to bottom: ``cli`` -> ``training`` -> ``distributed`` -> ``lars``. Beside them and
below all four: ``schedules``, ``data``, ``models``, ``errors`` and the native modules ``_C`` /
``_C_cuda``, which import none of the layers. The package's ``__init__`` (the public surface,
lazy re-exports) sits above everything: no module of the package may import it.

Every import counts, at module level or inside a function (a lazy import is still a
dependency). ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to
``pkg``. Horovod must not be imported below ``distributed``.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "hvd_largebatch"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
#: rank of each top-level part of the package (higher = further up)
LAYERS = {"schedules": 0, "data": 0, "models": 0, "errors": 0, "_C": 0, "_C_cuda": 0,
          "lars": 1, "distributed": 2, "training": 3, "cli": 4, "": 5}
#: extension modules (no .py source): leaves of the graph
NATIVE = {f"{PACKAGE}._C", f"{PACKAGE}._C_cuda"}
#: third-party packages that a layer may not import (below the layer that owns them)
FOREIGN = {"horovod": 2}


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` under ``root``."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join([package, *parts])] = path
    return modules


def imports_of(name: str, path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, relative ones resolved."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if sub in known else base))
    return found


def layer_of(module: str, package: str) -> int | None:
    """The layer rank of a module of the package (None outside it)."""
    if module != package and not module.startswith(package + "."):
        return None
    part = module[len(package) + 1:].split(".")[0] if module != package else ""
    return LAYERS.get(part)


def check_layers(root: Path, package: str = PACKAGE) -> tuple[list[str], dict[str, set[str]]]:
    """Upward imports (as messages) and the import graph of the package under ``root``."""
    modules = module_files(root, package)
    known = set(modules) | {f"{package}.{n.split('.')[-1]}" for n in NATIVE}
    problems, graph = [], {}
    for name, path in modules.items():
        mine = layer_of(name, package)
        if mine is None:
            problems.append(f"{path}: {name} belongs to no layer: add it to LAYERS")
            continue
        graph[name] = set()
        for line, target in imports_of(name, path, known):
            top = target.split(".")[0]
            if top in FOREIGN and mine < FOREIGN[top]:
                problems.append(f"{path.relative_to(root.parent)}:{line}: {name} imports {top}, "
                                f"which only layers from rank {FOREIGN[top]} up may use")
            theirs = layer_of(target, package)
            if theirs is None:
                continue
            if target != name:
                graph[name].add(target)
            if theirs > mine:
                problems.append(f"{path.relative_to(root.parent)}:{line}: upward import: {name} "
                                f"(layer {mine}) imports {target} (layer {theirs})")
    return problems, graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_imports_point_down_only():
    problems, _ = check_layers(ROOT)
    assert not problems, "\n".join(problems)


def test_no_import_cycle():
    _, graph = check_layers(ROOT)
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_every_module_has_an_opening_docstring():
    missing = [str(p.relative_to(ROOT.parent)) for p in module_files(ROOT, PACKAGE).values()
               if ast.get_docstring(ast.parse(p.read_text())) is None]
    assert not missing, f"modules without an opening docstring: {missing}"


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / PACKAGE / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / PACKAGE


@pytest.mark.parametrize("files, expected", [
    ({"lars/ops.py": "from hvd_largebatch.training import config\n", "training/config.py": ""},
     "lars/ops.py:1: upward import: hvd_largebatch.lars.ops (layer 1) imports "
     "hvd_largebatch.training.config (layer 3)"),
    ({"data/sampler.py": "def f():\n    from ..distributed import optimizer\n",
      "distributed/optimizer.py": ""},
     "data/sampler.py:2: upward import: hvd_largebatch.data.sampler (layer 0) imports "
     "hvd_largebatch.distributed.optimizer (layer 2)"),
    ({"lars/ops.py": "import horovod.torch as hvd\n"},
     "lars/ops.py:1: hvd_largebatch.lars.ops imports horovod"),
    ({"training/setup.py": "from hvd_largebatch import FusedLARS\n"},
     "upward import: hvd_largebatch.training.setup (layer 3) imports hvd_largebatch (layer 5)"),
    ({"plugins.py": ""}, "hvd_largebatch.plugins belongs to no layer"),
])
def test_checker_names_an_upward_import(tmp_path, files, expected):
    """The checker itself, on small made-up packages: it finds and names each violation."""
    problems, _ = check_layers(_write(tmp_path, {"__init__.py": "", **files}))
    assert any(expected in p for p in problems), problems


def test_checker_finds_a_cycle(tmp_path):
    root = _write(tmp_path, {"__init__.py": "",
                             "training/a.py": "from hvd_largebatch.training import b\n",
                             "training/b.py": "def f():\n    from . import c\n",
                             "training/c.py": "import hvd_largebatch.training.a\n",
                             "training/d.py": "from hvd_largebatch.training import a\n"})
    _, graph = check_layers(root)
    assert cycles(graph) == [[f"{PACKAGE}.training.{m}" for m in "abc"]]


def test_public_surface_stays_importable():
    """What README documents: the lazy re-exports resolve to the layers' objects."""
    import hvd_largebatch
    from hvd_largebatch import lars
    from hvd_largebatch.lars import ops, optimizer

    assert hvd_largebatch.FusedLARS is optimizer.FusedLARS is lars.FusedLARS
    assert hvd_largebatch.param_groups is optimizer.param_groups
    assert hvd_largebatch.ops is ops
    assert hvd_largebatch.schedules.Schedule.__module__ == "hvd_largebatch.schedules.schedule"
    assert hvd_largebatch.data.GlobalSampler.__module__ == "hvd_largebatch.data.sampler"
    assert callable(hvd_largebatch.build_info)
    with pytest.raises(AttributeError, match="no attribute 'optim'"):
        hvd_largebatch.optim  # noqa: B018 - the old flat module is gone, not silently aliased


def test_distributed_optimizer_reexported():
    pytest.importorskip("horovod.torch")
    import hvd_largebatch
    from hvd_largebatch.distributed.optimizer import DistributedOptimizer

    assert hvd_largebatch.DistributedOptimizer is DistributedOptimizer
