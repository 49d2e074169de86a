"""Helpers shared by several test modules: the tiny run config, the tiny causal-LM run and task,
and a fake Flower Grid that delivers messages to the real ClientApp in this process. Fixtures
live in tests/conftest.py; no test module imports another test module."""

from __future__ import annotations

import uuid
from pathlib import Path
from types import SimpleNamespace

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
