"""The one exception type for bad input; the command line prints it as a single line and exits 1."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type: the reason shown in a one-line error."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class VocabTrimError(Exception):
    """A user-facing error: its text names the problem and the fix."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
