"""The import graph of ``qaconv_ext/``: no cycles, and every import points down the layers.

The graph is read from the source with ``ast`` (nothing is imported); imports inside functions count
like those at the top of a module. The layers, bottom first:

    ops, utils, config                 the matching op (imports nothing else of the package); matrix checks, safe file
                                       reading; the plain settings (names, presets, recipes, TrainConfig; no PyTorch)
    head, data, postprocess            the QAConv head; datasets; re-ranking and TLift
    losses, scoring                    class memory, cosine softmax; feature extraction and blocked QAConv scoring
    models                             backbones, the GAP baseline
    engine, evaluation, viz            training; scoring and metrics; pictures (drawing only)
    search                             the gallery index on disk and its search
    distributed                        torch.distributed: sharded scoring and evaluation across ranks
    qaconv_ext (the package's top)     the public names
    cli                                the ``qaconv`` command
    __main__                           ``python -m qaconv_ext``

A unit imports only from units on lower layers (and from its own modules); units on one layer are
independent of each other. Inside ``cli``, no module imports a sub-command's module: the sub-commands
share ``cli/common.py`` and ``cli/pictures.py``, and ``cli/__init__.py`` loads them by name.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "qaconv_ext"

LAYERS: Tuple[Tuple[str, ...], ...] = (
    ("ops", "utils", "config"),
    ("head", "data", "postprocess"),
    ("losses", "scoring"),
    ("models",),
    ("engine", "evaluation", "viz"),
    ("search", "distributed"),
    ("qaconv_ext",),
    ("cli",),
    ("__main__",),
)


class Import(NamedTuple):
    """One import of a module of the package: who imports what, where."""

    source: str   # dotted module name, e.g. qaconv_ext.viz.ranklist
    target: str   # dotted module name it imports (a module of the package)
    where: str    # path:line


def module_files(package_dir: Path) -> Dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` file under ``package_dir``."""
    root = package_dir.name
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [root, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def package_imports(package_dir: Path) -> List[Import]:
    """Every import of one of the package's modules by another (or the same) module of the package.

    ``from X import name`` counts as an import of ``X.name`` when that is a module, else of ``X``.
    """
    files = module_files(package_dir)
    root = package_dir.name
    found = []
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        here = name.split(".") if is_package else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[:len(here) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in files else module for a in node.names]
            for target in targets:
                while target and target not in files and "." in target:   # import a.b.c of a module a.b
                    target = target.rsplit(".", 1)[0]
                imp = Import(name, target, f"{path.relative_to(package_dir.parent)}:{node.lineno}")
                if (target == root or target.startswith(root + ".")) and imp not in found:
                    found.append(imp)
    return found


def unit(module: str) -> str:
    """The layer unit of a module: its first sub-package or top-level module (``head``, ``cli``, ...),
    or ``qaconv_ext`` for the package's ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """The cycles of a directed graph without self-loops: one per strongly connected component with
    more than one node, each as a path that returns to its start."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[List[str]] = []

    def visit(v: str) -> None:   # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    out = []
    for comp in components:   # one concrete cycle through the component's first node
        members, start = set(comp), min(comp)
        path, seen = [start], {start}
        while True:
            nxt = min(w for w in edges[path[-1]] if w in members)
            if nxt in seen:
                out.append(path[path.index(nxt):] + [nxt])
                break
            path.append(nxt)
            seen.add(nxt)
    return out


def cycle_report(imports: Sequence[Import], key: Optional[Callable[[str], str]] = None) -> List[str]:
    """One line per cycle of the graph of ``imports``, naming where each arrow of the cycle is written.

    The nodes are the modules, or with ``key`` (e.g. :func:`unit`) what it maps them to; arrows from a
    node to itself are left out.
    """
    edges: Dict[str, Set[str]] = {}
    where: Dict[Tuple[str, str], str] = {}
    for imp in imports:
        a, b = (key(imp.source), key(imp.target)) if key else (imp.source, imp.target)
        if a != b:
            edges.setdefault(a, set()).add(b)
            where.setdefault((a, b), imp.where)
    return [" -> ".join(c) + "  (" + ", ".join(where[(a, b)] for a, b in zip(c, c[1:])) + ")"
            for c in cycles(edges)]


def layering_report(imports: Sequence[Import], subcommands: Sequence[str] = ()) -> List[str]:
    """One line per import that does not point down :data:`LAYERS`, and per import of a ``cli``
    sub-command's module by another ``cli`` module."""
    level = {u: i for i, layer in enumerate(LAYERS) for u in layer}
    below = {u: sorted((v for v in level if level[v] < level[u]), key=lambda v: (level[v], v)) for u in level}
    out = []
    for imp in imports:
        a, b = unit(imp.source), unit(imp.target)
        if a not in level or b not in level:
            out.append(f"{imp.where}: {imp.source} imports {imp.target}: unit {a if a not in level else b!r} "
                       f"has no layer (add it to LAYERS)")
        elif a != b and level[b] >= level[a]:
            allowed = ", ".join(below[a]) or "nothing else of the package"
            out.append(f"{imp.where}: {imp.source} imports {imp.target}: {a} may import only {allowed}")
        elif a == b == "cli" and imp.target.split(".")[-1] in subcommands and imp.source != imp.target:
            out.append(f"{imp.where}: {imp.source} imports the sub-command {imp.target}: sub-commands share "
                       f"cli/common.py (or another helper module), never one another")
    return out


def cli_subcommands(package_dir: Path) -> Tuple[str, ...]:
    """``SUBCOMMANDS`` of ``cli/__init__.py``, read from the source."""
    tree = ast.parse((package_dir / "cli" / "__init__.py").read_text())
    for node in tree.body:
        names = [t.id for t in getattr(node, "targets", ()) if isinstance(t, ast.Name)]
        if "SUBCOMMANDS" in names:
            return tuple(ast.literal_eval(node.value))
    raise AssertionError("cli/__init__.py defines no SUBCOMMANDS")


# ----------------------------------------------------------------------------------------------
# The package
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def imports() -> List[Import]:
    found = package_imports(PACKAGE_DIR)
    assert len(found) > 50   # the reader sees the package's imports
    return found


def test_no_cycle_between_modules(imports):
    report = cycle_report(imports)
    assert not report, "import cycles between modules of qaconv_ext:\n" + "\n".join(report)


def test_no_cycle_between_units(imports):
    report = cycle_report(imports, key=unit)
    assert not report, "import cycles between the parts of qaconv_ext:\n" + "\n".join(report)


def test_imports_point_down_the_layers(imports):
    report = layering_report(imports, cli_subcommands(PACKAGE_DIR))
    assert not report, "imports against the layering of qaconv_ext:\n" + "\n".join(report)


def test_every_unit_has_a_layer():
    units = {unit(m) for m in module_files(PACKAGE_DIR)}
    listed = {u for layer in LAYERS for u in layer}
    assert units <= listed, f"parts of qaconv_ext missing from LAYERS: {sorted(units - listed)}"
    assert not listed - units, f"LAYERS names parts qaconv_ext does not have: {sorted(listed - units)}"


# ----------------------------------------------------------------------------------------------
# The checker itself, on a made-up package with known faults
# ----------------------------------------------------------------------------------------------

def _tree(root: Path, files: Dict[str, str]) -> Path:
    pkg = root / "qaconv_ext"
    for rel, text in files.items():
        path = pkg / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return pkg


def test_checker_finds_cycles_upward_imports_and_subcommand_imports(tmp_path):
    pkg = _tree(tmp_path, {
        "__init__.py": "from .ops import op\n",
        "ops/__init__.py": "from .core import op\nfrom . import helpers\n",
        "ops/core.py": "def op():\n    from .helpers import h\n",
        "ops/helpers.py": "def h():\n    from ..viz import draw\n",          # ops -> viz: upward
        "head.py": "import qaconv_ext.ops.core\n",
        "viz/__init__.py": "from .draw import draw\n",
        "viz/draw.py": "from ..evaluation import score\ndef draw(): pass\n",   # viz -> evaluation: same layer
        "evaluation/__init__.py": "from ..viz import draw\nscore = 1\n",      # evaluation <-> viz: a cycle
        "cli/__init__.py": "SUBCOMMANDS = ('train', 'eval')\n",
        "cli/common.py": "from .. import ops\n",
        "cli/train.py": "from .common import ops\n",
        "cli/eval.py": "def run():\n    from .train import ops\n",          # a sub-command imports another
        "cli/loop_a.py": "from . import loop_b\n",
        "cli/loop_b.py": "from .loop_a import x\n",                           # a cycle inside cli
    })
    found = package_imports(pkg)
    pairs = {(i.source, i.target) for i in found}
    assert ("qaconv_ext.ops", "qaconv_ext.ops.helpers") in pairs           # from . import <module>
    assert ("qaconv_ext.head", "qaconv_ext.ops.core") in pairs              # import a.b.c
    assert ("qaconv_ext.cli.common", "qaconv_ext.ops") in pairs             # from .. import <name>
    assert ("qaconv_ext.ops.helpers", "qaconv_ext.viz.draw") in pairs       # inside a function; a module

    modules = cycle_report(found)
    assert any(line.startswith("qaconv_ext.cli.loop_a -> qaconv_ext.cli.loop_b -> qaconv_ext.cli.loop_a")
               for line in modules), modules
    assert any("qaconv_ext.evaluation" in line and "qaconv_ext.viz" in line for line in modules), modules
    units = cycle_report(found, key=unit)
    assert units and units[0].startswith("evaluation -> viz -> evaluation"), units
    assert "qaconv_ext/evaluation/__init__.py:1" in units[0] and "qaconv_ext/viz/draw.py:1" in units[0]

    layering = layering_report(found, cli_subcommands(pkg))
    text = "\n".join(layering)
    assert "qaconv_ext/ops/helpers.py:2: qaconv_ext.ops.helpers imports qaconv_ext.viz.draw: ops may import only " \
           "nothing else of the package" in text
    assert "qaconv_ext.viz.draw imports qaconv_ext.evaluation: viz may import only config, ops, utils, data, head" in text
    assert "qaconv_ext.evaluation imports qaconv_ext.viz" in text
    assert "qaconv_ext.cli.eval imports the sub-command qaconv_ext.cli.train" in text
    assert len(layering) == 4, layering   # cli -> ops, head -> ops, train -> common are fine
