"""One name policy: names that carry patient identity (MRNs, unicode, control bytes, bytes that are
not UTF-8) reach no published file, sidecar, quarantine file name, audit line or log line in any
pipeline kind by default; the operator still traces them by name through the 0600 journal."""

from __future__ import annotations

import io
import os
import random
import re
from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.support.accounting import check_accounting
from tests.support.data import emr_csv
from tests.support.waiting import wait_until
from tests.system.conftest import MakeService

STEMS = [
    "Doe_John_MRN4471",
    "Müller_Jürgen_MRN0815",
    "Doe\x1b[31m_Jane\x07_MRN9912",
    "Ωmega_Σmith_MRN7731",
    "Dupont_\udce9lise_MRN5550",  # a byte that is not UTF-8, as Python sees it
]
BROKEN = "Broken_Roe_Richard_MRN3141"
HASHED_FILE = re.compile(r"[0-9a-f]{32}(\.[a-z0-9]+)*(\.error\.json)?")


def png(rng: random.Random) -> bytes:
    pixels = np.array([[rng.randrange(256) for _ in range(8)] for _ in range(8)], dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def genomics_tsv(rng: random.Random) -> bytes:
    tag = rng.randrange(10**9)  # samples of their own: no (gene, sample) pair twice in a batch
    rows = [
        {"gene": f"G{g}", "sample": f"S{tag}-{s}", "expression": rng.lognormvariate(4, 1)}
        for g in range(5)
        for s in range(3)
    ]
    return pd.DataFrame(rows).to_csv(sep="\t", index=False).encode()


KINDS: dict[str, tuple[str, Callable[[random.Random], bytes]]] = {
    "emr": (".csv", lambda rng: emr_csv(rng, rows=30)),
    "imaging": (".png", png),
    "genomics": (".tsv", genomics_tsv),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_no_raw_name_leaves_the_service(make_service: MakeService, kind: str) -> None:
    ext, make = KINDS[kind]
    pipeline = {"name": kind, "kind": kind, "max_files": 100, "max_wait": 2, "settle_s": 0.1}
    service = make_service([pipeline])
    service.start()
    rng = random.Random(kind)
    # The journal keeps a name that is not UTF-8 with `\xNN` escapes: account it under that.
    dropped = {
        os.fsencode(stem + ext).decode("utf-8", "backslashreplace"): service.drop(
            kind, stem + ext, make(rng)
        )
        for stem in STEMS
    }
    dropped[BROKEN + ext] = service.drop(kind, BROKEN + ext, b"\x00\xffnot a table\n")
    wait_until(lambda: service.accounted() == len(dropped), 60)
    assert service.stop() == 0

    # Maps every published name back to a dropped one and greps every file for raw names.
    check_accounting(service, dropped)
    quarantine = sorted(p.name for p in (service.root / "quarantine" / kind).iterdir())
    assert len(quarantine) == 2 and all(HASHED_FILE.fullmatch(n) for n in quarantine), quarantine
    (sidecar,) = service.quarantined(kind)
    assert sidecar["name"] == BROKEN + ext and sidecar["published_name"].startswith("hmac-")

    done = service.run("trace", "Doe_John_MRN4471" + ext)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Doe_John_MRN4471{ext} in pipeline {kind}" in done.stdout


def test_a_pipeline_may_publish_real_names(make_service: MakeService) -> None:
    """`hash_names = false`: the manifest lists the names as dropped."""
    pipeline = {"name": "emr", "kind": "emr", "max_files": 2, "max_wait": 2, "settle_s": 0.1}
    service = make_service([{**pipeline, "hash_names": False}])
    service.start()
    rng = random.Random(3)
    dropped = {n: service.drop("emr", n, emr_csv(rng)) for n in ("visit_a.csv", "visit_b.csv")}
    wait_until(lambda: service.accounted() == 2, 30)
    assert service.stop() == 0
    (manifest,) = service.manifests("emr")
    assert sorted(i["published_name"] for i in manifest["inputs"]) == sorted(dropped)
    check_accounting(service, dropped)
