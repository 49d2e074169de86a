from __future__ import annotations

import torch
from fedpeft.strategies import ClientProfile, Payload, Upload, build_method

from fedpeft.core.config import load_config


def _upload(tensors: dict[str, torch.Tensor], n: int) -> Upload:
    return Upload(ClientProfile(0, 4), Payload(tensors), n)


def test_fedit_is_example_weighted_mean_of_each_factor() -> None:
    torch.manual_seed(0)
    method = build_method(load_config(None, ['method.name="fedit"']))
    keys = ["l.lora_A.weight", "l.lora_B.weight", "head.weight"]
    shapes = [(4, 16), (16, 4), (2, 16)]
    clients = [{k: torch.randn(s) for k, s in zip(keys, shapes, strict=True)} for _ in range(5)]
    sizes = [10, 1, 30, 7, 2]
    state = method.init({k: torch.zeros(s) for k, s in zip(keys, shapes, strict=True)})
    uploads = [_upload(c, n) for c, n in zip(clients, sizes, strict=True)]
    new = method.aggregate(state, uploads).state
    for k in keys:
        expected = sum(n * c[k] for c, n in zip(clients, sizes, strict=True)) / sum(sizes)
        assert torch.allclose(new.tensors[k], expected, atol=1e-6)
    # One client: aggregation returns its tensors unchanged.
    alone = method.aggregate(state, [_upload(clients[0], 3)]).state
    assert all(torch.allclose(alone.tensors[k], clients[0][k]) for k in keys)
    # Downlink sends every adapter tensor.
    assert set(method.downlink(new, ClientProfile(0, 4)).tensors) == set(keys)


def test_plain_loop_runs_back_to_back_start_from_the_same_adapter() -> None:
    """Experiment scripts run several plain-loop runs in one process; the cached workspace model
    is trained by the first, so the second must not take its initial global adapter from it."""
    from fedpeft.server.inprocess import run_plain

    from tests.helpers import TINY

    first = run_plain(None, [*TINY, 'method.name="fedit"'])
    second = run_plain(None, [*TINY, 'method.name="fedit"'])
    assert [r["loss"] for r in first] == [r["loss"] for r in second]
    assert first[-1]["loss"] != first[0]["loss"]  # it trained, so a leak would show
