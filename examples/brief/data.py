"""Real data that ships offline, shaped for the brief's Keras models.

- Cases 1 and 3 (the CNN on 32x32x3 images): scikit-learn's digits (1,797 8x8 grey images of
  handwritten digits), each pixel repeated 4x4 (nearest-neighbour upscaling to 32x32) and the grey
  value copied to 3 channels, scaled to [0, 1]; 360 held out.
- Case 2 (Embedding(1000, 16) over 50 tokens, a binary label): paragraphs of the Python
  documentation (``pydoc_data.topics``, English prose), labelled by which of two groups of topics
  they come from: strings and sequences (0) or statements and definitions (1). Words are ids of the
  998 most frequent training words (1 = any other word, 0 = padding), cut or padded to 50; 20 % of
  the paragraphs held out.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

__all__ = ["TOPIC_GROUPS", "digits_32x32x3", "topic_paragraphs"]

TOPIC_GROUPS = (
    ("formatstrings", "string-methods", "strings", "typesseq", "typesseq-mutable", "typesmapping"),
    ("compound", "try", "with", "import", "raise", "assignment", "function", "class", "async"),
)


def digits_32x32x3(n_test: int = 360, seed: int = 0) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test): float32 (N, 32, 32, 3) in [0, 1], int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.kron(d.images / 16.0, np.ones((4, 4)))  # (1797, 32, 32): each pixel as a 4x4 block
    x = np.repeat(x[..., None], 3, axis=-1).astype("float32")  # (1797, 32, 32, 3)
    y = d.target.astype("int64")
    perm = np.random.default_rng(seed).permutation(len(y))
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def _paragraphs(text: str) -> list[list[str]]:
    out = []
    for para in re.split(r"\n\s*\n", text):
        words = re.findall(r"[a-z_]+", para.lower())
        if len(words) >= 8:
            out.append(words)
    return out


def topic_paragraphs(
    vocab: int = 1000, length: int = 50, test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test): int32 (N, length) word ids, float32 (N, 1) labels."""
    from pydoc_data.topics import topics

    docs, labels = [], []
    for label, group in enumerate(TOPIC_GROUPS):
        for key in group:
            for words in _paragraphs(topics.get(key, "")):
                docs.append(words)
                labels.append(label)
    perm = np.random.default_rng(seed).permutation(len(docs))
    n_test = int(len(docs) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    counts = Counter(w for i in train for w in docs[i])
    ids = {w: i + 2 for i, (w, _) in enumerate(counts.most_common(vocab - 2))}
    x = np.zeros((len(docs), length), dtype="int32")
    for row, words in enumerate(docs):
        seq = [ids.get(w, 1) for w in words[:length]]
        x[row, : len(seq)] = seq
    y = np.asarray(labels, dtype="float32")[:, None]
    return x[train], y[train], x[test], y[test]
