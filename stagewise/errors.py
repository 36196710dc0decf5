"""User-facing errors.

Anything a user can cause (a bad recipe, missing data, a corrupt checkpoint) is raised
as a `StagewiseError` subclass with a one-line message naming the thing and what would
be valid. The CLI prints that line and exits with status 2; nothing else is printed.
Internal invariants use plain asserts instead.
"""


class StagewiseError(Exception):
    """Base class: a one-line, user-actionable error."""


class ConfigError(StagewiseError):
    """A recipe or override is invalid (unknown key, wrong type, impossible value)."""


class DataError(StagewiseError):
    """Data cannot be read, tokenized or trusted (missing, empty, undecodable, mismatched)."""


class CheckpointError(StagewiseError):
    """A checkpoint or run directory is missing, incomplete or does not match."""
