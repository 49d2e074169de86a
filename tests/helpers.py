"""Helpers shared by several test modules: the tiny run config, the tiny causal-LM run and task,
a LoRA adapter state and client uploads near it (the methods' aggregate tests), and a fake Flower
Grid that delivers messages to the real ClientApp in this process, and what a loopback deployment
test needs (a device's review CSV, the Flower env, waits, the ``fedpeft client`` command). Fixtures
live in tests/conftest.py; no test module imports another test module."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import torch
from fedpeft.client import app as client_app
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from fedpeft.core.config import DataConfig, ModelConfig
from fedpeft.core.keys import PARTITION
from fedpeft.core.models import load_tokenizer
from fedpeft.core.tasks import CausalLM

TINY = [
    'model.name="tiny-bert"',
    "federation.clients=6",
    "federation.clients_per_round=3",
    "federation.rounds=2",
    "train.local_steps=2",
    "train.batch_size=8",
    "eval.subset=100",
    'data.partitioner="iid"',
    "data.test_size=200",
]


LORA_RANK = 4
LORA_SHAPES = {"enc.0.q": (24, 40), "enc.0.v": (40, 24), "enc.1.q": (32, 32)}  # (d_out, d_in)


def lora_template(seed: int = 0) -> dict[str, torch.Tensor]:
    """peft-keyed adapter state (:data:`LORA_SHAPES`, rank :data:`LORA_RANK`, a 2-class head)
    after some training: A ~ kaiming, B small and non-zero."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for layer, (d_out, d_in) in LORA_SHAPES.items():
        bound = 1 / math.sqrt(d_in)
        out[f"{layer}.lora_A.weight"] = (torch.rand(LORA_RANK, d_in, generator=gen) * 2 - 1) * bound
        out[f"{layer}.lora_B.weight"] = torch.randn(d_out, LORA_RANK, generator=gen) * 0.02
    out["head.weight"] = torch.randn(2, 16, generator=gen) * 0.1
    out["head.bias"] = torch.zeros(2)
    return out


def near_upload(sent: dict[str, torch.Tensor], keys, seed: int) -> dict[str, torch.Tensor]:
    """A client's upload: the sent tensors moved by a common drift plus 30% private noise."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key in keys:
        base = sent[key]
        scale = float(base.abs().mean()) or 0.01
        common = torch.randn(base.shape, generator=torch.Generator().manual_seed(7)) * scale * 0.2
        out[key] = base + common + torch.randn(base.shape, generator=gen) * scale * 0.3
    return out


def tiny_run(folder: Path, data: Path, *extra: str) -> list[str]:
    """Overrides for a 2-round run of the tiny model saved in ``folder`` on a JSONL file."""
    return [f'model.name="{folder}"', 'data.dataset="file"', f'data.path="{data}"',
            'data.partitioner="iid"', "data.test_size=20", "federation.clients=4",
            "federation.clients_per_round=2", "federation.rounds=2", "train.local_steps=2",
            "train.batch_size=4", "model.max_length=48", *extra]


def make_task(folder: Path, data: DataConfig | None = None, labels: tuple[str, ...] = (),
              max_length: int = 256) -> CausalLM:
    cfg = ModelConfig(name=str(folder), max_length=max_length)
    return CausalLM(cfg, data or DataConfig(dataset="file", path="x"),
                    load_tokenizer(str(folder)), labels)


class Killed(BaseException):
    """Stands in for SIGKILL: nothing in the server catches it."""


class FakeGrid:
    """Delivers each message to the real ClientApp (mods included) in this process. ``silent``
    partitions never reply (timed out), ``gone`` ones get Flower's node-unavailable error, and
    the ``kill_at``-th push dies after the first reply (a server killed mid-round)."""

    def __init__(self, nodes: range, *, silent: tuple[int, ...] = (), gone: tuple[int, ...] = (),
                 kill_at: int | None = None, reverse: bool = False) -> None:
        self.nodes = list(nodes)
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(),
                                    run_config={}) for n in self.nodes}
        self.run = SimpleNamespace(run_id=1)  # Grid.run: the run the contexts belong to
        self.silent, self.gone = set(silent), set(gone)
        self.kill_at, self.reverse = kill_at, reverse
        self.pushes = 0
        self.inbox: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages: list[Message]) -> list[str]:
        self.pushes += 1
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            ids.append(msg.metadata.message_id)
            if self.pushes == self.kill_at and self.inbox:
                raise Killed
            partition = int(msg.content["scalars"][PARTITION])
            if partition not in self.silent:
                reply = self._deliver(msg, partition)
                reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
                self.inbox[msg.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: set[str]) -> list[Message]:
        got = [self.inbox.pop(i) for i in sorted(message_ids) if i in self.inbox]
        return got[::-1] if self.reverse else got

    def send_and_receive(self, messages: list[Message], *,
                         timeout: float | None = None) -> list[Message]:
        return self.pull_messages(set(self.push_messages(messages)))

    def _deliver(self, msg: Message, partition: int) -> Message:
        if partition in self.gone:
            return Message(Error(ErrorCode.NODE_UNAVAILABLE, "node offline"), reply_to=msg)
        try:
            return client_app.app(msg, self.contexts[msg.metadata.dst_node_id])
        except Exception as exc:  # what Flower's runtime does with a ClientApp exception
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, str(exc)), reply_to=msg)


# ---- loopback deployments (`fedpeft server` / `fedpeft client` as OS processes) --------------
FEDPEFT = [sys.executable, "-m", "fedpeft.cli"]
POSITIVE = ["a wonderful, moving film", "great acting and a clever script", "loved every minute",
            "a delightful surprise", "brilliant and funny", "one of the best this year"]
NEGATIVE = ["a dull, lifeless mess", "boring from start to finish", "awful dialogue",
            "a tedious waste of time", "clumsy and forgettable", "the worst film this year"]


def review_csv(path: Path, seed: int, rows: int = 24) -> Path:
    """A device's own file: ``rows`` short reviews labelled fresh/rotten, alternating."""
    lines = ["text,label"]
    for i in range(rows):
        good = (i + seed) % 2 == 0
        text = (POSITIVE if good else NEGATIVE)[(i * 7 + seed) % 6]
        lines.append(f'"{text} ({i})",{"fresh" if good else "rotten"}')
    path.write_text("\n".join(lines) + "\n")
    return path


def flower_env(home: Path) -> dict[str, str]:
    """The environment of a deployment's processes: Flower offline, its own FLWR_HOME."""
    return {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PYTHONUNBUFFERED": "1"}


def wait_listening(port: int, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the coordinator exited early"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {port} after {timeout_s} s")


def wait_exit(proc: subprocess.Popen, timeout_s: float) -> int:
    """The exit code, or -999 if the process still runs after ``timeout_s``."""
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        return -999


def client_cmd(superlink: str, ca: Path, key: Path, data: Path, extra: list[str]) -> list[str]:
    return [*FEDPEFT, "client", "--superlink", superlink, "--ca", str(ca), "--key", str(key),
            "--data", str(data), "--threads", "1", *extra]
