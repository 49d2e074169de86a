"""The Flower ClientApp: decode the server's message, run one client round, reply.

Method-agnostic: everything method-specific happens inside the method's ``load``/``uplink``.
The run's config arrives in every message (a small JSON string), so a device needs no config
file; model, data and encodings are cached per process by ``fedpeft.core.workspace``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping

from fedpeft.strategies import RANK_KEY, ClientState, Method, build_method
from fedpeft.strategies.base import check_privacy
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpeft.core.config import ConfigError, FedConfig, from_dict, validate_privacy
from fedpeft.core.privacy import BUDGET_SPENT
from fedpeft.core.wire import (
    CONFIG_RECORD,
    METRICS_RECORD,
    load_client_state,
    payload_to_records,
    records_to_payload,
    save_client_state,
)
from fedpeft.core.workspace import (
    Workspace,
    default_threads,
    get_local_workspace,
    get_workspace,
    set_torch_threads,
)

from .faults import inject_faults
from .trainer import client_round

app = ClientApp(mods=[inject_faults])  # [faults] config: injected misbehaviour (tests)


@functools.lru_cache(maxsize=4)
def _setup(cfg_json: str) -> tuple[FedConfig, Method]:
    cfg = from_dict(json.loads(cfg_json))
    sim = cfg.simulation
    set_torch_threads(sim.threads_per_client or sim.cpus_per_client)
    return cfg, build_method(cfg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, method = _setup(str(msg.content[CONFIG_RECORD]["json"]))
    downlink = records_to_payload(msg.content)
    scalars = downlink.scalars
    state = load_client_state(context.state)
    sent_rank = int(scalars.get("fedpeft.rank", cfg.model.rank))
    own = own_rank(context.node_config.get("rank"), state)
    if own is not None and own != sent_rank:
        return _rank_mismatch(msg, method, own, sent_rank)
    cfg, workspace = node_workspace(cfg, context.node_config)
    if cfg.privacy.enabled:  # a device may ask for DP-SGD itself: refuse what the method can't do
        check_privacy(type(method), cfg)
        validate_privacy(cfg)
    result = client_round(
        cfg, method, workspace, downlink,
        partition_id=int(scalars["fedpeft.partition"]),
        rank=int(scalars.get("fedpeft.rank", cfg.model.rank)),
        server_round=int(scalars["fedpeft.round"]),
        client_state=state,
    )
    if result.metrics.get(BUDGET_SPENT):  # no training, nothing to upload: say so, no tensors
        save_client_state(context.state, state)
        metrics = MetricRecord({**result.metrics, "num-examples": 0})
        return Message(content=RecordDict({METRICS_RECORD: metrics}), reply_to=msg)
    # [compression] up: the update against the downlink as received, through the filters; top-k
    # error feedback lives in the client state, so it is saved after packing
    content = payload_to_records(result.payload, filters=cfg.compression.up,
                                 reference=downlink.tensors, state=state)
    save_client_state(context.state, state)
    content[METRICS_RECORD] = MetricRecord({**result.metrics, "num-examples": result.num_examples})
    return Message(content=content, reply_to=msg)


def node_workspace(cfg: FedConfig,
                   node_config: Mapping[str, object]) -> tuple[FedConfig, Workspace]:
    """Deployment (``fedpeft client``): a SuperNode with ``data-path`` in its node config trains
    on its own file, on its own ``device`` with its own ``threads``; the node's data wins over
    the server's partition id. Otherwise (simulation): the run's partition and device."""
    path = node_config.get("data-path")
    if not path:
        return cfg, get_workspace(cfg)
    set_torch_threads(int(str(node_config.get("threads", 0) or 0)) or default_threads())
    device = str(node_config.get("device", "") or cfg.train.device)
    if device != cfg.train.device:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=device))
    profile = {key.replace("-", "_"): int(str(node_config[key]))
               for key in ("batch-size", "local-steps") if node_config.get(key)}
    if profile:  # the device's own training profile
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **profile))
    if node_config.get("epsilon"):  # this device's own DP-SGD budget (on even if the run's is off)
        cfg = dataclasses.replace(cfg, privacy=dataclasses.replace(
            cfg.privacy, enabled=True, epsilon=float(str(node_config["epsilon"]))))
    columns = {f"{role}_column": str(node_config[f"{role}-column"])
               for role in ("text", "label") if node_config.get(f"{role}-column")}
    if columns:  # the device's own file, its own column names
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **columns))
    return cfg, get_local_workspace(cfg, str(path))


def own_rank(node_rank: object, state: ClientState) -> int | None:
    """The LoRA rank this client holds: ``--node-config rank=N`` capped by any rank the method
    lowered since (``RANK_KEY`` in client state); None = whatever rank the server sends."""
    ranks = [int(state.values[RANK_KEY])] if RANK_KEY in state.values else []
    if node_rank is not None:
        try:
            rank = int(str(node_rank))
        except ValueError:
            rank = 0
        if rank < 1:
            raise ValueError(f"--node-config rank={node_rank!r}: expected a positive integer")
        ranks.append(rank)
    return min(ranks) if ranks else None


def _rank_mismatch(msg: Message, method: Method, own: int, sent: int) -> Message:
    """Reply without training: tell the server this node's rank (it sends that rank next time)."""
    if not method.mixed_ranks:  # a user error on this device: one line in both logs
        raise ConfigError(
            f"this node holds LoRA rank {own} but method {method.name!r} trains every client at "
            f"rank {sent}: start the node without --node-config rank or use a mixed-rank method"
        )
    metrics = MetricRecord({"num-examples": 0, "next_rank": own, "rank_mismatch": 1})
    return Message(content=RecordDict({METRICS_RECORD: metrics}), reply_to=msg)
