"""Devices reveal nothing by accident and refuse what they did not agree to; the Low findings of
the hostility review: model folders are data (no custom code, safetensors only), a tampered
checkpoint is one clear error on --resume, and bad CLI inputs are refused in one line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from fedpeft.client import app as client_app
from fedpeft.server.app import FedPeftStrategy
from fedpeft.server.checkpoint import CheckpointError, check_state
from fedpeft.server.rounds import new_loop
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.error import Error

from fedpeft.core.config import ConfigError, DataConfig, ModelConfig, load_config
from fedpeft.core.data import _labelled, read_user_file
from fedpeft.core.models import build_base
from fedpeft.core.payload import Payload
from fedpeft.core.workspace import get_workspace
from fedpeft.deploy import clientexec
from tests.helpers import TINY

# --- reason codes: the coordinator learns a code, the device keeps the text ---


def _raised(fn) -> BaseException:
    try:
        fn()
    except Exception as exc:  # the exception with its real traceback
        return exc
    raise AssertionError("expected an exception")


def _label_error(tmp_path: Path) -> BaseException:
    path = tmp_path / "own.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}", "label": lab}) + "\n"
                            for i, lab in enumerate(["diabetes", "healthy", "hiv-positive"])))
    cfg = DataConfig(dataset="file", path=str(path), labels=["a", "b"])
    return _raised(lambda: _labelled(read_user_file(path), cfg, path))


@pytest.mark.usefixtures("in_process")
def test_a_failed_task_tells_the_coordinator_a_code_never_the_text(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = _label_error(tmp_path)
    assert "hiv-positive" in str(secret)  # what the device's own log keeps
    assert clientexec.reason_code(secret) == "data error"
    sent: dict = {}

    class Quiet:
        is_running = False

        def __init__(self, *a: object) -> None: ...
        def start(self) -> None: ...
        def close(self) -> None: ...

    message = Message(RecordDict(), dst_node_id=1, message_type="train")
    monkeypatch.setattr(clientexec, "_task_client", lambda *a: Quiet())
    monkeypatch.setattr(clientexec, "HeartbeatSender", Quiet)
    monkeypatch.setattr(clientexec, "pull_task_input", lambda c: (message, Context(
        run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}), None, None))
    monkeypatch.setattr(clientexec, "check_fab", lambda fab, ref: None)
    monkeypatch.setattr(clientexec, "push_message", lambda c, reply, ctx: sent.update(reply=reply))
    monkeypatch.setattr(clientexec, "push_task_output",
                        lambda c, ctx, status, details: sent.update(details=details))

    def app(message: Message, context: Context) -> Message:
        raise secret

    assert not clientexec.run_task("x", "t", lambda: app, "ref")
    error: Error = sent["reply"].error
    assert error.reason == sent["details"] == "fedpeft device: data error"
    assert "hiv" not in error.reason and "diabetes" not in error.reason


def test_reason_codes_name_the_kind_of_failure(tmp_path: Path) -> None:
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mine", "auto_map": {
        "AutoModelForSequenceClassification": "modeling_mine.Mine"}}))
    model_error = _raised(lambda: build_base(ModelConfig(name=str(folder)), "classification", 2))
    assert clientexec.reason_code(model_error) == "model error"
    assert clientexec.reason_code(MemoryError()) == "out of memory"
    assert clientexec.reason_code(_raised(lambda: int("x"))) == "client error"
    assert clientexec.reason_code(clientexec.WrongAppError("x")) == "wrong app"


@pytest.mark.usefixtures("in_process")
def test_a_device_runs_no_fault_or_attack_injection_a_coordinator_sends() -> None:
    cfg = load_config(None, [*TINY, "federation.clients=2", "federation.clients_per_round=2",
                             "train.local_steps=1", "faults.crash=[0]"])
    loop = new_loop(cfg, get_workspace(cfg), simulation=False)

    class Grid:
        def get_node_ids(self) -> list[int]:
            return [1, 2]

    msg = next(iter(FedPeftStrategy(loop).configure_train(1, ArrayRecord(), ConfigRecord(),
                                                          Grid())))

    def context() -> Context:
        return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})

    with pytest.raises(Exception, match=r"(?i)fault|crash"):  # the simulation's app obeys
        client_app.app(msg, context())
    reply = client_app.device_app(msg, context())  # a device ignores it
    assert not reply.has_error() and reply.content["metrics"]["num-examples"] > 0


def test_a_pinned_device_refuses_another_model() -> None:
    from fedpeft.client.downlink import check_pinned_model

    check_pinned_model("tiny-bert", {"model": "tiny-bert"})
    check_pinned_model("anything", {})
    with pytest.raises(ConfigError, match="accepts 'tiny-bert' only"):
        check_pinned_model("/etc", {"model": "tiny-bert"})


# --- model folders are data ---


def test_a_model_folder_with_custom_code_or_pickled_weights_is_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mine", "auto_map": {
        "AutoModelForSequenceClassification": "modeling_mine.Mine"}}))
    with pytest.raises(ConfigError, match="never runs a model's own code") as info:
        build_base(ModelConfig(name=str(folder)), "classification", 2)
    assert "\n" not in str(info.value)
    from transformers import BertConfig, BertForSequenceClassification

    pickled = tmp_path / "pickled"
    model = BertForSequenceClassification(BertConfig(
        vocab_size=99, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
        intermediate_size=8))
    model.save_pretrained(pickled)
    (pickled / "model.safetensors").unlink()  # pickled weights only (what torch.save writes)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="safetensors") as info:
        build_base(ModelConfig(name=str(pickled)), "classification", 2)
    assert "\n" not in str(info.value)


# --- a tampered checkpoint on --resume ---


@pytest.mark.parametrize("tamper", ["shape", "nan", "scalar", "missing"])
@pytest.mark.parametrize("name", ["fedit", "flora", "ferret"])
def test_a_tampered_checkpoint_is_one_clear_error(name: str, tamper: str, tmp_path: Path) -> None:
    cfg = load_config(None, [*TINY, f'method.name="{name}"'])
    workspace = get_workspace(cfg)
    loop = new_loop(cfg, workspace, simulation=False)
    fresh, model = loop.state, workspace.adapter_model(cfg.model.rank)
    check_state(fresh, fresh, loop.method, cfg.model.rank, tmp_path, model)  # its own fits
    tensors, scalars = dict(fresh.tensors), dict(fresh.scalars)
    key = random.Random(0).choice(sorted(k for k, v in tensors.items() if v.numel()))
    if tamper == "shape":
        tensors[key] = torch.zeros(3, 3)
    elif tamper == "nan":
        tensors[key] = tensors[key].clone().fill_(float("nan"))
    elif tamper == "missing":
        del tensors[key]
    elif scalars:
        scalars = {k: "x" for k in scalars}
    else:
        pytest.skip(f"{name}'s state has no scalars")
    with pytest.raises(CheckpointError, match=r"does not fit|damaged"):
        check_state(Payload(tensors, scalars), fresh, loop.method, cfg.model.rank, tmp_path,
                    model)


# --- the command line ---


def _one_line_error(capsys: pytest.CaptureFixture, argv: list[str], *needles: str) -> None:
    from fedpeft.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedpeft: error:") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_cli_refusals_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    binary = tmp_path / "config.toml"
    binary.write_bytes(bytes(range(256)))
    _one_line_error(capsys, ["simulate", str(binary)], "not valid TOML")
    _one_line_error(capsys, ["sweep", str(binary)], "not valid TOML")
    a_file = tmp_path / "keys"
    a_file.write_text("x")
    _one_line_error(capsys, ["keygen", str(a_file)], "is a file")
    _one_line_error(capsys, ["server", "--insecure", "--clients", "2", "--port", "99999"],
                    "--port 99999")
    data = tmp_path / "own.jsonl"
    data.write_text('{"text": "a", "label": ["x", "y"]}\n{"text": "b", "label": "z"}\n')
    client = ["client", "--superlink", "127.0.0.1:1", "--insecure", "--data", str(data)]
    _one_line_error(capsys, client, "holds a list or an object")
    data.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "z"}\n')
    _one_line_error(capsys, [*client, "--threads", "-5"], "--threads -5")
    _one_line_error(capsys, [*client, "--rank", "0"], "--rank 0")
