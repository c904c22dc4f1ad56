"""The project's own exception types.

Every problem a user can cause (a bad file, a bad option, a corrupt checkpoint)
raises a subclass of FemtoGPTError with a one-line message; the command line
prints that line and exits with status 2 instead of showing a traceback.
ValueError/TypeError are also base classes so that library users who catch
those (the usual numpy/Python habit) keep working.
"""


class FemtoGPTError(Exception):
    """Base class for every error femtogpt raises on purpose."""


class ConfigError(FemtoGPTError, ValueError):
    """A model or training option is out of range or inconsistent."""


class DataError(FemtoGPTError, ValueError):
    """The training text cannot be used (missing, empty, not UTF-8, too short...)."""


class TokenizerError(FemtoGPTError, ValueError):
    """Text the tokenizer cannot represent, or a bad tokenizer description."""


class CheckpointError(FemtoGPTError, ValueError):
    """A checkpoint file is missing, truncated, corrupt or incompatible."""


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint from before digests loaded: damage to it cannot be detected."""
