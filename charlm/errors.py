"""The one exception type that reaches the user as a one-line message."""


class CharlmError(Exception):
    """A problem with the user's input or environment, explained in one line.

    The CLI prints ``str(error)`` and exits non-zero; nothing else is shown.
    """
