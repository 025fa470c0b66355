"""Case 1 of the brief in Keras 3: the image CNN, with its memory measured and reserved up front.

The brief's code, with ``import keras`` (Keras 3 on its torch backend) and these fixes:

- ``tf.config.experimental.set_memory_growth(True)`` is a TypeError as written (it takes a
  device first) and asks for the opposite of preallocation. memopt predicts the training step's
  peak on the meta device (no weight read), reserves that much memory up front with
  :func:`memopt.keras.set_memory_growth` (``enable=False``; on the CPU glibc then keeps freed
  blocks instead of returning them with ``munmap``), has Adam update in place into its
  preallocated moments (:func:`memopt.keras.in_place_adam`: torch's fused kernel instead of
  Keras's five weight-sized temporaries per weight and step) and then measures the real ``fit``
  steps against the prediction.
- ``train_images`` / ``train_labels`` are not defined in the brief: here scikit-learn's digits,
  upscaled to 32x32x3 (examples/brief/data.py), 360 images held out.

Each variant runs in a fresh child process (``--variant plain|preallocated``), so page faults and
peak RSS are its own. Printed: the estimate against the profile of a training step, allocator
calls of a training step (the profiler's count of every c10 allocation: the in-place Adam removes
its temporaries; a reserved heap does not change how many tensors Keras asks for, only whether
their pages must be faulted in again), minor page faults per ``fit`` step, median step time, peak
RSS, held-out accuracy.

    python examples/brief/case1_keras.py [--epochs 10]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build_model():  # noqa: ANN201  (a keras.Model: keras is imported here, not at the top)
    """The brief's model, compiled as the brief compiles it (``input_shape=`` as
    ``keras.Input``: Keras 3's form). Cases 1 and 3 and bench/keras3.py build it from here."""
    import memopt.keras  # noqa: F401  sets KERAS_BACKEND=torch before keras is imported

    import keras  # isort: skip

    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(32, (3, 3), activation="relu"),
            keras.layers.MaxPooling2D((2, 2)),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def run(variant: str, epochs: int) -> dict:
    sys.path.insert(0, str(HERE))
    import memopt.keras  # noqa: F401  sets KERAS_BACKEND=torch before keras is imported

    import keras  # isort: skip
    import torch
    from data import digits_32x32x3

    import memopt
    from memopt.keras import FitMarker, in_place_adam, set_memory_growth

    torch.set_num_threads(1)
    train_images, train_labels, test_images, test_labels = digits_32x32x3()
    keras.utils.set_random_seed(0)
    model = build_model()
    step = memopt.StepSpec(task="train", batch=32)  # Keras's default batch size
    predicted = memopt.estimate(model, step)
    if variant == "preallocated":
        # the brief's tf.config.experimental.set_memory_growth(True), fixed: a device, and growth
        # off (a pool reserved up front: the predicted peak, with room for Keras's temporaries)
        device = "GPU:0" if torch.cuda.is_available() else "CPU"
        set_memory_growth(device, False, memory_limit=2 * predicted.peak_bytes)
        in_place_adam(model)  # Adam's update written into its preallocated moments
    faults: list[int] = []
    times: list[float] = []

    class Steps(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):  # noqa: ANN001
            self.f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):  # noqa: ANN001
            times.append(time.perf_counter() - self.t0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self.f0)

    with memopt.MemoryTracker(model) as tracker:
        marker = FitMarker(tracker)
        model.fit(train_images, train_labels, epochs=epochs, verbose=0,
                  callbacks=[marker, Steps()])  # fmt: skip
    measured = memopt.profile(model, step)
    _, acc = model.evaluate(test_images, test_labels, verbose=0)
    # allocator calls of one training step (every c10 CPU allocation, counted by the profiler)
    from memopt.plan.alloc import count_allocations

    xb = torch.as_tensor(train_images[:32])
    yb = torch.as_tensor(train_labels[:32])
    allocs = count_allocations(lambda: model.train_step((xb, yb)), repeat=3).count
    steady = len(faults) // 2  # the second half: warm
    return {
        "estimate_bytes": predicted.peak_bytes,
        "profile_bytes": measured.peak_bytes,
        "fit_peak_bytes": tracker.peak_bytes,
        "allocations_per_step": allocs,
        "page_faults_per_step": statistics.mean(faults[steady:]),
        "step_ms": statistics.median(times[steady:]) * 1e3,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "test_accuracy": float(acc),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--variant", choices=["plain", "preallocated"])
    args = ap.parse_args()
    if args.variant:  # the child
        print(json.dumps(run(args.variant, args.epochs)))
        return
    out = {}
    for variant in ("plain", "preallocated"):
        cmd = [sys.executable, __file__, "--variant", variant, "--epochs", str(args.epochs)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    a, b = out["plain"], out["preallocated"]
    print(f"case 1 (Keras 3, torch backend), {args.epochs} epochs, batch 32")
    print(f"  training step: estimate {a['estimate_bytes']:,} B, profile {a['profile_bytes']:,} B "
          f"({a['estimate_bytes'] / a['profile_bytes']:.4f}x); peak over fit "
          f"{a['fit_peak_bytes']:,} B")  # fmt: skip
    print("| | plain | preallocated |")
    print("|---|---|---|")
    keys = ("allocations_per_step", "page_faults_per_step", "step_ms", "peak_rss_bytes")
    for key in (*keys, "test_accuracy"):
        fmt = "{:,.0f}" if key == "peak_rss_bytes" else "{:.4g}"
        print(f"| {key} | {fmt.format(a[key])} | {fmt.format(b[key])} |")


if __name__ == "__main__":
    main()
