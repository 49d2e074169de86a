"""Text classification with an encoder (or any model) and a classification head: the model
predicts one of the task's classes from the whole text; loss and accuracy over the classes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from fedpeft.core.config import ConfigError, ModelConfig
from fedpeft.core.data import TextData

from .base import EvalMetrics, Task


@dataclass(frozen=True)
class Encoded:
    """Token ids per example (unpadded) and labels: padding happens per batch."""

    ids: tuple[tuple[int, ...], ...]
    labels: np.ndarray
    pad_id: int

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self, indices: np.ndarray) -> np.ndarray:
        return np.fromiter((len(self.ids[i]) for i in indices), dtype=np.int64,
                           count=len(indices))

    def batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        rows = [self.ids[i] for i in indices]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, row in enumerate(rows):
            input_ids[j, : len(row)] = torch.tensor(row)
            mask[j, : len(row)] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "labels": torch.as_tensor(self.labels[indices]),
        }


def encode(tokenizer: object, data: TextData, max_length: int) -> Encoded:
    out = tokenizer(list(data.texts), truncation=True, max_length=max_length)  # type: ignore[operator]
    return Encoded(tuple(tuple(x) for x in out["input_ids"]), data.labels,
                   tokenizer.pad_token_id)  # type: ignore[attr-defined]


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Encoded, batch_size: int,
             device: torch.device) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over ``data``; batches sorted by length to pad less."""
    model.eval()
    order = np.argsort([len(x) for x in data.ids], kind="stable")
    correct, loss_sum = 0, 0.0
    for start in range(0, len(order), batch_size):
        batch = {k: v.to(device) for k, v in data.batch(order[start : start + batch_size]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss_sum += float(torch.nn.functional.cross_entropy(logits.float(), batch["labels"],
                                                            reduction="sum"))
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
    return correct / len(data), loss_sum / len(data)


class Classification(Task):
    """A head over the classes; every example carries the loss of its label."""

    name = "classification"
    peft_task_type = "SEQ_CLS"

    @classmethod
    def build_model(cls, cfg: ModelConfig, num_labels: int) -> torch.nn.Module:
        if num_labels < 2:
            raise ConfigError(
                "model.task = 'classification' needs labelled data (a text and a label column); "
                "instruction or chat data needs a causal LM (model.task = 'causal-lm')")
        return super().build_model(cfg, num_labels)

    def relabel(self, data: Encoded, labels: np.ndarray) -> Encoded:
        return dataclasses.replace(data, labels=np.asarray(labels))

    def encode(self, data: TextData) -> Encoded:
        if data.chats is not None:
            raise ConfigError("model.task = 'classification' cannot train on instruction or "
                              "chat data; use a causal LM (model.task = 'causal-lm')")
        return encode(self.tokenizer, data, self.model_cfg.max_length)

    def evaluate(self, model: torch.nn.Module, data: Encoded, batch_size: int,
                 device: torch.device) -> EvalMetrics:
        accuracy, loss = evaluate(model, data, batch_size, device)
        return EvalMetrics(accuracy, loss, len(data))
