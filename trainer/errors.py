"""User-facing errors: each one names the problem and the fix, and the CLIs turn it into one line
on stderr and a non-zero exit."""


class GLMError(Exception):
    """Base class of every error meant for the user rather than a traceback."""


class ConfigError(GLMError):
    """A configuration or layout that cannot work."""


class DataError(GLMError):
    """Input text, data files or tokenizer that cannot be used."""


class CheckpointError(GLMError):
    """A checkpoint that is missing, corrupted or does not match the model."""
