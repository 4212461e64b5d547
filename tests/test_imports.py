"""Import rules of the txlab source, read with ast (every .py under txlab/, imports inside functions counted).

(a) no import cycle among txlab modules; (b) the core (everything but txlab.sweeps, txlab.analysis, the CLI
and __main__) imports neither Ray nor plotting libraries, nor the sweep or analysis layers; (c) the
analysis reads the rest of txlab only through the results columns and store; (d) no txlab module is
imported by a string handed to importlib; (e) the distribution installs one top-level package, txlab.

A module importing a package counts as importing the package's __init__; `from pkg import mod` counts as
importing pkg.mod. Importing pkg.mod does not count as importing pkg (every import runs the parents'
__init__, so counting it would add an edge from every module to its own package).
"""

from __future__ import annotations

import ast
import importlib.metadata
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "txlab"

HEAVY = {"ray", "seaborn", "matplotlib"}  # the core never imports these
UPPER = ("txlab.sweeps", "txlab.analysis")  # layers the core never reaches into
ENTRY = {"txlab.cli", "txlab.__main__"}  # may import every layer
ANALYSIS_MAY_READ = {"txlab.results.columns", "txlab.results.store"}  # all the analysis reads of the rest


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@dataclass
class Graph:
    modules: dict[str, Path]
    # module -> txlab module it imports -> first line
    edges: dict[str, dict[str, int]] = field(default_factory=dict)
    # module -> top-level name of a non-txlab import -> first line
    external: dict[str, dict[str, int]] = field(default_factory=dict)
    # "module:line imports name": txlab imports that name no module (a stale path after a move)
    unresolved: list[str] = field(default_factory=list)
    # "module:line call('txlab....')": txlab modules imported by string
    dynamic: list[str] = field(default_factory=list)


def module_names(root: Path, package: str) -> dict[str, Path]:
    mods = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if "__pycache__" in parts:
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


DYNAMIC_IMPORTERS = {"import_module", "__import__", "resolve_name"}  # importlib, builtins, pkgutil


def _strings(node: ast.AST) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def build_graph(root: Path = ROOT, package: str = PACKAGE) -> Graph:
    g = Graph(module_names(root, package))
    for mod, path in g.modules.items():
        edges = g.edges.setdefault(mod, {})
        external = g.external.setdefault(mod, {})
        # the package relative imports start from: the module itself for an __init__, else its parent
        here = mod if path.name == "__init__.py" else mod.rpartition(".")[0]

        def add(target: str, line: int, mod=mod, edges=edges) -> None:
            if target != mod:
                edges.setdefault(target, line)

        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if within(alias.name, package):
                        if alias.name in g.modules:
                            add(alias.name, node.lineno)
                        else:
                            g.unresolved.append(f"{mod}:{node.lineno} imports {alias.name}")
                    else:
                        external.setdefault(alias.name.partition(".")[0], node.lineno)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                if not within(base, package):
                    external.setdefault(base.partition(".")[0], node.lineno)
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in g.modules:
                        add(sub, node.lineno)  # from pkg import mod
                    elif base in g.modules:
                        add(base, node.lineno)  # from mod import name / from pkg import name (its __init__)
                    else:
                        g.unresolved.append(f"{mod}:{node.lineno} imports {sub}")
            elif isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
                if name in DYNAMIC_IMPORTERS:
                    args = [*node.args, *(k.value for k in node.keywords)]
                    named = [s for a in args for s in _strings(a) if within(s.partition(":")[0], package)]
                    relative = [s for a in node.args[:1] for s in _strings(a) if s.startswith(".")]
                    if named or relative:
                        g.dynamic.append(f"{mod}:{node.lineno} {name}({', '.join(map(repr, named + relative))})")
    return g


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted; sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
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
                found.append(sorted(comp))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(edges) + 100))
    try:
        for v in sorted(edges):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(found)


def shortest_cycle(edges: dict[str, dict[str, int]], comp: list[str]) -> list[str]:
    """The shortest import loop inside one strongly connected set: [a, b, ..., a]."""
    inside = set(comp)
    best: list[str] = []
    for start in comp:
        parent = {start: ""}
        queue = [start]
        while queue:
            v = queue.pop(0)
            if start in edges[v] and v in parent:
                path = [v]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                loop = [*reversed(path), start]
                if not best or len(loop) < len(best):
                    best = loop
                break
            for w in sorted(edges[v]):
                if w in inside and w not in parent:
                    parent[w] = v
                    queue.append(w)
    return best


