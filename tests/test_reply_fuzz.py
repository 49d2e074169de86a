"""Hostile replies through the server's real reply path (``FedPeftStrategy.aggregate_train``: decode
against the method's expected upload, validate, aggregate) for FedIT, FLoRA and Ferret, and hostile
downlinks through the device's decoder. Two honest clients (the real ClientApp, training tiny-bert)
reply every round beside 204 hostile ones: nothing raises, the round is aggregated,
the global state stays finite, and decoding a bomb costs a small multiple of the expected upload
in memory, never what the sender declares. Each method's draw is fixed (a failure replays);
``FEDPEFT_FUZZ_SEED=N`` shifts it, to fuzz further."""

from __future__ import annotations

import json
import math
import os
import random
import tracemalloc
import zlib
from collections.abc import Callable

import pytest
import torch
from fedpeft.client import app as client_app
from fedpeft.client.downlink import downlink_expected
from fedpeft.server.app import FedPeftStrategy
from fedpeft.server.rounds import new_loop
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedpeft.core.config import load_config
from fedpeft.core.keys import BASE_FINGERPRINT, REPLY_INFO
from fedpeft.core.packing import PackError
from fedpeft.core.payload import Expected
from fedpeft.core.wire import (
    BYTES_STYPE,
    MANIFEST,
    METRICS_RECORD,
    PACKED,
    SCALARS,
    TENSORS,
    records_to_payload,
    serialized_nbytes,
)
from fedpeft.core.workspace import get_workspace
from tests.helpers import TINY

pytestmark = pytest.mark.usefixtures("in_process")

HONEST = 2  # the first two sampled nodes run the real ClientApp
NODES = 206  # hostile replies per round: NODES - HONEST
ROUNDS = 17  # 3 methods x 17 rounds x 204 hostile replies > 10,000
METHODS = {
    "fedit": [],
    "flora": [],
    "ferret": ["method.k=3", "method.block_size=512"],
}
N1_MANIFEST = b'{"v":1,"chain":["deflate"],"t":[["w","uint8",[9223372036854775808],"raw"]]}'
SCALAR_VALUES: list[object] = [[1, 2], float("inf"), -float("inf"), float("nan"), "7", 1e300,
                               -10**30, 10**30, None, b"\x00", True, -1, 0, 2, 3.5]


class Grid:
    """Just enough of a Flower Grid for ``configure_train``."""

    def __init__(self, n: int) -> None:
        self.nodes = list(range(1, n + 1))

    def get_node_ids(self) -> list[int]:
        return self.nodes


def _cfg(name: str, *extra: str):
    return load_config(None, [*TINY, f'method.name="{name}"', f"federation.clients={NODES}",
                              f"federation.clients_per_round={NODES}", "federation.min_replies=1",
                              "train.local_steps=1", "train.batch_size=4", "eval.subset=20",
                              "federation.max_update_norm=1000", *METHODS[name], *extra])


def _reply(to: Message, content: RecordDict) -> Message:
    reply = Message(content=content, reply_to=to)
    reply.metadata.__dict__["_src_node_id"] = to.metadata.dst_node_id
    return reply


def _copy(content: RecordDict) -> RecordDict:
    """A deep copy of an honest reply's records (each mutation edits its own)."""
    out = RecordDict()
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            out[name] = ArrayRecord({k: Array(dtype=a.dtype, shape=tuple(a.shape), stype=a.stype,
                                              data=bytes(a.data)) for k, a in record.items()})
        elif isinstance(record, MetricRecord):
            out[name] = MetricRecord(dict(record))
        else:
            out[name] = ConfigRecord(dict(record))
    return out


def _packed(content: RecordDict, buffer: bytes, manifest: bytes) -> None:
    content[PACKED] = ArrayRecord({"data": Array(dtype="uint8", shape=(len(buffer),),
                                                 stype=BYTES_STYPE, data=buffer)})
    content[MANIFEST] = ConfigRecord({"m": manifest})


def _manifest_doc(content: RecordDict) -> dict:
    """The reply's manifest as JSON (a placeholder when an earlier mutation broke it)."""
    try:
        doc = json.loads(zlib.decompress(content[MANIFEST]["m"]))
    except (zlib.error, ValueError, TypeError, RecursionError):
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("chain"), list) or not isinstance(
            doc.get("t"), list):
        doc = {"v": 1, "chain": [], "t": []}
    doc["t"] = [e for e in doc["t"] if isinstance(e, list) and len(e) >= 4
                and isinstance(e[2], list)] or [["w", "float32", [1], "raw"]]
    return doc


def n1(content: RecordDict, rng: random.Random) -> None:
    """The review's crash: a [2**63] uint8 tensor under deflate, plus one byte."""
    _packed(content, b"\x00", zlib.compress(N1_MANIFEST))


