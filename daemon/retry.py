"""What to do after a failed batch attempt: a pure `decide()`, unit-tested on its own.

Retry with back-off; split a batch that killed its worker twice (to isolate the input that does
it); give up at last. Attempts that were not the batch's fault are retried without counting.
"""

from __future__ import annotations

from dataclasses import dataclass

from daemon.models import DISK_REASONS, Reason

# Killing a worker (or outliving the timeout) twice is enough: a third try costs another worker.
MAX_FATAL_ATTEMPTS = 2
MAX_DELAY_S = 60.0
# Not the batch's fault: retried soon, whatever the attempt number.
MAX_UNCOUNTED_DELAY_S = 5.0
_NOT_ITS_FAULT = DISK_REASONS | {Reason.EXECUTOR_UNAVAILABLE}
_FATAL = frozenset({Reason.WORKER_CRASH, Reason.TIMEOUT})


@dataclass(frozen=True, slots=True)
class Retry:
    delay_s: float
    is_counted: bool
    # The disk failed, not the batch: intake pauses until a batch publishes again.
    should_pause: bool = False


@dataclass(frozen=True, slots=True)
class Split:
    """Halve the batch and run each half."""


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Quarantine every input with the reason."""


Decision = Retry | Split | GiveUp


def decide(reason: str, attempt: int, n_files: int, max_attempts: int) -> Decision:
    """The next step for a batch whose attempt number `attempt` failed with `reason`."""
    if reason in _NOT_ITS_FAULT:
        delay_s = backoff_s(attempt, MAX_UNCOUNTED_DELAY_S)
        return Retry(delay_s, is_counted=False, should_pause=reason in DISK_REASONS)
    if reason == Reason.WORKER_CRASH and attempt >= MAX_FATAL_ATTEMPTS and n_files > 1:
        return Split()
    limit = MAX_FATAL_ATTEMPTS if reason in _FATAL else max_attempts
    if attempt < limit:
        return Retry(backoff_s(attempt, MAX_DELAY_S), is_counted=True)
    return GiveUp()


def backoff_s(attempt: int, cap_s: float) -> float:
    """1, 2, 4 … seconds after attempts 1, 2, 3 …, at most `cap_s`."""
    return min(2.0 ** max(attempt - 1, 0), cap_s)
