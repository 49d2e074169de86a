"""FedIT (Zhang et al., ICASSP 2024): FedAvg on the LoRA factors A and B (and the task head)
separately, weighted by each client's number of training examples."""

from __future__ import annotations

from .aggregators import robust_mean
from .base import Method, Payload, Upload, register


@register("fedit")
class FedIT(Method):
    """FedAvg on LoRA A and B separately, weighted by examples (the baseline)."""

    default_lr = 0.002
    client_dp = True  # a weighted mean of the uploads, the same downlink for every client
    robust_aggregation = True  # federation.aggregator: any of AGGREGATORS

    def aggregate(self, state: Payload, uploads: list[Upload]) -> Payload:
        robust = robust_mean(self.ctx.aggregator, uploads, state.tensors, state.tensors)
        self.dropped_uploads = robust.dropped
        return Payload(robust.tensors)
