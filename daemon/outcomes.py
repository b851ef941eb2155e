"""Batch outcome events and the listener list that reacts to them (dramatiq-middleware style).

The batch flow commits each transition to the journal, then emits one of these; audit lines,
metrics, the disk-full pause, logs, sd_notify and disposal each react in one listener. Main loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog

from daemon.models import Batch, BatchResult

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class Sealed:
    batch: Batch


@dataclass(frozen=True, slots=True)
class Started:
    batch: Batch


@dataclass(frozen=True, slots=True)
class Committed:
    """The worker's result is in the journal: published, or every input refused."""

    batch: Batch
    result: BatchResult
    run_s: float
    # Seconds from each published input's arrival to publication.
    waits_s: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class Retrying:
    batch: Batch
    reason: str
    delay_s: float
    is_counted: bool
    should_pause: bool = False
    run_s: float | None = None


@dataclass(frozen=True, slots=True)
class SplitUp:
    batch: Batch
    children: tuple[Batch, ...]
    reason: str
    run_s: float | None = None


@dataclass(frozen=True, slots=True)
class GaveUp:
    """Every input of the batch is quarantined with the reason."""

    batch: Batch
    reason: str
    run_s: float | None = None


Outcome = Sealed | Started | Committed | Retrying | SplitUp | GaveUp


class Listener:
    """No-op base: override `on_outcome`. A listener's bug never stops the flow."""

    def on_outcome(self, outcome: Outcome) -> None:
        """React to one outcome (after its journal commit)."""


@dataclass
class Listeners:
    """The ordered list that shows the pipeline: audit first (it follows the journal)."""

    items: list[Listener] = field(default_factory=list)

    def emit(self, outcome: Outcome) -> None:
        for listener in self.items:
            try:
                listener.on_outcome(outcome)
            except Exception:
                log.exception("outcome.listener_failed", listener=type(listener).__name__)
