"""The task interface: what a model is tuned for, seen by nothing above ``fedpeft.core``.

A task says how the base is built (a classification head or none), how examples are tokenised
and collated (and so which tokens carry the loss), how the global model is evaluated, and what a
few fixed held-out prompts complete to. Methods, the round loop and the wire never see a task:
they move adapter tensors, and training calls ``model(**batch).loss`` on what the task collated.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from fedpeft.core.config import DataConfig, ModelConfig
from fedpeft.core.data import TextData
from fedpeft.core.models import build_base


class Batchable(Protocol):
    """Encoded examples: ``len``, ``batch(indices)`` -> model inputs with ``labels`` (what
    ``model(**batch).loss`` trains on), and each example's token count (a batch pads to its
    longest example)."""

    def __len__(self) -> int: ...

    def batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]: ...

    def lengths(self, indices: np.ndarray) -> np.ndarray: ...


@dataclass
class EvalMetrics:
    """One evaluation of a model: accuracy where there are labels, the mean held-out loss,
    and task extras (perplexity) as ``extra``."""

    accuracy: float | None
    loss: float
    examples: int
    extra: dict[str, float] = field(default_factory=dict)


class Task(abc.ABC):
    """Base class of the tasks. Built once per workspace from the run's model and data sections,
    the tokenizer and the training data's class names."""

    name: ClassVar[str] = ""
    peft_task_type: ClassVar[str] = ""

    def __init__(self, model_cfg: ModelConfig, data_cfg: DataConfig, tokenizer: Any,
                 label_names: tuple[str, ...]) -> None:
        self.model_cfg, self.data_cfg = model_cfg, data_cfg
        self.tokenizer = tokenizer
        self.label_names = label_names

    @classmethod
    def build_model(cls, cfg: ModelConfig, num_labels: int) -> torch.nn.Module:
        """The frozen base model for this task."""
        return build_base(cfg, cls.name, num_labels)

    @abc.abstractmethod
    def encode(self, data: TextData) -> Batchable:
        """Tokenise ``data`` once; padding happens per batch."""

    @abc.abstractmethod
    def evaluate(self, model: torch.nn.Module, data: Any, batch_size: int,
                 device: torch.device) -> EvalMetrics:
        """Score ``model`` on encoded held-out examples."""

    def samples(self, model: torch.nn.Module, data: TextData,
                device: torch.device) -> list[tuple[str, str]]:
        """(prompt, greedy completion) for a few fixed held-out examples (none by default)."""
        return []

    def relabel(self, data: Any, labels: np.ndarray) -> Batchable:
        """Encoded examples with each one's class replaced by ``labels`` (what a label-flip
        attacker trains on). A task whose examples have no classes refuses."""
        raise ValueError(f"model.task = {self.name!r}: these examples have no classes to "
                         "relabel")
