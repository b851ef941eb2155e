"""Issue 12 item 1, tables: files that decode to far more than they weigh (zstd Parquet of
constant columns, gzip/bz2/xz/zstd text, a padded .xlsx, a skippable zstd frame hiding the real
header) are refused while or before decoding, under a worker memory ceiling, costing only their
own file; good files in the same batches publish."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import resource
import struct
import zipfile

import openpyxl
import pyarrow as pa
import pyarrow.parquet as pq

from tests.security.corpus import emr_pipeline, good_emr, published_names, quarantine_reasons
from tests.support.accounting import check_accounting
from tests.support.waiting import wait_until
from tests.system.conftest import MakeService

ROW = b"flu,1\n"
DECODED_BYTES = 3 << 30  # each text bomb decodes to 3 GiB: more than the worker may hold


def text_bomb(compress: object) -> bytes:
    """3 GiB of one repeated row, compressed in 16 MiB pieces (concatenated streams)."""
    piece = ROW * ((16 << 20) // len(ROW))
    one = compress(piece)  # type: ignore[operator]
    return compress(b"diagnosis,temp\n") + one * (DECODED_BYTES // len(piece))  # type: ignore[operator]


def parquet_bomb() -> bytes:
    rows = 10_000_000
    table = pa.table({"diagnosis": pa.repeat("flu", rows), "temp": pa.repeat(1.0, rows)})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", row_group_size=rows)
    return sink.getvalue()


def xlsx_bomb() -> bytes:
    book = openpyxl.Workbook()
    book.active.append(["diagnosis", "temp"])
    book.active.append(["flu", 1.0])
    sink = io.BytesIO()
    book.save(sink)
    with zipfile.ZipFile(sink, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("xl/sharedStrings2.xml", bytes(400 << 20))
    return sink.getvalue()


def hidden_header() -> bytes:
    decoy = b"diagnosis,temp\nflu,1\n"
    real = b",".join(b"c%d" % i for i in range(5000)) + b",diagnosis\n"
    zstd = pa.Codec("zstd")
    return struct.pack("<II", 0x184D2A50, len(decoy)) + decoy + zstd.compress(real, asbytes=True)


def zstd_bytes(data: bytes) -> bytes:
    return pa.Codec("zstd").compress(data, asbytes=True)


def test_table_bombs_cost_only_their_file(make_service: MakeService) -> None:
    """Every bomb is quarantined with its reason by a worker under a 3 GiB address-space
    ceiling (each bomb decodes past it), and the good files of the same batches publish."""
    # Given: every process of the service under a 3 GiB address-space ceiling (inherited)
    limit = 3 << 30
    service = make_service(
        [emr_pipeline(max_files=20, max_wait=1)], workers={"count": 1, "batch_timeout_s": 120}
    )
    bombs = {
        "bomb.parquet": (parquet_bomb(), "decompression_bomb"),
        "bomb.csv.gz": (text_bomb(gzip.compress), "decompression_bomb"),
        "bomb.csv.bz2": (text_bomb(bz2.compress), "decompression_bomb"),
        "bomb.csv.xz": (text_bomb(lzma.compress), "decompression_bomb"),
        "bomb.csv.zst": (text_bomb(zstd_bytes), "decompression_bomb"),
        "bomb.xlsx": (xlsx_bomb(), "decompression_bomb"),
        "hidden.csv.zst": (hidden_header(), "too_many_columns"),
    }
    assert all(len(content) < 16 << 20 for content, _ in bombs.values())
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        service.start()
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    # When the bombs arrive among good files
    dropped = {"before.csv": service.drop("emr", "before.csv", good_emr(1))}
    for name, (content, _) in bombs.items():
        dropped[name] = service.drop("emr", name, content)
    dropped["after.csv"] = service.drop("emr", "after.csv", good_emr(2))
    # Then each is refused with its reason, the good ones publish, nothing else is lost
    wait_until(lambda: set(bombs) <= set(quarantine_reasons(service)), 90, message="refused")
    wait_until(lambda: {"before.csv", "after.csv"} <= published_names(service), 30)
    assert service.stop() == 0
    reasons = quarantine_reasons(service)
    assert {name: reasons[name] for name in bombs} == {n: r for n, (_, r) in bombs.items()}
    check_accounting(service, dropped)
