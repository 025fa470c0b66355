"""Bench: memopt's Keras front end on the brief's three models, against Keras's own quantize.

One process, Keras 3 on its torch backend, one thread (``--threads``). The models are the brief's
(case 1 and 3: Conv2D(32, 3x3) on 32x32x3 -> MaxPool -> Flatten -> Dense(10); case 2:
Embedding(1000, 16) over 50 tokens -> Bidirectional(LSTM(32)) -> Dense(16) -> Dense(1)), trained
for ``--epochs`` on real data that ships offline (examples/brief/data.py: scikit-learn's digits
upscaled to 32x32x3; Python-documentation paragraphs labelled by topic group).

1. Quantization, per model: float32, memopt int8 / int4 (:func:`memopt.keras.quantize`) and
   Keras's ``model.quantize("int8" | "int4")``. Bytes: the model's variables (what Keras says it
   holds) and *live*: every tensor torch sees as a parameter of the model, Keras's
   ``_torch_params`` included (the float kernels Keras's quantize leaves there show up); the
   ``.keras`` file. Quality: SQNR (dB) of the outputs against float32 and held-out accuracy.
   Speed: batch 1, single calls alternated with float32's (``--rounds`` rounds of 50 pairs),
   the ratio of each one's fastest call (> 1: faster than float32), with the spread of the
   rounds' ratios of medians. Forward peak: memopt's tracker over one batch-1 forward.
2. Case 2's cast float64 -> float32 (:func:`memopt.keras.cast`): bytes of the weights, of Adam's
   state and of the .keras file; accuracy before and after.
3. Case 3's pruning to 80 % during ``fit`` (:class:`memopt.keras.PruneDuringFit`) against dense
   training of the same epochs: held-out accuracy, the tracker's peak during training, the
   stripped model's bytes in memory and on disk (no gzip).
4. Case 1's training step: memopt's estimate (meta device) against its profile (real weights);
   allocator calls a step (memopt's count), Keras's Adam against memopt's in-place Adam.

tfmot does not accept Keras 3 models (tensorflow/model-optimization#1119) and TensorFlow pins
package versions memopt's environment does not use: ``--tfmot-python PATH`` runs case 3 with
tf-keras + tfmot in another interpreter (bench/peers/keras3_tfmot.py, its own virtual environment) in
the same bench run, printed beside memopt's figures.

    .venv/bin/python bench/keras3.py  (not keras.py: a script of that name would shadow the keras package) [--epochs E] [--rounds R] [--threads N] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import memopt.keras  # noqa: F401  (KERAS_BACKEND=torch before keras)

import keras  # isort: skip

BRIEF = Path(__file__).resolve().parents[1] / "examples" / "brief"
sys.path.insert(0, str(BRIEF))

from data import digits_32x32x3, topic_paragraphs  # noqa: E402

import memopt  # noqa: E402
from memopt.keras import (  # noqa: E402
    PolynomialDecay,
    PruneDuringFit,
    cast,
    in_place_adam,
    live_parameter_bytes,
    quantize,
    strip,
    variable_bytes,
)
from memopt.keras.rebuild import rebuild  # noqa: E402
from memopt.plan.alloc import count_allocations  # noqa: E402


def _example(name: str) -> Any:
    """examples/brief/<name>.py as a module: the bench trains the brief's models as written."""
    path = BRIEF / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"brief_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cnn = _example("case1_keras").build_model  # cases 1 and 3: () -> the compiled CNN
text_model = _example("case2_keras").build_model  # case 2: (dtype) -> the compiled text model


def sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    err = np.linalg.norm(ref - out)
    return float("inf") if err == 0 else float(20 * np.log10(np.linalg.norm(ref) / err))


def accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    p = model.predict(x, verbose=0, batch_size=128)
    hit = (p[:, 0] > 0.5) == (y[:, 0] > 0.5) if p.shape[-1] == 1 else p.argmax(-1) == y
    return float(np.mean(hit))


def disk_bytes(model: keras.Model, tmp: Path, name: str) -> int:
    path = tmp / f"{name}.keras"
    model.save(path)
    return path.stat().st_size


