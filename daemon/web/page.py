"""The status page: gathers a read-only view (journal, audit tail, outbox) and renders it.

Runs in the HTTP server's threads. The template is autoescaped; it gets ids, counts, reason
codes and hashes only, never a file name.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape

from daemon.liveness import Verdict, assess
from daemon.models import BatchState
from daemon.web.audit_tail import safe_reason, tail
from daemon.web.downloads import PAGE_LINKS
from daemon.web.queries import JournalReader, PipelineView

REFRESH_S = 5

_env = Environment(
    loader=PackageLoader("daemon.web", "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)


def _ago(ts: float | None) -> str:
    if ts is None:
        return ""
    seconds = max(0.0, time.time() - ts)
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))


_env.filters.update(ago=_ago, utc=_utc, reason=lambda r: safe_reason(r) or "")


class StatusPage:
    def __init__(
        self, journal: JournalReader, audit: Path, outbox: Path, pipelines: list[str]
    ) -> None:
        self._journal = journal
        self._audit = audit
        self._outbox = outbox
        self._pipelines = pipelines

    def render(self) -> str:
        now = time.time()
        with self._journal.open() as q:
            verdict: Verdict = assess(q.meta, now)
            paused = q.meta("paused")
            views = q.views(self._pipelines, now)
        return _env.get_template("status.html").render(
            refresh_s=REFRESH_S,
            now=now,
            verdict=verdict,
            paused=safe_reason(paused) if paused else None,
            pipelines=list(views.values()),
            links=self._links(views.values()),
            audit=tail(self._audit),
        )

    def _links(self, views: Iterable[PipelineView]) -> dict[str, list[str]]:
        """The result files each published batch on the page really has."""
        links: dict[str, list[str]] = {}
        for view in views:
            for batch in view.recent:
                if batch.state != BatchState.PUBLISHED:
                    continue
                folder = self._outbox / view.name / batch.batch_id
                links[batch.batch_id] = [n for n in PAGE_LINKS if (folder / n).is_file()]
        return links
