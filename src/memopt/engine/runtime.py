"""What a run of memopt's decode engine on a memopt folder holds beyond its tensors, measured.

One place for these figures: ``memopt fit`` plans with them (memopt.compose.fit) and a budgeted
``memopt run`` of a folder takes the engine only when they fit (memopt.stream.executor).

Measured on the bundled SmolLM2 (bench/fit.py, 192 positions, peak RSS over the run's import
baseline less the weights, KV cache and scratch): float32 / int8 folders 36-39 MB; folders with
int4 weights up to 50.3 MB (the int4 load's transient, kept by the allocator; what the engine
holds once loaded is exactly the weights), and an int4 embedding (tied: the head too) another
0.078x its float32 bytes (8.8 MB on SmolLM2's 113 MB; 11.8 MB before its repack went by chunks of
rows, memopt.weights.quantized.int4_relayout). Rounded up.
"""

from __future__ import annotations

__all__ = ["INT4_EMBEDDING_TRANSIENT", "RUNTIME_BYTES", "RUNTIME_INT4_BYTES"]

RUNTIME_BYTES = 40 << 20  # the tokenizer, Python's objects of the model, the allocator's slack
RUNTIME_INT4_BYTES = 50 << 20  # the same with int4 weights: their load's transient
INT4_EMBEDDING_TRANSIENT = 1 / 11  # of an int4 embedding's float32 bytes, beyond the above
