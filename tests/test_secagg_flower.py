"""SecAgg+ as the train phase of the Flower round loop: the real ServerApp round loop and the real
ClientApp (message types ``train.secagg_*``) in this process through tests/helpers.FakeGrid, on
the tiny model. The secure run must reach the plain run's adapter (within the fixed-point error),
with dropouts before and during the protocol, and the server's rows and summary must say what it
saw."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fedpeft.client import secagg as client_secagg
from fedpeft.server import app as server_app
from fedpeft.server.reporting import MetricsLog
from safetensors.torch import load_file

from fedpeft.core.config import load_config
from fedpeft.core.keys import PARTITION
from fedpeft.core.secagg import SecAggRefusal
from tests.helpers import TINY, FakeGrid

# every client in every round; a silent client is given up on after a second per stage
ALL = [*TINY, "federation.clients_per_round=6", "federation.round_timeout_s=1"]


def _run(tmp_path: Path, name: str, sets: list[str], silent: tuple[int, ...] = ()) -> tuple:
    cfg = load_config(None, sets)
    out = tmp_path / name
    summary = server_app.run_server(FakeGrid(range(11, 17), silent=silent), cfg, out)
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    return summary, MetricsLog.read(out / "metrics.jsonl"), adapter


def _close(a: dict, b: dict, tol: float = 1e-6) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=tol) for k in a)


@pytest.mark.parametrize("method", ["fedit", "ffa-lora"])
def test_secure_rounds_reach_the_plain_rounds_adapter(method: str, tmp_path: Path,
                                                      in_process: None) -> None:
    sets = [*TINY, f'method.name="{method}"']
    _, _, plain = _run(tmp_path, "plain", sets)
    summary, rows, secure = _run(tmp_path, "secagg", [*sets, "secagg.enabled=true"])
    assert _close(plain, secure)
    assert any(v.abs().max() > 1e-4 for k, v in secure.items() if "lora_B" in k)  # it trained
    for row in rows[1:]:
        assert row["secagg"] is True and row["aggregated"] == 1
        assert all(row[f"secagg_{s}_survivors"] == 3
                   for s in ("setup", "share_keys", "masked_input", "unmask"))
        assert row["secagg_masked_input_bytes_up"] > 0 and row["bytes_up"] > 0
        assert row["secagg_error_bound"] < 1e-8
    assert summary["secagg"] is True and "only the example-weighted sum" in summary["server_saw"]


def test_dropouts_before_and_during_the_protocol(tmp_path: Path, in_process: None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Partition 2 never answers (lost at setup); partition 4 fails while training (lost at the
    masked-input stage, after its shares went out, so the server rebuilds its mask key). The
    result is the plain run's with both clients silent."""
    _, _, plain = _run(tmp_path, "plain", ALL, silent=(2, 4))
    honest = client_secagg.train_upload

    def failing(cfg, method, msg, context):
        if int(msg.content["scalars"][PARTITION]) == 4:
            raise SecAggRefusal("masked_input", "the device lost power")
        return honest(cfg, method, msg, context)

    monkeypatch.setattr(client_secagg, "train_upload", failing)
    _, rows, secure = _run(tmp_path, "secagg", [*ALL, "secagg.enabled=true"], silent=(2,))
    assert _close(plain, secure)
    for row in rows[1:]:
        assert (row["secagg_setup_survivors"], row["secagg_share_keys_survivors"],
                row["secagg_masked_input_survivors"], row["secagg_unmask_survivors"]) == (
                    5, 5, 4, 4)
        assert row["clients_ok"] == 4 and row["clients_failed"] == 2


def test_below_threshold_the_round_is_skipped_naming_the_stage(
        tmp_path: Path, in_process: None, caplog: pytest.LogCaptureFixture) -> None:
    sets = [*ALL, "secagg.enabled=true", "secagg.threshold=5"]
    summary, rows, _ = _run(tmp_path, "secagg", sets, silent=(0, 1))
    assert all(row["aggregated"] == 0 and row["secagg_aborted_stage"] == "setup"
               for row in rows[1:])
    assert summary["rounds_not_aggregated"] == 2
    # 4 answered, but each then has 3 live neighbours + itself < 5 share holders
    assert "secagg stopped at stage 'setup': 0 clients left (4 answered), threshold 5" \
        in caplog.text


@pytest.mark.slow
def test_flower_simulation_runs_secure_rounds(tmp_path: Path) -> None:
    """The real simulation engine (SuperLink, Ray actors; a node's Context.state kept by Flower
    between its four messages): every round aggregates through all four stages."""
    from fedpeft.cli import main

    args = ["simulate", "--out", str(tmp_path)]
    for item in [*TINY, "secagg.enabled=true", "federation.round_timeout_s=120"]:
        args += ["--set", item]
    assert main(args) == 0
    rows = MetricsLog.read(tmp_path / "metrics.jsonl")
    assert [r["aggregated"] for r in rows[1:]] == [1, 1]
    assert all(r["secagg_unmask_survivors"] == 3 and r["secagg"] for r in rows[1:])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["secagg"] is True
    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert any(v.abs().max() > 1e-4 for k, v in adapter.items() if "lora_B" in k)


def test_in_process_engine_runs_the_same_protocol(tmp_path: Path) -> None:
    """simulation.engine = 'inprocess': the same stages, clients called directly; the secure
    adapter is the plain in-process run's within the fixed-point error."""
    from fedpeft.server.inprocess import run_inprocess

    adapters = {}
    for name, extra in (("plain", []), ("secagg", ["secagg.enabled=true"])):
        cfg = load_config(None, [*TINY, *extra])
        run_inprocess(cfg, tmp_path / name)
        adapters[name] = load_file(str(tmp_path / name / "adapter" /
                                       "adapter_model.safetensors"))
    assert _close(adapters["plain"], adapters["secagg"])
    rows = MetricsLog.read(tmp_path / "secagg" / "metrics.jsonl")
    assert all(r["secagg"] and r["secagg_unmask_survivors"] == 3 and r["aggregated"]
               for r in rows[1:])
    floats = sum(v.numel() for v in adapters["plain"].values())
    for r in rows[1:]:  # 3 clients' masked vectors (5 bytes a value) at least, and downlinks
        assert r["bytes_up"] >= r["secagg_masked_input_bytes_up"] > 3 * 5 * floats // 2
        assert r["bytes_down"] > 3 * 4 * floats // 2
