"""What a run's summary says about secure aggregation."""

from __future__ import annotations

from typing import Any


def secagg_summary(sa: Any, priv: Any = None) -> dict[str, Any]:
    """summary.json's account of what the server saw, from the ``[secagg]`` (and
    ``[privacy]``) sections."""
    if not sa.enabled:
        return {"secagg": False}
    saw = ("per round only the example-weighted sum (and the summed weight) of the surviving "
           "clients' clipped updates, through SecAgg+; no single client's upload, example count "
           "or training metrics")
    if priv is not None and priv.client_level != "off":
        saw = ("per round only the sum of the surviving clients' updates, each clipped to L2 "
               "norm privacy.client_clip and noised by its client before masking (noise std "
               ">= client_noise * client_clip in the sum when at least privacy.min_survivors "
               "survive; fewer: the round is skipped), and the survivors' count, through "
               "SecAgg+; no un-noised sum, no single client's upload, example count or "
               "training metrics")
    return {"secagg": True, "server_saw": saw,
            "secagg_params": {"threshold": sa.threshold, "neighbours": sa.neighbours,
                              "clip_range": sa.clip_range, "bits": sa.bits,
                              "max_weight": sa.max_weight}}
