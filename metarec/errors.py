"""Errors that carry a user-facing sentence (file, field, row, what was expected)."""


class MetarecError(Exception):
    """Base class: the message is shown to the user as is, without a traceback."""


class DataError(MetarecError, ValueError):
    """Input data is missing, malformed or fails a check."""


class LeakageError(MetarecError, AssertionError):
    """A split would let evaluation data reach training."""


class ConfigError(MetarecError, ValueError):
    """params.yaml or a model configuration is invalid."""
