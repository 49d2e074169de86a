"""Reliability: upload validation, client failures and stragglers, short rounds, checkpoint and
resume, bad configuration and data, fault injection.

Three layers, cheapest first: pure functions; the real server run loop (``run_server``) and the
real ClientApp (with its fault-injection mod) in this process, joined by a small fake Grid; and
real Flower simulations through ``fedpeft.cli.main`` (each costs ~40-60 s of Flower/Ray start-up,
so the faults share one run and kill-and-resume runs its reference alongside).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from fedpeft.client.faults import (
    EXPLODE_FACTOR,
    OVERSIZED_KEY,
    corrupt,
    fault_assignment,
)
from fedpeft.client.trainer import client_round
from fedpeft.server import app as server_app
from fedpeft.server.checkpoint import (
    Checkpoint,
    check_resumable,
    checkpoint_path,
    checkpoint_round,
    load_checkpoint,
    save_checkpoint,
)
from fedpeft.server.reporting import MetricsLog
from fedpeft.server.validation import check_examples, check_upload
from fedpeft.strategies import METHODS, build_method
from flwr.app import Context, RecordDict
from safetensors.torch import load_file

from fedpeft.cli import main
from fedpeft.core.config import FAULT_KINDS, ConfigError, FedConfig, load_config, to_toml
from fedpeft.core.evaluation import evaluate_adapter_dir
from fedpeft.core.payload import ClientState, Payload
from fedpeft.core.sampling import sample_clients
from fedpeft.run.session import finish_simulation
from tests.helpers import TINY, FakeGrid
from tests.helpers import Killed as _Killed

# ---------------------------------------------------------------------------------------------
# pure functions: validation, fault assignment and corruption, checkpoint files


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"a": torch.randn(4, 3, generator=gen), "b": torch.randn(2, generator=gen)}


def test_check_upload_names_each_problem() -> None:
    sent = _tensors()
    shapes = {k: tuple(v.shape) for k, v in sent.items()}
    good = {k: v + 0.01 for k, v in sent.items()}
    assert check_upload(Payload(good), shapes, max_norm=1.0, reference=sent) is None
    cases = {
        "missing tensors ['b']": {"a": good["a"]},
        "unexpected tensors ['c']": {**good, "c": torch.zeros(1)},
        "a: shape (3, 3), expected (4, 3)": {**good, "a": good["a"][:3]},
        "a: dtype torch.int64 is not floating point": {**good, "a": good["a"].long()},
        "a: dtype torch.float64, expected torch.float32": {**good, "a": good["a"].double()},
        "b: contains NaN or Inf": {**good, "b": torch.tensor([1.0, float("inf")])},
    }
    for reason, tensors in cases.items():
        assert check_upload(Payload(tensors), shapes, reference=sent) == reason
    far = {k: v + 10.0 for k, v in sent.items()}  # update norm sqrt(14) * 10 ~ 37
    assert "exceeds the bound 10" in check_upload(Payload(far), shapes, 10.0, sent)
    # the bound is on the update, not on the tensors: a large model with a small update passes
    big = {k: v * 100 for k, v in sent.items()}
    assert check_upload(Payload({k: v + 0.01 for k, v in big.items()}), shapes, 1.0, big) is None


def test_check_examples() -> None:
    assert check_examples({"num-examples": 12}) is None
    assert check_examples(None) == "no metrics record"
    for bad in (0, -3, 2.5, float("nan"), float("inf")):
        assert "expected a positive integer" in check_examples({"num-examples": bad})
    assert "missing" in check_examples({"train_loss": 1.0})


def _faults_cfg(*sets: str) -> FedConfig:
    return load_config(None, ["federation.clients=100", "federation.rounds=5",
                              "federation.round_timeout_s=5", *sets])


def test_fault_assignment_is_exact_disjoint_and_seeded() -> None:
    cfg = _faults_cfg("faults.crash=[3, 7]", "faults.crash_fraction=0.1",
                      "faults.nan_fraction=0.05", "faults.hang_fraction=0.02")
    plan = fault_assignment(cfg, 1)
    kinds = list(plan.values())
    assert {pid for pid, k in plan.items() if k == "crash"} >= {3, 7}
    assert kinds.count("crash") == 12 and kinds.count("nan") == 5 and kinds.count("hang") == 2
    assert plan == fault_assignment(cfg, 4)  # fixed for the run unless redrawn
    assert plan != fault_assignment(_faults_cfg("faults.crash=[3, 7]", "faults.crash_fraction=0.1",
                                                "faults.nan_fraction=0.05",
                                                "faults.hang_fraction=0.02",
                                                "federation.seed=1"), 1)
    redrawn = _faults_cfg("faults.nan_fraction=0.1", "faults.redraw=true")
    assert fault_assignment(redrawn, 1) != fault_assignment(redrawn, 2)
    assert len(fault_assignment(redrawn, 2)) == 10
    sampled = _faults_cfg("faults.crash_fraction=0.1", "faults.nan_fraction=0.05",
                          "faults.of_sampled=true")  # 10 of 100 sampled: 1 and 0.5 a round
    fed = sampled.federation
    nan_per_round = []
    for rnd in range(1, 11):
        plan = fault_assignment(sampled, rnd)
        assert set(plan) <= set(sample_clients(fed.clients, fed.clients_per_round, fed.seed, rnd))
        assert list(plan.values()).count("crash") == 1  # 10% of the sample, every round
        nan_per_round.append(list(plan.values()).count("nan"))
    assert nan_per_round == [1, 0] * 5  # 5% of 10: carried over, 5 in 10 rounds
    only = _faults_cfg("faults.nan=[1]", "faults.rounds=[2, 4]")
    assert [bool(fault_assignment(only, r)) for r in range(1, 6)] == [False, True, False, True,
                                                                       False]


@pytest.mark.parametrize("kind", [k for k in FAULT_KINDS if k not in ("crash", "hang")])
def test_every_corrupted_upload_is_rejected(kind: str) -> None:
    sent = _tensors()
    shapes = {k: tuple(v.shape) for k, v in sent.items()}
    bad = corrupt(kind, {k: v + 0.01 for k, v in sent.items()})
    bound = 5.0
    problem = check_upload(Payload(bad), shapes, bound, sent)
    assert problem is not None
    if kind == "oversized":
        assert OVERSIZED_KEY in problem and bad[OVERSIZED_KEY].numel() * 4 == 8 * 2 ** 20
    if kind == "explode":  # well formed and finite: only the norm bound catches it
        assert check_upload(Payload(bad), shapes, 0.0, sent) is None
        assert torch.allclose(bad["a"], (sent["a"] + 0.01) * EXPLODE_FACTOR)


def _cfg(*sets: str) -> FedConfig:
    return load_config(None, [*TINY, *sets])


def test_checkpoint_round_trip_is_exact_and_atomic(tmp_path: Path) -> None:
    cfg = _cfg()
    state = Payload({"w": torch.randn(3, 5), "h": torch.arange(4, dtype=torch.float64),
                     "bf": torch.randn(2, 2).to(torch.bfloat16)},
                    {"seed": 7, "scale": 0.5, "name": "x", "flag": True})
    rows = [{"round": 0, "accuracy": 0.5, "loss": None}]
    save_checkpoint(tmp_path, Checkpoint(0, state, rows, cfg.to_dict(), {"ranks": {"2": 4}}))
    state.tensors["w"] += 1  # a later round
    save_checkpoint(tmp_path, Checkpoint(1, state, rows * 2, cfg.to_dict()))
    assert [p.name for p in checkpoint_path(tmp_path).parent.iterdir()] == ["state.safetensors"]
    back = load_checkpoint(tmp_path)
    assert back.round == 1 == checkpoint_round(tmp_path) and back.metrics == rows * 2
    assert back.state.scalars == state.scalars
    assert all(type(back.state.scalars[k]) is type(v) for k, v in state.scalars.items())
    for key, value in state.tensors.items():
        assert back.state.tensors[key].dtype == value.dtype
        assert torch.equal(back.state.tensors[key], value)
    check_resumable(back, cfg, tmp_path)  # same config: fine
    with pytest.raises(ConfigError, match=r"federation.rounds = 5 \(run: 2\)"):
        check_resumable(back, _cfg("federation.rounds=5"), tmp_path)
    assert checkpoint_round(tmp_path / "nothing") is None
    with pytest.raises(ConfigError, match="no checkpoint in"):
        load_checkpoint(tmp_path / "nothing")
    checkpoint_path(tmp_path).write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="could not be read"):
        load_checkpoint(tmp_path)


def test_client_round_does_not_depend_on_the_global_rng() -> None:
    """Dropout is seeded by (seed, round, partition): whichever actor runs a client and whatever
    it ran before, the upload is the same (needed for reproducible runs and exact resume)."""
    cfg = _cfg()
    method = build_method(cfg)
    from fedpeft.core.workspace import get_workspace

    workspace = get_workspace(cfg)
    state = method.init(workspace.adapter_model(cfg.model.rank).state())
    uploads = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        result = client_round(cfg, method, workspace, Payload(state.tensors), partition_id=1,
                              rank=cfg.model.rank, server_round=1, client_state=ClientState())
        uploads.append(result.payload.tensors)
    assert all(torch.equal(uploads[0][k], uploads[1][k]) for k in uploads[0])
    before = torch.random.get_rng_state()
    client_round(cfg, method, workspace, Payload(state.tensors), partition_id=2,
                 rank=cfg.model.rank, server_round=1, client_state=ClientState())
    assert torch.equal(before, torch.random.get_rng_state())  # and the global RNG is untouched


# ---------------------------------------------------------------------------------------------
# the real run loop and ClientApp in this process, joined by a fake Grid


BROKEN = {"crash": [0], "nan": [1], "wrong_shape": [2], "oversized": [3], "explode": [4]}
SILENT, GONE = (5,), (6,)  # 7, 8, 9 behave


def _expected_round(cfg: FedConfig, rnd: int) -> dict:
    """Counts the run loop must report for round ``rnd`` of the short-round test."""
    fed, plan = cfg.federation, fault_assignment(cfg, rnd)
    row = {"clients_sampled": 0, "clients_ok": 0, "clients_failed": 0, "clients_rejected": 0,
           "clients_timed_out": 0}
    for attempt in range(1 + fed.max_retries):
        sample = sample_clients(fed.clients, fed.clients_per_round, fed.seed, rnd, attempt)
        kinds = [plan.get(p, "timed_out" if p in SILENT else "gone" if p in GONE else "ok")
                 for p in sample]
        row["clients_sampled"] += len(sample)
        row["clients_ok"] += kinds.count("ok")
        row["clients_failed"] += kinds.count("crash") + kinds.count("gone")
        row["clients_timed_out"] += kinds.count("timed_out")
        row["clients_rejected"] += sum(kinds.count(k) for k in BROKEN if k != "crash")
        row["retries"], row["aggregated"] = attempt, int(kinds.count("ok") >= fed.min_replies)
        if row["aggregated"]:
            break
    return row


def _short_round_config() -> FedConfig:
    sets = [*TINY, "federation.clients=10", "federation.clients_per_round=5",
            "federation.rounds=2", "federation.min_replies=3", 'federation.on_short_round="retry"',
            "federation.max_retries=2", "federation.max_update_norm=10",
            "federation.round_timeout_s=0.5",
            *(f"faults.{k}={v}" for k, v in BROKEN.items())]
    for seed in range(200):  # a seed whose round 1 is retried, then aggregated; round 2 skipped
        cfg = load_config(None, [*sets, f"federation.seed={seed}"])
        one, two = _expected_round(cfg, 1), _expected_round(cfg, 2)
        if one["retries"] and one["aggregated"] and not two["aggregated"]:
            return cfg
    raise AssertionError("no seed gives a retried and a skipped round")


def test_short_rounds_are_retried_then_skipped_with_exact_counts(
        tmp_path: Path, in_process: None, caplog: pytest.LogCaptureFixture) -> None:
    cfg = _short_round_config()
    out = tmp_path / "run"
    summary = server_app.run_server(FakeGrid(range(11, 21), silent=SILENT, gone=GONE), cfg, out)
    rows = MetricsLog.read(out / "metrics.jsonl")
    for rnd in (1, 2):
        want, got = _expected_round(cfg, rnd), rows[rnd]
        assert {k: got[k] for k in want} == want, rnd
        assert got["clients_sampled"] == sum(got[k] for k in (
            "clients_ok", "clients_failed", "clients_rejected", "clients_timed_out"))
    assert rows[1]["clients_aggregated"] >= 3 and rows[2]["clients_aggregated"] == 0
    assert summary["rounds_not_aggregated"] == 1
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in adapter.values())
    text = caplog.text
    assert "retry 1 of 2 with a fresh sample" in text and "round 2 skipped" in text
    assert "vanished: node offline" in text and "did not reply within" in text


def _method_sets(name: str) -> list[str]:
    mixed = METHODS[name].mixed_ranks
    return [f'method.name="{name}"', *(['federation.rank_mix="4:0.5,8:0.5"'] if mixed else [])]


def test_a_round_is_checkpointed_before_metrics_jsonl_shows_it(
        tmp_path: Path, in_process: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A coordinator stopped right after a round's metrics.jsonl line must resume after that
    round: the checkpoint is on disk before the line is written."""
    seen: list[tuple[int, int | None]] = []
    append = MetricsLog.append

    def watched(self: MetricsLog, row: dict) -> None:
        seen.append((row["round"], checkpoint_round(self.path.parent)))
        append(self, row)

    monkeypatch.setattr(MetricsLog, "append", watched)
    cfg = load_config(None, [*TINY, "federation.rounds=2"])
    server_app.run_server(FakeGrid(range(11, 17)), cfg, tmp_path / "run")
    assert seen == [(0, 0), (1, 1), (2, 2)]


