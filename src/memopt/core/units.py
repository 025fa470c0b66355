"""Sizes as people write them: ``135MB``, ``1.5GiB``, or plain bytes."""

from __future__ import annotations

import re

from memopt.core.errors import MemoptError

__all__ = ["parse_size"]

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
}


def parse_size(text: str | int) -> int:
    """Bytes of a size: an integer, or a number with a unit (``135MB``, ``1.5GiB``; 1 MB = 10⁶ B)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", str(text))
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _UNITS:
            raise MemoptError(f"not a size: {text!r} (expected e.g. 135MB, 1.5GiB or bytes)")
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise MemoptError(f"a memory size must be positive, got {text!r}")
    return value
