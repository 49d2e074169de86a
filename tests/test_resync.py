"""Client-state resynchronisation (Ferret, FLoRA): a client that lost its client state says so
(``needs_sync`` = 1, zero tensors marked synced -1, left out of the aggregate), gets the dense
global state the next time it is sampled, and contributes again, while the run goes on."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from fedpeft.client import step as client_step_module
from fedpeft.server import inprocess
from fedpeft.strategies import Upload
from fedpeft.strategies import ferret as fr
from fedpeft.strategies import flora as fl
from fedpeft.strategies.base import Aggregate

from fedpeft.core.payload import Payload
from fedpeft.core.sampling import sample_clients
from tests.helpers import TINY

LOST_CLIENT, LOST_ROUND, ROUNDS = 3, 3, 4
METHODS = {
    "ferret": [*TINY, 'method.name="ferret"', "method.block_size=4096", "method.k=3",
               "train.lr=0.001"],
    # rank 1: a round's stacked factors (3 clients) hold fewer numbers than tiny-bert's dense
    # matrices, so the server sends history, not the dense sum (which would resync anyone)
    "flora": [*TINY, 'method.name="flora"', "model.rank=1"],
}


def _dense(method: str, down: set[str]) -> bool:
    return fr.DELTA in down if method == "ferret" else any(k.startswith(fl.DELTA) for k in down)


def _contributors(method: str, state: Payload, rnd: int, rank: int) -> int:
    """How many clients' updates went into round ``rnd``'s aggregate."""
    if method == "ferret":
        return len(state.tensors[fr.ids_key(rnd)])
    b = next(v for k, v in state.tensors.items() if k.startswith(f"flora.hist.{rnd}.B::"))
    return b.shape[1] // rank


@pytest.mark.parametrize("method", list(METHODS))
def test_a_client_that_lost_its_state_is_resynchronised_and_contributes_again(
        method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    schedule = {r: sample_clients(6, 3, 0, r) for r in range(1, ROUNDS + 1)}
    assert all(LOST_CLIENT in schedule[r] for r in (2, 3, 4))  # seen, loses its state, back
    seen: dict[tuple[int, int], tuple[set[str], dict, dict]] = {}
    real_round = client_step_module.client_round

    def client_round(cfg: Any, meth: Any, ws: Any, down: Payload, **kw: Any) -> Any:
        if hasattr(meth, "clear_cache"):  # every client rebuilds the global state on its own
            meth.clear_cache()
        state = kw["client_state"]
        if (kw["server_round"], kw["partition_id"]) == (LOST_ROUND, LOST_CLIENT):
            assert state.tensors and state.values  # it held a state, which is now lost
            state.tensors.clear()
            state.values.clear()
        res = real_round(cfg, meth, ws, down, **kw)
        seen[(kw["server_round"], kw["partition_id"])] = (
            set(down.tensors), dict(res.payload.scalars), dict(res.metrics))
        return res

    cls = fr.Ferret if method == "ferret" else fl.FLoRA
    real_aggregate = cls.aggregate
    states: dict[int, Payload] = {}

    def aggregate(self: Any, state: Payload, uploads: list[Upload]) -> Aggregate:
        new = real_aggregate(self, state, uploads)
        states[int(new.state.scalars[fr.ROUND if method == "ferret" else fl.ROUND])] = new.state
        return new

    monkeypatch.setattr(client_step_module, "client_round", client_round)
    monkeypatch.setattr(cls, "aggregate", aggregate)
    rows = inprocess.run_plain(None, [*METHODS[method], f"federation.rounds={ROUNDS}"])

    assert [r.get("aggregated") for r in rows[1:]] == [1] * ROUNDS  # the run went on
    # the metrics row counts the clients that asked for a resync
    assert [r["needs_sync"] for r in rows[1:]] == [0, 0, 1, 0]
    assert all(r["clients_failed"] == 0 and r["clients_rejected"] == 0 for r in rows[1:])
    # the round it lost its state: it says so and its upload is left out of the aggregate
    _, scalars, metrics = seen[(LOST_ROUND, LOST_CLIENT)]
    assert metrics.get("needs_sync") == 1.0
    assert scalars[fr.SYNCED if method == "ferret" else fl.SYNCED] == -1
    rank = 1
    assert _contributors(method, states[LOST_ROUND], LOST_ROUND, rank) == 2
    # the next round: the dense global state, and its update counts again
    down, scalars, metrics = seen[(LOST_ROUND + 1, LOST_CLIENT)]
    assert _dense(method, down) and "needs_sync" not in metrics
    assert scalars[fr.SYNCED if method == "ferret" else fl.SYNCED] == LOST_ROUND
    assert _contributors(method, states[LOST_ROUND + 1], LOST_ROUND + 1, rank) == 3
    # nobody else was affected: no other client ever asked for a resync
    assert [k for k, v in seen.items() if "needs_sync" in v[2]] == [(LOST_ROUND, LOST_CLIENT)]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