# A personalised method's personal parts live only in its clients' Context.state, which this test
# throws away on purpose (a restart): its resumed run cannot equal the uninterrupted one.
@pytest.mark.parametrize("method", sorted(n for n, c in METHODS.items() if not c.personalized))
def test_resume_after_a_kill_mid_round_is_bit_identical(
        method: str, tmp_path: Path, in_process: None) -> None:
    """Checkpoint completeness, per method: a run killed in round 2 and resumed (new node ids,
    every client's Context.state lost, as after a real restart) ends with exactly the state of
    an uninterrupted run (whose replies even arrive in reverse order)."""
    cfg = load_config(None, [*TINY, "federation.rounds=3", "eval.every=3", *_method_sets(method)])
    server_app.run_server(FakeGrid(range(11, 17), reverse=True), cfg, tmp_path / "ref")
    with pytest.raises(_Killed):
        server_app.run_server(FakeGrid(range(11, 17), kill_at=2), cfg, tmp_path / "cut")
    assert checkpoint_round(tmp_path / "cut") == 1
    before_kill = load_checkpoint(tmp_path / "cut").state.scalars
    summary = server_app.run_server(FakeGrid(range(31, 37)), cfg, tmp_path / "cut", resume=True)
    assert summary["resumed_after"] == 1 and summary["rounds"] == 3
    ref, cut = load_checkpoint(tmp_path / "ref"), load_checkpoint(tmp_path / "cut")
    assert ref.state.tensors.keys() == cut.state.tensors.keys()
    for key, value in ref.state.tensors.items():
        assert torch.equal(value, cut.state.tensors[key]), key
    assert _node_free(ref.state.scalars, RUN_IDS) == _node_free(cut.state.scalars, RUN_IDS)
    for key in RUN_IDS & ref.state.scalars.keys():  # the resumed run is still the killed run
        assert cut.state.scalars[key] == before_kill[key] != ref.state.scalars[key], key
    assert [r["round"] for r in cut.metrics] == [0, 1, 2, 3]
    assert [r["accuracy"] for r in cut.metrics] == [r["accuracy"] for r in ref.metrics]
    # adapter/ scored with plain peft: the global model's accuracy where the export is exact,
    # else the accuracy the server reported for the export (and it says why it is lossy)
    exported = evaluate_adapter_dir(tmp_path / "cut" / "adapter")["accuracy"]
    # hetlora here: model.rank = the largest rank; ferret's default LoRA target exports exactly
    lossy = {"flexlora", "flora", "fedex-lora"}  # fedex-lora: residuals folded into the base
    assert summary["adapter_exact"] is (method not in lossy)
    if method in lossy:
        assert summary["adapter_note"] and exported == pytest.approx(summary["adapter_accuracy"])
    else:
        assert "adapter_accuracy" not in summary
        assert exported == pytest.approx(summary["final_accuracy"])


