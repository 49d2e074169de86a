"""Fault injection for tests: a Flower client mod that makes chosen clients misbehave.

The ``[faults]`` config section (``fedpeft.core.config.FaultsConfig``) names the faulty clients, by
partition id or as fractions of all clients drawn by seed. Everything happens here, around the
ClientApp's train function (``ClientApp(mods=[inject_faults])``), never inside a method:

- ``crash``: the ClientApp raises, so Flower returns an error reply;
- ``hang``: the client sleeps ``faults.hang_s`` before it trains and replies (a straggler or a
  vanished node: the server's ``federation.round_timeout_s`` gives up on it);
- ``nan``, ``wrong_shape``, ``oversized``, ``explode``: the client trains, then corrupts its
  reply (a NaN in every tensor, one tensor a row short, an extra 8 MB tensor, every tensor times
  1e4).

Which client does what in which round is a pure function of the config, the round and the
partition id (:func:`fault_assignment`), so tests can compute the expected counts.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from fedpeft.core.config import FAULT_KINDS, FedConfig, from_json
from fedpeft.core.keys import PARTITION, ROUND
from fedpeft.core.sampling import sample_clients
from fedpeft.core.wire import (
    SCALARS,
    has_tensors,
    replace_tensors,
    run_config_json,
    unpack_record,
)

OVERSIZED_KEY = "fedpeft.fault.padding"
OVERSIZED_FLOATS = 2 * 1024 * 1024  # 8 MB of float32
EXPLODE_FACTOR = 1e4


class InjectedFault(RuntimeError):
    """The exception a ``crash`` client raises (reported to the server as an error reply)."""


def faults_enabled(cfg: FedConfig) -> bool:
    faults = cfg.faults
    return any(getattr(faults, kind) or getattr(faults, f"{kind}_fraction")
               for kind in FAULT_KINDS)


def fault_assignment(cfg: FedConfig, server_round: int) -> dict[int, str]:
    """partition id -> fault kind for ``server_round`` (clients without a fault are absent).

    Listed ids come first; the fraction-chosen clients are then dealt, kind after kind, from a
    permutation of the remaining clients drawn with ``federation.seed`` (and the round when
    ``faults.redraw``), ``round(fraction * clients)`` clients per kind."""
    faults, clients = cfg.faults, cfg.federation.clients
    if not faults_enabled(cfg) or (faults.rounds and server_round not in faults.rounds):
        return {}
    out = {pid: kind for kind in FAULT_KINDS for pid in getattr(faults, kind)}
    if faults.of_sampled:
        return {**out, **_of_sampled(cfg, server_round, set(out))}
    counts = [round(getattr(faults, f"{kind}_fraction") * clients) for kind in FAULT_KINDS]
    if any(counts):
        key = [cfg.federation.seed, 13, *([server_round] if faults.redraw else [])]
        free = [int(p) for p in np.random.default_rng(key).permutation(clients) if p not in out]
        start = 0
        for kind, count in zip(FAULT_KINDS, counts, strict=True):
            out.update({pid: kind for pid in free[start:start + count]})
            start += count
    return out


def _of_sampled(cfg: FedConfig, server_round: int, taken: set[int]) -> dict[int, str]:
    """``faults.of_sampled``: each kind hits its fraction of the round's sample (the first
    attempt's: a retry's fresh sample is not targeted). A fraction that is not a whole number of
    clients per round is carried over, so the counts add up over rounds (0.05 of 10 sampled:
    1, 0, 1, 0, ...)."""
    fed = cfg.federation
    sampled = sample_clients(fed.clients, fed.clients_per_round, fed.seed, server_round)
    rng = np.random.default_rng([fed.seed, 17, server_round])
    free = [int(p) for p in rng.permutation(sampled) if int(p) not in taken]
    out: dict[int, str] = {}
    for kind in FAULT_KINDS:
        per_round = getattr(cfg.faults, f"{kind}_fraction") * len(sampled)
        count = int(np.floor(per_round * server_round + 0.5)) - int(
            np.floor(per_round * (server_round - 1) + 0.5))
        out.update({pid: kind for pid in free[:count]})
        free = free[count:]
    return out


def fault_for(cfg: FedConfig, partition_id: int, server_round: int) -> str | None:
    return fault_assignment(cfg, server_round).get(partition_id)


def inject_faults(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod: apply this client's fault for this round, if the config gives it one."""
    cfg_json = run_config_json(context.run_config, msg.content)
    if msg.metadata.message_type != MessageType.TRAIN or cfg_json is None:
        return call_next(msg, context)
    cfg = from_json(cfg_json)
    if not faults_enabled(cfg):
        return call_next(msg, context)
    scalars = msg.content[SCALARS]
    partition, server_round = int(scalars[PARTITION]), int(scalars[ROUND])
    kind = fault_for(cfg, partition, server_round)
    if kind == "crash":
        raise InjectedFault(f"injected fault: client {partition} crashes in round {server_round}")
    if kind == "hang":
        time.sleep(cfg.faults.hang_s)
    reply = call_next(msg, context)
    if kind in (None, "hang") or reply.has_error() or not has_tensors(reply.content):
        return reply
    sent = unpack_record(reply.content, reference=unpack_record(msg.content))  # as compressed
    replace_tensors(reply.content, corrupt(kind, sent))  # the corrupt tensors go uncompressed
    return reply


def corrupt(kind: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The upload a client with fault ``kind`` sends instead of ``tensors``."""
    out = {k: v.clone() for k, v in tensors.items()}
    keys = sorted(out)
    if kind == "nan":
        for value in out.values():
            value.view(-1)[0] = float("nan")
    elif kind == "wrong_shape":
        key = next(k for k in keys if out[k].dim() >= 1 and out[k].shape[0] > 1)
        out[key] = out[key][:-1].clone()
    elif kind == "oversized":
        out[OVERSIZED_KEY] = torch.ones(OVERSIZED_FLOATS, dtype=torch.float32)
    elif kind == "explode":
        out = {k: v * EXPLODE_FACTOR for k, v in out.items()}
    else:
        raise ValueError(f"unknown fault kind {kind!r}")
    return out
