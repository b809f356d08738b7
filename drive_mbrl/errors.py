"""The package's user-facing error type.

`DriveMbrlError` is raised for anything the *user* can fix (a bad config value, a missing scenario, a corrupt file);
its message says what was wrong and how to fix it. The CLI prints it without a traceback and exits non-zero.
Programming errors stay ordinary exceptions with tracebacks.
"""


class DriveMbrlError(Exception):
    """A problem with the user's input, files or environment; the message says what to fix."""


class ConfigError(DriveMbrlError):
    """A configuration value or scenario file is invalid; the message names the key and the allowed values."""


class DataError(DriveMbrlError):
    """A dataset file or manifest is missing, truncated, corrupt or of another schema version."""
