"""Errors an auditor or the coordinator can cause; the CLI prints their message without a traceback."""

from swarm.errors import SwarmError


class AuditError(SwarmError):
    """Base of the audit log's user errors."""


class AuditLogNotFoundError(AuditError):
    """The run directory or audit.db does not exist."""


class NotAnAuditLogError(AuditError):
    """The file exists but is not an SQLite audit log of this format."""


class EntryNotFoundError(AuditError):
    """An entry index outside the log, or an entry no signed tree head covers yet."""


class AttestationError(AuditError):
    """An attestation the log refuses: malformed, unsigned by its node, unknown node, wrong job, replayed."""


class EventError(AuditError):
    """A coordinator event that is missing a field its kind requires, or signed by the wrong key."""


class ProofFileError(AuditError):
    """An inclusion-proof file that is missing or not a proof in our JSON format."""
