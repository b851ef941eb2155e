"""Every decoder is bounded by what it will produce (hostile-ground 12.1): deflated DICOM, PNG and
TIFF pixel bytes, compressed and wide genomics tables. Each bomb runs in a child capped a fixed
budget above its imports, and must come back quarantined with its reason, not as a MemoryError;
files just under each limit still read."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.security.corpus import tiff_pages
from tests.unit.processors import bombs
from tests.unit.processors.bounded import BUDGET_BYTES, Reader, bounded_reader

MIB = 1 << 20
CODECS = ("gzip", "bz2", "xz", "zstd", "lz4")


@pytest.fixture(scope="module")
def capped() -> Iterator[tuple[Reader, Callable[[int], str]]]:
    with bounded_reader() as reader:
        yield reader


@pytest.fixture
def read(capped: tuple[Reader, Callable[[int], str]]) -> Reader:
    return capped[0]


def put(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def test_the_cap_bites(capped: tuple[Reader, Callable[[int], str]]) -> None:
    """The child really is capped: twice its budget cannot be allocated, a little can."""
    _, allocate = capped
    assert allocate(2 * BUDGET_BYTES) == "memory_error"
    assert allocate(MIB) == f"allocated {MIB}"


# -- DICOM ---------------------------------------------------------------------------------------


def test_deflated_dicom_bomb_is_refused_while_inflating(read: Reader, tmp_path: Path) -> None:
    """4 GB of zeros in a few MB of Deflated DICOM: refused at the inflate cap."""
    path = put(tmp_path, "bomb.dcm", bombs.deflated_dicom_bomb(4000 * MIB))
    assert path.stat().st_size < 8 * MIB
    assert read("imaging", path, max_image_bytes=256 * MIB) == (
        "quarantined",
        "decompression_bomb",
    )


@pytest.mark.parametrize(("padding_mib", "outcome"), [(0, "read"), (12, "read"), (24, "bomb")])
def test_deflated_dicom_around_the_cap(
    read: Reader, tmp_path: Path, padding_mib: int, outcome: str
) -> None:
    """A real deflated CT reads; padded past max_image_bytes + the header allowance (1 + 16 MiB)
    it is refused."""
    path = put(tmp_path, "ct.dcm", bombs.deflated_dicom(padding_mib * MIB))
    got = read("imaging", path, max_image_bytes=MIB)
    assert got == (("read", "") if outcome == "read" else ("quarantined", "decompression_bomb"))


# -- PNG and TIFF --------------------------------------------------------------------------------

LIMIT = 48 * MIB  # Pillow keeps 3 copies: 8-bit 4096 x 4096 is exactly the limit


@pytest.mark.parametrize(
    ("width", "height", "bits", "colour", "outcome"),
    [
        (4096, 4096, 8, 0, "read"),
        (4096, 4097, 8, 0, "too_many_pixel_bytes"),
        (2896, 2896, 16, 0, "read"),  # 16-bit grey: 2 bytes a sample
        (2897, 2897, 16, 0, "too_many_pixel_bytes"),
        (2364, 2364, 8, 2, "read"),  # RGB: 3 samples a pixel
        (2365, 2365, 8, 2, "too_many_pixel_bytes"),
    ],
)
def test_png_byte_guard(
    read: Reader, tmp_path: Path, width: int, height: int, bits: int, colour: int, outcome: str
) -> None:
    """The guard is in bytes: samples x bytes per sample x copies, just under and just over."""
    path = put(tmp_path, "x.png", bombs.png_zeros(width, height, bits, colour))
    got = read("imaging", path, max_image_bytes=LIMIT)
    assert got == (("read", "") if outcome == "read" else ("quarantined", outcome))


def test_16bit_png_under_max_pixels_is_refused_by_bytes(read: Reader, tmp_path: Path) -> None:
    """169 M samples is under max_pixels, but 16-bit it decodes to a gigabyte: refused."""
    path = put(tmp_path, "deep.png", bombs.png_zeros(13_000, 13_000, 16))
    assert read("imaging", path, max_image_bytes=512 * MIB) == (
        "quarantined",
        "too_many_pixel_bytes",
    )


@pytest.mark.parametrize(("pages", "outcome"), [(6, "read"), (7, "too_many_pixel_bytes")])
def test_tiff_pages_byte_guard(read: Reader, tmp_path: Path, pages: int, outcome: str) -> None:
    """Pages add up: six 16-bit 2048 x 2048 pages are the limit, seven are over."""
    path = put(tmp_path, "pages.tif", bombs.tiff_zeros(pages, 2048, "uint16"))
    got = read("imaging", path, max_image_bytes=LIMIT)
    assert got == (("read", "") if outcome == "read" else ("quarantined", outcome))


def test_tiff_page_bomb_is_refused(read: Reader, tmp_path: Path) -> None:
    """300 pages declaring 8192 x 8192 each, sharing one tiny strip: refused unread."""
    path = put(tmp_path, "bomb.tif", tiff_pages(300, 8192, 8192))
    assert read("imaging", path)[0] == "quarantined"


# -- genomics ------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
def test_compressed_tables_are_refused_unless_allowed(
    read: Reader, tmp_path: Path, codec: str
) -> None:
    """Compressed by content, whatever the name: refused by default, read when allowed."""
    path = put(tmp_path, "table.csv", bombs.compress(codec, bombs.long_rows(50)))
    assert read("genomics", path) == ("quarantined", "compressed_input")
    assert read("genomics", path, compressed=True) == ("read", "")


@pytest.mark.parametrize("codec", CODECS)
def test_compression_bombs_stop_at_the_ratio(read: Reader, tmp_path: Path, codec: str) -> None:
    """A few KB decoding to 26 MB is past the ratio cap: refused while decoding."""
    path = put(tmp_path, "bomb.tsv", bombs.compress(codec, bombs.long_rows(2_000_000)))
    assert read("genomics", path, compressed=True) == ("quarantined", "decompression_bomb")


@pytest.mark.parametrize("codec", CODECS)
def test_compression_bombs_stop_at_the_size(read: Reader, tmp_path: Path, codec: str) -> None:
    """With the ratio cap lifted, max_decoded_bytes still stops the stream."""
    path = put(tmp_path, "bomb.csv", bombs.compress(codec, bombs.long_rows(2_000_000)))
    options = {"compressed": True, "max_compression_ratio": 10**9, "max_decoded_bytes": 8 * MIB}
    assert read("genomics", path, **options) == ("quarantined", "decompression_bomb")


def test_ten_million_rows_in_kilobytes(read: Reader, tmp_path: Path) -> None:
    """100 M rows (1.3 GB) of gzip in a few MB: refused while decoding, at any setting."""
    path = put(tmp_path, "rows.csv", bombs.gzip_row_bomb(100_000_000))
    assert read("genomics", path, compressed=True) == ("quarantined", "decompression_bomb")
    lifted = {"compressed": True, "max_compression_ratio": 10**9}
    assert read("genomics", path, **lifted) == ("quarantined", "decompression_bomb")


def test_a_hidden_header_is_read_from_the_decoded_stream(read: Reader, tmp_path: Path) -> None:
    """A skippable zstd frame hides the real header from a raw-byte check: the frame's magic is
    found (refused by default), and when allowed the header comes from the decoded stream."""
    hidden = put(tmp_path, "h.csv", bombs.zstd_hidden_header(bombs.long_rows(10)))
    assert read("genomics", hidden) == ("quarantined", "compressed_input")
    assert read("genomics", hidden, compressed=True) == ("read", "")
    no_gene = put(tmp_path, "n.csv", bombs.zstd_hidden_header(b"patient,x\n1,2\n", b"gene,a\n"))
    assert read("genomics", no_gene, compressed=True) == ("quarantined", "missing_gene_column")


def test_names_do_not_decide_compression(read: Reader, tmp_path: Path) -> None:
    """A plain table named .gz is read as text (Arrow would try to gunzip it by name)."""
    assert read("genomics", put(tmp_path, "t.csv.gz", bombs.long_rows(5))) == ("read", "")
    assert read("genomics", put(tmp_path, "t.tsv.zst", bombs.long_rows(5))) == ("read", "")


@pytest.mark.parametrize(("samples", "outcome"), [(999, "read"), (1000, "too_many_columns")])
def test_wide_tables_stop_at_max_columns(
    read: Reader, tmp_path: Path, samples: int, outcome: str
) -> None:
    """gene + samples columns against max_columns = 1000."""
    path = put(tmp_path, "wide.csv", bombs.wide_header(samples))
    got = read("genomics", path, max_columns=1000)
    assert got == (("read", "") if outcome == "read" else ("quarantined", outcome))


def test_150k_sample_columns_are_refused_by_default(read: Reader, tmp_path: Path) -> None:
    """150,000 sample columns took 2.2 GB: refused from the header."""
    path = put(tmp_path, "wide.csv", bombs.wide_header(150_000))
    assert read("genomics", path) == ("quarantined", "too_many_columns")


@pytest.mark.parametrize("codec", [None, "gzip", "zstd"])
@pytest.mark.parametrize(("rows", "outcome"), [(1000, "read"), (1001, "too_many_rows")])
def test_rows_stop_at_max_rows(
    read: Reader, tmp_path: Path, codec: str | None, rows: int, outcome: str
) -> None:
    """Data lines counted before parsing, plain or decoded."""
    data = bombs.varied_rows(rows)
    path = put(tmp_path, "rows.csv", data if codec is None else bombs.compress(codec, data))
    got = read("genomics", path, max_rows=1000, compressed=True)
    assert got == (("read", "") if outcome == "read" else ("quarantined", outcome))
