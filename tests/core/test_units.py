"""memopt.core.units: byte sizes as the command line takes them (``--max-memory 135MB``)."""

from __future__ import annotations

import pytest

from memopt.core.errors import MemoptError
from memopt.core.units import parse_size


def test_parse_size() -> None:
    assert parse_size("135MB") == 135_000_000
    assert parse_size("1.5GiB") == 3 * 2**29
    assert parse_size("4096") == parse_size(4096) == 4096
    for bad in ("lots", "-5MB", "0", "12 parsecs"):
        with pytest.raises(MemoptError):
            parse_size(bad)