# Scalars that name a run, not model state: Ferret tags its process-wide cache of global
# updates with a random run id, so a long-lived client process serving two runs never mixes them.
RUN_IDS = {"ferret.run"}


def _node_free(scalars: dict, also: set[str] = frozenset()) -> dict:
    """Scalars whose keys name no node id (FLoRA keys its bookkeeping by node id, and node ids
    change when a federation restarts; its resumed clients are re-synced from the state)."""
    return {k: v for k, v in scalars.items()
            if k not in also and not re.search(r"\b(1[1-6]|3[1-6])\b", k)}


def test_a_serverapp_config_error_reaches_the_cli_as_one_message(
        tmp_path: Path, in_process: None, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.toml").write_text(to_toml(_cfg()))
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config={"config-file": str(tmp_path / "config.toml"),
                                  "out-dir": str(tmp_path), "resume": "1"})
    server_app.main(FakeGrid(range(11, 17)), context)  # no checkpoint to resume: a user error
    assert json.loads((tmp_path / "error.json").read_text())["kind"] == "config"
    assert finish_simulation(tmp_path, 0, time.perf_counter()) == 2
    err = capsys.readouterr().err
    assert "fedpeft: error: no checkpoint in" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# real Flower simulations through the CLI


def _simulate_args(out: Path, *sets: str) -> list[str]:
    args = ["simulate", "--out", str(out)]
    for item in (*TINY, *sets):
        args += ["--set", item]
    return args


