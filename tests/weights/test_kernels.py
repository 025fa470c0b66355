"""memopt.weights.kernels: the chooser, timed and untimed."""

from __future__ import annotations

import torch

from memopt.weights import kernels


def _counting(calls: dict[str, int], name: str, value: float):
    def run() -> torch.Tensor:
        calls[name] = calls.get(name, 0) + 1
        return torch.tensor(value)

    return run


def test_timed_choice_runs_every_candidate_and_keeps_one() -> None:
    calls: dict[str, int] = {}
    key = ("test-timed", 1)
    cands = {n: _counting(calls, n, v) for n, v in (("a", 1.0), ("b", 2.0))}
    out = kernels.autotune(key, cands, default="b")
    assert calls["a"] == 6 and calls["b"] == 6  # warm-up + 5 timed rounds each
    assert kernels._CHOSEN[key] in ("a", "b")
    assert float(out) == (1.0 if kernels._CHOSEN[key] == "a" else 2.0)


def test_untimed_choice_runs_only_the_default_once() -> None:
    before = kernels.set_untimed(True)
    try:
        calls: dict[str, int] = {}
        key = ("test-untimed", 1)
        cands = {n: _counting(calls, n, v) for n, v in (("a", 1.0), ("b", 2.0))}
        assert float(kernels.autotune(key, cands, default="b")) == 2.0
        assert calls == {"b": 1} and kernels._CHOSEN[key] == "b"

        def broken() -> torch.Tensor:
            raise RuntimeError("unsupported here")

        key2 = ("test-untimed-fallback", 1)
        out = kernels.autotune(key2, {"a": _counting(calls, "a", 1.0), "b": broken}, default="b")
        assert float(out) == 1.0 and kernels._CHOSEN[key2] == "a"  # the default failed: next one
    finally:
        kernels.set_untimed(before)
    assert kernels.set_untimed(before) is before  # restored
