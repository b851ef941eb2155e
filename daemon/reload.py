"""Reload (SIGHUP): the new settings, checked against what cannot change while running.

Main loop; the service applies them part by part.
"""

from __future__ import annotations

import structlog

from daemon.audit import AuditLog, load_name_key
from daemon.audit.events import AuditEvent, ConfigRejected
from daemon.config import Settings, load_settings
from daemon.errors import ConfigError, MedbatchError

log = structlog.get_logger()


def reloaded_settings(current: Settings, audit: AuditLog) -> tuple[Settings, bytes | None] | None:
    """The new settings and name key; None (logged and audited) when they are refused."""
    try:
        settings = _load(current)
        return settings, name_key_for(settings)
    except MedbatchError as exc:
        log.error(AuditEvent.CONFIG_REJECTED, error=str(exc))
        audit.record(ConfigRejected(reason=str(exc)))
        return None


def _load(current: Settings) -> Settings:
    path = current.config_path
    if path is None:
        raise ConfigError("config", "no config file to reload")
    settings = load_settings(path)
    if settings.paths != current.paths:
        raise ConfigError("paths", "paths cannot change on reload; restart the service")
    return settings


def name_key_for(settings: Settings) -> bytes | None:
    """The audit name key, created on first use (a pipeline with hash_names = true)."""
    if not any(p.hash_names for p in settings.pipeline):
        return None
    return load_name_key(settings.paths.state)