@pytest.mark.slow
def test_faults_in_a_flower_simulation(tmp_path: Path) -> None:
    """Eight clients, all sampled; round 1 clean (it also warms the actors up), in round 2 six
    of them misbehave in six ways. The run completes, aggregates the two good replies, and
    counts every fault where it belongs."""
    faults = {"crash": 0, "hang": 1, "nan": 2, "wrong_shape": 3, "oversized": 4, "explode": 5}
    out = tmp_path / "faults"
    assert main(_simulate_args(
        out, "federation.clients=8", "federation.clients_per_round=8", "federation.min_replies=2",
        "federation.round_timeout_s=40", "faults.hang_s=45", "federation.max_update_norm=10",
        "faults.rounds=[2]", *(f"faults.{k}=[{p}]" for k, p in faults.items()))) == 0
    rows = MetricsLog.read(out / "metrics.jsonl")
    counts = ("clients_sampled", "clients_ok", "clients_failed", "clients_rejected",
              "clients_timed_out", "aggregated")
    assert [rows[1][k] for k in counts] == [8, 8, 0, 0, 0, 1]
    assert [rows[2][k] for k in counts] == [8, 2, 1, 4, 1, 1]
    assert rows[2]["bytes_up"] > 8 * 2 ** 20  # the oversized upload did arrive, and was refused
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in adapter.values())
    log = (out / "run.log").read_text()
    for reason in ("injected fault: client 0 crashes in round 2", "contains NaN or Inf",
                   "shape (7, 32), expected (8, 32)", f"unexpected tensor {OVERSIZED_KEY!r}",
                   "exceeds the bound 10", "1 of 8 clients did not reply within"):
        assert reason in log, reason


