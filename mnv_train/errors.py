"""The one exception type users see: a bad recipe, missing data, a broken checkpoint.

The CLIs print these as a single line and exit with status 2; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with what the user gave us, explained in one line."""


def one_line(error: BaseException) -> str:
    """The message of a UserError, also when a DataLoader worker re-raised it with its traceback inside."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    for kind in {UserError, type(error)} if isinstance(error, UserError) else {UserError}:
        prefix = f'{kind.__module__}.{kind.__qualname__}: '
        if last.startswith(prefix):
            return last[len(prefix):]
    return last


def summary(error: BaseException) -> str:
    """One line for any error: a UserError's message, or another error's type and message (for the ranks that did
    not meet it, while the rank that did keeps its traceback)."""
    return one_line(error) if isinstance(error, UserError) else f'{type(error).__name__}: {one_line(error)}'
