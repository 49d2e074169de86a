"""Client-side evaluation (issue 27): the [eval] keys, each client's fixed holdout, the client's
figures, and the server's checks and aggregation of evaluation replies."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fedpeft.client.evaluator import client_evaluate
from fedpeft.server.client_eval import (
    ClientFigures,
    CountBound,
    EvalReply,
    check_eval_reply,
    client_figures,
    collect_eval,
    eval_cohort,
    holdout_cap,
)
from fedpeft.strategies import ClientProfile, build_method

from fedpeft.core.config import ConfigError, client_holdout, load_config
from fedpeft.core.data import holdout_size, holdout_split, load_partition
from fedpeft.core.keys import EVAL_ACCURACY, EVAL_LOSS, NUM_EXAMPLES
from fedpeft.core.payload import ClientState
from fedpeft.core.workspace import get_workspace
from tests.helpers import TINY

CLIENTS = ['eval.where="clients"']


# ---- [eval] keys ---------------------------------------------------------------------------
def test_eval_keys_defaults_and_refusals() -> None:
    cfg = load_config(None)
    assert (cfg.eval.where, cfg.eval.client_holdout, cfg.eval.clients_per_round,
            cfg.eval.personalize_steps) == ("server", 0.2, 0, 0)
    assert client_holdout(cfg) == 0.0  # scored on the server: every example trains
    assert client_holdout(load_config(None, CLIENTS)) == 0.2
    for bad in ('eval.where="everywhere"', "eval.client_holdout=0", "eval.client_holdout=0.9",
                "eval.client_holdout=nan", "eval.personalize_steps=-1",
                "eval.clients_per_round=101"):
        with pytest.raises(ConfigError, match="eval"):
            load_config(None, [*CLIENTS, bad])
    with pytest.raises(ConfigError, match="personalize_steps"):
        load_config(None, ["eval.personalize_steps=3"])  # needs clients that evaluate
    with pytest.raises(ConfigError, match="privacy"):
        load_config(None, ['eval.where="both"', "privacy.enabled=true"])


# ---- holdout ---------------------------------------------------------------------------------
def test_holdout_is_fixed_disjoint_and_sized() -> None:
    cfg = load_config(None, TINY)
    data = load_partition(cfg.data, cfg.federation.clients, 2)
    train, held = holdout_split(data, 0.2, cfg.data.seed, 2)
    again_train, again_held = holdout_split(data, 0.2, cfg.data.seed, 2)
    assert held.texts == again_held.texts and train.texts == again_train.texts
    assert len(held) == holdout_size(len(data), 0.2) == round(0.2 * len(data))
    assert len(train) + len(held) == len(data)
    assert not set(zip(train.texts, train.labels.tolist(), strict=True)) & set(
        zip(held.texts, held.labels.tolist(), strict=True)) or len(set(data.texts)) < len(data)
    other = holdout_split(data, 0.2, cfg.data.seed, 3)[1]  # another client's key: another draw
    assert other.texts != held.texts
    assert [holdout_size(n, 0.2) for n in (0, 1, 2, 3, 10)] == [0, 0, 1, 1, 2]


def test_training_never_sees_the_holdout() -> None:
    cfg = load_config(None, [*TINY, *CLIENTS])
    ws = get_workspace(cfg)
    n = cfg.federation.clients
    full, train = ws.partition(1, n), ws.partition(1, n, 0.2)
    held = ws.holdout(1, n, 0.2)
    assert len(train) + len(held) == len(full) and len(held) == holdout_size(len(full), 0.2)
    ids = {tuple(x) for x in train.ids}
    assert all(tuple(x) not in ids for x in held.ids if list(full.ids).count(x) == 1)


# ---- the client's figures ------------------------------------------------------------------
def test_client_evaluate_scores_its_holdout_and_keeps_its_state() -> None:
    cfg = load_config(None, [*TINY, *CLIENTS])
    ws = get_workspace(cfg)
    method = build_method(cfg, num_labels=ws.num_labels)
    state = method.init(ws.adapter_model(cfg.model.rank).state())
    client_state = ClientState({"x": torch.ones(2)}, {"k": 1})
    down = method.downlink(state, ClientProfile(0, cfg.model.rank))
    figures = client_evaluate(cfg, method, ws, down, partition_id=0, rank=cfg.model.rank,
                              server_round=1, client_state=client_state)
    held = ws.holdout(0, cfg.federation.clients, 0.2)
    adapter = ws.adapter_model(cfg.model.rank)
    adapter.load(state.tensors)
    direct = ws.task.evaluate(adapter.model, held, cfg.eval.batch_size, torch.device("cpu"))
    assert figures[NUM_EXAMPLES] == len(held) > 0
    assert figures[EVAL_ACCURACY] == pytest.approx(direct.accuracy)
    assert figures[EVAL_LOSS] == pytest.approx(direct.loss)
    assert set(figures) <= {NUM_EXAMPLES, EVAL_ACCURACY, EVAL_LOSS, "eval_s"}  # figures only
    assert client_state.values == {"k": 1} and set(client_state.tensors) == {"x"}


def test_personalize_steps_change_the_score_not_the_global_model() -> None:
    cfg = load_config(None, [*TINY, *CLIENTS, "eval.personalize_steps=3", "train.lr=0.05"])
    ws = get_workspace(cfg)
    method = build_method(cfg, num_labels=ws.num_labels)
    state = method.init(ws.adapter_model(cfg.model.rank).state())
    before = {k: v.clone() for k, v in state.tensors.items()}
    down = method.downlink(state, ClientProfile(0, cfg.model.rank))
    tuned = client_evaluate(cfg, method, ws, down, partition_id=0, rank=cfg.model.rank,
                            server_round=1, client_state=ClientState())
    plain_cfg = load_config(None, [*TINY, *CLIENTS])
    plain = client_evaluate(plain_cfg, method, ws, down, partition_id=0, rank=cfg.model.rank,
                            server_round=1, client_state=ClientState())
    assert tuned[EVAL_LOSS] != plain[EVAL_LOSS]
    assert all(torch.equal(before[k], state.tensors[k]) for k in before)
    again = client_evaluate(cfg, method, ws, down, partition_id=0, rank=cfg.model.rank,
                            server_round=1, client_state=ClientState())
    assert again[EVAL_LOSS] == tuned[EVAL_LOSS]  # seeded: the same steps every time


# ---- the server's checks -------------------------------------------------------------------
def _reply(pid: int, **metrics: object) -> EvalReply:
    return EvalReply(ClientProfile(pid, 4, node_id=pid), metrics)


def test_eval_reply_checks() -> None:
    good = {NUM_EXAMPLES: 20, EVAL_LOSS: 0.6, EVAL_ACCURACY: 0.65}
    exact = CountBound(20, exact=True)
    assert isinstance(check_eval_reply(_reply(0, **good), exact, True), ClientFigures)
    bad = {
        "list": {**good, EVAL_LOSS: [0.1, 0.2]},
        "nan": {**good, EVAL_ACCURACY: math.nan},
        "absurd count": {**good, NUM_EXAMPLES: 10**9},
        "over cap": {**good, NUM_EXAMPLES: 21},
        "zero count": {**good, NUM_EXAMPLES: 0},
        "fractional count": {**good, NUM_EXAMPLES: 2.5},
        "accuracy above one": {**good, EVAL_ACCURACY: 1.5},
        "accuracy not a share of the count": {**good, EVAL_ACCURACY: 0.6123},
        "negative loss": {**good, EVAL_LOSS: -1.0},
        "no loss": {NUM_EXAMPLES: 20, EVAL_ACCURACY: 0.65},
        "no accuracy on a label task": {NUM_EXAMPLES: 20, EVAL_LOSS: 0.6},
        "string": {**good, EVAL_LOSS: "0.6"},
    }
    for why, metrics in bad.items():
        assert isinstance(check_eval_reply(_reply(0, **metrics), exact, True), str), why
    assert isinstance(check_eval_reply(EvalReply(ClientProfile(0, 4), None), exact, True), str)
    # a deployment's cap (federation.max_examples_per_client) bounds the weight; absurd: rejected
    capped = check_eval_reply(_reply(0, **{**good, NUM_EXAMPLES: 40}), CountBound(20, False), True)
    assert isinstance(capped, ClientFigures) and capped.examples == 20
    assert isinstance(check_eval_reply(_reply(0, **{**good, NUM_EXAMPLES: 10**9}),
                                       CountBound(20, False), True), str)


def test_holdout_cap_is_the_real_holdout_in_simulation() -> None:
    cfg = load_config(None, [*TINY, *CLIENTS, "federation.max_examples_per_client=500"])
    assert holdout_cap(cfg, [50, 9], 0) == CountBound(10, True)
    assert holdout_cap(cfg, [50, 9], 1) == CountBound(2, True)
    assert holdout_cap(cfg, None, 0) == CountBound(500, False)  # a deployment: the federation's
    assert holdout_cap(load_config(None, [*TINY, *CLIENTS]), None, 0) is None


def test_collect_eval_aggregates_good_replies_and_counts_the_rest() -> None:
    rng = np.random.default_rng(0)
    counts = rng.integers(5, 40, size=7)
    accs = [rng.integers(0, n + 1) / n for n in counts]  # roughly agreeing clients
    losses = rng.uniform(0.4, 0.9, size=7)
    replies = [_reply(i, **{NUM_EXAMPLES: int(n), EVAL_LOSS: float(lo), EVAL_ACCURACY: float(a)})
               for i, (n, lo, a) in enumerate(zip(counts, losses, accs, strict=True))]
    replies.append(_reply(7, **{NUM_EXAMPLES: 10**6, EVAL_LOSS: 0.1, EVAL_ACCURACY: 1.0}))
    replies.append(EvalReply(ClientProfile(8, 4), error="crashed"))
    caps = {i: CountBound(40, exact=True) for i in range(9)}
    row = collect_eval(3, replies[::-1], caps, labelled=True)  # arrival order must not matter
    w = counts / counts.sum()
    assert row["clients_evaluated"] == 7
    assert row["clients_eval_rejected"] == 1 and row["clients_eval_failed"] == 1
    assert row["clients_accuracy"] == pytest.approx(float(np.dot(w, accs)))
    assert row["clients_loss"] == pytest.approx(float(np.dot(w, losses)))
    assert row["clients_accuracy_min"] == pytest.approx(min(accs))
    assert row["clients_accuracy_p10"] == pytest.approx(float(np.percentile(accs, 10)))
    assert row["clients_accuracy_std"] == pytest.approx(float(np.std(accs)))
    assert row["clients_accuracy_min"] <= row["clients_accuracy_p10"] <= row["clients_accuracy"]
    assert [c["partition"] for c in row["client_eval"]] == list(range(7))
    assert [c["accuracy"] for c in row["client_eval"]] == pytest.approx(accs)


def test_causal_lm_figures_are_loss_and_perplexity() -> None:
    figs = [ClientFigures(i, n, lo) for i, (n, lo) in enumerate([(10, 2.0), (30, 3.0), (5, 4.5)])]
    row = client_figures(figs)
    mean = (10 * 2.0 + 30 * 3.0 + 5 * 4.5) / 45
    assert row["clients_loss"] == pytest.approx(mean)
    assert row["clients_perplexity"] == pytest.approx(math.exp(mean))
    assert row["clients_perplexity_max"] == pytest.approx(math.exp(4.5))
    assert row["clients_perplexity_p90"] == pytest.approx(
        float(np.percentile(np.exp([2.0, 3.0, 4.5]), 90)))
    assert "clients_accuracy" not in row


def test_eval_cohort() -> None:
    cfg = load_config(None, [*TINY, *CLIENTS])
    assert eval_cohort(cfg, 6, [4, 1]) == [1, 4]  # the round's training sample
    fixed = load_config(None, [*TINY, *CLIENTS, "eval.clients_per_round=4"])
    first = eval_cohort(fixed, 6, [0])
    assert len(first) == 4 and first == eval_cohort(fixed, 6, [5])  # the same every round


# ---- outputs -------------------------------------------------------------------------------
def test_outputs_show_the_clients_figures(tmp_path) -> None:
    from fedpeft.server.reporting import plot_report, results_table, round_line, summarize

    figs = [ClientFigures(i, 10, 0.5 + i / 10, acc) for i, acc in enumerate([0.6, 0.8, 0.9])]
    rows = [{"round": r, "accuracy": None, "loss": None, **client_figures(figs)}
            for r in (0, 1)]
    rows[1]["clients_accuracy"] = 0.9
    line = round_line(rows[0], 1)
    assert "clients acc 0.767" in line and "(3 evaluated)" in line and "acc   -" not in line
    table = results_table(rows)
    assert "clients p10" in table.splitlines()[0]
    assert len({row.count("|") for row in table.splitlines()}) == 1  # every row fills the columns
    summary = summarize(rows)
    assert summary["final_clients_accuracy"] == 0.9 and summary["best_clients_accuracy"] == 0.9
    assert summary["final_clients_accuracy_min"] == pytest.approx(0.6)
    assert "clients" in plot_report(rows, tmp_path / "report.png")
    assert "final_clients_accuracy" not in summarize([{"round": 0, "accuracy": 0.5}])


def test_sweep_reports_the_clients_figures_over_seeds() -> None:
    from fedpeft.run.sweepreport import aggregate, markdown

    recs = [{"cell": f"a{s}", "method": "a", "seed": s, "final_accuracy": None,
             "best_accuracy": None, "last3_accuracy": None, "rounds_to_target": None,
             "bytes_up": 10, "bytes_down": 10, "wall_s": 1.0, "clients_accuracy": acc,
             "clients_accuracy_p10": acc - 0.2, "clients_accuracy_min": acc - 0.3,
             "clients_loss": 0.5, "rows": []} for s, acc in enumerate([0.7, 0.8, 0.9])]
    (row,) = aggregate(recs, ["method"])
    assert row["clients_accuracy"] == pytest.approx((0.8, 0.1))
    text = markdown("t", "i", [row], ["method"], None, [])
    assert "clients p10" in text and "| 0.800 ± 0.100 | 0.600 ± 0.100 | 0.500 ± 0.100 |" in text


def test_a_coordinator_without_data_needs_only_the_classes(tmp_path) -> None:
    from fedpeft.core.workspace import data_free_workspace

    missing = tmp_path / "absent.csv"
    sets = [*TINY, *CLIENTS, 'data.dataset="file"', f'data.path="{missing}"']
    with pytest.raises(ConfigError, match=r"data\.labels"):
        data_free_workspace(load_config(None, sets))
    ws = data_free_workspace(load_config(None, [*sets, 'data.labels=["no", "yes"]']))
    assert ws.num_labels == 2 and len(ws.train) == len(ws.test) == 0 and not missing.exists()


def test_sweep_curves_use_the_clients_accuracy_where_the_server_scored_nothing() -> None:
    from fedpeft.run.sweepreport import curve

    recs = [{"rows": [{"round": r, "accuracy": None, "clients_accuracy": a, "bytes_up": 5}
                      for r, a in ((0, 0.5), (6, acc))]} for acc in (0.7, 0.9)]
    c = curve(recs)
    assert c["round"] == [0, 6] and c["mean"] == pytest.approx([0.5, 0.8])
