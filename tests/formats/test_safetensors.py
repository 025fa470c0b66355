"""memopt.formats.safetensors: zero-copy mapped safetensors, views of the file's pages, no second
copy, pages given back; the writer's reserved writes. (Releasing and populating pages themselves:
tests/core/test_pages.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import proc_status
from memopt.core.pages import span_of
from memopt.formats.safetensors import SafetensorsReader, SafetensorsWriter
from memopt.models import SafetensorsSource

MB = 1 << 20


def test_values_and_metadata(weights: tuple[Path, dict[str, torch.Tensor]]) -> None:
    folder, tensors = weights
    src = SafetensorsReader(folder)
    assert set(src.names()) == set(tensors)
    for name, t in tensors.items():
        got = src.get(name)
        assert got.dtype == t.dtype and tuple(got.shape) == tuple(t.shape)
        assert torch.equal(got, t)
        assert src.nbytes(name) == t.numel() * t.element_size()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_zero_copy_load_and_release(weights: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """Loading and reading 32 MB of weights adds no anonymous memory (the bytes are the page
    cache's, mapped); the views' data pointers lie in the mapping; release() gives the pages back."""
    folder, _ = weights
    src = SafetensorsReader(folder)
    whole = src.mapped_span()
    anon0, file0 = proc_status("RssAnon"), proc_status("RssFile")
    views = [src.get(f"layers.{i}.weight") for i in range(4)]
    total = float(sum(v.sum() for v in views))  # touch every byte
    assert total == total  # not NaN: the data was really read
    assert proc_status("RssAnon") - anon0 < 4 * MB  # no second copy of the 32 MB
    assert proc_status("RssFile") - file0 > 28 * MB  # the mapped pages are what is resident
    for v in views:
        s = span_of(v)
        assert whole.start <= s.start and s.end <= whole.end
    src.release_all()
    assert proc_status("RssFile") - file0 < 4 * MB  # pages given back, data still there:
    assert torch.equal(views[0], src.get("layers.0.weight"))


def test_read_rows_copies_exactly_the_rows(weights: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """pread rows equal the mapped rows in the index's shape, own their memory, and an index past
    the end is refused in one line."""
    folder, tensors = weights
    src = SafetensorsReader(folder)
    idx = torch.tensor([[3, 0, 1023], [7, 7, 512]])  # (2, 3)
    got = src.read_rows("layers.2.weight", idx)  # (2, 3, 2048)
    assert got.shape == (2, 3, 2048)
    assert torch.equal(got, tensors["layers.2.weight"][idx])
    whole = src.mapped_span()
    assert not whole.start <= got.data_ptr() < whole.end  # a copy, not a view of the mapping
    assert src.read_rows("layers.2.weight", torch.tensor([], dtype=torch.long)).shape == (0, 2048)
    with pytest.raises(IndexError, match="out of range"):
        src.read_rows("layers.2.weight", torch.tensor([1024]))


def test_read_copies_a_row_range(weights: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """One pread of a whole tensor or of rows r0:r1: the mapped values, an own 64-byte aligned
    buffer (ATen's int8 kernel needs it), nothing mapped; a range past the end is refused."""
    folder, tensors = weights
    src = SafetensorsReader(folder)
    want = tensors["layers.2.weight"]  # (1024, 2048)
    whole = src.mapped_span()
    for got, ref in ((src.read("layers.2.weight"), want),
                     (src.read("layers.2.weight", 5, 700), want[5:700]),
                     (src.read("layers.2.weight", 9, 9), want[9:9])):  # fmt: skip
        assert got.shape == ref.shape and torch.equal(got, ref)
        assert not whole.start <= got.data_ptr() < whole.end and got.data_ptr() % 64 == 0
    with pytest.raises(IndexError, match="out of range"):
        src.read("layers.2.weight", 0, 1025)


def test_safetensors_source_mmap_option(weights: tuple[Path, dict[str, torch.Tensor]]) -> None:
    folder, tensors = weights
    mapped = SafetensorsSource(folder, mmap=True)
    plain = SafetensorsSource(folder)
    for name in tensors:
        assert torch.equal(mapped.get(name), plain.get(name))
    t = mapped.get("layers.1.weight")
    span = mapped.span("layers.1.weight")
    assert t.data_ptr() == span.start and span.nbytes == 8 * MB
    assert mapped.get("layers.1.weight", torch.float16).dtype == torch.float16


def test_reserved_tensor_is_written_in_its_place(tmp_path):
    layout = [("a", torch.float32, (3, 4)), ("b", torch.int8, (5,)), ("c", torch.uint8, (2, 2))]
    ts = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int8), "c": torch.ones(2, 2)}
    ts["c"] = ts["c"].to(torch.uint8)
    w1 = SafetensorsWriter(tmp_path / "x.safetensors", layout)
    for name, _, _ in layout:
        w1.write(name, ts[name])
    w1.close()
    w2 = SafetensorsWriter(tmp_path / "y.safetensors", layout)
    w2.reserve("a")  # first in the file, written last
    w2.write("b", ts["b"])
    w2.reserve("c")
    w2.write("c", ts["c"])
    w2.write("a", ts["a"])
    w2.close()
    assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "y.safetensors").read_bytes()
    w3 = SafetensorsWriter(tmp_path / "z.safetensors", layout)
    w3.reserve("a")
    w3.write("b", ts["b"])
    w3.write("c", ts["c"])
    with pytest.raises(ValueError, match="1 planned tensors were not written"):
        w3.close()
