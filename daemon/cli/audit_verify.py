"""`medbatch audit verify`: the audit log's hash chain, end to end, up to the journal's head."""

from __future__ import annotations

from daemon.audit import read_chain_key, verify
from daemon.cli.exits import EX_FAIL, EX_OK
from daemon.cli.journal_access import open_journal
from daemon.config import Settings


def audit_verify(settings: Settings) -> int:
    head = None
    with open_journal(settings) as journal:
        stored = journal.meta("audit_head") if journal is not None else None
    if stored and stored[0]:
        head = (int(stored[0]), str(stored[1]))
    # Run as the service user: the chain key is 0600 in the state folder.
    key = read_chain_key(settings.paths.state)
    report = verify(settings.paths.audit, expected_head=head, key=key)
    if not report.ok:
        print(f"audit log BROKEN: {report.error}")
        return EX_FAIL
    notes = []
    if report.from_checkpoint is not None:
        notes.append(
            f"older days pruned: starts at the checkpoint after seq {report.from_checkpoint}"
        )
    if report.torn_tail:
        notes.append("the last line was torn by a crash: tolerated, not counted")
    if report.unkeyed_lines:
        notes.append(f"{report.unkeyed_lines} older lines chained without a key (before hmac)")
    if head is None:
        notes.append("no chain head in the journal: a cut-off end cannot be detected")
    else:
        notes.append(f"reaches the journal's head, seq {head[0]}")
    print(f"audit log intact: {report.lines} lines in {report.files} files; " + "; ".join(notes))
    return EX_OK
