"""retry.decide: the whole failure policy, without a service."""

from __future__ import annotations

import pytest

from daemon.models import Reason
from daemon.retry import GiveUp, Retry, Split, backoff_s, decide


@pytest.mark.parametrize("reason", [Reason.DISK_FULL, Reason.IO_ERROR, Reason.EXECUTOR_UNAVAILABLE])
@pytest.mark.parametrize("attempt", [1, 2, 5, 50])
def test_not_the_batch_fault_is_retried_uncounted_forever(reason: Reason, attempt: int) -> None:
    """A full disk or an unreachable cluster never uses up a batch's attempts."""
    decision = decide(reason, attempt, n_files=3, max_attempts=3)
    assert isinstance(decision, Retry)
    assert not decision.is_counted
    assert decision.delay_s <= 5.0
    assert decision.should_pause == (reason != Reason.EXECUTOR_UNAVAILABLE)


@pytest.mark.parametrize("reason", ["processor_failed", "out_of_memory", "executor_error"])
def test_ordinary_failure_is_retried_until_max_attempts(reason: str) -> None:
    """Counted retries with growing delays, then give up at max_attempts."""
    delays = []
    for attempt in (1, 2):
        decision = decide(reason, attempt, n_files=4, max_attempts=3)
        assert isinstance(decision, Retry) and decision.is_counted
        delays.append(decision.delay_s)
    assert delays == sorted(delays) and delays[0] < delays[1]
    assert isinstance(decide(reason, 3, n_files=4, max_attempts=3), GiveUp)


def test_worker_crash_twice_splits_a_batch_of_many() -> None:
    """A batch that killed its worker twice is halved to find the input that does it."""
    assert isinstance(decide(Reason.WORKER_CRASH, 1, n_files=4, max_attempts=5), Retry)
    assert isinstance(decide(Reason.WORKER_CRASH, 2, n_files=4, max_attempts=5), Split)


def test_worker_crash_twice_with_one_file_gives_up() -> None:
    """One input that kills its worker twice is quarantined (nothing to split)."""
    assert isinstance(decide(Reason.WORKER_CRASH, 2, n_files=1, max_attempts=5), GiveUp)


def test_timeout_gives_up_after_two_whatever_max_attempts() -> None:
    """A batch that outlives its timeout twice is not tried a third time."""
    assert isinstance(decide(Reason.TIMEOUT, 1, n_files=3, max_attempts=9), Retry)
    assert isinstance(decide(Reason.TIMEOUT, 2, n_files=3, max_attempts=9), GiveUp)


def test_backoff_is_capped() -> None:
    """Delays double and stop at the cap."""
    assert [backoff_s(a, 60.0) for a in (0, 1, 2, 3, 7, 20)] == [1, 1, 2, 4, 60, 60]
