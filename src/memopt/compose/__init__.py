"""memopt.compose: what combines the transforms from above them: the memory of a run, whatever
the way it runs (one library call behind ``memopt estimate`` and ``memopt profile``)."""

from memopt.compose.fit import Budget, fit
from memopt.compose.memory import memory_report, step_spec

__all__ = ["Budget", "fit", "memory_report", "step_spec"]
