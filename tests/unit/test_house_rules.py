"""The house rules of STYLE.md that a reviewer should not have to count: no module over 400
lines, no class over 300, no function over 60 (in `daemon/`)."""

from __future__ import annotations

import ast
import re
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


# Words of the state, reason and audit vocabularies that mean something else where they stand.
OTHER_VOCABULARIES = {
    ("daemon/cli/status.py", "quarantined"): "a field of the status report (DESIGN contract)",
    ("daemon/cli/status.py", "running"): "the report's service-is-running flag",
    ("daemon/executors/dask/executor.py", "running"): "dask's Client.status",
    ("daemon/liveness.py", "running"): "the /healthz verdict (DESIGN contract)",
    ("daemon/outbox.py", "quarantined"): "a manifest key (DESIGN contract)",
    ("daemon/processors/options.py", "device"): 'a word of column names ("device_id")',
}
STATE_IN_SQL = re.compile(r"state\s*(?:=|IN|NOT IN)\s*\(?\s*'\w+'", re.IGNORECASE)


def bare_vocabulary() -> list[str]:
    from daemon.audit.events import AuditEvent
    from daemon.models import BatchState, FileState, Reason

    words = {m.value for enum in (FileState, BatchState, Reason, AuditEvent) for m in enum}
    homes = {DAEMON / "models.py", DAEMON / "audit" / "events.py"}
    found = []
    for path in sorted(set(DAEMON.rglob("*.py")) - homes):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        where = str(path.relative_to(DAEMON.parent))
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
        }
        for node in ast.walk(tree):
            if not isinstance(node, ast.Constant) or not isinstance(node.value, str):
                continue
            if id(node) in docstrings or (where, node.value) in OTHER_VOCABULARIES:
                continue
            if node.value in words or STATE_IN_SQL.search(node.value):
                found.append(f"{where}:{node.lineno}: {node.value!r}")
    return found


def test_states_reasons_and_audit_events_are_named_by_their_enums() -> None:
    """A state, reason or audit-event name written as a bare string (in code or in SQL) would
    drift from its enum unseen; each is spelt through `FileState`, `BatchState`, `Reason` or
    `AuditEvent`."""
    assert bare_vocabulary() == []