def bomb(content: RecordDict, rng: random.Random) -> None:
    """N3: the expected keys, each declared huge, and a 1 MB deflate of ~1 GB of zeros."""
    doc = _manifest_doc(content)
    for entry in doc["t"]:
        entry[1], entry[2], entry[3] = "float32", [1 << 28], "raw"
        del entry[4:]
    doc["chain"] = ["deflate"]
    _packed(content, BOMB, zlib.compress(json.dumps(doc).encode()))


def quiet_bomb(content: RecordDict, rng: random.Random) -> None:
    """The honest manifest (deflate) over a buffer that inflates far past it."""
    doc = _manifest_doc(content)
    doc["chain"] = [*doc["chain"], "deflate"] if "deflate" not in doc["chain"] else doc["chain"]
    _packed(content, BOMB, zlib.compress(json.dumps(doc).encode()))


def flip_bytes(content: RecordDict, rng: random.Random) -> None:
    data = bytearray(content[PACKED]["data"].data)
    for _ in range(rng.randint(1, 8)):
        if data:
            data[rng.randrange(len(data))] = rng.randrange(256)
    _packed(content, bytes(data), content[MANIFEST]["m"])


def resize_buffer(content: RecordDict, rng: random.Random) -> None:
    data = content[PACKED]["data"].data
    cut = rng.randint(0, len(data))
    data = data[:cut] if rng.random() < 0.5 else data + bytes(rng.randint(1, 64))
    _packed(content, data, content[MANIFEST]["m"])


def _grown(shape: list) -> list:
    return [*shape[:-1], 1 + shape[-1]] if shape and type(shape[-1]) is int else [1]


def edit_manifest(content: RecordDict, rng: random.Random) -> None:
    doc = _manifest_doc(content)
    entries = doc["t"]
    entry = rng.choice(entries)
    choice = rng.randrange(9)
    if choice == 0:
        entry[1] = rng.choice(["float64", "int64", "bool", "uint8", "float16", "complex", 7])
    elif choice == 1:
        entry[2] = rng.choice([[2**63], [2**31, 2**31], [-1], [0], [1.5], "x", [3] * 17,
                               _grown(entry[2])])
    elif choice == 2:
        entry[3] = rng.choice(["abs", "delta", "zz", None])
    elif choice == 3:
        entry[0] = rng.choice(["", "other.key", f"{entry[0]}x", 5])  # may be 5 already
    elif choice == 4:
        entries.append(list(entry))  # a duplicate key
    elif choice == 5:
        doc["chain"] = rng.choice([["topk:0.1"], ["int8"], ["bogus"], "deflate", ["deflate"] * 2,
                                   ["topk:2"], []])
    elif choice == 6:
        entries.append(["huge", "float32", [1 << 40], "raw"])
    elif choice == 7 and entries:
        del entries[rng.randrange(len(entries))]
    else:
        doc = rng.choice([[], {"v": 2}, {"v": 1, "t": {}}, None, "x" * 100, {"v": 1}])
    _packed(content, content[PACKED]["data"].data, zlib.compress(json.dumps(doc).encode()))


JUNK = [b"", b"x" * 99, zlib.compress(b"[" * 100_000), zlib.compress(b"{}" * 10**6),
        zlib.compress(b"\x00" * (8 << 20))]  # built once: deep, long, huge manifests


def junk_manifest(content: RecordDict, rng: random.Random) -> None:
    blob = rng.choice([*JUNK, bytes(rng.randrange(256) for _ in range(64))])
    _packed(content, content[PACKED]["data"].data, blob)


def scalars(content: RecordDict, rng: random.Random) -> None:
    """N2: the method's scalars (SYNCED, BASIS, ...) as a list, inf, a string, 1e300, ..."""
    record = dict(content[SCALARS]) if SCALARS in content else {}
    keys = list(record) or ["flora.synced"]
    for _ in range(rng.randint(1, 3)):
        value = rng.choice(SCALAR_VALUES)
        if value is None:
            record.pop(rng.choice(keys), None)
        else:
            record[rng.choice([*keys, "x" * rng.randint(1, 300)])] = value
    try:
        content[SCALARS] = ConfigRecord(record)
    except (TypeError, ValueError):  # Flower refuses this value itself: send what it allows
        content[SCALARS] = ConfigRecord({k: v for k, v in record.items()
                                         if not isinstance(v, type(None) | list)})


def metrics(content: RecordDict, rng: random.Random) -> None:
    record = dict(content[METRICS_RECORD])
    record[rng.choice(["num-examples", "train_s", "next_rank", "rank_mismatch", "epsilon",
                       "budget_spent"])] = rng.choice([0, -5, 1e15, 2.5, 10**18, 1, 4096,
                                                       float("inf")])
    content[METRICS_RECORD] = MetricRecord(record)


