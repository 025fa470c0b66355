"""Case 2 of the brief: a text classifier trained in float64, served in float32, bfloat16 and int8.

Model (the brief's Keras model in PyTorch): Embedding(1000, 16) over 50 tokens → bidirectional
LSTM(32) → Linear(64 → 16) ReLU → Linear(16 → 1) sigmoid, binary cross-entropy, Adam.

Data: derived from ``pydoc_data.topics`` (the Python documentation that ships with every Python):
each sentence of a *statement* topic (if, while, for, try, with, def, class, return, import, ...)
is labelled 1, each sentence of a *data model / types* topic (numbers, sequences, mappings,
special method names, ...) 0. Words are lower-cased; the 999 most frequent words of the training
split get ids 1-999, every other word is 0; sentences are cut or padded to 50 ids. 80/20 split by
a seeded shuffle.

Serving: float32 and bfloat16 are casts (``memopt.quant``'s ``Cast``); int8 keeps every weight as
int8 with one float32 scale per output row: the Linear layers through ``quantize_(model,
Int8WeightOnly())``, the Embedding and the LSTM through two wrappers here that dequantize their
weights on the fly inside forward (the LSTM's four weight matrices are dequantized to float32 and
the stock LSTM kernel runs on them through ``torch.func.functional_call``; the float copies live
only during the call and the tracker counts them in the peak).

    .venv/bin/python examples/case2_dtypes.py
"""

from __future__ import annotations

import collections
import copy
import random
import re
import time

import torch
from torch import nn

from memopt.measure.tracker import MemoryTracker

__all__ = ["TextClassifier", "load_data", "main"]

VOCAB, LENGTH = 1000, 50
STATEMENTS = (
    "if", "while", "for", "try", "with", "function", "class", "return", "import", "assert",
    "raise", "break", "continue", "global", "nonlocal", "pass", "del", "yield", "assignment",
    "augassign", "exprstmts", "compound", "async",
)  # fmt: skip
DATA_MODEL = (
    "numbers", "typesseq", "typesmapping", "specialnames", "customization", "attribute-access",
    "sequence-types", "numeric-types", "types", "typesfunctions", "typesmethods", "bltin-",
    "context-managers", "descriptors", "datamodel", "objects", "string-methods", "typesnumeric",
)  # fmt: skip


def load_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): (N, 50) int64 ids and (N,) float64 labels."""
    import pydoc_data.topics

    sentences: list[tuple[list[str], int]] = []
    for key, text in pydoc_data.topics.topics.items():
        label = 1 if key.startswith(STATEMENTS) else 0 if key.startswith(DATA_MODEL) else None
        if label is None:
            continue
        for sent in re.split(r"(?<=[.!?])\s+", text):
            words = re.findall(r"[a-z_]+", sent.lower())
            if len(words) >= 4:
                sentences.append((words, label))
    random.Random(seed).shuffle(sentences)
    cut = int(0.8 * len(sentences))
    counts = collections.Counter(w for ws, _ in sentences[:cut] for w in ws)
    ids = {w: i + 1 for i, (w, _) in enumerate(counts.most_common(VOCAB - 1))}

    def encode(part: list[tuple[list[str], int]]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.zeros(len(part), LENGTH, dtype=torch.int64)  # (N, 50), 0 = unknown / padding
        for i, (ws, _) in enumerate(part):
            row = [ids.get(w, 0) for w in ws[:LENGTH]]
            x[i, : len(row)] = torch.tensor(row)
        y = torch.tensor([lab for _, lab in part], dtype=torch.float64)
        return x, y

    return (*encode(sentences[:cut]), *encode(sentences[cut:]))


class TextClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.lstm = nn.LSTM(16, 32, batch_first=True, bidirectional=True)
        self.fc1 = nn.Linear(64, 16)
        self.fc2 = nn.Linear(16, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)  # (B, 50, 16)
        _, (h, _) = self.lstm(x)  # h: (2, B, 32), the last state of each direction
        h = torch.cat([h[0], h[1]], dim=-1)  # (B, 64)
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(h)))).squeeze(-1)  # (B,)


def _rowwise_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: (rows, cols) int8 and (rows, 1) float32 scales."""
    scale = w.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
    return torch.round(w.float() / scale).clamp(-127, 127).to(torch.int8), scale


