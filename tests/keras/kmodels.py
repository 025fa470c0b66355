"""Small Keras models of the brief's shapes for tests/keras (imported as ``from kmodels import``)."""

from __future__ import annotations

from typing import Any

import numpy as np

import memopt.keras  # noqa: F401  (KERAS_BACKEND=torch before keras is imported)

import keras  # isort: skip

__all__ = ["cnn", "keras", "sqnr", "text_model"]


def cnn(size: int = 16, filters: int = 16, compile: bool = True) -> Any:
    """The brief's case-1/3 CNN, smaller: Conv2D 3x3 ReLU -> MaxPool 2x2 -> Flatten -> Dense 10."""
    m = keras.Sequential(
        [
            keras.Input((size, size, 3)),
            keras.layers.Conv2D(filters, (3, 3), activation="relu"),
            keras.layers.MaxPooling2D((2, 2)),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    if compile:
        m.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return m


def text_model(dtype: str | None = None, length: int = 12, compile: bool = True) -> Any:
    """The brief's case-2 model: Embedding(1000, 16) -> Bidirectional(LSTM(32)) -> Dense(16) ->
    Dense(1, sigmoid), in ``dtype`` (every layer's policy, nested LSTMs included)."""
    kw = {"dtype": dtype} if dtype else {}
    m = keras.Sequential(
        [
            keras.Input((length,), dtype="int32"),
            keras.layers.Embedding(1000, 16, **kw),
            keras.layers.Bidirectional(keras.layers.LSTM(32, **kw), **kw),
            keras.layers.Dense(16, activation="relu", **kw),
            keras.layers.Dense(1, activation="sigmoid", **kw),
        ]
    )
    if compile:
        m.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    return m


def sqnr(ref: Any, out: Any) -> float:
    """``20 log10(|ref| / |ref - out|)`` in dB, float64."""
    ref = np.asarray(ref, dtype=np.float64)
    out = np.asarray(out, dtype=np.float64)
    err = np.linalg.norm(ref - out)
    return float("inf") if err == 0 else float(20 * np.log10(np.linalg.norm(ref) / err))
