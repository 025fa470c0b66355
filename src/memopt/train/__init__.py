"""Training-time memory: low-bit optimizer state (more to come: checkpointing, precision, FSDP)."""

from memopt.train.adamw8bit import (
    OPTIMIZER_KINDS,
    AdamW8bit,
    adamw_state_bytes,
    dequantize_blockwise,
    dynamic_map,
    quantize_blockwise,
)

__all__ = [
    "OPTIMIZER_KINDS",
    "AdamW8bit",
    "adamw_state_bytes",
    "dequantize_blockwise",
    "dynamic_map",
    "quantize_blockwise",
]