class Int8Embedding(nn.Module):
    """int8 rows + a float32 scale per row; gathers the rows it needs, then dequantizes them."""

    def __init__(self, emb: nn.Embedding) -> None:
        super().__init__()
        q, s = _rowwise_int8(emb.weight.detach())
        self.register_buffer("qweight", q)  # (V, D) int8
        self.register_buffer("scale", s)  # (V, 1) float32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].float() * self.scale[ids]  # (B, T, D)


class Int8LSTM(nn.Module):
    """An LSTM whose weight matrices are int8 (row scales); biases stay float32. forward
    dequantizes the weights and runs the stock kernel on them (torch.func.functional_call)."""

    def __init__(self, lstm: nn.LSTM) -> None:
        super().__init__()
        self.lstm = copy.deepcopy(lstm).float()
        self.names = [n for n, _ in self.lstm.named_parameters() if n.startswith("weight")]
        for n in self.names:
            q, s = _rowwise_int8(getattr(self.lstm, n).detach())
            self.register_buffer(f"{n}_q", q)
            self.register_buffer(f"{n}_s", s)
            delattr(self.lstm, n)  # the float weight is gone; only int8 + scales are kept
            self.lstm.register_parameter(n, None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        from torch.func import functional_call

        weights = {n: getattr(self, f"{n}_q").float() * getattr(self, f"{n}_s") for n in self.names}
        biases = {n: p for n, p in self.lstm.named_parameters()}
        return functional_call(self.lstm, {**weights, **biases}, (x,))


def serve(model: nn.Module, how: str) -> nn.Module:
    from memopt.quant import Cast, Int8WeightOnly, quantize_

    m = copy.deepcopy(model)
    if how == "float32":
        quantize_(m, Cast(dtype="float32"))
    elif how == "bfloat16":
        quantize_(m, Cast(dtype="bfloat16"))
    elif how == "int8":
        quantize_(m, Cast(dtype="float32"))
        quantize_(m, Int8WeightOnly(), include=["fc1", "fc2"])
        m.embed = Int8Embedding(m.embed)
        m.lstm = Int8LSTM(m.lstm)
    return m.eval()


def model_bytes(model: nn.Module) -> int:
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """Accuracy and the tracker's peak of live tensor bytes for inference on all of ``x``."""
    with torch.no_grad(), MemoryTracker(model, per_module=False, timeline=False) as tracker:
        tracker.track_existing(x)
        p = model(x)
    return float(((p.float() > 0.5) == (y > 0.5)).float().mean()), tracker.peak_bytes


def main() -> None:
    start = time.perf_counter()
    torch.manual_seed(0)
    x_tr, y_tr, x_te, y_te = load_data()
    model = TextClassifier().double()  # trained in float64, as the brief's case starts
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = nn.BCELoss()
    for _epoch in range(3):
        perm = torch.randperm(len(x_tr))
        for i in range(0, len(perm), 128):
            idx = perm[i : i + 128]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x_tr[idx]), y_tr[idx]).backward()
            opt.step()
    model.eval()
    print(
        f"data: {len(x_tr)} train / {len(x_te)} test sentences from pydoc_data.topics "
        f"(statements = 1: {int(y_te.sum())} of the test set); trained in "
        f"{time.perf_counter() - start:.1f} s"
    )
    rows = []
    for how in ("float64", "float32", "bfloat16", "int8"):
        m = model if how == "float64" else serve(model, how)
        acc, peak = evaluate(m, x_te, y_te)
        rows.append((how, model_bytes(m), peak, acc))
    base = rows[0]
    print(f"\n{'dtype':9} {'weights B':>10} {'×':>6} {'peak B':>10} {'×':>6} {'accuracy':>9}")
    for how, nbytes, peak, acc in rows:
        print(
            f"{how:9} {nbytes:10,} {nbytes / base[1]:6.3f} {peak:10,} {peak / base[2]:6.3f} "
            f"{acc:9.4f}"
        )
    print(f"\ntotal {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