def scale_values(content: RecordDict, rng: random.Random) -> None:
    """Valid encoding, absurd values (x1e6, NaN): the norm bound or the finite check refuses."""
    doc = _manifest_doc(content)
    if doc["chain"] or not doc["t"]:
        return flip_bytes(content, rng)
    data = bytearray(content[PACKED]["data"].data)  # empty after an earlier resize_buffer
    raw = torch.frombuffer(data, dtype=torch.float32) if data and len(data) % 4 == 0 else None
    if raw is not None:
        raw.mul_(rng.choice([1e6, float("nan"), -1e30]))
    _packed(content, bytes(data), content[MANIFEST]["m"])
    return None


def per_key(content: RecordDict, rng: random.Random) -> None:
    """Per-key tensors (Flower's DP layout) whose npy header lies about the shape."""
    size = rng.choice([2**40, 2**62, 10, 0])
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({size},), }}"
    header = header.ljust(118) + "\n"
    npy = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + bytes(8)
    for name in (PACKED, MANIFEST):
        del content[name]
    content[TENSORS] = ArrayRecord({"w": Array(dtype="float32", shape=(2,),
                                               stype="numpy.ndarray", data=npy)})


def wrong_records(content: RecordDict, rng: random.Random) -> None:
    choice = rng.randrange(4)
    if choice == 0:
        content[PACKED] = ConfigRecord({"data": b"x"})
    elif choice == 1:
        del content[MANIFEST]
    elif choice == 2:
        content[REPLY_INFO] = ConfigRecord({BASE_FINGERPRINT: rng.choice(["zz", "0" * 16])})
    else:
        content[MANIFEST] = ConfigRecord({"m": "not bytes"})


MUTATIONS: list[Callable[[RecordDict, random.Random], None]] = [
    n1, bomb, quiet_bomb, flip_bytes, resize_buffer, edit_manifest, edit_manifest,
    junk_manifest, scalars, scalars, metrics, scale_values, per_key, wrong_records,
]


def _bomb(wire_bytes: int = 1 << 20) -> bytes:
    """A zlib stream of about ``wire_bytes`` that inflates to about 1000 times as much (zeros,
    one flushed 1 MiB block repeated: built in milliseconds)."""
    deflate, zeros = zlib.compressobj(9), bytes(1 << 20)
    first = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    block = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    return first + block * (wire_bytes // len(block)) + deflate.flush()


BOMB = _bomb()  # 1 MB on the wire, ~1 GB inflated: the review's N3


def _honest_replies(messages: list[Message], contexts: dict[int, Context]) -> list[Message]:
    out = []
    for msg in messages[:HONEST]:
        node = msg.metadata.dst_node_id
        out.append(_reply(msg, client_app.app(msg, contexts[node]).content))
    return out


def _hostile(messages: list[Message], honest: list[Message], rng: random.Random) -> list[Message]:
    out = []
    for msg in messages[HONEST:]:
        content = _copy(rng.choice(honest).content)
        for _ in range(rng.choice([1, 1, 1, 2])):
            if PACKED in content and MANIFEST in content and isinstance(
                    content[MANIFEST], ConfigRecord) and isinstance(content[PACKED], ArrayRecord):
                rng.choice(MUTATIONS)(content, rng)
        out.append(_reply(msg, content))
    return out


@pytest.mark.parametrize("name", list(METHODS))
def test_thousands_of_hostile_replies_never_escape_and_honest_ones_aggregate(name: str) -> None:
    cfg = _cfg(name)
    workspace = get_workspace(cfg)
    loop = new_loop(cfg, workspace, simulation=False)
    # crc32, not hash(): str hashes change with every process, and a failure must replay
    seed = zlib.crc32(name.encode()) + int(os.environ.get("FEDPEFT_FUZZ_SEED", "0"))
    strategy, grid, rng = FedPeftStrategy(loop), Grid(NODES), random.Random(seed)
    contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(),
                           run_config={}) for n in grid.nodes}
    sent = 0
    for rnd in range(1, ROUNDS + 1):
        messages = list(strategy.configure_train(rnd, ArrayRecord(), ConfigRecord(), grid))
        honest = _honest_replies(messages, contexts)
        assert all(not r.has_error() for r in honest), [r.error for r in honest if r.has_error()]
        hostile = _hostile(messages, honest, rng)
        sent += len(hostile)
        replies = hostile + honest
        rng.shuffle(replies)
        _, stats = strategy.aggregate_train(rnd, replies)  # must not raise
        assert stats["aggregated"] == 1, (rnd, dict(stats))
        assert stats["clients_ok"] >= HONEST
        assert stats["clients_ok"] + stats["clients_rejected"] + stats["clients_resized"] + \
            stats["clients_budget_spent"] + stats["clients_failed"] == len(replies)
        for tensor in loop.state.tensors.values():
            assert not tensor.is_floating_point() or bool(torch.isfinite(tensor).all())
    assert sent >= 10_000 // len(METHODS)


