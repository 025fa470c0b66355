"""Process RSS: this process's figures, and a fresh child's peak for one piece of work."""

from __future__ import annotations

import mmap

import pytest

from memopt.core.errors import MemoptError
from memopt.core.rss import (
    ChildProcessFailed,
    current_rss_bytes,
    peak_rss_bytes,
    run_in_child,
)

MB = 10**6
MIB = 2**20


def allocate_and_touch(nbytes: int, tag: str = "") -> dict:
    """Child work: hold ``nbytes`` of written memory (bytes * n writes every page)."""
    block = b"\x01" * nbytes
    return {"held": len(block), "tag": tag}


def refuse(path: str) -> None:
    """Child work: fail the way memopt fails on bad input."""
    raise MemoptError(f"no model at {path}\nsecond line that must not travel")


def test_own_process_figures() -> None:
    now, peak = current_rss_bytes(), peak_rss_bytes()
    assert 10 * MB < now <= peak * 1.05  # ru_maxrss is the high-water mark (sampled in pages)
    # A fresh anonymous mapping: malloc could serve a bytes object from heap memory that earlier
    # tests freed but that is still resident, and RSS would not move.
    held = mmap.mmap(-1, 50 * MB)
    held.write(b"\x01" * (50 * MB))  # touches every page (the temporary itself may reuse the heap)
    assert peak_rss_bytes() >= peak
    assert current_rss_bytes() > now + 40 * MB
    held.close()


def test_child_peak_counts_the_work_not_the_imports() -> None:
    # 200 MiB (209.7 MB): the kernel updates RSS counters in batches (tens of pages per thread),
    # so exactly 200 MB can read a few hundred kB short; the MiB gives the bound room.
    out = run_in_child(allocate_and_touch, 200 * MIB, kwargs={"tag": "x"})
    assert out["held"] == 200 * MIB and out["tag"] == "x"  # the function's result, returned as is
    extra = out["peak_rss_bytes"] - out["baseline_rss_bytes"]
    assert 200 * MB <= extra < 300 * MB
    assert out["baseline_rss_bytes"] > 0 and out["seconds"] >= 0


def test_memopt_error_in_child_comes_back_as_memopt_error() -> None:
    with pytest.raises(MemoptError) as info:
        run_in_child(f"{__name__}:refuse", "/nowhere")
    assert str(info.value) == "no model at /nowhere"


def test_other_errors_come_back_with_the_child_message() -> None:
    # A standard-library target keeps this child fast (no torch import).
    with pytest.raises(ChildProcessFailed, match=r"^JSONDecodeError: Expecting value") as info:
        run_in_child("json:loads", "not json")
    assert info.value.exc_type == "JSONDecodeError"
    assert "Traceback" in info.value.stderr
    out = run_in_child("json.loads", "[1, 2]")  # a non-dict result comes under "result"
    assert out["result"] == [1, 2]


def test_unimportable_targets_are_refused_here() -> None:
    def local() -> None:
        pass

    with pytest.raises(ValueError, match="importable"):
        run_in_child(local)
    with pytest.raises(ChildProcessFailed, match="ModuleNotFoundError"):
        run_in_child("memopt_no_such_module:fn")
