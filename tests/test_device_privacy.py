"""A device's own privacy (issue 16, finding 8): a DP-SGD reply carries only what the accountant
covers, the device's delta cannot be raised by the coordinator, and its lifetime budget lives in
a ledger file across runs. Real ClientApp rounds on tiny-bert with a device's own data file."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from fedpeft.client import app as client_app
from fedpeft.strategies import ClientProfile, build_method
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedpeft.cli import main
from fedpeft.core.config import ConfigError, PrivacyConfig, load_config
from fedpeft.core.ledger import PrivacyLedger, device_privacy
from fedpeft.core.privacy import BUDGET_SPENT, compose, epsilon_of, noise_multiplier
from fedpeft.core.wire import CONFIG_RECORD, config_record, payload_to_records
from fedpeft.core.workspace import get_workspace
from tests.helpers import TINY

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the (largest|smallest) alpha")
ROWS = 64
LABELS = 'data.labels=["rotten", "fresh"]'
ALLOWED = {"epsilon", BUDGET_SPENT, "partition_id", "rank", "next_rank", "num-examples"}


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for attr in ("_task_id", "_run_id", "_node_id"):  # lets a test build Flower messages
        monkeypatch.setattr(TaskIdentity, attr, 1)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "mine.csv"
    path.write_text("text,label\n" + "".join(f'"review {i}",{("fresh", "rotten")[i % 2]}\n'
                                             for i in range(ROWS)))
    return path


def _round(sets: list[str], node: dict, run_id: int, state: RecordDict,
           server_round: int = 1) -> Message:
    """One real ClientApp round (fedit) as the coordinator's message would start it."""
    cfg = load_config(None, [*TINY, 'method.name="fedit"', LABELS, *sets])
    method = build_method(cfg)
    global_state = method.init(get_workspace(cfg).adapter_model(cfg.model.rank).state())
    content = payload_to_records(method.downlink(global_state, ClientProfile(0, cfg.model.rank)),
                                 {"fedpeft.round": server_round, "fedpeft.partition": 0})
    content[CONFIG_RECORD] = config_record(cfg)
    msg = Message(content=content, dst_node_id=5, message_type=MessageType.TRAIN, group_id="1")
    ctx = Context(run_id=run_id, node_id=5, node_config=node, state=state, run_config={})
    return client_app.train(msg, ctx)


def _ledger(path: Path) -> dict:
    return json.loads(path.read_text())


def test_a_dp_device_reply_carries_no_loss_and_no_size(data: Path, tmp_path: Path) -> None:
    """A device's own n is private: no loss, sample rate, noise multiplier or timings; the
    example count is its public profile (batch x steps), the epsilon its budget."""
    node = {"data-path": str(data), "epsilon": 4.0, "threads": 1,
            "ledger": str(tmp_path / "ledger.json")}
    reply = _round([], node, run_id=7, state=RecordDict())
    metrics = dict(reply.content["metrics"])
    assert set(metrics) <= ALLOWED, sorted(set(metrics) - ALLOWED)
    assert metrics["num-examples"] == 8 * 2 != ROWS  # train.batch_size x train.local_steps
    assert metrics["epsilon"] == 4.0  # the budget; the spent epsilon is in the ledger
    assert 0 < _ledger(tmp_path / "ledger.json")["spent"] < 4.0
    assert len(reply.content.array_records) > 0  # it did upload its DP-trained tensors


def test_a_dp_client_in_a_simulation_sends_no_loss(tmp_path: Path) -> None:
    """In a simulation n is public (the partition follows from the run's config), so the count
    and the exact epsilon stay; the loss, sample rate and sigma never leave the client."""
    sets = ["privacy.enabled=true", "privacy.epsilon=3"]
    reply = _round(sets, {}, run_id=1, state=RecordDict())
    metrics = dict(reply.content["metrics"])
    assert not {"train_loss", "sample_rate", "noise_multiplier"} & set(metrics)
    cfg = load_config(None, [*TINY, LABELS, *sets])
    assert metrics["num-examples"] == len(get_workspace(cfg).partition(0, cfg.federation.clients))
    assert 0 < metrics["epsilon"] < 3.0


