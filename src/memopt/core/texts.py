"""The bundled texts: evaluation and calibration text that ships with every CPython.

``pydoc_data.topics`` (the Python documentation, English prose) is available offline and the same
on every machine with the same Python. Evaluation reads :data:`EVAL_TOPICS`; calibration reads
:data:`CALIB_TOPICS`, which share no topic with them; distillation trains on the calibration topics
and is scored on the others (:func:`heldout_topics`).
"""

from __future__ import annotations

import re
from pathlib import Path

from memopt.core.errors import MemoptError

__all__ = [
    "CALIB_TOPICS",
    "EVAL_TOPICS",
    "default_calib_text",
    "default_sentences",
    "default_text",
    "heldout_topics",
    "read_text",
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
