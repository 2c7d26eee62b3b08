"""The one exception type the CLI turns into a single clear line and a non-zero exit."""


class LoupeError(Exception):
    """A user-facing error: bad input, a missing service, a corrupt file.

    The message is one line that says what went wrong and what to do about it. The CLI prints
    ``loupe: error: <message>`` and exits with status 2; no traceback is shown.
    """
