"""Errors that mean "the input is wrong", as opposed to a bug.

The command-line entry points print these as one message and exit non-zero instead of
showing a traceback.
"""


class HJEPAError(Exception):
    """Base class: the message says what was expected and where."""


class ConfigError(HJEPAError):
    """An invalid config value, key or combination."""


class DataError(HJEPAError):
    """Missing data, a wrong folder layout, or an unusable dataset."""


class MissingDataError(DataError):
    """A dataset that is not there (yet): its root or its files are absent."""


class CheckpointError(HJEPAError):
    """A missing, corrupt or incompatible checkpoint."""


class OutputError(HJEPAError):
    """The run's outputs cannot be written (a full disk, a read-only folder)."""


class NonFiniteLossError(HJEPAError):
    """Training produced a NaN or infinite loss."""
