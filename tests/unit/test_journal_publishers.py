"""`publishers_of`: the batches that already published some contents, one query per chunk (the
admission of a claim group asks once, not once a file)."""

from __future__ import annotations

from pathlib import Path

from daemon.journal import Journal
from daemon.models import Batch, BatchResult, IncomingFile


def publish(journal: Journal, pipeline: str, batch_id: str, hashes: list[str]) -> None:
    files = []
    for i, sha in enumerate(hashes):
        name = f"{batch_id}-{i}.csv"
        (file_id,) = journal.begin_claims([(pipeline, name, f"{pipeline}/{name}", 1000.0)])
        journal.finish_claims([(file_id, sha, 10)])
        files.append(IncomingFile(file_id, pipeline, name, Path("/spool") / name, sha, 10, 1000.0))
    journal.seal_batch(Batch(batch_id, pipeline, "emr", 3, 1001.0, tuple(files)), 1000.0)
    journal.mark_running(batch_id, 1002.0)
    facts = {f.file_id: {} for f in files[1:]}
    quarantined = {files[0].file_id: ("bad_table", "")}  # refused: it published nothing
    result = BatchResult(batch_id, Path("/out"), 1003.0, facts=facts, quarantined=quarantined)
    journal.mark_published(result, 1003.0)


def test_published_contents_of_one_pipeline_across_chunks(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    hashes = [f"{i:064x}" for i in range(1, 1202)]  # more than two IN chunks
    publish(journal, "emr", "B1", hashes)
    publish(journal, "other", "B2", [f"{i:064x}" for i in range(5000, 5003)])

    asked = [*hashes, *hashes[:10], f"{9999:064x}", f"{5001:064x}"]  # repeats, unknown, other
    found = journal.publishers_of("emr", asked)

    assert found == {sha: "B1" for sha in hashes[1:]}, "the refused input published nothing"
    assert journal.publishers_of("emr", []) == {}
    assert journal.publishers_of("other", [f"{5001:064x}"]) == {f"{5001:064x}": "B2"}
    journal.close()


def test_the_look_up_goes_by_content_not_through_every_published_row(tmp_path: Path) -> None:
    """Published rows are most of a journal: a look-up planned on the (state, pipeline) index
    would read all of them for every claim group, a cost that grows with the service's age."""
    journal = Journal(tmp_path / "journal.db")
    publish(journal, "emr", "B1", [f"{i:064x}" for i in range(1, 50)])
    statements: list[str] = []
    journal._db.set_trace_callback(statements.append)

    journal.publishers_of("emr", [f"{i:064x}" for i in range(1, 5)])

    (query,) = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    plan = journal._db.execute(f"EXPLAIN QUERY PLAN {query}").fetchall()
    details = " ".join(str(row[-1]) for row in plan)
    assert "files_by_sha (pipeline=? AND <expr>=?)" in details, details
    journal.close()


def test_hashes_that_share_the_index_prefix_are_told_apart(tmp_path: Path) -> None:
    """The index keys 64 bits of a hash: contents whose hashes share them (every test hash above
    does, and some real pair will) still answer by their whole hash."""
    journal = Journal(tmp_path / "journal.db")
    prefix = "ab" * 8
    published = [f"{prefix}{i:048x}" for i in range(3)]
    publish(journal, "emr", "B1", published)  # its first input is refused: not published
    asked = [f"{prefix}{i:048x}" for i in range(6)]

    assert journal.publishers_of("emr", asked) == {sha: "B1" for sha in published[1:]}
    assert journal.publishers_of("emr", [f"{prefix}{9:048x}"]) == {}
    journal.close()
