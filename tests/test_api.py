"""The public API: every exported name resolves; nothing else is exported."""

from __future__ import annotations

import pytest

import memopt


def test_every_exported_name_resolves() -> None:
    for name in memopt.__all__:
        assert getattr(memopt, name) is not None


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError):
        memopt.does_not_exist  # noqa: B018
