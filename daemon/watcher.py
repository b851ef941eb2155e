"""InboxWatcher: a watchdog (inotify) observer on every `<inbox>/<pipeline>/`.

Its thread only puts `PathSeen` messages on the main loop's queue; events are hints, and the
periodic rescan (periodic.py) is what guarantees a dropped event never loses a file.
"""

from __future__ import annotations

import logging
import queue
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from watchdog.events import (
    FileClosedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper

log = structlog.get_logger()

# watchdog holds every IN_MOVED_FROM for 0.5 s, waiting for its IN_MOVED_TO, and its queue is
# first-in first-out: each file we claim (a rename out of the inbox, never paired) would delay
# every later event by half a second (gorakhargosh/watchdog#649). A rename within one folder
# delivers both halves in the same read, so 20 ms still pairs them.
InotifyMoveEventGrouper.delay = 0.02


@dataclass(frozen=True, slots=True)
class PathSeen:
    pipeline: str
    path: Path
    is_writing: bool | None


class _Handler(FileSystemEventHandler):
    def __init__(self, pipeline: str, messages: queue.SimpleQueue[Any]) -> None:
        self._pipeline = pipeline
        self._messages = messages

    def dispatch(self, event: FileSystemEvent) -> None:
        # Never raise here: an exception would end watchdog's dispatcher thread for good
        # (gorakhargosh/watchdog#427).
        try:
            if event.is_directory:
                return
            if isinstance(event, FileMovedEvent):
                # Renamed in: written elsewhere and complete, unless a writer still holds it
                # (intake asks the kernel with a lease before taking it at once).
                path, is_writing = event.dest_path, False
            elif isinstance(event, FileModifiedEvent):
                path, is_writing = event.src_path, True
            elif isinstance(event, FileClosedEvent):
                path, is_writing = event.src_path, False
            elif event.event_type == "created":
                path, is_writing = event.src_path, None
            else:
                return
            text = path.decode("utf-8", "surrogateescape") if isinstance(path, bytes) else path
            self._messages.put(PathSeen(self._pipeline, Path(text), is_writing))
        except Exception as exc:  # no traceback: its text could quote a file name
            log.error("watcher.handler_failed", error=type(exc).__name__)


class InboxWatcher:
    def __init__(self, messages: queue.SimpleQueue[Any]) -> None:
        self._messages = messages
        self._observer: BaseObserver | None = None
        self._folders: dict[str, Path] = {}

    def start(self, folders: dict[str, Path]) -> None:
        """Watch each pipeline's folder (not recursive: an inbox is flat)."""
        self._folders = dict(folders)
        observer = Observer()
        for pipeline, folder in self._folders.items():
            folder.mkdir(parents=True, exist_ok=True)
            observer.schedule(_Handler(pipeline, self._messages), str(folder), recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def is_alive(self) -> bool:
        """The observer and every emitter thread are running (a dead one leaves us blind)."""
        observer = self._observer
        if observer is None or not observer.is_alive():
            return False
        return all(emitter.is_alive() for emitter in observer.emitters)

    def restart(self, folders: dict[str, Path] | None = None) -> None:
        self.stop()
        self.start(folders if folders is not None else self._folders)

    def stop(self) -> None:
        if self._observer is None:
            return
        # watchdog 7 logs an error when its emitter wakes after stop() closed the inotify fd
        # (watchdog/observers/inotify.py, "queue_events() called when the thread is inactive"):
        # harmless, but it would page whoever alerts on errors at every clean stop.
        inotify_log = logging.getLogger("watchdog.observers.inotify")
        level = inotify_log.level
        inotify_log.setLevel(logging.CRITICAL)
        try:
            self._observer.stop()
            self._observer.join(timeout=5)
        finally:
            inotify_log.setLevel(level)
        self._observer = None
