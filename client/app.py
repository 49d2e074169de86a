"""The Flower ClientApp: decode the server's message, run one client round, reply.

Method-agnostic: everything method-specific happens inside the method's ``load``/``uplink``.
The run's config arrives in every message (a small JSON string), so a device needs no config
file; model, data and encodings are cached per process by ``fedpeft.core.workspace``.
"""

from __future__ import annotations

import functools

from fedpeft.strategies import Method, build_method
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpeft.core.adapters import AdapterModel
from fedpeft.core.config import ConfigError, FedConfig, from_json
from fedpeft.core.keys import BASE_FINGERPRINT, PARTITION, RANK, REPLY_INFO, ROUND
from fedpeft.core.payload import Payload
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
from fedpeft.core.workspace import set_torch_threads

from .attacks import inject_attacks
from .downlink import check_pinned_model, downlink_expected
from .evaluator import client_evaluate
from .faults import inject_faults
from .secagg import register as register_secagg
from .step import client_step, node_workspace

# [faults] and [attacks] config: injected misbehaviour (tests, robustness experiments)
app = ClientApp(mods=[inject_faults, inject_attacks])


@functools.lru_cache(maxsize=4)
def _setup(cfg_json: str) -> tuple[FedConfig, Method]:
    cfg = from_json(cfg_json)
    sim = cfg.simulation
    set_torch_threads(sim.threads_per_client or sim.cpus_per_client)
    return cfg, build_method(cfg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Decode the downlink, run :func:`client_step`, encode its reply."""
    cfg_json = run_config_json(context.run_config, msg.content)
    if cfg_json is None:
        raise ConfigError("the message carries no run config (fedpeft sends it in the Flower "
                          f"run config {RUN_CONFIG_KEY!r} or in the message)")
    cfg, method = _setup(cfg_json)
    check_pinned_model(cfg.model.name, context.node_config)
    state = load_client_state(context.state)

    def decode(model: AdapterModel) -> Payload:  # the tensors: once the budget is known
        return records_to_payload(msg.content, expected=downlink_expected(method, model))

    reply = client_step(cfg, method, message_scalars(msg.content), decode, state,
                        context.node_config, context.run_id)
    content = RecordDict()
    if reply.payload is not None:
        # [compression] up: the update against the downlink as received, through the filters;
        # top-k error feedback lives in the client state, so it is saved after packing
        content = payload_to_records(reply.payload, filters=cfg.compression.up,
                                     reference=reply.reference, state=state)
    save_client_state(context.state, state)
    content[METRICS_RECORD] = MetricRecord(reply.metrics)
    if reply.fingerprint is not None:  # the frozen base's digest, compared with the server's
        content[REPLY_INFO] = ConfigRecord({BASE_FINGERPRINT: reply.fingerprint})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global model (with this client's personal parts, for a personalised method) on
    this client's own held-out examples; reply with figures only (docs/evaluation.md)."""
    cfg_json = run_config_json(context.run_config, msg.content)
    if cfg_json is None:
        raise ConfigError("the message carries no run config")
    cfg, method = _setup(cfg_json)
    check_pinned_model(cfg.model.name, context.node_config)
    scalars = message_scalars(msg.content)
    rank = int(scalars.get(RANK, cfg.model.rank))
    cfg, workspace = node_workspace(cfg, context.node_config)
    if cfg.privacy.enabled:  # the figures would leave the device outside DP-SGD's accountant
        raise ConfigError("this device trains under DP-SGD: it does not report held-out figures "
                          "(computed on its data outside the privacy guarantee)")
    downlink = records_to_payload(msg.content,
                                  expected=downlink_expected(method, workspace.adapter_model(rank)))
    figures = client_evaluate(cfg, method, workspace, downlink,
                              partition_id=int(scalars[PARTITION]), rank=rank,
                              server_round=int(scalars[ROUND]),
                              client_state=load_client_state(context.state))
    return Message(content=RecordDict({METRICS_RECORD: MetricRecord(figures),
                                       REPLY_INFO: ConfigRecord({BASE_FINGERPRINT:
                                                                 workspace.base_fingerprint()})}),
                   reply_to=msg)


# A real device (`fedpeft client`) runs these functions without the injection mods: no
# coordinator can make an honest device misbehave by sending [faults] or [attacks] settings
device_app = ClientApp()
device_app.train()(train)
device_app.evaluate()(evaluate)
register_secagg(app, _setup)  # train.secagg_* stages ([secagg] enabled)
register_secagg(device_app, _setup)
