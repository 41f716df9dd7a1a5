"""The one exception type for bad input; click prints it as a single line and exits 1."""

import click


class VocabTrimError(click.ClickException):
    """A user-facing error: its text names the problem and the fix."""

    def __init__(self, message: str):
        super().__init__(message)
        self.args = (message,)
