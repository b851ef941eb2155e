"""The processor contract, for every registered kind (built-ins and plugins): an empty batch
writes result.csv, a malformed file is a ProcessorError that quarantines only itself, merging is
exact however a batch is split, and everything crossing the process boundary pickles."""

from __future__ import annotations

import csv
import hashlib
import io
import math
import pickle
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from PIL import Image
from pydantic import BaseModel

from daemon.errors import ProcessorError
from daemon.models import Batch, BatchResult, BatchTask, IncomingFile
from daemon.processors import known_kinds, load_processor, options_model
from daemon.processors.base import Processor
from daemon.worker import run_batch

SNAKE_CASE = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)*$")
TOLERANCE = 1e-12


# -- samples: one small valid file (varied by seed) and one malformed file per kind ---------------


def emr_valid(folder: Path, seed: int) -> Path:
    rng = random.Random(seed)
    lines = ["patient_id,diagnosis,age,systolic_bp"]
    for i in range(12):
        bp = "" if i % 5 == 0 else f"{rng.uniform(90, 180):.6f}"
        lines.append(f"{rng.randint(0, 99999):05d},{rng.choice('abc')},{rng.randint(1, 99)},{bp}")
    path = folder / f"visit{seed}.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def genomics_valid(folder: Path, seed: int) -> Path:
    rng = random.Random(seed)
    genes = ["SEPT2", "MARCH1", "1-Mar", "ENSG00000141510.17", "000123"]
    if seed % 2:  # wide, tab-separated
        samples = [f"S{seed}_{j}" for j in range(3)]
        lines = ["\t".join(["gene", *samples])]
        lines += ["\t".join([g, *(f"{rng.gauss(100, 25):.9f}" for _ in samples)]) for g in genes]
        path = folder / f"expr{seed}.tsv"
    else:  # long, comma-separated
        lines = ["gene,sample,expression"]
        lines += [
            f"{rng.choice(genes)},S{rng.randint(1, 4)},{rng.gauss(100, 25):.9f}" for _ in range(15)
        ]
        path = folder / f"expr{seed}.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def imaging_valid(folder: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    if seed % 3 == 0:
        path = folder / f"scan{seed}.tif"
        tifffile.imwrite(path, rng.integers(0, 4096, (2, 9, 11), dtype=np.uint16))
    else:
        shape = (10, 14, 3) if seed % 3 == 1 else (13, 8)
        path = folder / f"scan{seed}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


def linecount_valid(folder: Path, seed: int) -> Path:
    path = folder / f"notes{seed}.txt"
    path.write_text("".join(f"line {i}\n" for i in range(seed + 2)) + "\n")
    return path


def binary_table(folder: Path) -> Path:
    path = folder / "broken.csv"
    path.write_bytes(b"\x00\x01binary junk\xff")
    return path


