"""One client's answer to a train message, free of Flower, for every transport: the ClientApp
(``client/app.py``) and the in-process loop (``server/inprocess.py``) both call
:func:`client_step`, so the same seed gives the same reply whichever way it travels (DP-SGD's
redaction, the example count, a rank mismatch and a device's node config included). The
transport only decodes the downlink and encodes the reply.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft.strategies import RANK_KEY, ClientState, Method
from fedpeft.strategies.base import check_privacy

from fedpeft.core.adapters import AdapterModel
from fedpeft.core.config import (
    ConfigError,
    FedConfig,
    parse_override,
    validate_privacy,
    with_values,
)
from fedpeft.core.keys import (
    BUDGET_SPENT,
    EPSILON,
    NEXT_RANK,
    NODE_EPSILON,
    NODE_RANK,
    NUM_EXAMPLES,
    PARTITION,
    RANK,
    RANK_MISMATCH,
    ROUND,
)
from fedpeft.core.ledger import (
    PrivacyLedger,
    check_device_delta,
    default_ledger_path,
    device_privacy,
)
from fedpeft.core.payload import Payload, Tensors
from fedpeft.core.privacy import dp_reply
from fedpeft.core.workspace import (
    Workspace,
    default_threads,
    get_local_workspace,
    get_workspace,
    set_torch_threads,
)

from .trainer import ClientResult, client_round


@dataclass
class ClientReply:
    """What a client answers: its metrics (the example count included), its upload (None:
    nothing to send, e.g. a spent DP budget or a rank mismatch), its frozen base's fingerprint,
    and the downlink's tensors as it decoded them (the reference its upload is encoded
    against)."""

    metrics: dict[str, float]
    payload: Payload | None = None
    fingerprint: str | None = None
    reference: Tensors = field(default_factory=dict)


def client_step(cfg: FedConfig, method: Method, scalars: Mapping[str, Any],
                decode: Callable[[AdapterModel], Payload], state: ClientState,
                node_config: Mapping[str, object], run_id: object = "") -> ClientReply:
    """One client round from a downlink's scalars to the reply. ``decode(model)``: the
    downlink's tensors, decoded for the adapter they load into; ``node_config``: a device's own
    flags (empty for a simulated client); ``run_id``: the run, for a device's privacy ledger."""
    sent_rank = int(scalars.get(RANK, cfg.model.rank))
    own = own_rank(node_config.get(NODE_RANK), state)
    cfg, workspace = node_workspace(cfg, node_config)
    if own is not None and own != sent_rank:
        return rank_mismatch(method, own, sent_rank, workspace.base_fingerprint())
    downlink = decode(workspace.adapter_model(sent_rank))
    own_data = bool(node_config.get("data-path"))  # a device: its example count is private
    ledger = None
    if cfg.privacy.enabled:  # a device may ask for DP-SGD itself: refuse what the method can't do
        check_privacy(type(method), cfg)
        validate_privacy(cfg)
        ledger = device_ledger(cfg, node_config, run_id, workspace) if own_data else None
    result = client_round(cfg, method, workspace, downlink,
                          partition_id=int(scalars[PARTITION]), rank=sent_rank,
                          server_round=int(scalars[ROUND]), client_state=state,
                          ledger=ledger)
    save_adapter(node_config, workspace, sent_rank)
    metrics, count = reply_metrics(cfg, result, own_data, ledger)
    if result.metrics.get(BUDGET_SPENT):  # no training, nothing to upload: say so, no tensors
        return ClientReply({**metrics, NUM_EXAMPLES: 0}, None, result.fingerprint,
                           downlink.tensors)
    return ClientReply({**metrics, NUM_EXAMPLES: count}, result.payload, result.fingerprint,
                       downlink.tensors)


def reply_metrics(cfg: FedConfig, result: ClientResult, own_data: bool,
                  ledger: PrivacyLedger | None) -> tuple[dict[str, float], int]:
    """The reply's metrics and example count: all of them, or under DP-SGD only what
    ``fedpeft.core.privacy.dp_reply`` allows (a device's own count is private)."""
    if not cfg.privacy.enabled:
        return dict(result.metrics), result.num_examples
    if ledger is not None:  # the device's own account, on the device only
        say(ledger_line(ledger, result.metrics))
    metrics, public = dp_reply(result.metrics, private_size=own_data, budget=cfg.privacy.epsilon,
                               batch_size=cfg.train.batch_size,
                               local_steps=cfg.train.local_steps)
    return metrics, result.num_examples if public is None else public