def describe_cycles(g: Graph) -> str:
    lines = []
    for comp in cycles(g.edges):
        loop = shortest_cycle(g.edges, comp)
        lines.append(f"{len(comp)} modules import each other: {', '.join(comp)}; the shortest loop:")
        lines += [f"    {a} (line {g.edges[a][b]}) imports {b}" for a, b in zip(loop, loop[1:])]
    return "\n".join(lines)


def is_core(mod: str) -> bool:
    return mod not in ENTRY and not any(within(mod, upper) for upper in UPPER)


@pytest.fixture(scope="module")
def graph() -> Graph:
    return build_graph()


def test_the_walk_sees_the_whole_package(graph):
    # guards the rules below against passing on an empty or partial walk
    assert {"txlab", "txlab.cli", "txlab.results.store", "txlab.analysis.data", "txlab.sweeps.driver"} <= set(
        graph.modules
    )
    assert graph.edges["txlab.cli"] and graph.edges["txlab.analysis.data"]


def test_every_txlab_import_names_a_module(graph):
    assert not graph.unresolved, "imports of txlab names that no module provides:\n" + "\n".join(graph.unresolved)


def test_no_import_cycles(graph):
    assert not cycles(graph.edges), "import cycles among txlab modules:\n" + describe_cycles(graph)


def package_edges(g: Graph, package: str = PACKAGE) -> dict[str, dict[str, int]]:
    """The import graph between the packages directly under `package` (a module of the top level counts as
    a unit of its own): a.b.c importing a.d.e is the edge a.b -> a.d, at its first line."""
    subpackages = {m for m, p in g.modules.items() if p.name == "__init__.py" and m.count(".") == 1}

    def unit(mod: str) -> str:
        top = ".".join(mod.split(".")[:2])
        return top if top in subpackages else mod

    out: dict[str, dict[str, int]] = {unit(m): {} for m in g.modules}
    for mod, targets in g.edges.items():
        for target, line in targets.items():
            a, b = unit(mod), unit(target)
            if a != b:
                out[a].setdefault(b, line)
    return out


def test_no_package_depends_on_another_that_depends_on_it(graph):
    """Packages depend one way: no two packages (policy and measure, say) import each other, directly or
    through others, even where no module cycle exists."""
    edges = package_edges(graph)
    found = cycles(edges)
    loops = [" -> ".join(shortest_cycle(edges, comp)) for comp in found]
    assert not found, "packages that import each other: " + "; ".join(loops)


def test_core_imports_no_ray_or_plotting(graph):
    bad = [
        f"{m} (line {line}) imports {name}"
        for m in sorted(graph.modules)
        if is_core(m)
        for name, line in sorted(graph.external[m].items())
        if name in HEAVY
    ]
    assert not bad, "core modules importing ray / seaborn / matplotlib:\n" + "\n".join(bad)


def test_core_never_imports_the_sweep_or_analysis_layers(graph):
    bad = [
        f"{m} (line {line}) imports {target}"
        for m in sorted(graph.modules)
        if is_core(m)
        for target, line in sorted(graph.edges[m].items())
        if not is_core(target)
    ]
    assert not bad, "core modules importing txlab.sweeps / txlab.analysis / the CLI:\n" + "\n".join(bad)


def test_analysis_reads_txlab_only_through_the_results_columns_and_store(graph):
    bad = [
        f"{m} (line {line}) imports {target}"
        for m in sorted(graph.modules)
        if within(m, "txlab.analysis")
        for target, line in sorted(graph.edges[m].items())
        if not within(target, "txlab.analysis") and target not in ANALYSIS_MAY_READ
    ]
    assert not bad, f"txlab.analysis may import only {sorted(ANALYSIS_MAY_READ)} from the rest of txlab:\n" + "\n".join(
        bad
    )


def test_no_txlab_module_is_imported_by_string(graph):
    assert not graph.dynamic, "txlab modules imported by string (import them with an import statement):\n" + (
        "\n".join(graph.dynamic)
    )


def test_the_distribution_installs_one_top_level_package():
    """`distribution("txlab")` is the first found on sys.path: with pythonpath ["."] that can be the
    checkout's txlab.egg-info (left by `pip install -e .`) before the environment's dist-info, so every
    txlab distribution in view is read."""
    found: dict[Path, importlib.metadata.Distribution] = {}
    for dist in [importlib.metadata.distribution("txlab"), *importlib.metadata.distributions(name="txlab")]:
        found.setdefault(Path(str(getattr(dist, "_path", "?"))).resolve(), dist)
    for where, dist in found.items():
        top_level = dist.read_text("top_level.txt")
        assert top_level is not None, f"no top_level.txt in the txlab distribution at {where}"
        assert top_level.split() == ["txlab"], f"top-level names of the distribution at {where}: {top_level.split()}"


