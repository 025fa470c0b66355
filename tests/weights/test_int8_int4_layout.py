"""int8's default (grouped lookups, bfloat16-valued scales), int4 stored in the kernel's layout."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import assert_similar
from memopt.core.modules import model_bytes
from memopt.formats.manifest import MANIFEST, WEIGHTS, read_manifest
from memopt.models import load_model
from memopt.models import saved as io
from memopt.quant import Int4WeightOnly, Int8WeightOnly, quantize_
from memopt.weights import Int4Weight, Int8Weight
from memopt.weights.kernels import int4_block_n
from memopt.weights.quantized import int4_relayout


def test_int8_scales_are_bfloat16_values_and_codes_round_against_them():
    w = torch.randn(64, 256) * torch.rand(64, 1) * 3  # rows of different ranges
    q = Int8Weight(w)
    assert torch.equal(q.scale, q.scale.to(torch.bfloat16).float())  # what the fused kernel uses
    err = (q.dequantize() - w).abs()  # (N, K)
    assert bool((err <= q.scale / 2 * (1 + 1e-6)).all())  # within half a step of the stored scale


def test_int8_groups_lookup_only_embeddings_and_keeps_tied_ones_per_channel(tiny_folder):
    class Enc(nn.Module):  # an encoder-like toy: an untied embedding and a Linear
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 256)
            self.fc = nn.Linear(256, 64)

    enc = Enc()
    quantize_(enc, Int8WeightOnly())
    assert enc.emb.qweight.group_size == 128 and enc.emb.qweight.scale.shape == (50, 2)
    assert enc.fc.qweight.group_size is None  # the fused per-channel kernel
    assert Int8WeightOnly(embedding_group_size=96).group_for(256, True) is None  # 96 ∤ 256
    assert Int8WeightOnly(group_size=32).group_for(256, True) == 32  # explicit: everywhere

    llama = load_model(tiny_folder("llama")).model  # tied lm_head: a matmul weight
    quantize_(llama, Int8WeightOnly())
    assert llama.lm_head.qweight is llama.model.embed_tokens.qweight
    assert llama.lm_head.qweight.group_size is None


def test_minilm_int8_default_meets_the_issue_targets():
    """Issue 4: whole-model int8 <= 0.27x float32 bytes and cosine_min >= 0.999 (64 sentences).
    Measured 0.2561x and 0.99920 (per channel everywhere: 0.99900-0.99915). The float32 reference
    is loaded here, not the session fixture, which other tests may have transformed."""
    from memopt.evaluate import embedding_cosine

    minilm = load_model("minilm")
    q = load_model("minilm")
    report = quantize_(q.model, Int8WeightOnly())
    assert report.bytes_after <= 0.27 * model_bytes(minilm.model)
    assert "embeddings.word_embeddings" in report.modules  # whole model, not Linears only
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: one thread is as fast, and robust on a busy machine
    try:
        assert embedding_cosine(q, minilm).cosine_min >= 0.999
    finally:
        torch.set_num_threads(threads)


def test_int4_is_saved_in_the_kernel_layout_and_converted_only_when_needed(tiny_folder, tmp_path):
    loaded = load_model(tiny_folder("llama"))
    quantize_(loaded.model, Int4WeightOnly(group_size=32))
    io.save(loaded, tmp_path / "q")
    manifest = read_manifest(tmp_path / "q")
    spec = manifest["weights"]["model.embed_tokens.qweight"]
    n = spec["shape"][0]
    assert spec["block_n"] == int4_block_n(n)  # recorded (None where the CPU kernel is missing)
    from safetensors.torch import load_file

    disk = load_file(str(tmp_path / "q" / WEIGHTS))
    qw = loaded.model.model.embed_tokens.qweight
    assert torch.equal(disk["model.embed_tokens.qweight.packed"], qw.packed)  # bytes as in RAM
    back = load_model(tmp_path / "q").model
    assert torch.equal(back.model.embed_tokens.qweight.packed, qw.packed)

    # a folder in the portable layout (along K: an older memopt, or another CPU's kernel) loads
    # into this CPU's layout, to the same buffers
    canon = tmp_path / "canon"
    io.save(loaded, canon)
    m = json.loads((canon / MANIFEST).read_text())
    tensors = load_file(str(canon / WEIGHTS))
    for key, s in m["weights"].items():
        if s["format"] == "int4":
            k = s["shape"][1]
            p = tensors[f"{key}.packed"]
            tensors[f"{key}.packed"] = int4_relayout(p, k, s["block_n"], None).contiguous()
            s["block_n"] = None
    from safetensors.torch import save_file

    save_file(tensors, str(canon / WEIGHTS))
    (canon / MANIFEST).write_text(json.dumps(m))
    again = load_model(canon).model
    for name, buf in back.named_buffers():
        assert torch.equal(buf, dict(again.named_buffers())[name]), name
    ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, loaded.model(ids).logits)


def test_int4_relayout_round_trips():
    from memopt.weights.primitives import pack, pack_int4_nblock

    codes = torch.randint(0, 16, (256, 64), dtype=torch.uint8)
    canon = pack(codes, 4)  # (256, 32) along K
    for b in (16, 32, 64):
        inter = int4_relayout(canon, 64, None, b)
        assert torch.equal(inter, pack_int4_nblock(codes, b))
        assert torch.equal(int4_relayout(inter, 64, b, None), canon)
        assert torch.equal(int4_relayout(inter, 64, b, 32), pack_int4_nblock(codes, 32))


def test_int4_decode_path_is_the_chosen_kernel_without_the_tuner():
    """Once the tuner chose ATen's int4 kernel for a shape, later calls go straight to it (the
    decode path: no candidate closures): same output, bit for bit."""
    from memopt.weights import kernels

    qw = Int4Weight(torch.randn(256, 128), group_size=64)
    if qw.block_n is None:
        pytest.skip("no CPU int4 kernel layout on this machine")
    x = torch.randn(1, 128)
    key = kernels._key("int4", x, 256, 128)
    kernels._CHOSEN[key] = "int4_aten_bf16"
    try:
        y = qw.linear(x)
        assert torch.equal(y, kernels._int4_aten(x, qw.packed, 64, qw.scale_zero))
        ref = x @ qw.dequantize().t()  # float32 reference of the dequantized weight
        assert_similar(y, ref, min_cosine=0.999)  # bf16 activations
    finally:
        kernels._CHOSEN.pop(key, None)
