"""FFA-LoRA: shared frozen A from a seed, exact aggregation of B, half of FedIT's adapter bytes."""

from __future__ import annotations

import math

import pytest
import torch
from fedpeft.client.trainer import client_lr, client_round
from fedpeft.strategies import ClientProfile, Upload, build_method
from fedpeft.strategies.ffa_lora import SEED_KEY, frozen_factor

from fedpeft.core.adapters import build_adapter_model
from fedpeft.core.config import ConfigError, ModelConfig, load_config
from fedpeft.core.payload import ClientState, Payload
from fedpeft.core.wire import payload_to_records, records_to_payload, serialized_nbytes
from fedpeft.core.workspace import get_workspace
from tests.helpers import TINY

PROFILE = ClientProfile(0, 8)


def _ffa(*overrides: str):
    return build_method(load_config(None, ['method.name="ffa-lora"', *overrides]))


def _template(layers: int, d: int, r: int, labels: int = 2) -> dict[str, torch.Tensor]:
    """peft-shaped adapter state: query/value LoRA per layer plus a classifier head."""
    out: dict[str, torch.Tensor] = {}
    for i in range(layers):
        for mod in ("query", "value"):
            stem = f"base_model.model.bert.encoder.layer.{i}.attention.self.{mod}"
            out[f"{stem}.lora_A.weight"] = torch.randn(r, d) / math.sqrt(d)
            out[f"{stem}.lora_B.weight"] = torch.zeros(d, r)
    out["base_model.model.classifier.weight"] = torch.randn(labels, d)
    out["base_model.model.classifier.bias"] = torch.zeros(labels)
    return out


def _a_keys(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in tensors if k.endswith("lora_A.weight")]


def test_frozen_factor_is_peft_init_deterministic_and_leaves_global_rng_alone() -> None:
    rng_before = torch.get_rng_state()
    a1 = frozen_factor(7, "x.lora_A.weight", (8, 384))
    a2 = frozen_factor(7, "x.lora_A.weight", (8, 384))
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.equal(a1, a2)
    a1.add_(1.0)  # callers get copies: the cache cannot be corrupted
    assert torch.equal(frozen_factor(7, "x.lora_A.weight", (8, 384)), a2)
    assert not torch.equal(frozen_factor(8, "x.lora_A.weight", (8, 384)), a2)
    assert not torch.equal(frozen_factor(7, "y.lora_A.weight", (8, 384)), a2)
    # kaiming_uniform(a=sqrt(5)) on (r, d_in) = U(-1/sqrt(d_in), 1/sqrt(d_in)): variance 1/(3 d_in)
    big = frozen_factor(1, "z.lora_A.weight", (64, 384))
    bound = 1 / math.sqrt(384)
    assert float(big.abs().max()) <= bound
    assert float(big.abs().max()) > 0.98 * bound
    assert float(big.var()) == pytest.approx(1 / (3 * 384), rel=0.05)


def test_server_state_downlink_and_seed_option() -> None:
    template = _template(2, 32, 4)
    method = _ffa("federation.seed=3")
    state = method.init(template)
    assert state.scalars[SEED_KEY] == 3
    for key in _a_keys(template):
        assert torch.equal(state.tensors[key], frozen_factor(3, key, (4, 32)))
    down = method.downlink(state, PROFILE)
    assert not _a_keys(down.tensors)  # A never travels
    assert set(down.tensors) == {k for k in template if "lora_A" not in k}
    assert down.scalars == {SEED_KEY: 3}
    assert method.expected_upload(state, PROFILE).tensors == {k: tuple(v.shape)
                                                      for k, v in down.tensors.items()}
    explicit = _ffa("federation.seed=3", "method.seed=11").init(template)
    assert explicit.scalars[SEED_KEY] == 11
    with pytest.raises(ConfigError, match=r"method.seed"):
        _ffa("method.seed=-2")


def test_aggregation_is_exact_for_the_shared_a() -> None:
    torch.manual_seed(0)
    method = _ffa()
    state = method.init(_template(3, 48, 6))
    sizes = [5, 40, 1, 13]
    uploads = []
    for n in sizes:
        sent = {k: torch.randn_like(v) for k, v in method.downlink(state, PROFILE).tensors.items()}
        uploads.append(Upload(PROFILE, Payload(sent), n))
    new = method.aggregate(state, uploads).state
    p = torch.tensor(sizes, dtype=torch.float64) / sum(sizes)
    for a_key in _a_keys(state.tensors):
        b_key = a_key.replace("lora_A", "lora_B")
        a = state.tensors[a_key].double()
        assert torch.equal(new.tensors[a_key], state.tensors[a_key])  # A unchanged
        mean_of_products = sum(pk * (u.payload.tensors[b_key].double() @ a)
                               for pk, u in zip(p, uploads, strict=True))
        product_of_mean = new.tensors[b_key].double() @ a
        assert torch.allclose(product_of_mean, mean_of_products, atol=1e-6)
    head = "base_model.model.classifier.weight"
    expected = sum(pk * u.payload.tensors[head].double() for pk, u in zip(p, uploads, strict=True))
    assert torch.allclose(new.tensors[head].double(), expected, atol=1e-6)
    assert new.scalars == state.scalars