def speed(model: keras.Model, ref: keras.Model, x: torch.Tensor, rounds: int) -> dict[str, Any]:
    """Batch-1 forward speed of ``model`` against ``ref`` (float32): single calls alternated
    A, B, A, B, ``rounds`` rounds of 50 pairs. The figure is the ratio of each one's fastest call
    (> 1: faster than float32): load from other processes only ever adds time, so the minimum of
    many calls is a model's own cost, where a median is whatever the load was. Beside it, the
    spread: each round's ratio of medians (min, median, max over the rounds)."""
    with torch.no_grad():
        for _ in range(20):  # warm-up: kernel choice, Keras's first-call work
            model(x, training=False)
            ref(x, training=False)
        a: list[list[float]] = []
        b: list[list[float]] = []
        for _ in range(rounds):
            ta, tb = [], []
            for _ in range(50):
                t = time.perf_counter()
                model(x, training=False)
                t1 = time.perf_counter()
                ref(x, training=False)
                tb.append(time.perf_counter() - t1)
                ta.append(t1 - t)
            a.append(ta)
            b.append(tb)
    per_round = sorted(
        statistics.median(tb) / statistics.median(ta) for ta, tb in zip(a, b, strict=True)
    )
    best_a, best_b = min(map(min, a)), min(map(min, b))
    return {
        "x": best_b / best_a,
        "best_us": (best_a * 1e6, best_b * 1e6),
        "rounds": (per_round[0], statistics.median(per_round), per_round[-1]),
    }


def forward_peak(model: keras.Model) -> int:
    return memopt.profile(model, memopt.StepSpec(task="infer", batch=1)).peak_bytes


def keras_own(model: keras.Model, mode: str) -> keras.Model:
    """Keras's model.quantize on a copy (it quantizes in place)."""
    copy = rebuild(model, {})
    copy.quantize(mode)
    return copy


def quant_rows(name, model, x_eval, y_eval, x1, tmp, rounds) -> list[dict[str, Any]]:  # noqa: ANN001
    ref_out = model.predict(x_eval, verbose=0, batch_size=128)
    fp_vars = variable_bytes(model.variables)
    variants = [("float32", model, None)]
    for mode in ("int8", "int4"):
        q, report = quantize(model, mode)
        skipped = ", ".join(f"{r.kind} ({r.reason})" for r in report.skipped) or "-"
        variants.append((f"memopt {mode}", q, skipped))
        try:
            variants.append((f"keras {mode}", keras_own(model, mode), "Conv, LSTM stay float"))
        except Exception as exc:  # a peer's failure is a row, not a crash
            variants.append((f"keras {mode}", None, f"failed: {type(exc).__name__}: {exc}"))
    rows = []
    for label, m, note in variants:
        if m is None:
            rows.append({"model": name, "variant": label, "note": note})
            continue
        out = m.predict(x_eval, verbose=0, batch_size=128)
        rows.append(
            {
                "model": name,
                "variant": label,
                "variable_bytes": variable_bytes(m.variables),
                "live_bytes": live_parameter_bytes(m),
                "x_float32": live_parameter_bytes(m) / fp_vars,
                "disk_bytes": disk_bytes(m, tmp, f"{name}-{label.replace(' ', '-')}"),
                "sqnr_db": sqnr(ref_out, out) if m is not model else None,
                "accuracy": accuracy(m, x_eval, y_eval),
                "speed": speed(m, model, x1, rounds) if m is not model else None,
                # an inference copy of the float model: the trained one also holds Adam's state
                # and the gradients that fit leaves on its parameters
                "forward_peak_bytes": forward_peak(rebuild(m, {}) if m is model else m),
                "note": note or "",
            }
        )
    return rows


def case2_cast(x, y, xt, yt, epochs, tmp) -> dict[str, Any]:  # noqa: ANN001
    keras.utils.set_random_seed(0)
    m64 = text_model("float64")
    m64.fit(x, y.astype("float64"), epochs=epochs, batch_size=32, verbose=0)
    m32 = cast(m64, "float32")
    opt = lambda m: variable_bytes([v for v in m.optimizer.variables if len(v.shape)])  # noqa: E731
    return {
        "weights": (variable_bytes(m64.weights), variable_bytes(m32.weights)),
        "optimizer": (opt(m64), opt(m32)),
        "disk": (disk_bytes(m64, tmp, "c2-64"), disk_bytes(m32, tmp, "c2-32")),
        "disk_arrays": (file_payload(tmp / "c2-64.keras"), file_payload(tmp / "c2-32.keras")),
        "accuracy": (accuracy(m64, xt, yt), accuracy(m32, xt, yt)),
    }


