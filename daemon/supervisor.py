"""Moved: the service is `daemon.service.Service`. This alias goes when the CLI imports it."""

from daemon.service import Service as Supervisor

__all__ = ["Supervisor"]
