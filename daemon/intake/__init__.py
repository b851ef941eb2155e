"""Intake: from an inbox entry to a claimed, hashed, journaled file in the spool (main loop)."""

from daemon.intake.intake import CLAIM_CHUNK, Intake
from daemon.intake.refusal import is_ignored, kind_of, recorded_name, refusal, spool_suffix

__all__ = [
    "CLAIM_CHUNK",
    "Intake",
    "is_ignored",
    "kind_of",
    "recorded_name",
    "refusal",
    "spool_suffix",
]
