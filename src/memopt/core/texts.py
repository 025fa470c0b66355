"""The bundled texts: evaluation and calibration text that ships with every CPython.

``pydoc_data.topics`` (the Python documentation, English prose) is available offline and the same
on every machine with the same Python. Evaluation reads :data:`EVAL_TOPICS`; calibration reads
:data:`CALIB_TOPICS`, which share no topic with them; distillation trains on the calibration topics
and is scored on the others (:func:`heldout_topics`).

Held-out texts of other domains (:data:`HELDOUT`), files of the standard library's own folder (so
offline and the same for every machine with the same CPython): ``pydoc`` (the default text above),
``license`` (CPython's LICENSE.txt: legal English), ``news`` (idlelib/NEWS.txt: IDLE's release
notes, terse English about a program's changes) and ``code`` (json/encoder.py + json/decoder.py:
Python source). Quality is reported on each (memopt.evaluate.heldout_perplexities): a user's text is
never the calibration text.

The default calibration set (:func:`mixed_calib_text`) mixes three domains in equal shares, none of
them a held-out text: pydoc's calibration topics (documentation), other standard-library modules
(:data:`CALIB_CODE`: code) and IDLE's older history (:data:`CALIB_PROSE`: release notes of 2001 to
2.x). No legal text is calibrated on: ``license`` is a domain calibration never sees.
"""

from __future__ import annotations

import re
import sysconfig
from pathlib import Path

from memopt.core.errors import MemoptError

__all__ = [
    "CALIB_CODE",
    "CALIB_PROSE",
    "CALIB_TOPICS",
    "EVAL_TOPICS",
    "HELDOUT",
    "default_calib_text",
    "default_sentences",
    "default_text",
    "heldout_text",
    "heldout_texts",
    "heldout_topics",
    "mixed_calib_text",
    "read_text",
    "stdlib_file",
    "topics",
]

# Prose-heavy topics of the Python reference, in a fixed order: "Execution model" and "The standard
# type hierarchy" (pydoc_data.topics keys; calibration text must come from other topics).
EVAL_TOPICS = ("execmodel", "types")

# Topics used for calibration: the language reference's statements, strings, sequences, mappings,
# the debugger; none of the Data model (chapter 3) or Execution model (chapter 4) sections that
# evaluation reads (and the Data model's own sections on Pythons whose topics split it: "types",
# "specialnames", "customization", ...).
CALIB_TOPICS: tuple[str, ...] = (
    "compound",
    "formatstrings",
    "string-methods",
    "typesseq",
    "debugger",
    "typesmapping",
    "assignment",
    "comparisons",
    "strings",
    "import",
    "try",
    "operator-summary",
    "calls",
    "function",
    "typesseq-mutable",
    "identifiers",
    "async",
    "raise",
    "binary",
    "with",
    "class",
)

# Held-out texts: name -> files under the standard library's folder (joined by a blank line);
# "pydoc" is default_text(). None of these files is read by calibration.
HELDOUT: dict[str, tuple[str, ...]] = {
    "pydoc": (),
    "license": ("LICENSE.txt",),
    "news": ("idlelib/NEWS.txt",),
    "code": ("json/encoder.py", "json/decoder.py"),
}

# Calibration's code and prose shares: standard-library files that no held-out text reads.
CALIB_CODE = ("heapq.py", "textwrap.py", "string.py", "bisect.py", "fractions.py")
CALIB_PROSE = ("idlelib/HISTORY.txt", "idlelib/NEWS2x.txt")
# Characters of each domain in the mixed calibration text (about 5-6k tokens each: the default
# 32 x 256 or 64 x 256 windows spread evenly over it cover each domain alike).
CALIB_SHARE_CHARS = 24_000


def stdlib_file(rel: str) -> str:
    """The text of a file of the standard library's folder (``sysconfig`` ``stdlib``)."""
    p = Path(sysconfig.get_paths()["stdlib"]) / rel
    try:
        return p.read_text(encoding="utf-8")
    except OSError:
        raise MemoptError(f"{p}: this Python's standard library has no such file") from None


