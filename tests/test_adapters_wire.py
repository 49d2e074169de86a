from __future__ import annotations

import torch
from flwr.app import RecordDict

from fedpeft.core.adapters import build_adapter_model, lora_pairs
from fedpeft.core.config import ModelConfig
from fedpeft.core.payload import ClientState, Payload
from fedpeft.core.wire import (
    load_client_state,
    payload_to_records,
    records_to_payload,
    save_client_state,
    serialized_nbytes,
    tensor_nbytes,
)

TINY = ModelConfig(name="tiny-bert", rank=4, alpha=8)


def test_adapter_state_is_adapter_only_and_pairs_layers() -> None:
    adapter = build_adapter_model(TINY, num_labels=2)
    state = adapter.state()
    total = sum(p.numel() for p in adapter.model.parameters())
    assert adapter.num_floats() < total / 10
    assert len(adapter.pairs) == 2 * 2  # 2 layers x (query, value)
    for pair in adapter.pairs.values():
        assert state[pair.a_key].shape == (4, 32)
        assert state[pair.b_key].shape == (32, 4)
        assert pair.scale == 2.0
    assert sorted(adapter.head_keys) == ["base_model.model.classifier.bias",
                                         "base_model.model.classifier.weight"]
    assert set(lora_pairs(list(state), 1.0)) == set(adapter.pairs)


def test_adapter_load_round_trip_and_checks() -> None:
    adapter = build_adapter_model(TINY, num_labels=2)
    new = {k: torch.randn_like(v) for k, v in adapter.state().items()}
    adapter.load(new)
    assert all(torch.equal(adapter.state()[k], v) for k, v in new.items())
    bad = dict(new)
    key = next(iter(bad))
    bad[key] = torch.zeros(3)
    try:
        adapter.load(bad)
    except ValueError as exc:
        assert "shape" in str(exc)
    else:
        raise AssertionError("wrong shape accepted")


def test_same_base_everywhere() -> None:
    one = build_adapter_model(TINY, 2).model.state_dict()
    two = build_adapter_model(TINY, 2).model.state_dict()
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_adapter_forward_changes_with_b() -> None:
    adapter = build_adapter_model(TINY, 2)
    ids = torch.randint(0, 1000, (2, 7))
    before = adapter.model(input_ids=ids).logits
    adapter.load({k: v + 0.5 for k, v in adapter.state().items() if "lora_B" in k}, strict=False)
    assert not torch.allclose(before, adapter.model(input_ids=ids).logits)


def test_payload_record_round_trip_and_byte_count() -> None:
    tensors = {"a": torch.randn(8, 384), "b": torch.randn(384, 8), "h": torch.randn(2)}
    records = payload_to_records(Payload(tensors, {"k": 3}), extra={"fedpeft.round": 1})
    back = records_to_payload(records)
    assert all(torch.equal(back.tensors[k], v) for k, v in tensors.items())
    assert back.scalars == {"k": 3, "fedpeft.round": 1}
    raw = tensor_nbytes(tensors)
    counted = serialized_nbytes(records)
    assert raw == (2 * 8 * 384 + 2) * 4
    assert raw < counted < raw + 1200  # one packed array, its manifest and the scalars
    bigger = payload_to_records(Payload({**tensors, "c": torch.randn(1000)}, {"k": 3}),
                                extra={"fedpeft.round": 1})
    assert 4000 <= serialized_nbytes(bigger) - counted < 4100


def test_client_state_round_trip() -> None:
    store = RecordDict()
    assert load_client_state(store) == ClientState()
    state = ClientState({"x": torch.arange(3.0)}, {"rank": 4, "note": "pruned"})
    save_client_state(store, state)
    back = load_client_state(store)
    assert torch.equal(back.tensors["x"], state.tensors["x"])
    assert back.values == state.values
