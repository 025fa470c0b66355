"""Case 3 of the brief in Keras 3: magnitude pruning during training that saves bytes.

The brief's code, with ``import keras`` (Keras 3 on its torch backend) and these fixes:

- ``tfmot`` is never imported in the brief, and ``tfmot.sparsity.keras.prune_low_magnitude``
  refuses Keras 3 models (tensorflow/model-optimization#1119); on tf-keras its stripped model is
  as large as the dense one (dense zeros). memopt's :class:`~memopt.keras.PruneDuringFit` callback
  prunes to 80 % along tfmot's default schedule (polynomial decay) during ``fit`` with no wrapper
  and no mask, and :func:`memopt.keras.strip` stores the pruned kernels sparse (a bitmask and the
  nonzero values).
- The brief prunes an untrained model and trains it once; here, as tfmot's guide does, the dense
  model trains first, then pruning runs during the second half of the epochs.
- ``train_images`` / ``train_labels``: scikit-learn's digits, upscaled to 32x32x3.

Printed: held-out accuracy, the peak of the training (memopt's tracker), bytes in memory and in
the ``.keras`` file (no gzip) of the dense model and of the stripped one.

    python examples/brief/case3_keras.py [--epochs 10]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import memopt.keras  # noqa: E402, F401  sets KERAS_BACKEND=torch before keras is imported

import keras  # noqa: E402  # isort: skip
from case1_keras import build_model  # noqa: E402  the brief's case-1 CNN, as case 3 prunes it
from data import digits_32x32x3  # noqa: E402

import memopt  # noqa: E402
from memopt.keras import (  # noqa: E402
    PolynomialDecay,
    PruneDuringFit,
    sparsity_of,
    strip,
    variable_bytes,
)
from memopt.keras.rebuild import rebuild  # noqa: E402


def fit(model: keras.Model, x, y, epochs: int, callbacks: list) -> int:  # noqa: ANN001
    with memopt.MemoryTracker(model) as tracker:
        model.fit(x, y, epochs=epochs, verbose=0, callbacks=callbacks)
    return tracker.peak_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--sparsity", type=float, default=0.8)
    args = ap.parse_args()
    train_images, train_labels, test_images, test_labels = digits_32x32x3()
    half = max(1, args.epochs // 2)
    keras.utils.set_random_seed(0)
    dense = build_model()
    dense_peak = fit(dense, train_images, train_labels, args.epochs, [])
    keras.utils.set_random_seed(0)
    model = build_model()
    fit(model, train_images, train_labels, half, [])
    steps = (args.epochs - half) * -(-len(train_images) // 32)
    schedule = PolynomialDecay(0.0, args.sparsity, begin_step=0, end_step=steps // 2, frequency=20)
    prune_peak = fit(model, train_images, train_labels, args.epochs - half,
                     [PruneDuringFit(schedule)])  # fmt: skip
    small, report = strip(model)
    plain = rebuild(dense, {})  # the dense model without its optimizer state, as `small`
    with tempfile.TemporaryDirectory() as tmp:
        disk = []
        for name, m in (("dense", plain), ("stripped", small)):
            path = Path(tmp) / f"{name}.keras"
            m.save(path)
            disk.append(path.stat().st_size)
    acc_dense = dense.evaluate(test_images, test_labels, verbose=0)[1]
    acc_small = small.evaluate(test_images, test_labels, verbose=0)[1]
    print(f"case 3 (Keras 3, torch backend), {args.epochs} epochs, "
          f"sparsity {sparsity_of(model)['kernels']:.4f}")  # fmt: skip
    print("| model | accuracy | training peak | weights | × | .keras file | × |")
    print("|---|---|---|---|---|---|---|")
    w0 = variable_bytes(dense.weights)
    print(f"| dense | {acc_dense:.4f} | {dense_peak:,} B | {w0:,} B | 1 | {disk[0]:,} B | 1 |")
    print(f"| pruned 80 %, stripped | {acc_small:.4f} | {prune_peak:,} B | "
          f"{report.bytes_after:,} B | {report.bytes_after / w0:.3f} | {disk[1]:,} B | "
          f"{disk[1] / disk[0]:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
