"""bench/keras3.py's peer for case 3: tfmot's pruning on tf-keras, run in its own interpreter.

tensorflow-model-optimization does not accept Keras 3 models, and TensorFlow pins versions of
numpy, ml_dtypes and protobuf that memopt's environment does not use, so this script runs in a
separate virtual environment (``python -m venv tfvenv && tfvenv/bin/pip install
tensorflow-cpu==2.21.0 tf-keras==2.21.0 tensorflow-model-optimization==0.8.0 scikit-learn``) and
prints one JSON object; ``bench/keras3.py --tfmot-python tfvenv/bin/python`` runs it in the same
bench run. The brief's case 3 as tfmot's guide does it: dense training, then
``prune_low_magnitude`` to 80 % (polynomial decay) with ``UpdatePruningStep``, ``strip_pruning``;
bytes of the variables during pruning (the wrapper's masks and thresholds included) and after
stripping, the files (HDF5 and .keras without the optimizer, and gzip of the HDF5), accuracy.

    tfvenv/bin/python bench/peers/keras3_tfmot.py --epochs 3  (not in bench/*.py: make bench runs those)
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["TF_USE_LEGACY_KERAS"] = "1"  # tfmot needs tf-keras (Keras 2)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "brief"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    import numpy as np
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tf_keras as keras
    from data import digits_32x32x3

    tf.random.set_seed(0)
    x, y, xt, yt = digits_32x32x3()

    def build() -> keras.Model:
        m = keras.Sequential(
            [
                keras.layers.Conv2D(32, (3, 3), activation="relu", input_shape=(32, 32, 3)),
                keras.layers.MaxPooling2D((2, 2)),
                keras.layers.Flatten(),
                keras.layers.Dense(10, activation="softmax"),
            ]
        )
        m.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        return m

    def nbytes(variables) -> int:  # noqa: ANN001
        return int(sum(np.asarray(v).nbytes for v in variables))

    dense = build()
    dense.fit(x, y, epochs=args.epochs, batch_size=64, verbose=0)
    steps = args.epochs * -(-len(x) // 64)
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        0.0, 0.8, 0, max(1, 2 * steps // 3), frequency=10
    )
    model = build()
    pruned = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)
    pruned.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    pruned.fit(x, y, epochs=args.epochs, batch_size=64, verbose=0,
               callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])  # fmt: skip
    while_pruning = nbytes(pruned.weights)  # the kernels, their masks and thresholds
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)
    kernels = [w for w in stripped.get_weights() if w.ndim > 1]
    zeros = sum(int((w == 0).sum()) for w in kernels) / sum(w.size for w in kernels)
    out = {
        "tensorflow": tf.__version__,
        "tfmot": tfmot.__version__ if hasattr(tfmot, "__version__") else "0.8",
        "dense_bytes": nbytes(dense.get_weights()),
        "bytes_while_pruning": while_pruning,
        "stripped_bytes": nbytes(stripped.get_weights()),
        "sparsity": zeros,
        "accuracy_dense": float(dense.evaluate(xt, yt, verbose=0)[1]),
    }
    stripped.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    out["accuracy_stripped"] = float(stripped.evaluate(xt, yt, verbose=0)[1])
    with tempfile.TemporaryDirectory() as d:
        for name, m in (("dense", dense), ("stripped", stripped)):
            h5 = Path(d) / f"{name}.h5"
            m.save(h5, include_optimizer=False)
            out[f"{name}_h5_bytes"] = h5.stat().st_size
            out[f"{name}_h5_gzip_bytes"] = len(gzip.compress(h5.read_bytes()))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
