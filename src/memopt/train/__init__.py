"""Training-time memory: checkpointing, 8-bit optimizer state, mixed precision, FSDP2, finetune."""

from memopt.train.adamw8bit import (
    BACKENDS,
    LOOKUP_BYTES,
    OPTIMIZER_KINDS,
    AdamW8bit,
    adamw_state_bytes,
    dequantize_blockwise,
    dynamic_map,
    quantize_blockwise,
)
from memopt.train.checkpoint import (
    CheckpointChoice,
    checkpoint_blocks,
    choose_checkpointing,
    select_blocks,
)
from memopt.train.demo import demo_row
from memopt.train.finetune import FINETUNE_ARGS, finetune
from memopt.train.fsdp import check_against_single, launch, shard_model
from memopt.train.precision import LossScaler, MasterWeights, autocast_context
from memopt.train.trainer import Trainer

__all__ = [
    "FINETUNE_ARGS",
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
    "demo_row",
    "dequantize_blockwise",
    "dynamic_map",
    "finetune",
    "launch",
    "quantize_blockwise",
    "select_blocks",
    "shard_model",
]
