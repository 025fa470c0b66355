"""memopt.stream: memory-mapped weights and layer-by-layer streaming under a byte budget.

``stream_model(model, max_memory)`` returns a model whose blocks are read from the mapped file as
they run (prefetched one ahead, their pages given back after), so that a run's peak RSS stays within
``max_memory`` over the import baseline; :func:`plan_budget` predicts that peak (and refuses a budget
that cannot work) without reading a weight. :mod:`memopt.stream.run` has the entry points that the
command line calls (``memopt run --max-memory``), :mod:`memopt.stream.memory` the memory of a
streamed run for estimate and profile; :mod:`memopt.stream.layout` writes files in execution order and holds the one in-memory layout
change that measured a gain (:func:`channels_last_`, convolutions).
"""

from memopt.stream.executor import (
    RESERVE_BYTES,
    StreamedModel,
    StreamPlan,
    activation_bytes,
    plan_budget,
    stream_model,
)
from memopt.stream.layout import channels_last_, order_report, save_float_folder
from memopt.stream.memory import estimate_streamed, profile_streamed

__all__ = [
    "RESERVE_BYTES",
    "StreamPlan",
    "StreamedModel",
    "activation_bytes",
    "channels_last_",
    "estimate_streamed",
    "order_report",
    "plan_budget",
    "profile_streamed",
    "save_float_folder",
    "stream_model",
]
