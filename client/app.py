"""The Flower ClientApp: decode the server's message, run one client round, reply.

Method-agnostic: everything method-specific happens inside the method's ``load``/``uplink``.
The run's config arrives in every message (a small JSON string), so a device needs no config
file; model, data and encodings are cached per process by ``fedpeft.core.workspace``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from collections.abc import Mapping
from pathlib import Path

from fedpeft.strategies import RANK_KEY, ClientState, Method, build_method
from fedpeft.strategies.base import check_privacy
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpeft.core.config import ConfigError, FedConfig, from_dict, validate_privacy
from fedpeft.core.keys import BASE_FINGERPRINT, REPLY_INFO
from fedpeft.core.ledger import (
    PrivacyLedger,
    check_device_delta,
    default_ledger_path,
    device_privacy,
)
from fedpeft.core.privacy import BUDGET_SPENT, dp_reply
from fedpeft.core.wire import (
    METRICS_RECORD,
    RUN_CONFIG_KEY,
    load_client_state,
    message_scalars,
    payload_to_records,
    records_to_payload,
    run_config_json,
    save_client_state,
)
from fedpeft.core.workspace import (
    Workspace,
    default_threads,
    get_local_workspace,
    get_workspace,
    set_torch_threads,
)

from .attacks import inject_attacks
from .downlink import downlink_expected
from .faults import inject_faults
from .trainer import ClientResult, client_round

# [faults] and [attacks] config: injected misbehaviour (tests, robustness experiments)
app = ClientApp(mods=[inject_faults, inject_attacks])


@functools.lru_cache(maxsize=4)
def _setup(cfg_json: str) -> tuple[FedConfig, Method]:
    cfg = from_dict(json.loads(cfg_json))
    sim = cfg.simulation
    set_torch_threads(sim.threads_per_client or sim.cpus_per_client)
    return cfg, build_method(cfg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg_json = run_config_json(context.run_config, msg.content)
    if cfg_json is None:
        raise ConfigError("the message carries no run config (fedpeft sends it in the Flower "
                          f"run config {RUN_CONFIG_KEY!r} or in the message)")
    cfg, method = _setup(cfg_json)
    scalars = message_scalars(msg.content)  # the tensors: once the budget is known (below)
    state = load_client_state(context.state)
    sent_rank = int(scalars.get("fedpeft.rank", cfg.model.rank))
    own = own_rank(context.node_config.get("rank"), state)
    if own is not None and own != sent_rank:
        return _rank_mismatch(msg, method, own, sent_rank)
    cfg, workspace = node_workspace(cfg, context.node_config)
    model = workspace.adapter_model(int(scalars.get("fedpeft.rank", cfg.model.rank)))
    downlink = records_to_payload(msg.content, expected=downlink_expected(method, model))
    own_data = bool(context.node_config.get("data-path"))  # a device: its example count is private
    ledger = None
    if cfg.privacy.enabled:  # a device may ask for DP-SGD itself: refuse what the method can't do
        check_privacy(type(method), cfg)
        validate_privacy(cfg)
        ledger = device_ledger(cfg, context, workspace) if own_data else None
    result = client_round(
        cfg, method, workspace, downlink,
        partition_id=int(scalars["fedpeft.partition"]),
        rank=int(scalars.get("fedpeft.rank", cfg.model.rank)),
        server_round=int(scalars["fedpeft.round"]),
        client_state=state,
        ledger=ledger,
    )
    metrics, num_examples = reply_metrics(cfg, result, own_data, ledger)
    if result.metrics.get(BUDGET_SPENT):  # no training, nothing to upload: say so, no tensors
        save_client_state(context.state, state)
        metrics = MetricRecord({**metrics, "num-examples": 0})
        return Message(content=RecordDict({METRICS_RECORD: metrics,
                                           REPLY_INFO: reply_info(result)}), reply_to=msg)
    # [compression] up: the update against the downlink as received, through the filters; top-k
    # error feedback lives in the client state, so it is saved after packing
    content = payload_to_records(result.payload, filters=cfg.compression.up,
                                 reference=downlink.tensors, state=state)
    save_client_state(context.state, state)
    content[METRICS_RECORD] = MetricRecord({**metrics, "num-examples": num_examples})
    content[REPLY_INFO] = reply_info(result)
    return Message(content=content, reply_to=msg)


def reply_info(result: ClientResult) -> ConfigRecord:
    """The reply's strings: the frozen base's fingerprint, which the server compares with its
    own (every reply carries it: 16 hex digits, hashed once per process)."""
    return ConfigRecord({BASE_FINGERPRINT: result.fingerprint})


def reply_metrics(cfg: FedConfig, result: ClientResult, own_data: bool,
                  ledger: PrivacyLedger | None) -> tuple[dict[str, float], int]:
    """The reply's metrics and example count: all of them, or under DP-SGD only what
    ``fedpeft.core.privacy.dp_reply`` allows (a device's own count is private)."""
    if not cfg.privacy.enabled:
        return dict(result.metrics), result.num_examples
    if ledger is not None:  # the device's own account, on the device only
        _say(ledger_line(ledger, result.metrics))
    metrics, public = dp_reply(result.metrics, private_size=own_data, budget=cfg.privacy.epsilon,
                               batch_size=cfg.train.batch_size,
                               local_steps=cfg.train.local_steps)
    return metrics, result.num_examples if public is None else public


def device_ledger(cfg: FedConfig, context: Context, workspace: Workspace) -> PrivacyLedger | None:
    """A device's lifetime ledger when it gave its own budget (``--epsilon``); refuses a delta
    that is not below 1/n for the device's n examples."""
    node = context.node_config
    check_device_delta(cfg.privacy.delta, len(workspace.partition(0, 1)))
    if not node.get("epsilon"):
        return None  # the run's per-run budget, as the device agreed to
    path = str(node.get("ledger") or "") or str(default_ledger_path())
    return PrivacyLedger(Path(path), cfg.privacy.epsilon, cfg.privacy.delta,
                         run=str(context.run_id), data=str(node.get("data-path")))


def ledger_line(ledger: PrivacyLedger, metrics: Mapping[str, float]) -> str:
    if metrics.get(BUDGET_SPENT):
        return (f"fedpeft: privacy budget spent: this device's lifetime epsilon "
                f"{ledger.epsilon:g} (delta {ledger.delta:g}) allows no more DP-SGD rounds "
                f"({metrics.get('epsilon', 0.0):.3g} spent, ledger {ledger.path}); not training, "
                "the coordinator is told 'budget spent'")
    return (f"fedpeft: privacy ledger {ledger.path}: epsilon {metrics['epsilon']:.3g} of "
            f"{ledger.epsilon:g} spent (delta {ledger.delta:g})")


@functools.lru_cache(maxsize=64)
def _say_once(line: str) -> None:
    _say(line)


def _say(line: str) -> None:
    """A line for the device's own console (``fedpeft client`` runs this ClientApp in-process)."""
    print(line, file=sys.stderr, flush=True)


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
    eps, delta = node_config.get("epsilon"), node_config.get("delta")
    privacy, note = device_privacy(cfg.privacy, float(str(eps)) if eps else None,
                                   float(str(delta)) if delta else None)
    if privacy != cfg.privacy:  # the device's own budget (on even if the run's is off) and delta
        cfg = dataclasses.replace(cfg, privacy=privacy)
    if note:
        _say_once(f"fedpeft: {note}")
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
