"""FedSA-LoRA (Guo, Zeng, Wang, Fan, Wang, Qu; ICLR 2025, arXiv 2410.01463): share A, keep B.

Every client trains both LoRA factors (and the task head) but uploads only A; the server averages
A weighted by examples, Ā = Σ p_k A_k, and sends Ā back. Each client keeps its own B_k and head
(the reference code's ``personalization.local_param = ['lora_B', 'classifier']``) from the last
round it took part in, in its client state; a client never seen before starts from B = 0 and the
initial head, which the downlink carries (a few floats per class). Client k's model is
W0 + s B_k Ā: there is no single global model, so the model is scored on the clients, each with
its own B_k and head (eval.where = 'clients'); ``adapter/`` holds Ā with B = 0 and the initial
head, labelled as such (it alone scores as the base model does).

No optimizer state survives a round (FederatedScope builds a fresh optimizer every round, as the
trainer here does). The paper's optimizer is SGD at lr 0.02 (RoBERTa-large); with fedpeft's AdamW
the default rate is FedIT's.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fedpeft.core.adapters import AdapterModel, lora_pairs

from .base import (
    PERSONAL_DP_REFUSAL,
    Aggregate,
    ClientProfile,
    ClientState,
    Export,
    Method,
    Payload,
    TrainSpec,
    Upload,
    UploadSpec,
    register,
    weighted_mean,
)

PERSONAL = "fedsa-lora/"  # ClientState.tensors prefix of a client's own B and head


def shared_keys(keys: list[str]) -> list[str]:
    """The averaged tensors: lora_A of every wrapped layer."""
    return sorted(p.a_key for p in lora_pairs(keys, 1.0).values())


def b_keys(keys: list[str]) -> list[str]:
    return sorted(p.b_key for p in lora_pairs(keys, 1.0).values())


@register("fedsa-lora")
class FedSALoRA(Method):
    """FedSA-LoRA (Guo et al., ICLR 2025): clients train A, B and the head and send only A;
    the server averages A (Ā = Σ p_k A_k); B and the head stay on each client."""

    default_lr = 0.002
    personalized = True
    dp_refusal = PERSONAL_DP_REFUSAL
    robust_refusal = ("its aggregate is the plain weighted mean of A (a robust rule, which its "
                      "mathematics would allow, is not wired in)")

    def personal_keys(self, keys: Iterable[str]) -> set[str]:
        names = list(keys)
        return set(names) - set(shared_keys(names))

    # ---- server half -------------------------------------------------------------------
    def downlink(self, state: Payload, profile: ClientProfile) -> Payload:
        """Ā, plus the initial head for a client that has none yet (B starts at zero)."""
        keys = list(state.tensors)
        personal = self.personal_keys(keys) - set(b_keys(keys))
        return Payload({k: state.tensors[k] for k in [*shared_keys(keys), *sorted(personal)]})

    def expected_upload(self, state: Payload, profile: ClientProfile) -> UploadSpec:
        return UploadSpec({k: tuple(state.tensors[k].shape)
                           for k in shared_keys(list(state.tensors))})

    def aggregate(self, state: Payload, uploads: list[Upload]) -> Aggregate:
        """Ā = Σ p_k A_k (weights by example count, float64); B and the head are untouched."""
        mean = weighted_mean(uploads, shared_keys(list(state.tensors)))
        return Aggregate(Payload({**state.tensors, **mean}, dict(state.scalars)))

    def export(self, state: Payload) -> Export:
        return Export(dict(state.tensors), note=(
            "fedsa-lora keeps each client's lora_B and head on the client: adapter/ holds the "
            "shared lora_A averaged over the clients with B = 0 and the initial head, so on its "
            "own it scores as the base model does; a device keeps its own adapter with "
            "`fedpeft client --save-adapter DIR`"))

    # ---- client half -------------------------------------------------------------------
    def load(self, model: AdapterModel, payload: Payload, client_state: ClientState) -> None:
        """Ā from the server; the client's own B and head (B = 0 and the sent head at first)."""
        keys = list(model.params)
        own = {k: client_state.tensors[PERSONAL + k] for k in self.personal_keys(keys)
               if PERSONAL + k in client_state.tensors}
        fresh = {k: torch.zeros_like(model.params[k]) for k in b_keys(keys) if k not in own}
        model.load({**payload.tensors, **fresh, **own})

    def train_spec(self, model: AdapterModel) -> TrainSpec:
        return TrainSpec()  # A, B and the head all train

    def uplink(self, model: AdapterModel, payload: Payload, client_state: ClientState) -> Payload:
        """A only; B and the head go into the client state for its next round."""
        state = model.state()
        for key in self.personal_keys(list(state)):
            client_state.tensors[PERSONAL + key] = state[key]
        return Payload({k: state[k] for k in shared_keys(list(state))})
