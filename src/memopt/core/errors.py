"""The one exception type that the command line turns into a one-line message and exit code 2."""

from __future__ import annotations

__all__ = ["MemoptError", "one_line"]


class MemoptError(Exception):
    """A problem with the user's input (a path, a file, an option), stated in one line.

    The CLI prints ``memopt: error: <message>`` on stderr and exits with code 2; anything else that
    escapes is a bug in memopt, not in the input.
    """


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (its class name when the message is empty)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