def file_payload(path: Path) -> dict[str, int]:
    """A ``.keras`` file's bytes: its arrays' by dtype, and ``"rest"`` (config, HDF5 structure, zip
    headers). A cast halves the float64 arrays; Adam's learning rate (float32) and iteration
    counter (int32) and the rest stay as they are."""
    import io
    import zipfile

    import h5py

    out: dict[str, int] = {}

    def visit(_: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            out[str(obj.dtype)] = out.get(str(obj.dtype), 0) + obj.nbytes

    with zipfile.ZipFile(path) as z, h5py.File(io.BytesIO(z.read("model.weights.h5"))) as h5:
        h5.visititems(visit)
    out["rest"] = path.stat().st_size - sum(out.values())
    return out


def fit_peak(model, x, y, epochs, callbacks) -> int:  # noqa: ANN001
    with memopt.MemoryTracker(model) as tracker:
        model.fit(x, y, epochs=epochs, batch_size=64, verbose=0, callbacks=callbacks)
    return tracker.peak_bytes


def case3_prune(x, y, xt, yt, epochs, tmp) -> dict[str, Any]:  # noqa: ANN001
    keras.utils.set_random_seed(0)
    dense = cnn()
    dense_peak = fit_peak(dense, x, y, epochs, [])
    keras.utils.set_random_seed(0)
    pruned = cnn()
    steps = epochs * -(-len(x) // 64)
    cb = PruneDuringFit(PolynomialDecay(0.0, 0.8, 0, max(1, 2 * steps // 3), frequency=10))
    pruned_peak = fit_peak(pruned, x, y, epochs, [cb])
    small, report = strip(pruned)
    small8, report8 = strip(pruned, values="int8")
    plain = rebuild(dense, {})  # the dense model's file without its optimizer state
    return {
        "accuracy": (accuracy(dense, xt, yt), accuracy(pruned, xt, yt), accuracy(small, xt, yt)),
        "train_peak": (dense_peak, pruned_peak),
        "bytes": (report.bytes_before, report.bytes_after, report8.bytes_after),
        "disk": (
            disk_bytes(plain, tmp, "c3-dense"),
            disk_bytes(small, tmp, "c3-sparse"),
            disk_bytes(small8, tmp, "c3-sparse8"),
        ),
        "sparsity": report.sparsity,
    }


def tfmot_peer(python: str, epochs: int) -> dict[str, Any]:
    """bench/peers/keras3_tfmot.py in ``python`` (tf-keras + tfmot): its JSON, or the failure."""
    import subprocess

    script = Path(__file__).resolve().parent / "peers" / "keras3_tfmot.py"
    proc = subprocess.run(
        [python, str(script), "--epochs", str(epochs)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def case1_estimate(model) -> dict[str, Any]:  # noqa: ANN001
    spec = memopt.StepSpec(task="train", batch=32)
    est = memopt.estimate(model, spec)
    prof = memopt.profile(model, spec)
    return {"estimate": est.peak_bytes, "profile": prof.peak_bytes, "breakdown": prof.breakdown}


def case1_allocations(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Allocator calls of one training step at batch 32 (memopt's count: every c10 CPU
    allocation, under the profiler), Keras's Adam against :func:`memopt.keras.in_place_adam`
    (what examples/brief/case1_keras.py's preallocated variant adds to the reserved heap)."""
    xb, yb = torch.as_tensor(x[:32]), torch.as_tensor(y[:32])
    out = {}
    for name in ("keras adam", "in-place adam"):
        keras.utils.set_random_seed(0)
        model = cnn()
        if name == "in-place adam":
            in_place_adam(model)
        for _ in range(3):  # the optimizer's variables built, kernels chosen
            model.train_step((xb, yb))
        report = count_allocations(lambda m=model: m.train_step((xb, yb)), repeat=5)
        out[name] = {"count": report.count, "bytes": report.bytes}
    return out


def mb(n: float) -> str:
    return f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n / 1e3:.1f} KB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--tfmot-python", metavar="PATH", help="a Python with tf-keras + tfmot")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out: dict[str, Any] = {"keras": keras.__version__, "torch": torch.__version__}
    xd, yd, xdt, ydt = digits_32x32x3()
    xs, ys, xst, yst = topic_paragraphs()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        keras.utils.set_random_seed(0)
        m1 = cnn()
        m1.fit(xd, yd, epochs=args.epochs, batch_size=64, verbose=0)
        keras.utils.set_random_seed(0)
        m2 = text_model()
        m2.fit(xs, ys, epochs=args.epochs * 3, batch_size=32, verbose=0)
        out["case1_estimate"] = case1_estimate(m1)
        out["case1_allocations"] = case1_allocations(xd, yd)
        rows = quant_rows("CNN (cases 1, 3)", m1, xdt, ydt, torch.as_tensor(xdt[:1]), tmp,
                          args.rounds)  # fmt: skip
        rows += quant_rows("text (case 2)", m2, xst, yst, torch.as_tensor(xst[:1]), tmp,
                           args.rounds)  # fmt: skip
        out["quantize"] = rows
        out["case2_cast"] = case2_cast(xs, ys, xst, yst, args.epochs * 3, tmp)
        out["case3_prune"] = case3_prune(xd, yd, xdt, ydt, args.epochs, tmp)
        if args.tfmot_python:
            out["case3_tfmot"] = tfmot_peer(args.tfmot_python, args.epochs)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"keras {out['keras']}, torch {out['torch']}, {args.threads} thread(s)\n")
    print("| model | variant | live bytes | × float32 | .keras | SQNR dB | accuracy | "
          "batch-1 speed × float32 | forward peak | note |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "live_bytes" not in r:
            print(f"| {r['model']} | {r['variant']} | | | | | | | | {r['note']} |")
            continue
        q = "–" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f}"
        sp = r["speed"]
        fast = "1.00" if sp is None else (
            f"{sp['x']:.2f} ({sp['best_us'][0]:.0f} / {sp['best_us'][1]:.0f} µs; rounds "
            f"{sp['rounds'][0]:.2f}–{sp['rounds'][2]:.2f}, median {sp['rounds'][1]:.2f})"
        )  # fmt: skip
        print(
            f"| {r['model']} | {r['variant']} | {mb(r['live_bytes'])} | {r['x_float32']:.3f} | "
            f"{mb(r['disk_bytes'])} | {q} | {r['accuracy']:.4f} | {fast} | "
            f"{mb(r['forward_peak_bytes'])} | {r['note']} |"
        )
    c2 = out["case2_cast"]
    print("\ncase 2, float64 -> float32 (memopt.keras.cast)")
    for key in ("weights", "optimizer", "disk"):
        a, b = c2[key]
        print(f"  {key}: {a:,} -> {b:,} B ({b / a:.3f}x)")
    p64, p32 = c2["disk_arrays"]
    show = lambda p: ", ".join(f"{k} {v:,} B" for k, v in p.items())  # noqa: E731
    print(f"  in the file: {show(p64)} -> {show(p32)}")
    print(f"  held-out accuracy: {c2['accuracy'][0]:.4f} -> {c2['accuracy'][1]:.4f}")
    c3 = out["case3_prune"]
    b0, b1, b8 = c3["bytes"]
    d0, d1, d8 = c3["disk"]
    print(f"\ncase 3, magnitude pruning to 80 % during fit (sparsity {c3['sparsity']:.4f})")
    print(f"  held-out accuracy dense / pruned / stripped: "
          f"{' / '.join(f'{a:.4f}' for a in c3['accuracy'])}")  # fmt: skip
    p0, p1 = c3["train_peak"]
    print(f"  training peak dense / pruning: {p0:,} / {p1:,} B ({p1 / p0:.3f}x)")
    print(f"  memory: {b0:,} -> {b1:,} B ({b1 / b0:.3f}x), int8 values {b8:,} B ({b8 / b0:.3f}x)")
    print(f"  disk (.keras, no gzip): {d0:,} -> {d1:,} B ({d1 / d0:.3f}x), int8 values {d8:,} B "
          f"({d8 / d0:.3f}x)")  # fmt: skip
    tf = out.get("case3_tfmot")
    if tf and "error" in tf:
        print(f"  tfmot (tf-keras): failed: {tf['error']}")
    elif tf:
        d = tf["dense_bytes"]
        print(f"  tfmot {tf['tfmot']} on tf-keras (TensorFlow {tf['tensorflow']}), same data and "
              f"epochs: sparsity {tf['sparsity']:.4f}; accuracy dense / stripped "
              f"{tf['accuracy_dense']:.4f} / {tf['accuracy_stripped']:.4f}")  # fmt: skip
        print(f"    variables while pruning {tf['bytes_while_pruning']:,} B "
              f"({tf['bytes_while_pruning'] / d:.3f}x dense); stripped in memory "
              f"{tf['stripped_bytes']:,} B ({tf['stripped_bytes'] / d:.3f}x)")  # fmt: skip
        print(f"    HDF5 file (no optimizer) {tf['dense_h5_bytes']:,} -> {tf['stripped_h5_bytes']:,} B "
              f"({tf['stripped_h5_bytes'] / tf['dense_h5_bytes']:.3f}x); gzip "
              f"{tf['dense_h5_gzip_bytes']:,} -> {tf['stripped_h5_gzip_bytes']:,} B "
              f"({tf['stripped_h5_gzip_bytes'] / tf['dense_h5_gzip_bytes']:.3f}x)")  # fmt: skip
    c1 = out["case1_estimate"]
    print(f"\ncase 1, one training step at batch 32: estimate {c1['estimate']:,} B, profile "
          f"{c1['profile']:,} B ({c1['estimate'] / c1['profile']:.4f}x)")  # fmt: skip
    a0, a1 = out["case1_allocations"]["keras adam"], out["case1_allocations"]["in-place adam"]
    print(f"  allocator calls a step: Keras's Adam {a0['count']} ({a0['bytes']:,} B), "
          f"memopt.keras.in_place_adam {a1['count']} ({a1['bytes']:,} B)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