def rank_mismatch(method: Method, own: int, sent: int, fingerprint: str) -> ClientReply:
    """The reply without training: this node's rank (the server sends that rank next time)."""
    if not method.mixed_ranks:  # a user error on this device: one line in both logs
        raise ConfigError(
            f"this node holds LoRA rank {own} but method {method.name!r} trains every client at "
            f"rank {sent}: start the node without --node-config rank or use a mixed-rank method"
        )
    return ClientReply({NUM_EXAMPLES: 0, NEXT_RANK: own, RANK_MISMATCH: 1}, None, fingerprint)


def device_ledger(cfg: FedConfig, node: Mapping[str, object], run_id: object,
                  workspace: Workspace) -> PrivacyLedger | None:
    """A device's lifetime ledger when it gave its own budget (``--epsilon``); refuses a delta
    that is not below 1/n for the device's n examples."""
    check_device_delta(cfg.privacy.delta, len(workspace.partition(0, 1)))
    if not node.get(NODE_EPSILON):
        return None  # the run's per-run budget, as the device agreed to
    path = str(node.get("ledger") or "") or str(default_ledger_path())
    return PrivacyLedger(Path(path), cfg.privacy.epsilon, cfg.privacy.delta,
                         run=str(run_id), data=str(node.get("data-path")))


def ledger_line(ledger: PrivacyLedger, metrics: Mapping[str, float]) -> str:
    if metrics.get(BUDGET_SPENT):
        return (f"fedpeft: privacy budget spent: this device's lifetime epsilon "
                f"{ledger.epsilon:g} (delta {ledger.delta:g}) allows no more DP-SGD rounds "
                f"({metrics.get(EPSILON, 0.0):.3g} spent, ledger {ledger.path}); not training, "
                "the coordinator is told 'budget spent'")
    return (f"fedpeft: privacy ledger {ledger.path}: epsilon {metrics[EPSILON]:.3g} of "
            f"{ledger.epsilon:g} spent (delta {ledger.delta:g})")


def save_adapter(node_config: Mapping[str, object], workspace: Workspace, rank: int) -> None:
    """``fedpeft client --save-adapter DIR``: the device's own adapter as trained this round
    (a personalised method's shared part joined with its personal part), in peft's format."""
    folder = node_config.get("save-adapter")
    if folder:
        workspace.adapter_model(rank).save_pretrained(Path(str(folder)))
        say_once(f"fedpeft: this device's own adapter is saved to {folder} after every round")


@functools.lru_cache(maxsize=64)
def say_once(line: str) -> None:
    say(line)


def say(line: str) -> None:
    """A line for the device's own console (``fedpeft client`` runs the ClientApp in-process)."""
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
    cfg = node_overrides(cfg, node_config)
    return cfg, get_local_workspace(cfg, str(path))


def node_overrides(cfg: FedConfig, node_config: Mapping[str, object]) -> FedConfig:
    """The run's config with this device's own settings (device, training profile, column
    names, privacy budget and delta), checked like ``--set``: a bad one is a ConfigError."""
    values: dict[str, Any] = {}
    if node_config.get("device"):
        values["train.device"] = str(node_config["device"])
    for key in ("batch-size", "local-steps"):  # the device's own training profile
        if node_config.get(key):
            path = "train." + key.replace("-", "_")
            values[path] = parse_override(f"{path}={node_config[key]}")[1]
    for role in ("text", "label"):  # the device's own file, its own column names
        if node_config.get(f"{role}-column"):
            values[f"data.{role}_column"] = str(node_config[f"{role}-column"])
    privacy, note = device_privacy(cfg.privacy, node_number(node_config, NODE_EPSILON),
                                   node_number(node_config, "delta"))
    if privacy != cfg.privacy:  # the device's own budget (on even if the run's is off) and delta
        values.update({f"privacy.{key}": value for key, value in vars(privacy).items()
                       if value != getattr(cfg.privacy, key)})
    if note:
        say_once(f"fedpeft: {note}")
    return with_values(cfg, values, "this node's config") if values else cfg


def node_number(node_config: Mapping[str, object], key: str) -> float | None:
    """A number from the node config (None when absent); anything else is a ConfigError."""
    raw = node_config.get(key)
    if not raw:
        return None
    try:
        return float(str(raw))
    except ValueError:
        raise ConfigError(f"this node's config: {key} = {raw!r}: expected a number") from None


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
