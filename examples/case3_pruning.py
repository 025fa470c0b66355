"""Case 3 of the brief: prune a CNN gradually while training, then strip it into a smaller model.

The brief's model is Conv2D(32, 3x3, ReLU) -> MaxPool(2x2) -> Flatten -> Dense(10, softmax) on
32x32x3 images, pruned with ``tfmot.sparsity.keras.prune_low_magnitude``. Here it runs on the data
this machine has, scikit-learn's digits: **8x8x1 inputs** (1,797 images of handwritten digits), so
the conv output is 6x6x32, pooled to 3x3x32 = 288 features. The softmax lives in the loss
(cross-entropy on logits), as PyTorch does it.

Steps: train dense (Adam, as the brief) -> keep training while the sparsity rises along a
polynomial schedule to 80 % -> fine-tune at 80 % -> ``strip()``: masks removed, pruned weights stored
as bitmask + packed values -> saved (safetensors + JSON, no pickle) and reloaded -> accuracy and
bytes (RAM: parameters + buffers; disk: the saved files) before and after.

    python examples/case3_pruning.py        # about 10-20 s on 2 CPU cores
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from memopt.core.modules import model_bytes
from memopt.prune import PolynomialDecay, SparseWeight, prune_low_magnitude, sparsity_of
from memopt.weights.modules import QConv, QLinear


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train / test split of sklearn's digits as (N, 1, 8, 8) float32 in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    n_test = 360
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def brief_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3),  # (B, 32, 6, 6)
        nn.ReLU(),
        nn.MaxPool2d(2),  # (B, 32, 3, 3)
        nn.Flatten(),  # (B, 288)
        nn.Linear(32 * 3 * 3, 10),  # logits; softmax is in the loss
    )


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train(model, x, y, epochs, lr=3e-3, pruner=None, batch=64, seed=0) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            idx = perm[i : i + batch]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
            if pruner is not None:
                pruner.step()


def save_module(model: nn.Module, folder: Path) -> int:
    """Save a plain module (not a transformers model, which memopt.models.saved handles): its state dict in
    safetensors, the sparse weights' specs in JSON. Returns the bytes written."""
    from safetensors.torch import save_file

    from memopt.weights import weight_spec

    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors"
    )
    specs = {n: weight_spec(m) for n, m in model.named_modules() if isinstance(m, SparseWeight)}
    (folder / "memopt.json").write_text(json.dumps({"sparse_weights": specs}, indent=1))
    return sum(p.stat().st_size for p in folder.iterdir())


def load_module(folder: Path) -> nn.Module:
    """Rebuild the stripped CNN from the folder alone (architecture + sparse specs + tensors)."""
    from safetensors.torch import load_file

    from memopt.weights import disk_layout, empty_weight, fill_weight

    specs = json.loads((folder / "memopt.json").read_text())["sparse_weights"]
    tensors = load_file(folder / "model.safetensors")
    model = brief_cnn()
    for wname, spec in specs.items():
        mname = wname.rpartition(".")[0]  # "0.qweight" -> "0"
        qw = empty_weight(spec, "cpu")
        fill_weight(qw, {s: tensors.pop(f"{wname}.{s}") for s in disk_layout(spec)})
        old = model.get_submodule(mname)
        new = QConv(old, qw) if isinstance(old, nn.Conv2d) else QLinear(qw, old.bias)
        model._modules[mname] = new
    res = model.load_state_dict(tensors, strict=False)
    missing = [k for k in res.missing_keys if ".qweight." not in k]
    if missing or res.unexpected_keys:
        raise RuntimeError(f"missing {missing}, unexpected {res.unexpected_keys}")
    return model.eval()


def main() -> int:
    t0 = time.perf_counter()
    torch.set_num_threads(1)  # a 3k-parameter model: threads cost more than they give
    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits()
    dense = brief_cnn()
    train(dense, xtr, ytr, epochs=15)
    acc_dense = accuracy(dense, xte, yte)
    with tempfile.TemporaryDirectory() as tmp:
        from safetensors.torch import save_file

        save_file(dense.state_dict(), Path(tmp) / "dense.safetensors")
        disk_dense = (Path(tmp) / "dense.safetensors").stat().st_size
        ram_dense = model_bytes(dense)

        # gradual pruning: 0 -> 80 % over 8 epochs (mask update every 10 steps), then 6 epochs at 80 %
        steps_per_epoch = -(-len(ytr) // 64)
        schedule = PolynomialDecay(0.0, 0.8, begin_step=0, end_step=8 * steps_per_epoch,
                                   frequency=10)  # fmt: skip
        # global scope: the 80 % is over both layers together, so the 288-weight conv (which every
        # feature passes through) keeps more of its weights than the 2,880-weight classifier
        pruner = prune_low_magnitude(dense, schedule, scope="global")
        train(dense, xtr, ytr, epochs=16, lr=2e-3, pruner=pruner, seed=1)
        acc_pruned_dense = accuracy(dense, xte, yte)
        report = pruner.strip()  # masks gone, weights stored sparse
        sparse_model = dense
        acc_stripped = accuracy(sparse_model, xte, yte)
        disk_sparse = save_module(sparse_model, Path(tmp) / "pruned")
        reloaded = load_module(Path(tmp) / "pruned")
        acc_reloaded = accuracy(reloaded, xte, yte)
        ram_sparse = model_bytes(reloaded)

    from rich.console import Console
    from rich.table import Table

    table = Table(title="case 3: brief CNN on sklearn digits (8x8x1), gradual pruning to 80 %")
    for col in ("model", "sparsity", "test accuracy", "RAM bytes", "disk bytes"):
        table.add_column(col, justify="right" if col != "model" else "left")
    table.add_row("dense", "0.0 %", f"{acc_dense:.2%}", f"{ram_dense:,}", f"{disk_dense:,}")
    table.add_row(
        "pruned, stripped, reloaded",
        f"{report.sparsity:.1%}",
        f"{acc_reloaded:.2%}",
        f"{ram_sparse:,} ({ram_sparse / ram_dense:.2f}x)",
        f"{disk_sparse:,} ({disk_sparse / disk_dense:.2f}x)",
    )
    Console().print(table)
    print(f"accuracy before strip {acc_pruned_dense:.2%}, after strip {acc_stripped:.2%}; "
          f"formats {report.formats}; sparsity measured {sparsity_of(reloaded):.1%}; "
          f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
    ok = acc_reloaded >= acc_dense - 0.01 and acc_reloaded == acc_stripped
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
