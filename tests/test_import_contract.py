"""Imports run one way: a test fails when one climbs back up the layers or closes a cycle.

An AST scan of every module of every pdserve package (imports at module level, in functions, in
TYPE_CHECKING blocks, and ``importlib.import_module("pdserve....")`` with a literal name) builds the
package-level import graph, then checks it against the layer order below. Nothing is imported, so
the check needs neither vLLM nor Ray and takes well under a second.

The one place exempt is a module's ``if __name__ == "__main__":`` block: it runs only when that
module is the program (``python -m pdserve.bench.pd_vs_mono``), never for a module that imports it,
so it is that program's own composition root and may wire in cluster/ (bench/cluster_runtime.py).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Bottom first. A package may import packages of lower tiers only; packages of one tier are
# independent of each other. (Decided from the code, 2026: see each tier's note.) Each layer's
# config section lives with it (<layer>/config.py) and settings/ composes them; see CONFIG_MODULES.
LAYERS: list[tuple[str, ...]] = [
    # kv_transfer/: the KV connectors vLLM loads by path, and their config section
    # (kv_transfer/config.py). lab/: the lab's host tooling and its config section (lab/spec.py).
    # Neither imports any other pdserve package.
    ("kv_transfer", "lab"),
    # engine/: the engine server, the replica base and the engine call, and the config of the model,
    # the engines and the pools (engine/config.py).
    ("engine",),
    # fallback/: causes and breakers; planner/: model maths and Little's Law.
    ("fallback", "planner"),
    # admission/: the router's admission policies (uses planner's model maths).
    ("admission",),
    # the replica classes and legs of each pool
    ("prefill", "decode"),
    ("router",),
    # settings/: the whole config (ClusterConfig, load_config), composed of every layer's section, so
    # it sits above all of them; it is the one package every layer may import all the same (below).
    ("settings",),
    # the benchmarks: they start clusters with the runtime cluster/ hands them
    ("bench",),
    # the composition root: imports everything, and nothing imports it
    ("cluster",),
]
TIER = {pkg: i for i, tier in enumerate(LAYERS) for pkg in tier}

# Modules that hold config types: they may import one another and nothing else of pdserve, so
# reading a config never pulls in an engine, a router or vLLM. A layer's own section lives in its
# config module, which the layer order above governs like any other module (the router's section
# may use admission's priority classes, not the reverse).
CONFIG_MODULES = {
    "pdserve.admission.config",
    "pdserve.engine.config",
    "pdserve.fallback.config",
    "pdserve.kv_transfer.config",
    "pdserve.lab.spec",
    "pdserve.router.config",
    "pdserve.router.decider_config",
    "pdserve.router.selection_config",
    "pdserve.settings",
    "pdserve.settings.cluster",
    "pdserve.settings.overrides",
}

# The package of the whole config. It holds config modules only (a test checks), so importing it
# pulls in no layer's code: every layer may import it, and imports of it are left out of the
# layer order (engine/ reads ClusterConfig, whose router section is typed in router/).
WHOLE_CONFIG = "settings"

# Imports that break the contract and are known, as (importing module, imported package): reason.
# Each one is a TODO; the test also fails when one listed here is gone, so the list only shrinks.
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {
    # (none at present: router/, prefill/, decode/ and fallback/ keep to the order above)
}


def _packages() -> list[str]:
    """Every pdserve package, read from its folder (pyproject maps pdserve.<folder> -> <folder>/)."""
    return sorted(p.parent.name for p in ROOT.glob("*/__init__.py")
                  if p.parent.name not in ("tests", "tools", "docs", "configs"))


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return "pdserve." + ".".join(parts)


def _is_main_guard(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    t = node.test
    return (isinstance(t, ast.Compare) and isinstance(t.left, ast.Name) and t.left.id == "__name__"
            and len(t.comparators) == 1 and isinstance(t.comparators[0], ast.Constant)
            and t.comparators[0].value == "__main__")


def _imports(tree: ast.Module, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, imported module) for every import in ``tree`` but those under ``if __name__ == "__main__"``."""
    skip: set[int] = set()
    for node in tree.body:
        if _is_main_guard(node):
            skip.update(id(n) for n in ast.walk(node))
    found: list[tuple[int, str]] = []
    base = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[:len(base) - (node.level - 1)]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # `from pdserve import router` / `from pdserve.x import submodule` name modules too
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names if a.name != "*"]
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if (name in ("import_module", "__import__") and node.args
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                found.append((node.lineno, node.args[0].value))
    return found


def _package_of(target: str, packages: set[str]) -> str | None:
    parts = target.split(".")
    if len(parts) >= 2 and parts[0] == "pdserve" and parts[1] in packages:
        return parts[1]
    return None


def scan() -> dict[tuple[str, str], list[str]]:
    """(importing package, imported package) -> ["path:line importing-module -> target", ...]."""
    packages = set(_packages())
    edges: dict[tuple[str, str], list[str]] = {}
    for pkg in sorted(packages):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            module = _module_name(path)
            tree = ast.parse(path.read_text(), filename=str(path))
            for line, target in _imports(tree, module, path.name == "__init__.py"):
                dep = _package_of(target, packages)
                if dep is None or dep == pkg or dep == WHOLE_CONFIG:
                    continue
                edges.setdefault((pkg, dep), []).append(f"{path.relative_to(ROOT)}:{line} {module} -> {target}")
    return edges


def module_imports() -> dict[str, set[str]]:
    """pdserve module -> the pdserve modules it imports (for the config-module contract)."""
    packages = set(_packages())
    out: dict[str, set[str]] = {}
    for pkg in sorted(packages):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            module = _module_name(path)
            tree = ast.parse(path.read_text(), filename=str(path))
            out[module] = {t for _, t in _imports(tree, module, path.name == "__init__.py")
                           if _package_of(t, packages)}
    return out


def _violations(edges: dict[tuple[str, str], list[str]]) -> dict[tuple[str, str], list[str]]:
    """Edges that do not go to a lower tier, keyed by (importing module, imported package)."""
    bad: dict[tuple[str, str], list[str]] = {}
    for (src, dst), sites in edges.items():
        if TIER[dst] < TIER[src]:
            continue
        for site in sites:
            module = site.split()[1]
            bad.setdefault((module, dst), []).append(site)
    return bad


def _cycles(edges) -> list[list[str]]:
    """Strongly connected components with more than one package (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for src, dst in edges:
        graph.setdefault(src, set()).add(dst)
        graph.setdefault(dst, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def edges():
    return scan()


def test_every_package_has_a_layer():
    missing = sorted(set(_packages()) - set(TIER))
    assert not missing, f"packages with no place in LAYERS (tests/test_import_contract.py): {missing}"


def test_imports_only_go_down_the_layers(edges):
    bad = {k: v for k, v in _violations(edges).items() if k not in KNOWN_EXCEPTIONS}
    lines = [f"  {site}   ({k[0].split('.')[1]} is in tier {TIER[k[0].split('.')[1]]}, {k[1]} in tier {TIER[k[1]]})"
             for k, sites in sorted(bad.items()) for site in sites]
    assert not bad, ("imports that climb the layers (or cross into a sibling of the same tier); a package may "
                     "import only lower tiers of LAYERS:\n" + "\n".join(lines))


def test_known_exceptions_still_exist(edges):
    gone = sorted(set(KNOWN_EXCEPTIONS) - set(_violations(edges)))
    assert not gone, f"these known exceptions are fixed: take them out of KNOWN_EXCEPTIONS: {gone}"


def test_no_package_cycles(edges):
    kept = {k: v for k, v in edges.items()
            if not all((s.split()[1], k[1]) in KNOWN_EXCEPTIONS for s in v)}
    cycles = _cycles(kept)
    detail = [f"  {a} -> {b}: {edges[(a, b)][0]}" for c in cycles for a in c for b in c if (a, b) in edges]
    assert not cycles, f"package import cycles {cycles}:\n" + "\n".join(detail)


def test_nothing_imports_the_composition_root(edges):
    sites = [s for (src, dst), v in edges.items() if dst == "cluster" for s in v]
    assert not sites, "cluster/ is the composition root and nothing may import it:\n  " + "\n  ".join(sites)


def test_config_modules_import_only_config_modules():
    imports = module_imports()
    missing = sorted(CONFIG_MODULES - set(imports))
    assert not missing, f"CONFIG_MODULES names modules that do not exist: {missing}"
    hidden = sorted(m for m in imports if _package_of(m, set(_packages())) == WHOLE_CONFIG and m not in CONFIG_MODULES)
    assert not hidden, (f"{WHOLE_CONFIG}/ may hold config modules only (every layer imports it), but these are "
                        f"not in CONFIG_MODULES: {hidden}")
    bad = {m: sorted(t for t in imports[m] if t not in CONFIG_MODULES and t.rsplit(".", 1)[0] not in CONFIG_MODULES)
           for m in sorted(CONFIG_MODULES)}
    bad = {m: t for m, t in bad.items() if t}
    assert not bad, f"config modules must import only other config modules (so any layer can read them): {bad}"


def test_the_scan_sees_every_kind_of_import(tmp_path):
    """The scanner itself: function-level, relative, `from pdserve import x`, importlib, and __main__."""
    src = (
        "import pdserve.router.app\n"
        "from pdserve import cluster\n"
        "from . import sibling\n"
        "def f():\n"
        "    from pdserve.bench.loadgen import x\n"
        "    import importlib\n"
        "    importlib.import_module('pdserve.planner')\n"
        "if __name__ == '__main__':\n"
        "    from pdserve.cluster import runtime\n"
    )
    got = {t for _, t in _imports(ast.parse(src), "pdserve.engine.server", False)}
    assert {"pdserve.router.app", "pdserve.cluster", "pdserve.engine.sibling", "pdserve.bench.loadgen",
            "pdserve.planner"} <= got
    assert "pdserve.cluster.runtime" not in got
