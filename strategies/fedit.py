"""FedIT (Zhang et al., ICASSP 2024): FedAvg on the LoRA factors A and B (and the task head)
separately, weighted by each client's number of training examples."""

from __future__ import annotations

from .base import Method, Payload, Upload, register, weighted_mean


@register("fedit")
class FedIT(Method):
    """FedAvg on LoRA A and B separately, weighted by examples (the baseline)."""

    default_lr = 0.002
    client_dp = True  # a weighted mean of the uploads, the same downlink for every client

    def aggregate(self, state: Payload, uploads: list[Upload]) -> Payload:
        return Payload(weighted_mean(uploads, state.tensors))
