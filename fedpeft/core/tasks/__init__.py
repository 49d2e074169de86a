"""Tasks: what a model is tuned for (one file each). ``model.task`` selects one; ``auto`` lets
the registry entry or the model folder's ``config.json`` architecture decide."""

from __future__ import annotations

from fedpeft.core.config import ModelConfig
from fedpeft.core.models import infer_task

from .base import Batchable, EvalMetrics, Task
from .causal_lm import CausalLM
from .classification import Classification

TASKS: dict[str, type[Task]] = {Classification.name: Classification, CausalLM.name: CausalLM}


def task_class(cfg: ModelConfig) -> type[Task]:
    """The task of this model section (``model.task``, or inferred when ``auto``)."""
    return TASKS[infer_task(cfg)]


__all__ = ["TASKS", "Batchable", "CausalLM", "Classification", "EvalMetrics", "Task",
           "task_class"]
