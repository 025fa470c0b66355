"""Training-time memory: checkpointing, 8-bit optimizer state, mixed precision, FSDP2, finetune."""

from memopt.step.adamw8bit import (
    BACKENDS,
    LOOKUP_BYTES,
    OPTIMIZER_KINDS,
    AdamW8bit,
    adamw_state_bytes,
    dequantize_blockwise,
    dynamic_map,
    quantize_blockwise,
)
from memopt.step.checkpoint import checkpoint_blocks, select_blocks
from memopt.step.precision import LossScaler, MasterWeights, autocast_context
from memopt.step.trainer import Trainer
from memopt.train.checkpoint import CheckpointChoice, choose_checkpointing
from memopt.train.finetune import finetune
from memopt.train.fsdp import check_against_single, launch, shard_model

__all__ = [
    "LOOKUP_BYTES",
    "OPTIMIZER_KINDS",
    "AdamW8bit",
    "BACKENDS",
    "CheckpointChoice",
    "LossScaler",
    "MasterWeights",
    "Trainer",
    "adamw_state_bytes",
    "autocast_context",
    "check_against_single",
    "checkpoint_blocks",
    "choose_checkpointing",
    "dequantize_blockwise",
    "dynamic_map",
    "finetune",
    "launch",
    "quantize_blockwise",
    "select_blocks",
    "shard_model",
]