def heldout_text(name: str) -> str:
    """One held-out text of :data:`HELDOUT` by name."""
    if name not in HELDOUT:
        raise MemoptError(f"unknown held-out text {name!r} (one of {', '.join(HELDOUT)})")
    if name == "pydoc":
        return default_text()
    return "\n\n".join(stdlib_file(rel) for rel in HELDOUT[name])


def heldout_texts(names: tuple[str, ...] | list[str] | None = None) -> dict[str, str]:
    """name -> text for ``names`` (default: every held-out text this Python has; a missing file
    leaves its text out, unless it was asked for by name)."""
    out = {}
    for name in names if names is not None else HELDOUT:
        try:
            out[name] = heldout_text(name)
        except MemoptError:
            if names is not None:
                raise
    return out


def mixed_calib_text() -> str:
    """The default calibration text: documentation, code and prose, ``CALIB_SHARE_CHARS`` each
    (cut at a line end), in that order; none of it is in a held-out text."""
    docs = default_calib_text()
    code = "\n\n".join(_present(CALIB_CODE))
    prose = "\n\n".join(_present(CALIB_PROSE))
    # IDLE's older notes repeat some entries of the held-out notes (fixes released on both
    # branches): a paragraph sharing a line with a held-out text is left out
    held = set().union(*(_long_lines(t) for t in heldout_texts().values()))
    parts = [_without(t, held) for t in (docs, code, prose)]
    return "\n\n".join(_cut(t, CALIB_SHARE_CHARS) for t in parts if t)


def _long_lines(text: str) -> set[str]:
    """The stripped lines of 40 characters or more: what a shared passage has in common."""
    return {ln.strip() for ln in text.splitlines() if len(ln.strip()) >= 40}


def _without(text: str, lines: set[str]) -> str:
    """``text`` less its paragraphs (blank-line separated) that contain one of ``lines``."""
    paras = re.split(r"\n\s*\n", text)
    return "\n\n".join(p for p in paras if not _long_lines(p) & lines)


def _present(files: tuple[str, ...]) -> list[str]:
    out = []
    for rel in files:
        try:
            out.append(stdlib_file(rel))
        except MemoptError:
            continue  # a Python packaged without it (idlelib is optional on some systems)
    return out


def _cut(text: str, chars: int) -> str:
    if len(text) <= chars:
        return text
    end = text.rfind("\n", 0, chars)
    return text[: end if end > 0 else chars]


def topics() -> dict[str, str]:
    """Every topic of ``pydoc_data.topics``: name -> text."""
    from pydoc_data.topics import topics as all_topics

    return all_topics


def default_text() -> str:
    """The fixed evaluation excerpt: the prose topics :data:`EVAL_TOPICS`."""
    return "\n\n".join(topics()[name] for name in EVAL_TOPICS)


def read_text(path: str | Path | None) -> str:
    """A user's text file (UTF-8, not empty), or :func:`default_text` for None."""
    if path is None:
        return default_text()
    p = Path(path)
    if not p.is_file():
        raise MemoptError(f"no such text file: {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MemoptError(f"{path}: not UTF-8 text") from None
    if not text.strip():
        raise MemoptError(f"{path}: the text file is empty")
    return text


def default_sentences(n: int = 64) -> list[str]:
    """``n`` fixed sentences of 40–300 characters from the default text, in order."""
    flat = re.sub(r"\s+", " ", default_text())
    out = [s.strip() for s in re.split(r"(?<=[.!?])\s+", flat) if 40 <= len(s.strip()) <= 300]
    if len(out) < n:
        raise MemoptError(f"the default text has only {len(out)} sentences, {n} asked")
    return out[:n]


def default_calib_text() -> str:
    """The calibration text: :data:`CALIB_TOPICS` of ``pydoc_data.topics`` (those present)."""
    have = topics()
    parts = [have[t] for t in CALIB_TOPICS if t in have and t not in EVAL_TOPICS]
    if not parts:
        raise MemoptError("pydoc_data.topics has none of the calibration topics")
    return "\n\n".join(parts)


def heldout_topics() -> list[str]:
    """Topics that calibration (and distillation's training text) never reads: the evaluation
    topics first, then every other topic that is not a calibration topic, sorted."""
    have = topics()
    rest = sorted(t for t in have if t not in CALIB_TOPICS and t not in EVAL_TOPICS)
    return [t for t in EVAL_TOPICS if t in have] + rest
