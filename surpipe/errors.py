"""User-facing errors: the CLI prints these as one clear message and exits non-zero."""


class SurpipeError(Exception):
    """An error caused by the user's input, data or models, not by a bug in surpipe.

    ``problems`` holds every problem found when a check reports several at once.
    """

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = list(problems or [])
        if self.problems:
            message = message + "\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its class name when the message is empty): the
    part of a library's error worth showing in a one-line SurpipeError."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
