"""User-facing errors.

Anything a user can cause (a bad flag, a malformed config, a size that cannot
fit) raises a subclass of `KVForgeError` with a message that names the limit.
The CLI turns these into one line on stderr and exit code 2; everything else
is a bug and keeps its traceback.
"""


class KVForgeError(ValueError):
    """A problem with the user's input, explained in the message."""


class ConfigError(KVForgeError):
    """A model name, config file or checkpoint that cannot be used."""


class PlanError(KVForgeError):
    """Sizes that are impossible: non-positive, or more than the memory holds."""


def positive_int(name: str, value: object, error: type[KVForgeError] = KVForgeError) -> int:
    """`value` if it is a positive integer (not a bool), else `error` naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise error(f"{name} must be a positive integer, got {value!r}")
    return value


class EngineDeadError(KVForgeError):
    """The engine cannot run another step (a tensor-parallel rank is gone): every request
    in flight has ended with this error, and a server stops."""
