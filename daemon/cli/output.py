"""Text for a terminal: names from producers may hold control characters, which are escaped so
that a name can never move the cursor, clear a screen or forge a line."""

from __future__ import annotations

import unicodedata


def printable(text: object) -> str:
    """`text` with every control, format or separator character (but the plain space) escaped."""
    out = []
    for ch in str(text):
        if ch != " " and unicodedata.category(ch)[0] in "CZ":
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)
