"""Claim: AdamW8bit keeps ~1/4 of AdamW's state bytes at the same training quality; what it costs in time.

One run, every optimizer in the same process, ratios against torch.optim.AdamW (float32 state):
- state bytes and optimizer.step() time (median of repeats after warm-up) on a ~10.5 M-parameter MLP
  (1024 → 2048 → 2048 → 2048 → 10) with fixed random gradients;
- final training loss and test accuracy on scikit-learn's digits (real 8×8 images), same init and
  same 300 batches for every optimizer.
bitsandbytes' AdamW8bit is a peer row when it is importable (it is not installed by memopt).

    .venv/bin/python bench/optim8bit.py [--json] [--repeats N] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from memopt.train import AdamW8bit

__all__ = ["main"]

OptFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def _mlp(sizes: list[int], seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    # Count each storage once: some optimizers keep views of one buffer.
    seen: dict[int, int] = {}
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                s = v.untyped_storage()
                seen[s.data_ptr() or id(s)] = s.nbytes()
    return sum(seen.values())


def _optimizers() -> dict[str, OptFactory]:
    opts: dict[str, OptFactory] = {
        "torch AdamW (fp32)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2),
        "memopt AdamW8bit (C kernel)": lambda ps: AdamW8bit(
            ps, lr=1e-3, weight_decay=1e-2, backend="kernel"
        ),
        "memopt AdamW8bit (torch ops)": lambda ps: AdamW8bit(
            ps, lr=1e-3, weight_decay=1e-2, backend="torch"
        ),
    }
    try:
        import bitsandbytes as bnb

        opts[f"bitsandbytes {bnb.__version__} AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(
            ps, lr=1e-3, weight_decay=1e-2
        )
    except Exception:  # not installed, or fails to load: no peer row
        pass
    return opts


def _step_times(
    makers: dict[str, OptFactory], sizes: list[int], repeats: int
) -> dict[str, tuple[int, float] | str]:
    """Per optimizer: (state bytes, median step seconds) on fixed random gradients, or an error.

    The optimizers' steps are interleaved (A, B, A, B, ...) so that load from other processes on
    this shared machine falls on all of them alike.
    """
    opts: dict[str, torch.optim.Optimizer] = {}
    out: dict[str, tuple[int, float] | str] = {}
    for name, make in makers.items():
        model = _mlp(sizes)
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g) * 1e-2
        try:
            opt = make(model.parameters())
            for _ in range(3):  # warm-up: state allocation, lookup tables, allocator
                opt.step()
        except Exception as exc:  # a peer that fails here is reported, not fatal
            out[name] = f"{type(exc).__name__}: {exc}"
            continue
        opts[name] = opt
    times: dict[str, list[float]] = {name: [] for name in opts}
    for _ in range(repeats):
        for name, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t0)
    for name, opt in opts.items():
        out[name] = (_state_bytes(opt), statistics.median(times[name]))
    return out


def _digits(make: OptFactory, steps: int = 300) -> tuple[float, float]:
    """(final training loss, test accuracy) of a 64-256-256-10 MLP on digits."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0  # (1797, 64)
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    model = _mlp([64, 256, 256, 10])
    opt = make(model.parameters())
    for i in range(steps):
        b = train[torch.randperm(1400, generator=torch.Generator().manual_seed(i))[:64]]
        loss = F.cross_entropy(model(x[b]), y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        train_loss = float(F.cross_entropy(model(x[train]), y[train]))
        acc = float((model(x[test]).argmax(1) == y[test]).float().mean())
    return train_loss, acc


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    sizes = [1024, 2048, 2048, 2048, 10]
    n_params = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
    makers = _optimizers()
    timed = _step_times(makers, sizes, args.repeats)
    rows: list[dict] = []
    for name, make in makers.items():
        t = timed[name]
        if isinstance(t, str):
            rows.append({"optimizer": name, "error": t})
            continue
        try:
            loss, acc = _digits(make)
        except Exception as exc:  # a peer that fails here is reported, not fatal
            rows.append({"optimizer": name, "error": f"{type(exc).__name__}: {exc}"})
            continue
        rows.append(
            {
                "optimizer": name,
                "state_bytes": t[0],
                "step_ms": t[1] * 1e3,
                "digits_loss": loss,
                "digits_acc": acc,
            }
        )
    base = rows[0]
    for r in rows:
        if "error" not in r:
            r["state_ratio"] = r["state_bytes"] / base["state_bytes"]
            r["step_ratio"] = r["step_ms"] / base["step_ms"]
            r["loss_ratio"] = r["digits_loss"] / base["digits_loss"]
    result = {
        "params": n_params,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rows": rows,
    }
    if args.json:
        print(json.dumps(result))
        return result
    print(
        f"MLP {n_params / 1e6:.1f} M params, step on fixed gradients (median of {args.repeats}); "
        f"digits MLP 64-256-256-10, 300 steps; torch {torch.__version__}, "
        f"threads={torch.get_num_threads()}"
    )
    head = (
        f"{'optimizer':<34} {'state':>10} {'×':>6} {'step ms':>9} {'×':>6} "
        f"{'digits loss':>11} {'×':>6} {'acc':>6}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['optimizer']:<34} failed: {r['error']}")
            continue
        print(
            f"{r['optimizer']:<34} {r['state_bytes'] / 2**20:>7.1f} MiB {r['state_ratio']:>6.3f} "
            f"{r['step_ms']:>9.1f} {r['step_ratio']:>6.2f} {r['digits_loss']:>11.4f} "
            f"{r['loss_ratio']:>6.3f} {r['digits_acc'] * 100:>5.1f}%"
        )
    return result


if __name__ == "__main__":
    main()
