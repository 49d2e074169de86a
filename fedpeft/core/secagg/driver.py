"""One SecAgg+ instance over any transport: four request/reply exchanges, timed and counted.

A transport is a function ``exchange(stage, requests) -> replies`` (node -> fields; a node that
did not answer in time is absent). The Flower transport sends one Message per node and waits with
the stage timeout; the in-process loop calls each client's handler directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .messages import STAGES
from .server import RoundAborted, SecAggResult, SecAggServer, StageStats

Exchange = Callable[[str, dict[int, dict[str, Any]]], dict[int, Any]]


@dataclass
class SecAggOutcome:
    result: SecAggResult | None
    aborted: RoundAborted | None
    stats: list[StageStats]
    wall_s: dict[str, float] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """The round's metrics row entries: per stage, seconds (wall, including clients),
        server seconds, bytes each way and survivors."""
        out: dict[str, Any] = {"secagg": True, "secagg_threshold_met": self.result is not None}
        if self.aborted is not None:
            out["secagg_aborted_stage"] = self.aborted.stage
        for st in self.stats:
            p = f"secagg_{st.stage}"
            out.update({f"{p}_s": round(self.wall_s.get(st.stage, 0.0), 4),
                        f"{p}_server_s": round(st.server_s, 4), f"{p}_bytes_down": st.bytes_down,
                        f"{p}_bytes_up": st.bytes_up, f"{p}_survivors": st.survivors})
        return out


def run_instance(server: SecAggServer, exchange: Exchange) -> SecAggOutcome:
    """Drive ``server`` through the four stages; an abort leaves ``result`` None."""
    wall: dict[str, float] = {}
    try:
        for i, stage in enumerate(STAGES):
            t0 = time.perf_counter()
            requests = server.requests()
            t1 = time.perf_counter()
            replies = exchange(stage, requests)
            t2 = time.perf_counter()
            try:
                server.receive(replies)
            finally:
                t3 = time.perf_counter()
                server.stats[i].server_s = (t1 - t0) + (t3 - t2)
                wall[stage] = t3 - t0
    except RoundAborted as e:
        return SecAggOutcome(None, e, server.stats, wall, dict(server.rejected))
    return SecAggOutcome(server.result, None, server.stats, wall, dict(server.rejected))
