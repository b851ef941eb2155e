"""The house rules of STYLE.md that a reviewer should not have to count: no module over 400
lines, no class over 300, no function over 60 (in `daemon/`)."""

from __future__ import annotations

import ast
from pathlib import Path

DAEMON = Path(__file__).resolve().parents[2] / "daemon"
LIMITS = {"module": 400, "class": 300, "function": 60}


def oversized() -> list[str]:
    found = []
    for path in sorted(DAEMON.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(DAEMON.parent)
        if (lines := len(text.splitlines())) > LIMITS["module"]:
            found.append(f"{where}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            kind = {ast.ClassDef: "class", ast.FunctionDef: "function"}.get(type(node))
            if isinstance(node, ast.AsyncFunctionDef):
                kind = "function"
            if kind is None:
                continue
            assert isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > LIMITS[kind]:
                found.append(f"{where}: {kind} {node.name} {length} lines")
    return found


def test_modules_classes_and_functions_stay_small() -> None:
    assert oversized() == []
