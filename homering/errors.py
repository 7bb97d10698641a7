"""The one exception type that the command line turns into a clean error line."""


class HomeringError(Exception):
    """A user-facing error: the CLI prints ``homering: error: <message>`` and exits 2.

    Raise it (or a subclass) for anything the user can fix: an unknown model
    name, a missing or corrupt file, a broker that cannot be reached.
    """

    exit_code = 2


class ModelError(HomeringError):
    """A model cannot be resolved, downloaded, verified or parsed."""
