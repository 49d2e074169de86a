"""The Flower ClientApp: decode the server's message, run one client round, reply.

Method-agnostic: everything method-specific happens inside the method's ``load``/``uplink``.
The run's config arrives in every message (a small JSON string), so a device needs no config
file; model, data and encodings are cached per process by ``fedpeft.runtime``.
"""

from __future__ import annotations

import functools
import json

from fedpeft.strategies import Method, build_method
from flwr.app import Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from fedpeft.config import FedConfig, from_dict
from fedpeft.runtime import get_workspace, set_torch_threads
from fedpeft.wire import (
    CONFIG_RECORD,
    METRICS_RECORD,
    load_client_state,
    payload_to_records,
    records_to_payload,
    save_client_state,
)

from .trainer import client_round

app = ClientApp()


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
    result = client_round(
        cfg, method, get_workspace(cfg), downlink,
        partition_id=int(scalars["fedpeft.partition"]),
        rank=int(scalars.get("fedpeft.rank", cfg.model.rank)),
        server_round=int(scalars["fedpeft.round"]),
        client_state=state,
    )
    save_client_state(context.state, state)
    content = payload_to_records(result.payload)
    content[METRICS_RECORD] = MetricRecord({**result.metrics, "num-examples": result.num_examples})
    return Message(content=content, reply_to=msg)