def test_the_ledger_persists_across_runs_and_refuses_beyond_the_budget(
        data: Path, tmp_path: Path) -> None:
    """Budget planned for 2 rounds; run 7 trains 1, run 8 trains 1 and is then refused (the
    run's own state would have allowed a second round), and so is a third run: the device's
    lifetime epsilon stays within its budget across runs."""
    ledger = tmp_path / "ledger.json"
    node = {"data-path": str(data), "epsilon": 3.0, "threads": 1, "ledger": str(ledger)}
    sets = ["privacy.rounds=2", "federation.rounds=2"]
    assert "budget_spent" not in _round(sets, node, run_id=7, state=RecordDict()).content[
        "metrics"]
    first = _ledger(ledger)["spent"]
    state = RecordDict()  # run 8's own client state, kept between its rounds
    assert "budget_spent" not in _round(sets, node, run_id=8, state=state).content["metrics"]
    refused = _round(sets, node, run_id=8, state=state, server_round=2)
    again = _round(sets, node, run_id=9, state=RecordDict())
    for reply in (refused, again):
        assert reply.content["metrics"][BUDGET_SPENT] == 1
        assert reply.content["metrics"]["num-examples"] == 0
        assert not reply.content.array_records  # nothing trained, nothing sent
    doc = _ledger(ledger)
    assert [r["run"] for r in doc["runs"]] == ["7", "8"]
    assert all(0 < r["epsilon"] <= 3.0 for r in doc["runs"])
    assert first < doc["spent"] <= 3.0
    history = [tuple(h) for r in doc["runs"] for h in r["history"]]
    assert doc["spent"] == pytest.approx(epsilon_of(history, 1e-5, "rdp"), rel=1e-9)


def test_the_coordinator_cannot_weaken_the_device_delta(data: Path, tmp_path: Path) -> None:
    """A run asking for delta 0.5 gets the device's own 1e-5: the device's epsilon at 1e-5 stays
    within its budget (with the coordinator's delta, sigma would give far more)."""
    ledger = tmp_path / "ledger.json"
    node = {"data-path": str(data), "epsilon": 3.0, "delta": 1e-5, "threads": 1,
            "ledger": str(ledger)}
    sets = ["privacy.enabled=true", "privacy.epsilon=3", "privacy.delta=0.5",
            "privacy.rounds=1", "federation.rounds=1"]
    _round(sets, node, run_id=3, state=RecordDict())
    doc = _ledger(ledger)
    assert doc["delta"] == 1e-5 and 0 < doc["spent"] <= 3.0
    sigma, q, steps = doc["runs"][0]["history"][0]
    weak = noise_multiplier(PrivacyConfig(epsilon=3.0, delta=0.5), q, steps)
    assert weak < sigma
    assert epsilon_of(compose([], weak, q, steps), 1e-5, "rdp") > 10  # what 0.5 would have done


def test_device_privacy_settings() -> None:
    run = PrivacyConfig(enabled=True, epsilon=3.0, delta=0.5)
    mine, note = device_privacy(run, None, 1e-5)  # no budget of its own: the run's, its delta
    assert (mine.enabled, mine.epsilon, mine.delta) == (True, 3.0, 1e-5) and "0.5" in note
    mine, note = device_privacy(PrivacyConfig(enabled=True, delta=1e-7), 2.0, 1e-5)
    assert (mine.epsilon, mine.delta, note) == (2.0, 1e-7, None)  # a smaller delta is fine
    mine, _ = device_privacy(PrivacyConfig(), 2.0, None)  # the run does not ask for DP
    assert (mine.enabled, mine.delta) == (True, 1e-5)
    assert device_privacy(PrivacyConfig(), None, None)[0] == PrivacyConfig()
    with pytest.raises(ConfigError, match="out of range"):
        device_privacy(run, 2.0, 1.5)


def test_a_delta_of_one_over_n_is_refused_on_the_device(data: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    args = ["client", "--superlink", "127.0.0.1:9", "--insecure", "--data", str(data),
            "--epsilon", "3", "--delta", str(1 / ROWS)]
    assert main(args) == 2
    assert f"for this device's {ROWS} examples" in capsys.readouterr().err
    node = {"data-path": str(data), "epsilon": 3.0, "delta": 0.1, "threads": 1,
            "ledger": str(tmp_path / "ledger.json")}
    with pytest.raises(ConfigError, match="leaking a whole record"):
        _round([], node, run_id=1, state=RecordDict())


def test_a_damaged_ledger_is_refused_with_one_message(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    path.write_text('{"format": "fedpeft-privacy-ledger/1", "runs": [{"history": [[1.0]]}]}')
    with pytest.raises(ConfigError, match="is not a fedpeft-privacy-ledger/1 file"):
        PrivacyLedger(path, 3.0, 1e-5, run="1").spend(0.1, 5, 10)


def test_concurrent_spenders_share_one_budget(tmp_path: Path) -> None:
    """Two device processes on one ledger: every granted spend is recorded and together they
    stay within the budget (the file is changed under a lock)."""
    path, granted = tmp_path / "ledger.json", []

    def spender(run: str) -> None:
        book = PrivacyLedger(path, 2.0, 1e-5, run=run)
        granted.extend(run for _ in range(12) if book.spend(0.1, 4, 24).granted)

    threads = [threading.Thread(target=spender, args=(str(i),)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    doc = _ledger(path)
    assert sum(n for r in doc["runs"] for _, _, n in r["history"]) == 4 * len(granted)
    assert 0 < doc["spent"] <= 2.0 and len(granted) == 6  # 24 planned steps, 4 a spend
