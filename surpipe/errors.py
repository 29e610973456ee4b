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


def first_line(e: BaseException, empty: str | None = None) -> str:
    """The first line of an exception's message (``empty``, by default its class name, when the
    message is empty): the part of a library's error worth showing in a one-line SurpipeError."""
    return (str(e).strip().splitlines() or [type(e).__name__ if empty is None else empty])[0]
