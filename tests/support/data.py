"""Test data: EMR tables, written to the inbox the safe way (write, then rename)."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

DIAGNOSES = ("asthma", "copd", "diabetes", "hypertension", "sepsis")


def emr_csv(rng: random.Random, rows: int = 50, missing_every: int = 0) -> bytes:
    lines = ["patient_id,diagnosis,age,systolic_bp,glucose"]
    for i in range(rows):
        bp = "" if missing_every and i % missing_every == 0 else f"{rng.uniform(90, 180):.1f}"
        lines.append(
            f"{rng.randint(0, 999999):06d},{rng.choice(DIAGNOSES)},"
            f"{rng.randint(1, 99)},{bp},{rng.uniform(3, 15):.3f}"
        )
    return ("\n".join(lines) + "\n").encode()


def drop(folder: Path, name: str, content: bytes) -> str:
    """Write as a hidden temp, then rename in (what careful producers do); return sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.part"
    tmp.write_bytes(content)
    os.rename(tmp, folder / name)
    return hashlib.sha256(content).hexdigest()