def _peak(fn: Callable[[], object]) -> int:
    """Bytes traced at the peak while ``fn`` runs (numpy and Python allocations)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("craft", [n1, bomb, quiet_bomb], ids=["N1-2**63", "N3-1MB-bomb",
                                                               "N3-honest-manifest"])
@pytest.mark.parametrize("name", ["fedit", "flora", "ferret"])
def test_a_bomb_is_rejected_within_a_small_multiple_of_the_expected_upload(
        name: str, craft: Callable) -> None:
    cfg = _cfg(name, "federation.clients=3", "federation.clients_per_round=3")
    loop = new_loop(cfg, get_workspace(cfg), simulation=False)
    strategy, grid = FedPeftStrategy(loop), Grid(3)
    contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(),
                           run_config={}) for n in grid.nodes}
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    honest = [_reply(m, client_app.app(m, contexts[m.metadata.dst_node_id]).content)
              for m in messages[:2]]
    content = _copy(honest[0].content)
    craft(content, random.Random(0))
    hostile = _reply(messages[2], content)
    spec = loop.method.expected_upload(loop.state, loop.pending[messages[2].metadata.dst_node_id])
    expected = sum(4 * math.prod(s) for s in getattr(spec, "tensors", spec).values())
    out: dict = {}
    peak = _peak(lambda: out.update(stats=strategy.aggregate_train(1, [hostile, *honest])[1]))
    stats = out["stats"]
    assert (stats["clients_ok"], stats["clients_rejected"], stats["aggregated"]) == (2, 1, 1)
    # the bomb is ~1 MB on the wire and inflates to ~1 GB, the N1 manifest declares 2**63 bytes:
    # handling it costs a few expected uploads plus a fixed ~100 KB (zlib's window and one
    # 16 KiB input chunk, the manifest's JSON, log lines), never what the sender declared
    assert serialized_nbytes(content) > 500_000 or craft is n1
    assert peak < 4 * expected + (160 << 10), (peak, expected)


# --- the device's downlink decoder ---


def _downlink(name: str) -> tuple[Message, object, object]:
    cfg = _cfg(name, "federation.clients=2", "federation.clients_per_round=2")
    workspace = get_workspace(cfg)
    loop = new_loop(cfg, workspace, simulation=False)
    strategy = FedPeftStrategy(loop)
    message = next(iter(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), Grid(2))))
    model = workspace.adapter_model(cfg.model.rank)
    return message, loop.method, model


@pytest.mark.parametrize("name", list(METHODS))
def test_hostile_downlinks_are_refused_cleanly_by_the_device_decoder(name: str) -> None:
    message, method, model = _downlink(name)
    expected = downlink_expected(method, model)
    honest = records_to_payload(message.content, expected=expected)  # accepted as it is
    assert honest.tensors.keys() == records_to_payload(message.content).tensors.keys()
    rng = random.Random(7)
    refused = 0
    for _ in range(2000):
        content = _copy(message.content)
        rng.choice([n1, bomb, quiet_bomb, flip_bytes, resize_buffer, edit_manifest,
                    junk_manifest, per_key, wrong_records])(content, rng)
        try:
            records_to_payload(content, expected=expected)
        except ValueError:  # PackError: a clean refusal, the ClientApp reports it
            refused += 1
    assert refused > 1000


@pytest.mark.parametrize("craft", [n1, bomb, quiet_bomb], ids=["N1-2**63", "N3-bomb",
                                                               "N3-honest-manifest"])
def test_a_downlink_bomb_costs_the_device_a_small_multiple_of_its_budget(craft) -> None:
    message, method, model = _downlink("fedit")
    expected = downlink_expected(method, model)
    content = _copy(message.content)
    craft(content, random.Random(0))
    budget = expected.limit

    def decode() -> None:
        with pytest.raises(PackError):
            records_to_payload(content, expected=expected)

    assert _peak(decode) < 2 * budget + (160 << 10)
    assert budget < 64 << 20  # tiny-bert: the bomb's 1 GiB is far beyond it
    assert Expected(max_bytes=budget).limit == budget


@pytest.mark.parametrize("craft", [n1, bomb], ids=["N1-2**63", "N3-bomb"])
def test_the_device_clientapp_refuses_a_bomb_and_tells_only_a_code(craft) -> None:
    from fedpeft.deploy.clientexec import reason_code

    message, _, _ = _downlink("fedit")
    craft(message.content, random.Random(0))
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(PackError) as info:
        client_app.device_app(message, context)
    assert reason_code(info.value) == "downlink rejected"
