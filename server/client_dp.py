"""Client-level DP (``[privacy] client_level``): clip each client's update, noise their mean,
as Flower's fixed-clipping wrappers define it and with Flower's own helpers
(``compute_clip_model_update``, ``compute_stdv``, ``add_gaussian_noise_inplace``).

It is a stage of the round loop (``server/rounds.py``), not a second road: the loop decodes and
validates every reply once, and this stage takes the accepted uploads, so the same code serves
every transport (Flower and the in-process loop). What it does, with G the round's downlink
(for every uploaded key the same for all clients: ``mean_aggregate`` methods without a
``client_dp_refusal``), C = ``client_clip``, z = ``client_noise`` and m the clients sampled per
round:

- ``server-fixed``: the server clips every accepted update U_k - G to L2 norm C (Flower's
  ``DifferentialPrivacyServerSideFixedClipping``); ``client-fixed``: each client clipped its own
  (``fedpeft.core.privacy.clip_update``, Flower's ``DifferentialPrivacyClientSideFixedClipping``)
  and the server rejects an update whose norm exceeds C.
- G + (1/m) sum_k clip(U_k - G), unit weights over the m sampled clients (a missing or rejected
  one is a zero update): one client moves it by at most C / m, the sensitivity of the noise. The
  method aggregates one upload holding the noised mean (as under SecAgg): what it does after
  the mean (FedSVD's SVD) is post-processing.
- Gaussian noise of std z C / m is added to the mean (Flower's ``compute_stdv``), once per
  aggregated round (a release); ``client_epsilon`` is the client-level epsilon of the releases
  so far, by Opacus's RDP accountant with no amplification by client sampling (as Flower's own
  accountant requires).
- A zero update is rejected (Flower's clipping divides by its norm); it counts as zero, as a
  missing client does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from fedpeft.strategies import Method, Payload, Upload
from fedpeft.strategies.base import Aggregate

from fedpeft.core.config import FedConfig
from fedpeft.core.payload import Tensors, update_norm
from fedpeft.core.privacy import client_level_epsilon

CLIENT_EPSILON = "client_epsilon"  # round metric: client-level epsilon of the releases so far
DP_RELEASES = "dp_releases"  # checkpoint key: noised releases so far
NORM_SLACK = 1e-4  # float32 round-off when checking a client-clipped norm


def flower_dp() -> Any:
    """Flower's differential-privacy helpers (their module moved between releases)."""
    try:
        from flwr.supercore import differential_privacy
    except ImportError:  # older layout
        from flwr.common import differential_privacy  # type: ignore[no-redef]
    return differential_privacy


class ClientLevelDP:
    """Clip and noise for one run (see the module docstring); ``releases``: noised means so
    far (checkpointed by the round loop)."""

    def __init__(self, cfg: FedConfig) -> None:
        priv = cfg.privacy
        self.mode, self.clip, self.noise = priv.client_level, priv.client_clip, priv.client_noise
        self.delta = priv.delta
        self.sampled = min(cfg.federation.clients_per_round, cfg.federation.clients)
        self.releases = 0

    def problem(self, tensors: Tensors, reference: Tensors) -> str | None:
        """Why an otherwise valid upload cannot enter the clipped mean, or None."""
        norm = update_norm(tensors, reference)
        if self.mode == "client-fixed" and norm > self.clip * (1 + NORM_SLACK):
            return f"update norm {norm:.4g} above privacy.client_clip = {self.clip:g}"
        if norm == 0:
            return "a zero update (counts as zero, as a missing client does)"
        return None

    def aggregate(self, method: Method, state: Payload, uploads: list[Upload],
                  reference: Tensors) -> Aggregate:
        """The method's aggregate of one upload holding G + (1/m) sum_k clip(U_k - G) plus the
        noise, over the uploaded keys (the method post-processes it as it would a mean, e.g.
        FedSVD's re-factorisation); ``reference``: the round's downlink (G)."""
        keys = sorted(uploads[0].payload.tensors)  # every upload was validated to these keys
        clipped = [self._clipped(u.payload.tensors, reference, keys) for u in uploads]
        mean = [(reference[k].double() + sum(c[k].double() - reference[k].double()
                                             for c in clipped) / self.sampled).numpy()
                for k in keys]  # k of m: the others count as zero updates
        dp = flower_dp()
        dp.add_gaussian_noise_inplace(mean, dp.compute_stdv(self.noise, self.clip, self.sampled))
        self.releases += 1
        noised = {k: torch.from_numpy(np.asarray(v)).to(uploads[0].payload.tensors[k].dtype)
                  for k, v in zip(keys, mean, strict=True)}
        return method.aggregate(state, [Upload(uploads[0].profile, Payload(noised), 1, {})])

    def _clipped(self, tensors: Tensors, reference: Tensors, keys: list[str]) -> Tensors:
        """``server-fixed``: the upload with its update clipped to C by Flower's
        ``compute_clip_model_update``; ``client-fixed``: as the client clipped it."""
        if self.mode != "server-fixed":
            return tensors
        up = [tensors[k].detach().cpu().numpy().copy() for k in keys]
        flower_dp().compute_clip_model_update(up, [reference[k].numpy() for k in keys],
                                              self.clip)
        return {k: torch.from_numpy(np.asarray(v)).to(tensors[k].dtype)
                for k, v in zip(keys, up, strict=True)}

    def epsilon(self) -> float:
        """Client-level epsilon of the releases so far."""
        return client_level_epsilon(self.noise, self.releases, self.delta)
