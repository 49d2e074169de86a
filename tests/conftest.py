"""Shared fixtures, Flower's offline switches for every test, and the ``slow`` selection.

Tests marked ``@pytest.mark.slow`` (a Flower simulation or deployment, processes, a real packaged
model) are deselected unless ``--runslow`` is given (or a ``-m`` expression names ``slow``):

    python -m pytest -q                 # everyday: the fast tests
    python -m pytest -q --runslow       # everything (the README's command, CI)
    python -m pytest -q -m slow --runslow   # the slow tests only
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run the tests marked slow (Flower simulations, deployments, "
                          "real models)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow") or "slow" in (config.getoption("markexpr") or ""):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


@pytest.fixture(autouse=True)
def _flwr_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path_factory.mktemp("flwr_home")))


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Flower's task identity for building messages here, and one fixed torch thread count
    (server and clients share this process; a different count changes float results)."""
    from fedpeft.client import app as client_app
    from fedpeft.server import app as server_app
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    monkeypatch.setattr(server_app, "set_torch_threads", lambda n: None)
    monkeypatch.setattr(client_app, "set_torch_threads", lambda n: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