def truncated_png(folder: Path) -> Path:
    buffer = io.BytesIO()
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)).save(buffer, "PNG")
    path = folder / "cut.png"
    path.write_bytes(buffer.getvalue()[: buffer.tell() // 2])
    return path


def text_with_nul(folder: Path) -> Path:
    path = folder / "binary.txt"
    path.write_bytes(b"one\ntwo\x00three\n")
    return path


@dataclass(frozen=True)
class Samples:
    valid: Callable[[Path, int], Path]
    malformed: Callable[[Path], Path]
    options: dict[str, Any] = field(default_factory=dict)


# A new kind must add its samples here: the tests below fail (never skip) for a kind without.
SAMPLES: dict[str, Samples] = {
    "emr": Samples(emr_valid, binary_table),
    "genomics": Samples(genomics_valid, binary_table),
    "imaging": Samples(imaging_valid, truncated_png, {"thumbnail_px": 16}),
    "linecount": Samples(linecount_valid, text_with_nul),
    # The test plugin that can break its worker on purpose; without its magic words it is
    # linecount.
    "faulty": Samples(linecount_valid, text_with_nul),
}


# -- helpers ---------------------------------------------------------------------------------


def samples_of(kind: str) -> Samples:
    samples = SAMPLES.get(kind)
    assert samples is not None, f"kind {kind!r} has no samples: add it to SAMPLES"
    return samples


def options_of(kind: str) -> BaseModel:
    return options_model(kind).model_validate(samples_of(kind).options)


def make_processor(kind: str) -> Processor:
    return load_processor(kind)(options_of(kind))


def written(proc: Processor, merged: Any, folder: Path) -> list[str]:
    folder.mkdir()
    names = proc.write(merged, folder)
    assert "result.csv" in names
    assert all((folder / name).is_file() for name in names)
    return names


def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="") as fh:
        return list(csv.reader(fh))


def cells_match(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    return math.isclose(x, y, rel_tol=TOLERANCE, abs_tol=TOLERANCE)


def assert_same_result(one: Path, other: Path) -> None:
    """Two result.csv files are equal cell by cell (text exactly, numbers within 1e-12)."""
    a, b = read_csv(one), read_csv(other)
    assert a[0] == b[0], "headers differ"
    assert len(a) == len(b), f"{len(a)} rows against {len(b)}"
    for i, (row_a, row_b) in enumerate(zip(a, b, strict=True)):
        assert len(row_a) == len(row_b)
        mismatched = [
            (name, x, y)
            for name, x, y in zip(a[0], row_a, row_b, strict=True)
            if not cells_match(x, y)
        ]
        assert not mismatched, f"row {i}: {mismatched}"


def incoming(file_id: int, path: Path) -> IncomingFile:
    data = path.read_bytes()
    return IncomingFile(
        file_id=file_id,
        pipeline="contract",
        name=path.name,
        spool_path=path,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        received_at=1_700_000_000.0 + file_id,
    )


def batch_task(kind: str, paths: list[Path], outbox: Path) -> BatchTask:
    files = tuple(incoming(i, path) for i, path in enumerate(paths, start=1))
    batch = Batch(
        batch_id=f"20240101T000000Z-contract-{hashlib.sha256(kind.encode()).hexdigest()[:8]}",
        pipeline="contract",
        kind=kind,
        priority=3,
        sealed_at=1_700_000_100.0,
        files=files,
    )
    options = options_of(kind).model_dump(mode="json")
    return BatchTask(batch=batch, options=options, outbox_dir=outbox)


kinds = pytest.mark.parametrize("kind", known_kinds())


# -- the contract ----------------------------------------------------------------------------


def test_every_registered_kind_has_samples() -> None:
    """Every registered kind (built-ins and entry points, the linecount plugin among them) has
    samples."""
    assert "linecount" in known_kinds()
    missing = sorted(set(known_kinds()) - set(SAMPLES))
    assert not missing, f"kinds without samples: {missing}"


@kinds
def test_processor_declares_its_kind(kind: str) -> None:
    """The class registered under a kind says that kind and has an options model."""
    cls = load_processor(kind)
    assert cls.kind == kind
    assert issubclass(cls.Options, BaseModel)
    assert options_model(kind) is cls.Options


@kinds
def test_empty_batch_writes_a_result(kind: str, tmp_path: Path) -> None:
    """merge([]) then write works and writes result.csv."""
    proc = make_processor(kind)
    written(proc, proc.merge([]), tmp_path / "out")
    assert read_csv(tmp_path / "out" / "result.csv"), "result.csv has no header"


@kinds
def test_valid_sample_reads(kind: str, tmp_path: Path) -> None:
    """The valid sample reads into a partial and facts with string keys."""
    _, facts = make_processor(kind).read(samples_of(kind).valid(tmp_path, 1), "sample")
    assert all(isinstance(key, str) for key in facts)
    assert all(isinstance(value, int | float | str) for value in facts.values())


@kinds
def test_malformed_file_is_a_processor_error(kind: str, tmp_path: Path) -> None:
    """A malformed file raises ProcessorError with a snake_case reason."""
    path = samples_of(kind).malformed(tmp_path)
    with pytest.raises(ProcessorError) as info:
        make_processor(kind).read(path, path.name)
    assert SNAKE_CASE.match(info.value.reason), info.value.reason


@kinds
def test_malformed_file_is_quarantined_the_rest_published(kind: str, tmp_path: Path) -> None:
    """Through run_batch, the malformed file ends in quarantined; the others are published."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    samples = samples_of(kind)
    paths = [samples.valid(inputs, 1), samples.malformed(inputs), samples.valid(inputs, 2)]
    task = batch_task(kind, paths, tmp_path / "outbox")

    result = run_batch(task)

    assert result.is_published
    assert result.folder is not None and result.folder.is_dir()
    assert set(result.quarantined) == {2}
    reason, _ = result.quarantined[2]
    assert SNAKE_CASE.match(reason), reason
    assert set(result.facts) == {1, 3}
    names = {o.name for o in result.outputs}
    assert "result.csv" in names
    assert names <= {p.name for p in result.folder.iterdir()}


@kinds
def test_merge_is_exact_however_the_batch_is_split(kind: str, tmp_path: Path) -> None:
    """result.csv is the same whether the files come in one batch or in several."""
    proc = make_processor(kind)
    paths = [samples_of(kind).valid(tmp_path, seed) for seed in range(1, 6)]
    a, b, c, d, e = (proc.read(path, path.name)[0] for path in paths)
    splits = {
        "whole": [a, b, c, d, e],
        "halves": [proc.merge([a, b]), proc.merge([c, d, e])],
        "nested": [proc.merge([proc.merge([e]), proc.merge([c, a])]), proc.merge([d, b])],
        "reversed": [e, d, c, b, a],
    }
    names = {how: written(proc, proc.merge(parts), tmp_path / how) for how, parts in splits.items()}
    for how in splits:
        assert names[how] == names["whole"], how
        assert_same_result(tmp_path / "whole" / "result.csv", tmp_path / how / "result.csv")


@kinds
def test_everything_crossing_processes_pickles(kind: str, tmp_path: Path) -> None:
    """Partials, facts, options, the task, the BatchResult and ProcessorError round-trip."""
    proc = make_processor(kind)
    path = samples_of(kind).valid(tmp_path, 1)
    partial, facts = proc.read(path, path.name)
    merged = proc.merge([partial])

    assert pickle.loads(pickle.dumps(facts)) == facts
    options = options_of(kind)
    assert pickle.loads(pickle.dumps(options)) == options
    for how, value in (("partial", partial), ("merged", merged)):
        written(proc, proc.merge([value]), tmp_path / f"{how}-original")
        restored = pickle.loads(pickle.dumps(value))
        written(proc, proc.merge([restored]), tmp_path / f"{how}-copy")
        assert_same_result(
            tmp_path / f"{how}-original" / "result.csv", tmp_path / f"{how}-copy" / "result.csv"
        )

    task = batch_task(kind, [path, samples_of(kind).malformed(tmp_path)], tmp_path / "outbox")
    assert pickle.loads(pickle.dumps(task)) == task
    result = run_batch(task)
    restored_result: BatchResult = pickle.loads(pickle.dumps(result))
    assert restored_result == result
    assert result.is_published and result.quarantined

    with pytest.raises(ProcessorError) as info:
        proc.read(samples_of(kind).malformed(tmp_path), "bad")
    error = pickle.loads(pickle.dumps(info.value))
    assert (type(error), error.reason, error.detail) == (
        type(info.value),
        info.value.reason,
        info.value.detail,
    )
