"""Errors a user can cause. The CLI prints them as one red line and exits with ``exit_code``.

Exit codes: 2 for a bad command line, option, name, configuration or input file (``SegError``);
1 for a check that ran and found problems (``CheckFailed``). Anything else is a bug and shows a traceback.
"""


class SegError(Exception):
    """A problem the user can fix; the message names the file or option and what is wrong."""

    exit_code = 2


class ConfigError(SegError):
    """A bad experiment, registry file, ``--set`` override or plugin option."""


class UnknownPluginError(ConfigError):
    """A plugin name that no installed plugin registered."""


class DataError(SegError):
    """An unreadable, malformed or inconsistent input image, label map or dataset."""


class CheckpointError(SegError):
    """A checkpoint that is missing, truncated, unsafe or does not fit the model."""


class CheckFailed(SegError):
    """A check (``seg data check``) ran and found problems; they were already reported."""

    exit_code = 1
