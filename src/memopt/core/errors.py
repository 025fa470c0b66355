"""The one exception type that the command line turns into a one-line message and exit code 2."""

from __future__ import annotations

__all__ = ["MemoptError", "flat", "one_line"]


class MemoptError(Exception):
    """A problem with the user's input (a path, a file, an option), stated in one line.

    The CLI prints ``memopt: error: <message>`` on stderr and exits with code 2; anything else that
    escapes is a bug in memopt, not in the input.
    """


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (its class name when the message is empty)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def flat(exc: BaseException, limit: int = 300) -> str:
    """An exception's whole message on one line (its lines joined), cut at ``limit`` characters:
    for libraries whose first line says only "validation error:" and the reason comes after."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
