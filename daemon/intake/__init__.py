"""Intake: from an inbox entry to a claimed, hashed, journaled file in the spool (main loop).

Nothing is imported here: the claimer process (`daemon.intake.claimer`) imports only what a
claim needs, not the service.
"""
