"""A client's side of SecAgg+ (``[secagg] enabled``; ``fedpeft.core.secagg``): one handler per
stage, registered as Flower train actions ``secagg_setup`` .. ``secagg_unmask``.

The protocol state (this round's secret keys, seed, the shares it holds, the log of shares it
revealed) lives in ``Context.state`` under one ConfigRecord and never goes into a reply. Only the
masked-input stage trains: it opens the shares first (a bad request costs no training), then runs
the ordinary client step and masks the update against the downlink. A refusal raises, so Flower
answers with an error and the server counts this client as dropped at that stage.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from fedpeft.strategies import ClientState, Method
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedpeft.core.config import ConfigError, FedConfig
from fedpeft.core.keys import NUM_EXAMPLES
from fedpeft.core.secagg import STAGES, ClientPolicy, SecAggClient, SecAggRefusal, respond
from fedpeft.core.secagg.dp import noise_for
from fedpeft.core.secagg.layout import flatten_update, layout_digest
from fedpeft.core.secagg.messages import LAYOUT_KEY, SECAGG_RECORD
from fedpeft.core.wire import (
    load_client_state,
    message_scalars,
    records_to_payload,
    run_config_json,
    save_client_state,
)

from .downlink import downlink_expected
from .step import client_step

STATE_KEY = "fedpeft.secagg.state"  # this node's protocol state in Context.state
Setup = Callable[[str], tuple[FedConfig, Method]]


def register(app: ClientApp, setup: Setup) -> None:
    """Route ``train.secagg_<stage>`` messages to :func:`handle`; ``setup(cfg_json)`` gives the
    run's config and method (cached by the ClientApp)."""
    for stage in STAGES:
        app.train(f"secagg_{stage}")(_handler(stage, setup))


def _handler(stage: str, setup: Setup) -> Callable[[Message, Context], Message]:
    def handler(msg: Message, context: Context) -> Message:
        return handle(stage, msg, context, setup)
    handler.__name__ = f"secagg_{stage}"
    return handler


def handle(stage: str, msg: Message, context: Context, setup: Setup) -> Message:
    cfg_json = run_config_json(context.run_config, msg.content)
    if cfg_json is None:
        raise ConfigError("the message carries no run config")
    cfg, method = setup(cfg_json)
    if not cfg.secagg.enabled:
        raise SecAggRefusal(stage, "this run's config does not enable [secagg]")
    record = msg.content.get(SECAGG_RECORD)
    if not isinstance(record, ConfigRecord):
        raise SecAggRefusal(stage, "the request has no protocol record")
    client = load_client(context, client_policy(cfg))
    try:
        fields = respond(client, stage, dict(record),
                         lambda: train_upload(cfg, method, msg, context))
    finally:
        context.state[STATE_KEY] = ConfigRecord(client.to_record())
    return Message(content=RecordDict({SECAGG_RECORD: ConfigRecord(fields)}), reply_to=msg)


def client_policy(cfg: FedConfig) -> ClientPolicy:
    """What this client accepts: with ``privacy.client_level`` its own config's noise (a server
    may ask for more, never less; ``fedpeft.core.secagg.dp``)."""
    noise = noise_for(cfg)
    if noise is None:
        return ClientPolicy()
    return ClientPolicy(noise_clip=noise.clip, noise_std=noise.std,
                        min_survivors=noise.min_survivors)


def load_client(context: Context, policy: ClientPolicy | None = None) -> SecAggClient:
    policy = policy or ClientPolicy()
    if STATE_KEY in context.state:
        return SecAggClient.from_record(dict(context.state[STATE_KEY]), policy)
    return SecAggClient(int(context.node_id), int(context.run_id), policy)


def train_upload(cfg: FedConfig, method: Method, msg: Message,
                 context: Context) -> tuple[np.ndarray, float]:
    """Train as in a plain round (the method's client state kept in ``Context.state``)."""
    state = load_client_state(context.state)

    def decode(model: Any) -> Any:
        return records_to_payload(msg.content, expected=downlink_expected(method, model))

    try:
        return masked_upload(cfg, method, message_scalars(msg.content), decode, state,
                             context.node_config, context.run_id)
    finally:
        save_client_state(context.state, state)


def masked_upload(cfg: FedConfig, method: Method, scalars: Mapping[str, Any],
                  decode: Callable[[Any], Any], state: ClientState,
                  node_config: Mapping[str, object], run_id: object) -> tuple[np.ndarray, float]:
    """The client step of any transport; the update against the downlink as decoded, over the
    server's layout, and its weight (1 under uniform weighting or client-level DP, else the
    example count). Under client-level DP the protocol clips and noises the update."""
    reply = client_step(cfg, method, scalars, decode, state, node_config, run_id)
    if reply.payload is None:
        raise SecAggRefusal("masked_input", "nothing to upload this round (a spent privacy "
                                            "budget or another LoRA rank)")
    tensors = reply.payload.tensors
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if layout_digest(shapes) != scalars.get(LAYOUT_KEY):
        raise SecAggRefusal("masked_input", "this client's upload has other tensors than the "
                                            "server's layout")
    uniform = cfg.federation.weighting == "uniform" or cfg.privacy.client_level != "off"
    weight = 1.0 if uniform else float(reply.metrics[NUM_EXAMPLES])
    if cfg.federation.max_examples_per_client > 0:
        weight = min(weight, cfg.federation.max_examples_per_client)
    return flatten_update(tensors, reply.reference, shapes), weight
