"""The base-model fingerprint (issue 14): every party must hold the same frozen base. The digest
sees every frozen weight and none of the tensors that travel (LoRA factors, the task head); the
round loop rejects a reply whose fingerprint is not the server's, in the plain loop and over
the Flower wire, and the run finishes with the honest clients."""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

import pytest
import torch
from fedpeft.client import step as client_step_module
from fedpeft.client import trainer
from fedpeft.server import app as server_app
from fedpeft.server import inprocess
from fedpeft.server.reporting import MetricsLog
from fedpeft.server.rounds import Reply, RoundLoop, new_loop, run_rounds
from fedpeft.strategies import ClientProfile, build_method
from flwr.app import ArrayRecord, ConfigRecord, Message

from fedpeft.core.adapters import build_adapter_model
from fedpeft.core.config import FedConfig, ModelConfig, load_config
from fedpeft.core.fingerprint import (
    base_fingerprint,
    frozen_tensors,
    tensors_digest,
    travelling_names,
)
from fedpeft.core.keys import BASE_FINGERPRINT, REPLY_INFO
from fedpeft.core.models import MODELS, load_tokenizer
from fedpeft.core.payload import Payload
from fedpeft.core.workspace import get_workspace
from tests.helpers import TINY, FakeGrid

TINY_BERT = ModelConfig(name="tiny-bert")
QUERY = "bert.encoder.layer.0.attention.self.query.weight"  # a frozen base weight LoRA wraps


def _fresh_base() -> torch.nn.Module:
    """tiny-bert built from scratch (its own seed), not the process's cached copy."""
    return MODELS["tiny-bert"].build(2)


def _digest(model: torch.nn.Module) -> str:
    adapter = build_adapter_model(TINY_BERT, 2, 4)
    return tensors_digest(frozen_tensors(model, travelling_names(adapter.params)))


