"""Exit statuses (sysexits.h where one fits) and the error type → status table."""

from __future__ import annotations

from daemon.errors import (
    ConfigError,
    InstanceLockedError,
    JournalCorruptError,
    JournalUnreadableError,
    MedbatchError,
)

EX_OK = 0
EX_FAIL = 1
EX_USAGE = 2
EX_NOT_RUNNING = 3
EX_DATAERR = 65
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78
# A reader (`medbatch status | head`) went away: what a shell reports for SIGPIPE.
EX_BROKEN_PIPE = 141

# Error type → exit status; the first match wins.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (ConfigError, EX_CONFIG),
    (JournalCorruptError, EX_DATAERR),
    (InstanceLockedError, EX_TEMPFAIL),
    (JournalUnreadableError, EX_NOPERM),
    (MedbatchError, EX_FAIL),
)


def exit_status(exc: BaseException) -> int | None:
    if isinstance(exc, JournalUnreadableError) and not exc.is_permission:
        return EX_FAIL
    for error_type, code in EXIT_CODES:
        if isinstance(exc, error_type):
            return code
    return None
