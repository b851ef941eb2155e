"""The audit log: typed events, the hash-chained writer, name hashing, verification, rebuild."""

from daemon.audit.events import AuditEvent, Record
from daemon.audit.names import (
    NameKeyError,
    hash_name,
    load_chain_key,
    load_name_key,
    read_chain_key,
    read_name_key,
)
from daemon.audit.verify import VerifyReport, read_lines, verify
from daemon.audit.writer import AuditLog, AuditLogCorruptError, TolerantAuditLog

__all__ = [
    "AuditEvent",
    "AuditLog",
    "AuditLogCorruptError",
    "NameKeyError",
    "Record",
    "TolerantAuditLog",
    "VerifyReport",
    "hash_name",
    "load_chain_key",
    "load_name_key",
    "read_chain_key",
    "read_lines",
    "read_name_key",
    "verify",
]
