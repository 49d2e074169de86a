"""Shared fixtures: a private FLWR_HOME and Flower's offline switches for every test."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _flwr_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path_factory.mktemp("flwr_home")))


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
