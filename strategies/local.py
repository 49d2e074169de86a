"""Local training only: every client trains its own adapter on its own data and nothing is
averaged (the lower bound of the personalisation literature: what a client gets without the
federation).

The downlink is the common initial adapter (the same every round; a client that has one of its
own ignores it), the uplink holds no tensors at all, and the server's state never changes. Scored
on the clients only (eval.where = 'clients'), each with its own adapter.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedpeft.core.adapters import AdapterModel

from .base import (
    PERSONAL_DP_REFUSAL,
    Aggregate,
    ClientProfile,
    ClientState,
    Export,
    Method,
    Payload,
    Upload,
    UploadSpec,
    register,
)

OWN = "local/"  # ClientState.tensors prefix of the client's own adapter


@register("local-only")
class Local(Method):
    """No federation: each client trains only its own adapter; nothing is uploaded or averaged."""

    default_lr = 0.002
    personalized = True
    dp_refusal = PERSONAL_DP_REFUSAL

    def personal_keys(self, keys: Iterable[str]) -> set[str]:
        return set(keys)

    def expected_upload(self, state: Payload, profile: ClientProfile) -> UploadSpec:
        return UploadSpec({})

    def aggregate(self, state: Payload, uploads: list[Upload]) -> Aggregate:
        return Aggregate(state)

    def export(self, state: Payload) -> Export:
        return Export(dict(state.tensors), note=(
            "local-only trains a separate adapter on every client and shares none: adapter/ is the "
            "common initial adapter; a device keeps its own with `fedpeft client --save-adapter "
            "DIR`"))

    def load(self, model: AdapterModel, payload: Payload, client_state: ClientState) -> None:
        own = {k: client_state.tensors[OWN + k] for k in model.params
               if OWN + k in client_state.tensors}
        model.load({**payload.tensors, **own})

    def uplink(self, model: AdapterModel, payload: Payload, client_state: ClientState) -> Payload:
        for key, value in model.state().items():
            client_state.tensors[OWN + key] = value
        return Payload({})
