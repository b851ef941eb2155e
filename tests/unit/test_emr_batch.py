"""EMR's batch path (one parse for many small files) equals reading each file alone."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from daemon.errors import ProcessorError
from daemon.processors.emr import EmrProcessor
from daemon.processors.options import EmrOptions

HEADER = "patient_id,diagnosis,age,systolic_bp,glucose\n"


def clean(rng: random.Random, rows: int = 30) -> str:
    lines = [HEADER]
    for i in range(rows):
        bp = "" if i % 7 == 0 else f"{rng.uniform(90, 180):.1f}"
        lines.append(
            f"{rng.randint(0, 999999):06d},{rng.choice('ABCDE')},{rng.randint(1, 99)},"
            f"{bp},{rng.uniform(3, 15):.3f}\n"
        )
    return "".join(lines)


CORPUS = {
    "ints_only.csv": "diagnosis,age\nA,1\nB,2\nA,3\n",
    "other_header.csv": "diagnosis,weight\nA,70.5\nC,80\n",
    "free_text.csv": "diagnosis,age,note\nA,1,12\nB,2,34\n",
    "free_text_words.csv": "diagnosis,age,note\nA,1,fine\nB,2,ok\n",
    "blank_lines.csv": HEADER + "\n000001,A,3,120,5\n\n000002,B,4,130,6\n",
    "no_trailing_newline.csv": HEADER + "000003,C,5,140,7",
    "leading_blank_lines.csv": HEADER + "\n\n000012,B,5,140,7\n000013,B,6,141,8",
    "only_blank_lines.csv": HEADER + "\n\n\n",
    "space_line.csv": HEADER + " \n000014,C,5,140,7\n",
    "header_only.csv": HEADER,
    "quoted.csv": HEADER + '000004,"A",6,150,8\n',
    "crlf.csv": HEADER.replace("\n", "\r\n") + "000005,D,7,160,9\r\n",
    "bom.csv": "\ufeff" + HEADER + "000006,E,8,170,10\n",
    "ragged.csv": HEADER + "000007,A,9\n",
    "no_group.csv": "ward,age\nX,1\n",
    "binary.csv": "\x00\x01\x02",
    "empty.csv": "",
    "tabs.csv": HEADER.replace(",", "\t") + "000008\tA\t10\t110\t4\n",
    "nan_words.csv": HEADER + "000009,A,NA,120,NaN\n000010,B,11,null,5\n",
    "latin1.csv": None,
}


def write_corpus(tmp_path: Path, rng: random.Random) -> list[tuple[Path, str]]:
    items = []
    for i in range(12):
        path = tmp_path / f"clean{i}.csv"
        path.write_text(clean(rng))
        items.append((path, path.name))
    for name, text in CORPUS.items():
        path = tmp_path / name
        if text is None:
            path.write_bytes(HEADER.encode() + "000011,é,1,2,3\n".encode("latin-1"))
        else:
            path.write_text(text, newline="")
        items.append((path, name))
    rng.shuffle(items)
    return items


def per_file(processor: EmrProcessor, items: list[tuple[Path, str]]):
    partials, outcomes = [], []
    for path, name in items:
        try:
            partial, facts = processor.read(path, name)
        except ProcessorError as exc:
            outcomes.append(exc)
        else:
            partials.append(partial)
            outcomes.append(facts)
    return partials, outcomes


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_batch_path_matches_the_per_file_path(tmp_path: Path, seed: int) -> None:
    """Same published result, same facts per file, same refusals with the same reasons."""
    processor = EmrProcessor(EmrOptions(min_cell_size=1))
    items = write_corpus(tmp_path, random.Random(seed))

    batch_partials, batch_outcomes = processor.read_many(items)
    file_partials, file_outcomes = per_file(processor, items)

    for (_, name), got, want in zip(items, batch_outcomes, file_outcomes, strict=True):
        if isinstance(want, ProcessorError):
            assert isinstance(got, ProcessorError), name
            assert got.reason == want.reason, name
        else:
            assert got == want, name
    out_batch, out_file = tmp_path / "batch", tmp_path / "file"
    out_batch.mkdir()
    out_file.mkdir()
    processor.write(processor.merge(batch_partials), out_batch)
    processor.write(processor.merge(file_partials), out_file)
    assert (out_batch / "result.csv").read_text() == (out_file / "result.csv").read_text()


def test_clean_small_files_share_one_parse(tmp_path: Path) -> None:
    """Many clean files of one header come back as a single partial."""
    processor = EmrProcessor(EmrOptions(min_cell_size=1))
    rng = random.Random(4)
    items = []
    for i in range(50):
        path = tmp_path / f"f{i}.csv"
        path.write_text(clean(rng))
        items.append((path, path.name))
    partials, outcomes = processor.read_many(items)
    assert len(partials) == 1
    assert all(o["rows"] == 30 for o in outcomes if not isinstance(o, ProcessorError))
