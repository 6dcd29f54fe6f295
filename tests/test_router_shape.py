"""router/ stays readable: no class over 200 lines and no function over 60 (an AST scan, no
imports). A stage that grows past that is a sign it has taken a second job."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROUTER = Path(__file__).resolve().parents[1] / "router"
MAX_CLASS_LINES, MAX_FUNCTION_LINES = 200, 60


def _too_long() -> list[str]:
    found = []
    for path in sorted(ROUTER.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            limit = (MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else
                     MAX_FUNCTION_LINES if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None)
            if limit is not None and node.end_lineno - node.lineno + 1 > limit:
                found.append(f"{path.relative_to(ROUTER.parent)}:{node.lineno} {node.name} "
                             f"({node.end_lineno - node.lineno + 1} lines, limit {limit})")
    return found


def test_no_class_over_200_lines_and_no_function_over_60():
    assert _too_long() == []


def test_the_scan_sees_classes_and_functions(tmp_path, monkeypatch):
    long_body = "\n".join(f"    x{i} = {i}" for i in range(61))
    (tmp_path / "router").mkdir()
    (tmp_path / "router" / "big.py").write_text(f"def f():\n{long_body}\n")
    monkeypatch.setattr(sys.modules[__name__], "ROUTER", tmp_path / "router")
    assert [s.split(" ")[1] for s in _too_long()] == ["f"]
