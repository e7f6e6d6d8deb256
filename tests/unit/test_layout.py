"""The package layout rules that keep the architecture readable (see the README's architecture section):
unique module names, small modules, no import cycles between modules, no private names imported across modules,
and torch.distributed called from the communicator alone."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "kfac"
MODULES = sorted(p for p in ROOT.rglob("*.py"))
MAX_LINES = 520


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


KNOWN_MODULES = {_name(p) for p in MODULES}


def _imports(path: Path, *, typing: bool = False) -> list[tuple[str, list[str]]]:
    """``(absolute module, imported names)`` of the module-level imports of ``path`` (not those inside functions,
    nor those under ``if TYPE_CHECKING:`` unless ``typing``: those cannot form import-time cycles)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _name(path) if path.name == "__init__.py" else _name(path).rpartition(".")[0]
    out = []
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) and not typing:
            continue
        for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else ():
            if isinstance(sub, ast.ImportFrom):
                if sub.level:
                    base = package.split(".")
                    base = base[:len(base) - sub.level + 1]
                    module = ".".join(base + ([sub.module] if sub.module else []))
                else:
                    module = sub.module or ""
                out.append((module, [a.name for a in sub.names]))
            elif isinstance(sub, ast.Import):
                out += [(a.name, []) for a in sub.names]
    return out


def test_module_file_names_are_unique():
    names = Counter(p.name for p in MODULES if p.name not in ("__init__.py", "__main__.py", "base.py"))
    dupes = {n: c for n, c in names.items() if c > 1}
    assert not dupes, dupes


def test_modules_are_small():
    long = {str(p.relative_to(ROOT)): n for p in MODULES if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_no_private_names_imported_across_modules():
    offenders = []
    for path in MODULES:
        for module, names in _imports(path):
            if not module.startswith("kfac"):
                continue
            # a private helper *module* (kfac._tensor, kfac.ext._loader) is how shared helpers are shared; its
            # names are public. A private name taken from another module is not.
            private = [n for n in names if n.startswith("_") and not n.startswith("__")
                       and f"{module}.{n}" not in KNOWN_MODULES]
            if private:
                offenders.append((_name(path), module, private))
    assert not offenders, offenders


@pytest.mark.parametrize("typing", [False, True], ids=["import-time", "type-level"])
def test_no_import_cycles_between_modules(typing):
    """Neither at import time nor counting ``TYPE_CHECKING`` imports (a type-level cycle means a type lives in the
    wrong module, as ``LayerState`` did in ``hooks`` while ``corrections`` needed it)."""
    known = KNOWN_MODULES
    graph: dict[str, set[str]] = {}
    for path in MODULES:
        deps = set()
        for module, names in _imports(path, typing=typing):
            for target in [module] + [f"{module}.{n}" for n in names]:
                if target in known and target != _name(path):
                    deps.add(target)
        graph[_name(path)] = deps
    # packages import their submodules in __init__: a cycle through a package's own __init__ is not a module cycle
    for name in list(graph):
        graph[name] = {d for d in graph[name] if not (name.startswith(d + ".") and d in known)}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_torch_distributed_is_called_by_the_communicator_only():
    """Collectives in ``kfac.distributed.comm``; ``DTensor`` / FSDP2 shards are read in ``kfac.distributed.fsdp``
    (imports inside functions included): nowhere else."""
    def imports_anywhere(path: Path) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        return names

    users = sorted(_name(p) for p in MODULES if any(m.startswith("torch.distributed") for m in imports_anywhere(p)))
    assert users == ["kfac.distributed.comm", "kfac.distributed.fsdp"], users