def test_adapter_bytes_per_round_are_half_of_fedit() -> None:
    """Measured from Flower's serialised records, at MiniLM-L6's shapes (d = 384, r = 8)."""
    torch.manual_seed(0)
    template = _template(6, 384, 8)
    fedit, ffa = build_method(load_config(None, [])), _ffa()
    trained = {k: torch.randn_like(v) for k, v in template.items()}  # B != 0, as after round 1

    def adapter_bytes(payload: Payload) -> int:
        lora = {k: v for k, v in payload.tensors.items() if ".lora_" in k}
        return serialized_nbytes(payload_to_records(Payload(lora, payload.scalars)))

    fedit_state = fedit.init(trained)
    ffa_state = ffa.init(trained)
    ffa_state.tensors.update({k: v for k, v in trained.items() if "lora_B" in k})
    down_fedit = adapter_bytes(fedit.downlink(fedit_state, PROFILE))
    down_ffa = adapter_bytes(ffa.downlink(ffa_state, PROFILE))
    up_fedit = adapter_bytes(Payload(trained))
    up_ffa = adapter_bytes(Payload({k: v for k, v in trained.items() if "lora_A" not in k}))
    assert down_ffa / down_fedit == pytest.approx(0.5, abs=0.005)
    assert up_ffa / up_fedit == pytest.approx(0.5, abs=0.005)
    # The whole message with the head: a little over half.
    whole = serialized_nbytes(payload_to_records(ffa.downlink(ffa_state, PROFILE)))
    whole_fedit = serialized_nbytes(payload_to_records(fedit.downlink(fedit_state, PROFILE)))
    assert 0.5 < whole / whole_fedit < 0.52
    # The seed survives the wire.
    back = records_to_payload(payload_to_records(ffa.downlink(ffa_state, PROFILE)))
    assert back.scalars[SEED_KEY] == ffa_state.scalars[SEED_KEY]


def test_client_round_trains_b_and_head_only_with_the_servers_a() -> None:
    cfg = load_config(None, [*TINY, 'method.name="ffa-lora"', "federation.seed=5"])
    method = build_method(cfg)
    workspace = get_workspace(cfg)
    adapter = workspace.adapter_model(cfg.model.rank)
    state = method.init(adapter.state())
    down = records_to_payload(payload_to_records(method.downlink(state, PROFILE)))
    adapter.load({k: torch.randn_like(v) for k, v in adapter.state().items()})  # stale A
    result = client_round(cfg, method, workspace, down, partition_id=0, rank=cfg.model.rank,
                          server_round=1, client_state=ClientState())
    a_keys = _a_keys(state.tensors)
    assert set(adapter.trainable_keys()) == set(state.tensors) - set(a_keys)
    for key in a_keys:  # the client regenerated the server's A and did not train it
        assert torch.equal(adapter.params[key].detach(), state.tensors[key])
    expected = method.expected_upload(state, PROFILE).tensors
    assert {k: tuple(v.shape) for k, v in result.payload.tensors.items()} == expected
    moved = [k for k in expected if not torch.equal(result.payload.tensors[k], state.tensors[k])]
    assert any("lora_B" in k for k in moved)
    new = method.aggregate(state, [Upload(PROFILE, result.payload, result.num_examples)]).state
    assert set(method.export(new).tensors) == set(state.tensors)  # export gets A, B and head


def test_default_learning_rate_is_ffa_specific() -> None:
    ffa_cfg = load_config(None, ['method.name="ffa-lora"'])
    fedit_cfg = load_config(None, [])
    assert client_lr(ffa_cfg, build_method(ffa_cfg)) == pytest.approx(0.02)
    assert client_lr(fedit_cfg, build_method(fedit_cfg)) == pytest.approx(0.002)
    explicit = load_config(None, ['method.name="ffa-lora"', "train.lr=0.005"])
    assert client_lr(explicit, build_method(explicit)) == pytest.approx(0.005)


def test_embedding_lora_is_refused() -> None:
    cfg = ModelConfig(name="tiny-bert", rank=4, alpha=8, target_modules=["word_embeddings",
                                                                         "query"])
    adapter = build_adapter_model(cfg, num_labels=2)
    method = _ffa()
    with pytest.raises(ConfigError, match="embedding LoRA"):
        method.init(adapter.state())
    with pytest.raises(ConfigError, match="embedding LoRA"):
        method.load(adapter, Payload({}, {SEED_KEY: 0}), ClientState())
