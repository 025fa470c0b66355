"""The child-process entry of :func:`memopt.stream.run.run_measured`.

Importing this module imports everything a streamed run needs (the child's RSS baseline is taken
after it), so that the measured peak over the baseline is the run's own: weights, KV cache,
activations, tokenizer and runtime, not the libraries.
"""

from __future__ import annotations

import memopt.formats.gguf  # noqa: F401 (in the baseline: a GGUF source reads through it)
import memopt.models.saved  # noqa: F401 (in the baseline: a memopt folder reads through it)
from memopt.core.rss import import_baseline
from memopt.stream.run import run_job

__all__ = ["run_job"]

import_baseline()
