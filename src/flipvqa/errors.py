"""User-facing errors.

Anything the user can fix (a missing file, a malformed annotation, a checkpoint that does not fit)
raises :class:`FlipVQAError` with one line naming the file and the problem; the CLI prints that line
and exits with status 2 instead of showing a traceback.
"""


class FlipVQAError(Exception):
    """An error caused by the user's input, reported as a single line."""



class Interrupted(Exception):
    """A run stopped by SIGTERM/SIGINT after saving its state; ``code`` is the exit status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code
