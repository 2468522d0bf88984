"""Errors a user can cause. The CLIs catch SwarmError and print its message without a traceback."""


class SwarmError(Exception):
    """Base of every error whose message tells the user what to fix."""


class JobFileError(SwarmError):
    """The job file is missing, is not YAML, or does not match the schema."""


class ModelSourceError(SwarmError):
    """A model checkpoint or preset cannot be used (missing files, unsupported family, mismatch)."""


class SwarmConnectionError(SwarmError):
    """A peer or the coordinator cannot be reached or stopped answering."""


class JoinTimeoutError(SwarmError):
    """Not enough nodes joined in time."""


class RemoteBlockError(SwarmError):
    """A node serving blocks answered a call with an error."""


class CoordinatorTrustError(SwarmError):
    """The coordinator did not prove the key the node trusts (its pin, or the key remembered on first use)."""
