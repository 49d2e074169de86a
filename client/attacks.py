"""Attack injection for robustness experiments: malicious clients, beside the faults of
``client/faults.py``.

The ``[attacks]`` config section (``fedpeft.core.config.AttacksConfig``) makes
``round(attacks.fraction * federation.clients)`` clients, drawn once per run with
``federation.seed`` (:func:`attackers`), attack whenever they are sampled. Their uploads stay
well formed and finite, so validation lets them through and only the aggregator
(``federation.aggregator``) can blunt them. With update = upload - what the client was sent:

- ``sign-flip``: the client uploads sent - update;
- ``scaled``: sent + ``attacks.scale`` * update (default -10);
- ``noise``: sent + a Gaussian vector of the honest update's L2 norm (seeded by run, round and
  client), in place of the update;
- ``label-flip``: the client trains on flipped labels (class c -> num_labels - 1 - c) and
  uploads what that training gives (:func:`attacked_data`, called by the trainer).

The update attacks act on the reply: :func:`inject_attacks` is a Flower ClientApp mod (the
upload is decoded against the downlink and sent uncompressed, as a fault's is), and the
single-process loop calls :func:`attack_upload` on the same tensors.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from fedpeft.core.config import FedConfig, from_json
from fedpeft.core.keys import PARTITION, ROUND
from fedpeft.core.payload import Tensors
from fedpeft.core.tasks import Batchable, Task
from fedpeft.core.wire import (
    SCALARS,
    has_tensors,
    replace_tensors,
    run_config_json,
    unpack_record,
)

UPDATE_ATTACKS = ("sign-flip", "scaled", "noise")


def attackers(cfg: FedConfig) -> frozenset[int]:
    """The partition ids of the run's malicious clients: the first ``round(fraction * clients)``
    of a permutation drawn with ``federation.seed`` (the same in every round)."""
    count = round(cfg.attacks.fraction * cfg.federation.clients)
    if cfg.attacks.kind == "none" or count == 0:
        return frozenset()
    order = np.random.default_rng([cfg.federation.seed, 19]).permutation(cfg.federation.clients)
    return frozenset(int(p) for p in order[:count])


def attack_for(cfg: FedConfig, partition_id: int) -> str | None:
    """This client's attack kind, or None for an honest client."""
    return cfg.attacks.kind if partition_id in attackers(cfg) else None


def attacked_data(cfg: FedConfig, data: Batchable, partition_id: int, task: Task) -> Batchable:
    """The examples a client trains on: a label-flip attacker's with every label c replaced by
    ``num_labels - 1 - c`` (the task re-encodes them: a causal LM's answer becomes the other
    class's verbaliser); everyone else's as they are."""
    if cfg.attacks.kind != "label-flip" or attack_for(cfg, partition_id) is None:
        return data
    num_labels = len(task.label_names)
    return task.relabel(data, num_labels - 1 - np.asarray(data.labels))  # type: ignore[attr-defined]


def attack_upload(cfg: FedConfig, partition_id: int, server_round: int, upload: Tensors,
                  sent: Tensors) -> Tensors:
    """The upload this client sends: ``upload`` from an honest or label-flip client, the
    attacked update (:func:`attacked_update`) from an update attacker."""
    kind = attack_for(cfg, partition_id)
    if kind not in UPDATE_ATTACKS or not upload:  # nothing to attack (a spent DP budget)
        return upload
    seed = [cfg.federation.seed, 23, server_round, partition_id]
    return attacked_update(kind, upload, sent, scale=cfg.attacks.scale, seed=seed)


def attacked_update(kind: str, upload: Tensors, sent: Tensors, *, scale: float = -10.0,
                    seed: list[int] | None = None) -> Tensors:
    """sent + f(upload - sent) for attack ``kind``. A key the client was not sent (or not in
    that shape) counts as an update from zero."""
    updates = {k: v.double() - _origin(k, v, sent) for k, v in upload.items()}
    if kind == "sign-flip":
        attacked = {k: -u for k, u in updates.items()}
    elif kind == "scaled":
        attacked = {k: scale * u for k, u in updates.items()}
    elif kind == "noise":
        attacked = _noise_like(updates, seed or [0])
    else:
        raise ValueError(f"unknown update attack {kind!r}")
    return {k: (_origin(k, upload[k], sent) + attacked[k]).to(upload[k].dtype) for k in upload}


def _origin(key: str, value: torch.Tensor, sent: Tensors) -> torch.Tensor:
    ref = sent.get(key)
    if ref is None or ref.shape != value.shape:
        return torch.zeros_like(value, dtype=torch.float64)
    return ref.double()


def _noise_like(updates: dict[str, torch.Tensor], seed: list[int]) -> dict[str, torch.Tensor]:
    """Gaussian noise over all keys together, scaled to the updates' joint L2 norm."""
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence(seed).generate_state(
        1, np.uint64)[0] >> 1))
    noise = {k: torch.randn(u.shape, generator=generator, dtype=torch.float64)
             for k, u in sorted(updates.items())}
    norm = torch.sqrt(sum(u.pow(2).sum() for u in updates.values()))
    noise_norm = torch.sqrt(sum(z.pow(2).sum() for z in noise.values()))
    return {k: z * (norm / noise_norm.clamp_min(1e-300)) for k, z in noise.items()}


def inject_attacks(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod: an update attacker's reply carries the attacked upload (label-flip acts in
    the trainer)."""
    cfg_json = run_config_json(context.run_config, msg.content)
    if msg.metadata.message_type != MessageType.TRAIN or cfg_json is None:
        return call_next(msg, context)
    cfg = from_json(cfg_json)
    reply = call_next(msg, context)
    if cfg.attacks.kind not in UPDATE_ATTACKS or reply.has_error() \
            or not has_tensors(reply.content):
        return reply
    scalars = msg.content[SCALARS]
    partition, server_round = int(scalars[PARTITION]), int(scalars[ROUND])
    if attack_for(cfg, partition) is None:
        return reply
    sent = unpack_record(msg.content)
    upload = unpack_record(reply.content, reference=sent)  # as compressed
    replace_tensors(reply.content, attack_upload(cfg, partition, server_round, upload, sent))
    return reply
