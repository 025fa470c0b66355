"""memopt.core.pages: where a tensor's bytes live (span_of), giving a mapping's pages back
(release) and bringing them in (populate)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import proc_status
from memopt.core.pages import populate, release, span_of
from memopt.formats.safetensors import SafetensorsReader

MB = 1 << 20


def test_span_of_is_the_tensors_bytes() -> None:
    t = torch.zeros(3, 5, dtype=torch.float16)
    s = span_of(t)
    assert s.start == t.data_ptr() and s.nbytes == 3 * 5 * 2 and s.end == s.start + s.nbytes


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_release_gives_back_the_folios_around_a_span(
    weights: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    """Releasing one tensor's span unmaps what populating it mapped of its neighbours too (the
    fault-around window: 40-60 kB of them stayed mapped when only the span's pages were
    released), and leaves the data readable."""
    folder, tensors = weights
    src = SafetensorsReader(folder)
    src.release_all()
    file0 = proc_status("RssFile")
    populate([src.span("layers.1.weight")])
    assert proc_status("RssFile") - file0 >= 8 * MB
    release([src.span("layers.1.weight")])
    assert proc_status("RssFile") - file0 < 16 << 10  # nothing of it or its neighbours stays mapped
    assert torch.equal(src.get("layers.1.weight"), tensors["layers.1.weight"])
