"""Case 2 of the brief in Keras 3: the text model's float64 -> float32, bytes that really halve.

The brief's code, with ``import keras`` (Keras 3 on its torch backend) and these fixes:

- The brief says float64 -> float32 but never changes a dtype: here the model is built in float64
  (every layer's ``dtype``, the Bidirectional's LSTMs included) and :func:`memopt.keras.cast`
  rebuilds it with float32 policies, so Keras's own dtypes, Adam's state and the ``.keras`` file
  agree (a torch-side ``.float()`` would leave Keras computing, training and saving in float64).
- ``input_length=50`` is gone from Keras 3's Embedding: ``keras.Input((50,))`` says it.
- ``train_data`` / ``train_labels`` are not defined in the brief: here paragraphs of the Python
  documentation labelled by topic group (examples/brief/data.py), 20 % held out.

Then :func:`memopt.keras.quantize` to int8 for inference. Printed: bytes of the weights, of the
optimizer's state and of the ``.keras`` file, the inference step's peak (memopt's profile) and
held-out accuracy, for float64, float32 and int8.

    python examples/brief/case2_keras.py [--epochs 5]   # the brief says 10: ~4 min here
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import memopt.keras  # noqa: E402, F401  sets KERAS_BACKEND=torch before keras is imported

import keras  # noqa: E402  # isort: skip
import numpy as np  # noqa: E402
from data import topic_paragraphs  # noqa: E402

import memopt  # noqa: E402
from memopt.keras import cast, quantize, variable_bytes  # noqa: E402


def build_model(dtype: str = "float32") -> keras.Model:
    """The brief's text model, every layer (the Bidirectional's LSTMs too) in ``dtype``; also
    built by bench/keras3.py."""
    model = keras.Sequential(
        [
            keras.Input((50,), dtype="int32"),
            keras.layers.Embedding(1000, 16, dtype=dtype),
            keras.layers.Bidirectional(keras.layers.LSTM(32, dtype=dtype), dtype=dtype),
            keras.layers.Dense(16, activation="relu", dtype=dtype),
            keras.layers.Dense(1, activation="sigmoid", dtype=dtype),
        ]
    )
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args()
    train_data, train_labels, test_data, test_labels = topic_paragraphs()
    keras.utils.set_random_seed(0)
    model = build_model("float64")
    model.fit(train_data, train_labels.astype("float64"), epochs=args.epochs, verbose=0)
    m32 = cast(model, "float32")  # the fix: Keras's dtypes, optimizer state and save agree
    q8, report = quantize(m32, "int8")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, m in (("float64", model), ("float32", m32), ("int8", q8)):
            path = Path(tmp) / f"{name}.keras"
            m.save(path)
            opt = m.optimizer.variables if m.optimizer is not None else []
            pred = m.predict(test_data, verbose=0)[:, 0] > 0.5
            rows.append(
                (
                    name,
                    variable_bytes(m.weights),
                    variable_bytes([v for v in opt if len(v.shape)]),
                    path.stat().st_size,
                    memopt.profile(m, memopt.StepSpec(task="infer", batch=1)).peak_bytes,
                    float(np.mean(pred == (test_labels[:, 0] > 0.5))),
                )
            )
    print(f"case 2 (Keras 3, torch backend), {args.epochs} epochs; optimizer state: Adam's moments")
    print("| dtype | weights | × | optimizer state | .keras file | × | inference peak | accuracy |")
    print("|---|---|---|---|---|---|---|---|")
    w0, d0 = rows[0][1], rows[0][3]
    for name, w, o, d, peak, acc in rows:
        print(f"| {name} | {w:,} B | {w / w0:.3f} | {o:,} B | {d:,} B | {d / d0:.3f} | "
              f"{peak:,} B | {acc:.4f} |")  # fmt: skip
    print(f"int8 layers: {', '.join(f'{r.name} ({r.kind})' for r in report.layers)}")


if __name__ == "__main__":
    main()
