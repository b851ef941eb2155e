"""The error tree. An exception's docstring is its default message; its fields are audit facts."""

from __future__ import annotations

from pathlib import Path


class MedbatchError(Exception):
    """medbatch failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(MedbatchError):
    """The configuration is invalid."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}")


class JournalCorruptError(MedbatchError):
    """The journal failed its integrity check; refusing to start (it is never recreated)."""


class ProcessorError(MedbatchError):
    """A processor could not use one input file.

    `reason` is a short code such as ``missing_group_column``; `detail` is free text that must not
    quote a cell value or a patient attribute (it reaches the quarantine sidecar, not the logs).
    """

    def __init__(self, path: Path | str, reason: str, detail: str = "") -> None:
        self.path = Path(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)

    def __reduce__(self) -> tuple[type[ProcessorError], tuple[str, str, str]]:
        return (type(self), (str(self.path), self.reason, self.detail))


class UnknownProcessorError(MedbatchError):
    """No processor is registered under that kind."""


class ExecutorUnavailableError(MedbatchError):
    """The executor could not run this attempt (its cluster is unreachable): not the batch's fault,
    so the attempt does not count against it."""


class InstanceLockedError(MedbatchError):
    """Another medbatch instance already runs on this state folder."""

    def __init__(self, path: Path, pid: int | None) -> None:
        self.path = path
        self.pid = pid
        holder = f"pid {pid}" if pid is not None else "another process"
        super().__init__(
            f"another instance ({holder}) already runs on this state folder "
            f"(it holds {path}); stop it first, or give this one its own paths.state"
        )


class JournalUnreadableError(MedbatchError):
    """The journal could not be read."""

    def __init__(self, message: str, *, is_permission: bool = False) -> None:
        self.is_permission = is_permission
        super().__init__(message)


class DiskFullError(MedbatchError):
    """A write failed because the disk is full or failing; work pauses until it can resume."""


class BatchFailedError(MedbatchError):
    """A batch attempt failed as a whole (not one bad input): it is retried, then quarantined."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)

    def __reduce__(self) -> tuple[type[BatchFailedError], tuple[str, str]]:
        return (type(self), (self.reason, self.detail))
