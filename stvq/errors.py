"""The exception types stvq raises for bad input; the CLI prints them as one line on stderr."""


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of a library's message (torch's and safetensors' run to several), for our one line."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else ""


class StvqError(Exception):
    """Base class: a problem the user can fix; the message names the bad value and the fix."""


class ConfigError(StvqError, ValueError):
    """An unknown preset, an unknown config field or an invalid value."""


class OptionRangeError(ConfigError):
    """A command-line value outside the range its option allows, where the range is known only once a model
    or data set is loaded (``--keep`` past the prior's sequence): exit status 2, as click's own range errors."""


class PluginError(StvqError):
    """A plugin is unknown, broken or registered twice."""


class UnknownPluginError(PluginError, KeyError):
    """No plugin of that kind and name is registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class PluginConflictError(PluginError):
    """Two packages register the same kind and name, and a command uses it."""


class CheckpointError(StvqError):
    """A checkpoint is missing, malformed, or does not match its config."""


class TrainingDiverged(StvqError):
    """The loss became NaN or infinite."""
