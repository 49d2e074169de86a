"""What a run's summary says about secure aggregation."""

from __future__ import annotations

from typing import Any


def secagg_summary(sa: Any) -> dict[str, Any]:
    """summary.json's account of what the server saw, from the ``[secagg]`` section."""
    if not sa.enabled:
        return {"secagg": False}
    return {"secagg": True,
            "server_saw": "per round only the example-weighted sum (and the summed weight) of "
                          "the surviving clients' clipped updates, through SecAgg+; no single "
                          "client's upload, example count or training metrics",
            "secagg_params": {"threshold": sa.threshold, "neighbours": sa.neighbours,
                              "clip_range": sa.clip_range, "bits": sa.bits,
                              "max_weight": sa.max_weight}}