def _sigkill_tree_at_round(proc: subprocess.Popen[bytes], out: Path, rnd: int,
                           result: dict) -> None:
    """SIGKILL ``proc`` and everything it started (SuperLink, SuperExec, flwr-simulation, Ray:
    other sessions too) as soon as round ``rnd``'s checkpoint exists; remove their FLWR_HOME."""
    from fedpeft.run.launcher import Tracker

    tracker = Tracker(proc)
    while (checkpoint_round(out) or -1) < rnd and proc.poll() is None:
        time.sleep(0.2)
    alive = tracker.scan()
    homes = set()
    for pid in alive:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        homes |= {e[10:].decode() for e in env if e.startswith(b"FLWR_HOME=/tmp/fedpeft-sim-")}
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while tracker.scan() and time.monotonic() < deadline:
        time.sleep(0.2)
    result.update(killed=len(alive), survivors=sorted(tracker.scan()),
                  round=checkpoint_round(out))
    for home in homes:
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.slow
def test_sigkill_mid_run_and_resume_gives_the_same_adapter(tmp_path: Path) -> None:
    """FedIT: a run SIGKILLed (with all its processes) right after round 1's checkpoint and then
    resumed ends bit-identical to an uninterrupted run, which runs meanwhile."""
    sets = ("federation.rounds=3",)
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "fedpeft.cli", *_simulate_args(cut, *sets)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    killed: dict = {}
    killer = threading.Thread(target=_sigkill_tree_at_round, args=(proc, cut, 1, killed))
    killer.start()
    assert main(_simulate_args(tmp_path / "ref", *sets)) == 0
    killer.join()
    assert killed["killed"] > 3 and not killed["survivors"]
    assert 1 <= killed["round"] < 3 and not (cut / "summary.json").exists()
    assert main(["simulate", "--resume", str(cut)]) == 0
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["resumed_after"] == killed["round"]
    assert [r["round"] for r in MetricsLog.read(cut / "metrics.jsonl")] == [0, 1, 2, 3]
    ref = load_file(str(tmp_path / "ref" / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(cut / "adapter" / "adapter_model.safetensors"))
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert any(ref[k].abs().sum() > 0 for k in ref if "lora_B" in k)  # it did train


# ---------------------------------------------------------------------------------------------
# bad configuration and data: one clear message, before anything starts


def _write(path: Path, rows: list[dict]) -> Path:
    import pandas as pd

    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _file_sets(path: Path, *sets: str) -> tuple[str, ...]:
    return ('data.dataset="file"', f'data.path="{path}"', "data.test_size=10", *sets)


def _data_cases(tmp: Path) -> dict[str, tuple[tuple[str, ...], str]]:
    rows = [{"text": f"review {i}", "label": ["bad", "good"][i % 2]} for i in range(40)]
    no_text = _write(tmp / "no_text.csv", [{"review": r["text"], "label": r["label"]}
                                            for r in rows])
    no_label = _write(tmp / "no_label.csv", [{"text": r["text"]} for r in rows])
    odd_label = _write(tmp / "odd.csv", [*rows, {"text": "meh", "label": "neutral"}])
    small = _write(tmp / "small.csv", rows)
    return {
        "missing text column": (_file_sets(no_text), "has no text column 'text'"),
        "missing label column": (_file_sets(no_label), "has no label column 'label'"),
        "label outside the classes": (_file_sets(odd_label, 'data.labels=["bad", "good"]'),
                                      "labels ['neutral'] are outside the task's classes"),
        "empty partitions": (_file_sets(small, "federation.clients=40",
                                        "federation.clients_per_round=3"),
                             "cannot fill federation.clients = 40 partitions"),
        "no such file": (_file_sets(tmp / "nope.csv"), "does not exist"),
        "test split eats the data": (_file_sets(small, "data.test_size=40"),
                                     "leaves no training data"),
    }


CONFIG_CASES = {
    "rank < 1": (("model.rank=0",), "model.rank = 0 is out of range: int >= 1"),
    "unknown key": (("federation.bogus=1",), "unknown key federation.bogus"),
    "unknown section": (("bogus.key=1",), "unknown section [bogus]"),
    "more sampled than exist": (("federation.clients_per_round=7",),
                                "exceeds federation.clients = 6"),
    "rank_mix fraction outside (0, 1]": (('federation.rank_mix="8:1.5"',),
                                         "needs a rank >= 1 and a fraction in (0, 1]"),
    "min_replies above the sample": (("federation.min_replies=4",),
                                     "exceeds federation.clients_per_round"),
    "unknown method": (('method.name="fedsgd"',), "method.name = 'fedsgd' is not allowed"),
    "no such LoRA target": (('model.target_modules=["nope"]',), "matched no layer"),
    "short-round policy": (('federation.on_short_round="wait"',),
                           "federation.on_short_round = 'wait' is not allowed"),
    "fault fraction > 1": (("faults.nan_fraction=1.5",), "faults.nan_fraction = 1.5 is out of"),
    "fault on a missing client": (("faults.crash=[9]",), "partition ids run from 0 to 5"),
    "hang without a timeout": (("faults.hang=[1]",), "need federation.round_timeout_s > 0"),
    "device not on this host": (('train.device="cuda:7"',), "train.device = 'cuda:7'"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_stops_with_one_message(case: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    sets, message = CONFIG_CASES[case]
    _assert_refused(_simulate_args(tmp_path / "run", *sets), message, tmp_path, capsys)


@pytest.mark.parametrize("case", ["missing text column", "missing label column",
                                  "label outside the classes", "empty partitions", "no such file",
                                  "test split eats the data"])
def test_bad_data_stops_with_one_message(case: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    sets, message = _data_cases(tmp_path)[case]
    _assert_refused(_simulate_args(tmp_path / "run", *sets), message, tmp_path, capsys)


def _assert_refused(args: list[str], message: str, tmp_path: Path,
                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedpeft: error: ") and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # refused before any work started


def test_resume_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _cfg()
    run = tmp_path / "run"
    _assert_resume(["--resume", str(tmp_path / "none")], "no config.toml there", capsys)
    run.mkdir()
    (run / "config.toml").write_text(to_toml(cfg))
    _assert_resume(["--resume", str(run)], "no checkpoint in", capsys)
    state = Payload({"w": torch.zeros(2)})
    save_checkpoint(run, Checkpoint(1, state, [], cfg.to_dict()))
    _assert_resume(["--resume", str(run), "--set", "federation.rounds=4"],
                   "federation.rounds = 4 (run: 2)", capsys)
    _assert_resume(["--resume", str(run), "--out", str(tmp_path / "else")], "drop --out", capsys)
    (run / "config.toml").write_text(to_toml(_cfg("train.local_steps=3")))  # edited afterwards
    _assert_resume(["--resume", str(run)], "train.local_steps = 3 (run: 2)", capsys)
    dp = _cfg("privacy.enabled=true")
    (run / "config.toml").write_text(to_toml(dp))
    save_checkpoint(run, Checkpoint(1, state, [], dp.to_dict()))
    _assert_resume(["--resume", str(run)], "would restart each client's privacy budget", capsys)
    (run / "config.toml").write_text(to_toml(cfg))
    save_checkpoint(run, Checkpoint(2, state, [], cfg.to_dict()))
    assert main(["simulate", "--resume", str(run)]) == 0
    assert "finished all 2 rounds; nothing to resume" in capsys.readouterr().out


def _assert_resume(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
