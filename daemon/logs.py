"""Operational logs: structlog to stderr, JSON lines when not a terminal (journald keeps them),
readable key=value on a terminal. Libraries' stdlib `logging` goes through the same renderer, so
every line has the same shape: `timestamp`, `level`, `event` (a stable dotted name) and facts."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import PurePath
from typing import TextIO

import structlog
from structlog.stdlib import ProcessorFormatter

from daemon.errors import ConfigError

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Chatty below WARNING (apscheduler logs every job run at INFO): their INFO is not ours to show.
LIBRARY_LOGGERS = ("apscheduler", "watchdog", "distributed", "tornado", "pebble", "asyncio", "PIL")


def parse_level(level: str) -> int:
    name = level.strip().upper()
    if name == "WARN":
        name = "WARNING"
    if name not in LEVELS:
        raise ConfigError("log_level", f"{level!r} is not one of {', '.join(LEVELS).lower()}")
    return int(getattr(logging, name))


def configure_logging(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Route structlog and stdlib logging to one handler on `stream` (default: stderr)."""
    threshold = parse_level(level)
    stream = sys.stderr if stream is None else stream
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        ProcessorFormatter(
            processors=[ProcessorFormatter.remove_processors_meta, *_renderer(stream)],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(threshold)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(max(threshold, logging.WARNING))
    logging.captureWarnings(True)
    structlog.configure(
        processors=[*shared, ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )


def _renderer(stream: TextIO) -> list[structlog.typing.Processor]:
    if stream.isatty():
        # ConsoleRenderer formats exc_info itself (and warns if format_exc_info ran before it).
        return [structlog.dev.ConsoleRenderer(colors=True)]
    return [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]


def contain_library_logs() -> None:
    """Worker side: a log record that is not one of ours (structlog's) leaves the process only
    as `library.record` with its logger, level and a code (module:line); its message, arguments,
    traceback and stack are dropped, for libraries quote what they read (tifffile logs a tag's
    value, pydicom an element's). Call after `configure_logging`, in every worker; on a Dask
    worker (whose logging is not ours) it guards the root's handlers and Python's last resort.
    Idempotent."""
    handlers = [*logging.getLogger().handlers, logging.lastResort]
    for handler in handlers:
        if handler is not None and not any(isinstance(f, _Redact) for f in handler.filters):
            handler.addFilter(_Redact(isinstance(handler.formatter, ProcessorFormatter)))


class _Redact(logging.Filter):
    def __init__(self, is_structlog: bool) -> None:
        super().__init__()
        self._is_structlog = is_structlog

    def filter(self, record: logging.LogRecord) -> bool:
        if hasattr(record, "_logger"):  # ours, through structlog's wrap_for_formatter
            return True
        fields = {
            "event": "library.record",
            "logger": record.name,
            "level": record.levelname.lower(),
            "code": f"{PurePath(record.pathname).stem}:{record.lineno}",
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(),
        }
        record.args = ()
        record.exc_info = record.exc_text = record.stack_info = None
        if self._is_structlog:
            # Rendered as a structlog event dict: ProcessorFormatter checks these two attributes.
            record.msg = fields
            record._logger = None
            record._name = record.levelname.lower()
        else:
            record.msg = json.dumps(fields)
        return True
