"""The manifest's text: the same JSON as before, in ASCII, one listed input per line."""

from __future__ import annotations

import json

from daemon.outbox import manifest_text

NAMES = ["a.csv", "dossier-é.csv", "bad\nname\x1b[31m.csv", 'quote"and\\slash.csv', "\u202eexe.csv"]


def manifest() -> dict[str, object]:
    return {
        "batch_id": "b1",
        "pipeline": "emr",
        "priority": 2,
        "inputs": [
            {"name": n, "sha256": f"{i:064x}", "size": i, "rows": {"kept": i, "nested": [1, 2]}}
            for i, n in enumerate(NAMES)
        ],
        "outputs": [{"name": "result.csv", "sha256": "f" * 64, "size": 10}],
        "quarantined": [],
        "provenance": {"version": "1", "options": {"group_by": "diagnosis", "columns": None}},
    }


def test_the_text_is_the_manifest_in_ascii_with_one_input_a_line() -> None:
    m = manifest()
    text = manifest_text(m)
    assert json.loads(text) == m
    assert text.isascii() and text.endswith("}\n")
    lines = text.splitlines()
    for i, name in enumerate(NAMES):
        (line,) = [x for x in lines if f"{i:064x}" in x]
        assert json.loads(line.strip().rstrip(",")) == m["inputs"][i]  # type: ignore[index]
        assert json.dumps(name, ensure_ascii=True) in line
    assert '  "quarantined": [],' in lines
    assert '  "provenance": {' in lines and '      "group_by": "diagnosis",' in lines
