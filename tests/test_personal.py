"""Personalised methods (issue 27): FedSA-LoRA (share A, keep B and the head) and local training,
against their own formulas; the interface's personal parts never travel."""

from __future__ import annotations

import pytest
import torch
from fedpeft.client.trainer import client_round
from fedpeft.strategies import ClientProfile, Payload, Upload, build_method

from fedpeft.core.adapters import build_adapter_model
from fedpeft.core.config import ConfigError, load_config
from fedpeft.core.payload import ClientState
from fedpeft.core.workspace import get_workspace
from tests.helpers import TINY

CLIENTS = ['eval.where="clients"']
KEYS = {"l.lora_A.weight": (4, 24), "l.lora_B.weight": (16, 4),  # non-square layer
        "m.lora_A.weight": (4, 16), "m.lora_B.weight": (16, 4), "head.weight": (3, 16)}


def _method(name: str, *extra: str):
    return build_method(load_config(None, [f'method.name="{name}"', *CLIENTS, *extra]))


def test_fedsa_aggregate_is_the_weighted_mean_of_a_only() -> None:
    torch.manual_seed(0)
    method = _method("fedsa-lora")
    state = method.init({k: torch.randn(s) for k, s in KEYS.items()})
    base = {k: torch.randn(s) for k, s in KEYS.items()}
    sizes = [13, 2, 40, 7]
    # clients that roughly agree: the same A plus small client noise
    a_k = [{k: base[k] + 0.05 * torch.randn(s) for k, s in KEYS.items() if "lora_A" in k}
           for _ in sizes]
    ups = [Upload(ClientProfile(i, 4), Payload(a), n) for i, (a, n) in enumerate(
        zip(a_k, sizes, strict=True))]
    new = method.aggregate(state, ups).state
    total = sum(sizes)
    for key in ("l.lora_A.weight", "m.lora_A.weight"):
        ref = sum(n / total * a[key].double() for a, n in zip(a_k, sizes, strict=True))
        assert torch.allclose(new.tensors[key].double(), ref, atol=1e-6)
    for key in ("l.lora_B.weight", "m.lora_B.weight", "head.weight"):  # the server never writes
        assert torch.equal(new.tensors[key], state.tensors[key])
    shuffled = method.aggregate(state, ups[::-1]).state  # client order does not matter
    assert all(torch.allclose(shuffled.tensors[k], new.tensors[k], atol=1e-7) for k in KEYS)
    spec = method.expected_upload(state, ClientProfile(0, 4))
    assert set(spec.tensors) == {"l.lora_A.weight", "m.lora_A.weight"}
    assert method.personal_keys(KEYS) == {"l.lora_B.weight", "m.lora_B.weight", "head.weight"}
    down = method.downlink(new, ClientProfile(0, 4)).tensors  # Ā and the initial head, no B
    assert set(down) == {"l.lora_A.weight", "m.lora_A.weight", "head.weight"}


def _round(cfg, method, down: Payload, pid: int, rnd: int, state: ClientState):
    ws = get_workspace(cfg)
    return client_round(cfg, method, ws, down, partition_id=pid, rank=cfg.model.rank,
                        server_round=rnd, client_state=state)


def test_fedsa_client_keeps_b_and_head_and_sends_only_a() -> None:
    cfg = load_config(None, [*TINY, *CLIENTS, 'method.name="fedsa-lora"', "train.lr=0.01"])
    ws = get_workspace(cfg)
    method = build_method(cfg, num_labels=ws.num_labels)
    template = ws.adapter_model(cfg.model.rank)
    state = method.init(template.state())
    profile = ClientProfile(0, cfg.model.rank)
    own = ClientState()
    first = _round(cfg, method, method.downlink(state, profile), 0, 1, own)
    personal = method.personal_keys(template.params)
    assert personal and not personal & set(first.payload.tensors)  # nothing personal travels
    assert not any("lora_B" in k or k in template.head_keys for k in first.payload.tensors)
    kept = {k: v.clone() for k, v in own.tensors.items()}
    assert len(kept) == len(personal)
    assert any(float(v.abs().sum()) > 0 for k, v in kept.items() if "lora_B" in k)  # B trained
    # the server aggregates other clients meanwhile; this client comes back two rounds later
    other = ClientState()
    up = _round(cfg, method, method.downlink(state, profile), 1, 1, other).payload
    state = method.aggregate(state, [Upload(profile, first.payload, 10),
                                     Upload(ClientProfile(1, cfg.model.rank), up, 12)]).state
    adapter = ws.adapter_model(cfg.model.rank)
    method.load(adapter, method.downlink(state, profile), own)
    loaded = adapter.state()
    for key in personal:  # its own B and head, not the server's (B = 0, initial head)
        assert torch.equal(loaded[key], kept["fedsa-lora/" + key])
    for key in method.expected_upload(state, profile).tensors:  # and the newest Ā
        assert torch.equal(loaded[key], state.tensors[key])


def test_fedsa_with_one_client_is_local_training() -> None:
    """One client, two rounds: FedSA-LoRA (A averaged over one client, B kept) gives the model
    that `local-only` (nothing averaged) gives."""
    models, template = {}, None
    for name in ("fedsa-lora", "local-only"):
        cfg = load_config(None, [*TINY, *CLIENTS, f'method.name="{name}"', "train.lr=0.01"])
        ws = get_workspace(cfg)
        method = build_method(cfg, num_labels=ws.num_labels)
        template = template or build_adapter_model(cfg.model, ws.num_labels).state()  # B = 0
        state = method.init(template)
        profile, own = ClientProfile(0, cfg.model.rank), ClientState()
        for rnd in (1, 2):
            res = _round(cfg, method, method.downlink(state, profile), 0, rnd, own)
            state = method.aggregate(state, [Upload(profile, res.payload, res.num_examples)]).state
        adapter = ws.adapter_model(cfg.model.rank)
        method.load(adapter, method.downlink(state, profile), own)
        models[name] = adapter.state()
    assert all(torch.allclose(models["fedsa-lora"][k], models["local-only"][k], atol=1e-6)
               for k in models["local-only"])


def test_local_uploads_nothing_and_keeps_its_adapter() -> None:
    method = _method("local-only")
    state = method.init({k: torch.randn(s) for k, s in KEYS.items()})
    assert method.expected_upload(state, ClientProfile(0, 4)).tensors == {}
    assert method.aggregate(state, []).state is state


def test_personalised_methods_need_client_side_evaluation() -> None:
    for name in ("fedsa-lora", "local-only"):
        for where in ("server", "both"):
            with pytest.raises(ConfigError, match=r"eval\.where = 'clients'"):
                build_method(load_config(None, [f'method.name="{name}"',
                                                f'eval.where="{where}"']))