def test_the_packages_config_finds_txlab_only():
    """What the next install will ship: setuptools' package discovery as pyproject.toml configures it."""
    tomllib = pytest.importorskip("tomllib")
    setuptools = pytest.importorskip("setuptools")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    find = config["tool"]["setuptools"]["packages"]["find"]
    # pyproject's `find` discovers namespace packages (folders without __init__.py) unless told not to
    finder = setuptools.find_namespace_packages if find.get("namespaces", True) else setuptools.find_packages
    packages = []
    for where in find.get("where", ["."]):
        packages += finder(str(ROOT / where), include=find.get("include", ["*"]), exclude=find.get("exclude", ()))
    top = sorted({p.partition(".")[0] for p in packages})
    assert top == ["txlab"], f"top-level packages in pyproject's packages config: {top} (of {sorted(packages)})"
    assert set(packages) >= {m for m, p in module_names(ROOT, PACKAGE).items() if p.name == "__init__.py"}


# --- the checker on a package made up for the purpose ------------------------------------------------------


def make_package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in {"pkg/__init__.py": "", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_checker_finds_a_cycle_through_a_function_level_import(tmp_path):
    root = make_package(
        tmp_path,
        {
            "pkg/a.py": "from pkg.b import f\n",
            "pkg/b.py": "def f():\n    from pkg import c\n",
            "pkg/c.py": "import pkg.a\n",
            "pkg/d.py": "from pkg.a import f\n",  # reaches the cycle, is not in it
        },
    )
    g = build_graph(root, "pkg")
    assert cycles(g.edges) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert "pkg.b (line 2) imports pkg.c" in describe_cycles(g)


def test_checker_finds_a_cycle_between_packages_without_a_module_cycle(tmp_path):
    root = make_package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/policy/__init__.py": "",
            "pkg/policy/planner.py": "from pkg.measure.budget import GiB\n",
            "pkg/measure/__init__.py": "",
            "pkg/measure/budget.py": "GiB = 2**30\n",
            "pkg/measure/trial.py": "from pkg.policy.apply import apply\n",
            "pkg/policy/apply.py": "def apply():\n    pass\n",
            "pkg/units.py": "GiB = 2**30\n",
        },
    )
    g = build_graph(root, "pkg")
    assert cycles(g.edges) == []  # no module imports one that imports it
    assert cycles(package_edges(g, "pkg")) == [["pkg.measure", "pkg.policy"]]
    (root / "pkg/policy/planner.py").write_text("from pkg.units import GiB\n")  # the unit moved below both
    assert cycles(package_edges(build_graph(root, "pkg"), "pkg")) == []


def test_checker_counts_a_package_import_as_its_init(tmp_path):
    root = make_package(
        tmp_path,
        {
            "pkg/sub/__init__.py": "from pkg.sub.x import X\n",
            "pkg/sub/x.py": "X = 1\n",
            "pkg/y.py": "from pkg.sub import X\n",  # the package's __init__
            "pkg/sub/z.py": "from ..y import *\n",  # relative, two levels: pkg.y
            "pkg/sub/w.py": "from . import x\n",  # from a package, a submodule: pkg.sub.x
        },
    )
    g = build_graph(root, "pkg")
    assert g.edges["pkg.y"] == {"pkg.sub": 1}
    assert g.edges["pkg.sub.z"] == {"pkg.y": 1}
    assert g.edges["pkg.sub.w"] == {"pkg.sub.x": 1}
    assert cycles(g.edges) == []
    # pkg.sub.x importing its own package closes a cycle through the __init__
    (root / "pkg/sub/x.py").write_text("import pkg.sub\nX = 1\n")
    assert cycles(build_graph(root, "pkg").edges) == [["pkg.sub", "pkg.sub.x"]]


def test_checker_sees_strings_handed_to_importlib_and_stale_paths(tmp_path):
    root = make_package(
        tmp_path,
        {
            "pkg/a.py": (
                "import importlib\n"
                "def load(name):\n"
                "    importlib.import_module('pkg.b')\n"
                "    importlib.import_module(f'pkg.{name}')\n"
                "    importlib.import_module('json')\n"
                "    from pkg.gone import thing\n"
            ),
            "pkg/b.py": "import ray.tune\nimport matplotlib.pyplot as plt\n",
        },
    )
    g = build_graph(root, "pkg")
    assert g.dynamic == ["pkg.a:3 import_module('pkg.b')", "pkg.a:4 import_module('pkg.')"]
    assert g.unresolved == ["pkg.a:6 imports pkg.gone.thing"]
    assert {"ray", "matplotlib"} <= set(g.external["pkg.b"])
