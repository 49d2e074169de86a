"""FedIT (Zhang et al., ICASSP 2024): FedAvg on the LoRA factors A and B (and the task head)
separately, weighted by each client's number of training examples."""

from __future__ import annotations

from .aggregators import robust_mean
from .base import Aggregate, Method, Payload, Upload, register


@register("fedit")
class FedIT(Method):
    """FedAvg on LoRA A and B separately, weighted by examples (the baseline)."""

    default_lr = 0.002
    mean_aggregate = True  # a weighted mean of the uploads, the same downlink for every client

    def aggregate(self, state: Payload, uploads: list[Upload]) -> Aggregate:
        robust = robust_mean(self.ctx.aggregator, uploads, state.tensors, state.tensors)
        return Aggregate(Payload(robust.tensors), robust.metrics)
