"""User-facing errors.

Anything the user can fix (a bad flag, a missing folder, a broken file) raises
:class:`UserError` with a message that says what is wrong and how to fix it. The CLI prints
it as one line and exits with :data:`EXIT_USER_ERROR`; anything else is a bug.
"""

EXIT_OK = 0
EXIT_FAILURE = 1  # an unexpected failure (a bug, or the machine ran out of something)
EXIT_USER_ERROR = 2  # bad input: flags, files, data folders, checkpoints
EXIT_INTERRUPTED = 130  # Ctrl-C; training saved ``last`` first, so ``--resume`` continues


class UserError(ValueError):
    """A problem the user can fix; the message says how."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message: library errors can run to pages."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
