"""The evaluate-on-clients phase of the round loop (issue 27): in the plain in-process loop, over
the Flower strategy (the real ClientApp behind a fake grid) and in a real Flower simulation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from fedpeft.client import app as client_app
from fedpeft.server import app as server_app
from fedpeft.server.reporting import MetricsLog

from fedpeft.core.config import load_config
from fedpeft.core.keys import EVAL_ACCURACY, EVAL_LOSS, NUM_EXAMPLES
from tests.helpers import TINY, FakeGrid

CLIENT_KEYS = ("clients_accuracy", "clients_accuracy_p10", "clients_accuracy_min",
               "clients_accuracy_std", "clients_loss", "clients_evaluated", "client_eval")


def _plain(*sets: str) -> list[dict]:
    from fedpeft.server.inprocess import run_plain

    return run_plain(None, [*TINY, *sets])


def test_plain_loop_writes_the_clients_figures_every_evaluated_round() -> None:
    rows = _plain('eval.where="clients"')
    for row in rows:
        assert all(row.get(k) is not None for k in CLIENT_KEYS), row["round"]
        assert row["accuracy"] is None  # the server scores nothing
        # the round's training sample evaluates (round 0: the sample of round 1)
        assert row["clients_evaluated"] == 3 and len(row["client_eval"]) == 3
        assert 0 <= row["clients_accuracy_min"] <= row["clients_accuracy"] <= 1
    assert rows[1]["client_eval"] != rows[2]["client_eval"]


def test_both_writes_both_families_and_evaluation_changes_no_training() -> None:
    both = _plain('eval.where="both"')
    clients = _plain('eval.where="clients"')
    for b, c in zip(both, clients, strict=True):
        assert b["accuracy"] is not None and b["clients_accuracy"] is not None
        assert b.get("train_loss") == c.get("train_loss")
        assert b["client_eval"] == c["client_eval"]


def test_personalised_methods_run_in_the_plain_loop() -> None:
    for method in ("fedsa-lora", "local-only"):
        rows = _plain('eval.where="clients"', f'method.name="{method}"', "train.lr=0.01")
        assert all(r["clients_evaluated"] == 3 for r in rows), method
        assert all(r["clients_ok"] == 3 for r in rows[1:]), method
        if method == "local-only":  # no tensors up: each reply is its metrics only
            assert all(c["bytes_up"] < 1000 for r in rows[1:] for c in r["client_bytes"])


def test_personalize_steps_run_before_scoring() -> None:
    plain = _plain('eval.where="clients"', "eval.clients_per_round=2")
    tuned = _plain('eval.where="clients"', "eval.clients_per_round=2", "eval.personalize_steps=2",
                   "train.lr=0.01")
    assert [c["partition"] for c in plain[0]["client_eval"]] == [
        c["partition"] for c in plain[2]["client_eval"]]  # a fixed cohort
    assert tuned[0]["clients_loss"] != plain[0]["clients_loss"]


def test_flower_strategy_evaluates_and_survives_hostile_evaluators(
        tmp_path: Path, in_process: None, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    honest = client_app.client_evaluate
    lies = {0: {EVAL_LOSS: [0.1, 0.2]}, 1: {EVAL_ACCURACY: math.nan},
            2: {NUM_EXAMPLES: 10**9}}

    def hostile(cfg, method, workspace, downlink, **kw):
        figures = honest(cfg, method, workspace, downlink, **kw)
        return {**figures, **lies.get(kw["partition_id"], {})}

    monkeypatch.setattr(client_app, "client_evaluate", hostile)
    cfg = load_config(None, [*TINY, 'eval.where="clients"', "eval.clients_per_round=6"])
    out = tmp_path / "run"
    server_app.run_server(FakeGrid(range(11, 17)), cfg, out, simulation=True)
    rows = MetricsLog.read(out / "metrics.jsonl")
    for row in rows:
        assert row["clients_evaluated"] == 3 and row["clients_eval_rejected"] == 3
        assert [c["partition"] for c in row["client_eval"]] == [3, 4, 5]
    assert rows[-1]["clients_ok"] == 3  # training went on
    for pid in (0, 1, 2):
        assert f"rejected the evaluation reply of client {pid}" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("sets", [['eval.where="both"'],
                                  ['eval.where="clients"', 'method.name="fedsa-lora"',
                                   "federation.rounds=3", "train.lr=0.01"]],
                         ids=["fedit-both", "fedsa-lora"])
def test_plain_loop_and_flower_simulation_give_the_same_client_figures(
        tmp_path: Path, sets: list[str]) -> None:
    """The same figures for the same seed; under fedsa-lora this also shows that every virtual
    client's B and head survive between its rounds in Flower's per-node state."""
    from fedpeft.cli import main

    plain = _plain(*sets)
    sets = [*TINY, *sets]
    args = ["simulate", "--out", str(tmp_path)]
    for item in sets:
        args += ["--set", item]
    assert main(args) == 0
    flower = MetricsLog.read(tmp_path / "metrics.jsonl")
    assert len(flower) == len(plain)
    for f, p in zip(flower, plain, strict=True):
        for fc, pc in zip(f["client_eval"], p["client_eval"], strict=True):
            assert fc["partition"] == pc["partition"] and fc["examples"] == pc["examples"]
            assert fc["accuracy"] == pytest.approx(pc["accuracy"], abs=1e-9)
            assert fc["loss"] == pytest.approx(pc["loss"], rel=1e-5)
        if p["accuracy"] is not None:
            assert f["accuracy"] == pytest.approx(p["accuracy"], abs=1e-9)


def test_causal_lm_clients_report_loss_and_perplexity(tmp_path: Path) -> None:
    import json

    from fedpeft.server.inprocess import run_plain

    from tests.helpers import tiny_run
    from tests.tiny_models import save_tiny_llama

    model = save_tiny_llama(tmp_path / "llama")
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {i} plus one?"},
        {"role": "assistant", "content": f"It is {i + 1}."}]}) + "\n" for i in range(60)))
    for method in ("fedit", "fedsa-lora"):  # fedsa-lora on a model without a head: B only
        rows = run_plain(None, tiny_run(model, chats, 'eval.where="clients"',
                                        f'method.name="{method}"', "train.lr=0.01"))
        for row in rows:
            assert row["clients_evaluated"] == 2 and "clients_accuracy" not in row, method
            assert row["clients_perplexity"] >= 1 and row["clients_loss"] > 0
            assert row["clients_perplexity_max"] >= row["clients_perplexity_p90"]
