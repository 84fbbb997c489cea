"""User-facing errors: the CLI prints them as one line and exits non-zero, without a traceback."""


class SrcrError(Exception):
    """A problem with the user's input or environment; the message names the fix."""

    exit_code = 2