def test_the_digest_format_is_pinned() -> None:
    # a fleet mixes releases: a new digest format would reject every older client's base
    tensors = {"b": torch.tensor([1.0, -2.0], dtype=torch.bfloat16),
               "a": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    assert tensors_digest(tensors) == "39478f73daa1809e"
    assert tensors_digest(dict(reversed(tensors.items()))) == "39478f73daa1809e"  # sorted
    assert tensors_digest({"a": tensors["a"].reshape(3, 2), "b": tensors["b"]}) != \
        "39478f73daa1809e"  # same bytes, another shape


def test_the_same_weights_give_the_same_fingerprint() -> None:
    one, two = _fresh_base(), _fresh_base()
    assert one is not two and _digest(one) == _digest(two)
    assert len(_digest(one)) == 16 and set(_digest(one)) <= set("0123456789abcdef")
    cfg = load_config(None, TINY)
    assert get_workspace(cfg).base_fingerprint() == _digest(one)  # what a client sends


def test_one_changed_base_weight_changes_the_fingerprint() -> None:
    base = _fresh_base()
    before = _digest(base)
    with torch.no_grad():
        weight = base.get_parameter(QUERY)
        weight[3, 5] = torch.nextafter(weight[3, 5], torch.tensor(1.0))  # the smallest change
    assert _digest(base) != before
    as_bf16 = copy.deepcopy(_fresh_base()).to(torch.bfloat16)
    assert _digest(as_bf16) != before  # another model.dtype is another base


def test_adapter_and_head_weights_do_not_change_it() -> None:
    cfg = load_config(None, TINY)
    workspace = get_workspace(cfg)
    before = workspace.base_fingerprint()
    adapter = workspace.adapter_model(cfg.model.rank)
    assert any(k.endswith("lora_B.weight") for k in adapter.params) and adapter.head_keys
    adapter.load({k: torch.randn_like(v) for k, v in adapter.params.items()})  # "trained"
    assert workspace.base_fingerprint() == before
    # the head travels (the server overwrites it every round): a base whose head was drawn
    # otherwise has the same fingerprint; any other weight counts
    base = _fresh_base()
    with torch.no_grad():
        base.get_parameter("classifier.weight").add_(1.0)
    assert _digest(base) == before
    assert base_fingerprint(TINY_BERT, 2, []) != before  # head included: another digest


# ---- the round loop -------------------------------------------------------------------------
KEYS = {"m.lora_A.weight": (4, 16), "m.lora_B.weight": (16, 4), "head.weight": (2, 16)}
OURS = "0123456789abcdef"


def _loop() -> RoundLoop:
    cfg = load_config(None, ['method.name="fedit"', "federation.clients=4",
                             "federation.clients_per_round=4", "federation.min_replies=1"])
    method = build_method(cfg)
    start = {k: torch.zeros(s) for k, s in KEYS.items()}
    return RoundLoop(cfg, method, method.init(start), fingerprint=OURS)


def _reply(loop: RoundLoop, partition: int, value: float, fingerprint: object) -> Reply:
    sent = loop.downlink(ClientProfile(partition, 8))
    tensors = {k: torch.full_like(v, value) for k, v in sent.tensors.items()}
    return Reply(ClientProfile(partition, 8, node_id=partition),
                 {"num-examples": 10, "train_s": 1.0}, Payload(tensors), fingerprint=fingerprint)


def test_the_loop_rejects_another_base_and_names_both_fingerprints(
        caplog: pytest.LogCaptureFixture) -> None:
    loop = _loop()
    stats = loop.collect(1, [_reply(loop, 0, 1.0, OURS), _reply(loop, 1, 3.0, OURS),
                             _reply(loop, 2, 500.0, "fedcba9876543210")])
    assert (stats["clients_ok"], stats["clients_rejected"], stats["aggregated"]) == (2, 1, 1)
    assert float(loop.state.tensors["m.lora_B.weight"].mean()) == pytest.approx(2.0)
    assert ("rejected client 2: base model fingerprint fedcba9876543210 differs from the "
            f"server's {OURS} (model.name = 'minilm-l6')") in caplog.text


@pytest.mark.parametrize("bad", [12, "xyz", "ABCDEF", "", "a" * 65, ["0123"], b"01"])
def test_a_malformed_fingerprint_is_a_rejection_not_a_crash(bad: object) -> None:
    loop = _loop()
    stats = loop.collect(1, [_reply(loop, 0, 1.0, OURS), _reply(loop, 1, 9.0, bad)])
    assert (stats["clients_ok"], stats["clients_rejected"]) == (1, 1)


def test_a_reply_without_a_fingerprint_is_accepted_with_one_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    loop = _loop()
    for rnd in (1, 2):
        stats = loop.collect(rnd, [_reply(loop, 0, 1.0, OURS), _reply(loop, 3, 3.0, None)])
        assert (stats["clients_ok"], stats["clients_rejected"]) == (2, 0)
    assert caplog.text.count("client 3 sent no base model fingerprint") == 1
    unchecked = _loop()
    unchecked.fingerprint = None  # a loop built without its own: nothing is compared
    stats = unchecked.collect(1, [_reply(unchecked, 0, 1.0, "fedcba9876543210")])
    assert stats["clients_ok"] == 1


# ---- whole runs -----------------------------------------------------------------------------
def _other_base(folder: Path) -> Path:
    """tiny-bert saved as a Hugging Face folder with one weight nudged: the same architecture,
    tokenizer and keys, another base."""
    model = _fresh_base()
    with torch.no_grad():
        model.get_parameter(QUERY)[0, 0] += 0.01
    model.save_pretrained(str(folder))
    load_tokenizer("tiny-bert").save_pretrained(str(folder))
    return folder


def _run_cfg() -> FedConfig:
    return load_config(None, [*TINY, "federation.clients=4", "federation.clients_per_round=4",
                              "federation.min_replies=2", "eval.every=2"])


def test_the_plain_loop_rejects_a_client_on_another_base_and_finishes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    cfg = _run_cfg()
    workspace = get_workspace(cfg)
    other_cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, name=str(_other_base(tmp_path / "other"))))
    other = get_workspace(other_cfg)  # client 1's own model files
    assert other.base_fingerprint() != workspace.base_fingerprint()

    def client_round(*args: object, partition_id: int, **kwargs: object) -> trainer.ClientResult:
        args = (*args[:2], other, *args[3:]) if partition_id == 1 else args
        return trainer.client_round(*args, partition_id=partition_id, **kwargs)

    monkeypatch.setattr(client_step_module, "client_round", client_round)
    caplog.set_level(logging.INFO)
    loop = new_loop(cfg, workspace, simulation=True)
    transport = inprocess.InProcessTransport(cfg, loop.method, workspace)
    summary = run_rounds(loop, transport, workspace, tmp_path / "run")
    rows = MetricsLog.read(tmp_path / "run" / "metrics.jsonl")
    assert [(r["clients_ok"], r["clients_rejected"], r["aggregated"]) for r in rows[1:]] == \
        [(3, 1, 1), (3, 1, 1)]
    assert summary["base_fingerprint"] == workspace.base_fingerprint()
    assert summary["final_accuracy"] is not None
    assert (f"rejected client 1: base model fingerprint {other.base_fingerprint()} differs "
            f"from the server's {workspace.base_fingerprint()} (model.name = 'tiny-bert')"
            ) in caplog.text


class _TamperingGrid(FakeGrid):
    """Flower's wire: the real ClientApp replies; one client's fingerprint is replaced (as a
    device on other model files would send it), another's info record is dropped (an older
    client) and a third's is no ConfigRecord at all."""

    def _deliver(self, msg: Message, partition: int) -> Message:
        reply = super()._deliver(msg, partition)
        assert reply.content[REPLY_INFO][BASE_FINGERPRINT] == self.expected
        if partition == 1:
            reply.content[REPLY_INFO] = ConfigRecord({BASE_FINGERPRINT: "fedcba9876543210"})
        elif partition == 2:
            del reply.content[REPLY_INFO]
        elif partition == 3:
            reply.content[REPLY_INFO] = ArrayRecord()
        return reply


@pytest.mark.usefixtures("in_process")
def test_over_flower_the_fingerprint_travels_and_a_mismatch_is_rejected(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config(None, [*TINY, "federation.clients=5", "federation.clients_per_round=5",
                             "federation.min_replies=2", "eval.every=2"])
    grid = _TamperingGrid(range(11, 16))
    grid.expected = get_workspace(cfg).base_fingerprint()
    summary = server_app.run_server(grid, cfg, tmp_path / "run", simulation=True)
    rows = MetricsLog.read(tmp_path / "run" / "metrics.jsonl")
    # 1 (another fingerprint) and 3 (a malformed record) rejected; 2 (none) accepted
    assert [(r["clients_ok"], r["clients_rejected"]) for r in rows[1:]] == [(3, 2), (3, 2)]
    assert summary["base_fingerprint"] == grid.expected
    assert summary["final_accuracy"] is not None
    text = caplog.text
    assert f"differs from the server's {grid.expected}" in text
    assert "client 2 sent no base model fingerprint" in text
    assert "malformed base model fingerprint" in text
