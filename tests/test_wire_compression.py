"""Packed payloads and compression filters: exact packing, each filter's error bound, top-k error
feedback, composition, hostile manifests, and the bytes FedIT's real upload takes."""

from __future__ import annotations

import json
import math
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedpeft.core import filters
from fedpeft.core.config import ConfigError, load_config
from fedpeft.core.filters import Chain, compression_refusal, parse_chain
from fedpeft.core.payload import ClientState, Payload
from fedpeft.core.wire import (
    BYTES_STYPE,
    MANIFEST,
    PACKED,
    RESIDUAL_PREFIX,
    SCALARS,
    TENSORS,
    load_client_state,
    payload_to_records,
    records_to_payload,
    replace_tensors,
    save_client_state,
    serialized_nbytes,
    to_array_record,
    transmit,
    unpack_in_place,
    unpack_record,
)

GEN = torch.Generator().manual_seed(0)


def _randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN) * scale


def _every_dtype() -> dict[str, torch.Tensor]:
    return {
        "f32": _randn(8, 5), "f64": _randn(3, 2).double(), "f16": _randn(7).half(),
        "bf16": _randn(2, 3).bfloat16(), "i64": torch.arange(-3, 6), "i32": torch.arange(4,
        dtype=torch.int32), "i16": torch.tensor([-2, 7], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8), "u8": torch.tensor([0, 255],
        dtype=torch.uint8), "bool": torch.tensor([[True, False]]), "scalar": torch.tensor(2.5),
        "int_scalar": torch.tensor(7), "empty": torch.zeros(0, 4), "empty_int": torch.zeros(
            3, 0, dtype=torch.int64),
    }


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


# ---- packing ------------------------------------------------------------------------------
def test_packing_round_trip_is_exact_for_every_dtype() -> None:
    tensors = _every_dtype()
    content = payload_to_records(Payload(tensors, {"k": 3}), {"fedpeft.round": 2})
    assert list(content.array_records) == [PACKED]  # one array for the whole payload
    assert content[PACKED]["data"].shape == (sum(t.numel() * t.element_size()
                                                for t in tensors.values()),)
    back = records_to_payload(content)
    assert list(back.tensors) == list(tensors)
    assert all(_same(back.tensors[k], v) for k, v in tensors.items())
    assert back.scalars == {"k": 3, "fedpeft.round": 2}


def test_empty_payload_and_filters_leave_non_float_tensors_exact() -> None:
    empty = records_to_payload(payload_to_records(Payload({}, {"a": 1}), filters=["int8"]))
    assert empty.tensors == {} and empty.scalars == {"a": 1}
    tensors = _every_dtype()
    content = payload_to_records(Payload(tensors), filters=["int4"])
    back = unpack_record(content)
    for key, value in tensors.items():
        if not value.is_floating_point() or value.numel() == 0:
            assert _same(back[key], value), key
        else:  # lossy, but the dtype and the shape come back
            assert back[key].dtype == value.dtype and back[key].shape == value.shape


def test_per_key_records_still_decode_and_unpack_in_place_makes_them() -> None:
    tensors = {"a": _randn(3, 4), "b": _randn(5)}
    legacy = RecordDict({TENSORS: to_array_record(tensors), SCALARS: ConfigRecord({"x": 1})})
    assert all(_same(records_to_payload(legacy).tensors[k], v) for k, v in tensors.items())
    ref = {k: v + 0.1 for k, v in tensors.items()}
    content = payload_to_records(Payload(tensors), filters=["topk:0.5"], reference=ref)
    decoded = unpack_record(content, reference=ref)
    out = unpack_in_place(content, reference=ref)  # what Flower's DP wrappers need
    assert PACKED not in content and MANIFEST not in content
    assert sorted(content[TENSORS].keys()) == ["a", "b"]
    assert all(torch.equal(out[k], decoded[k]) for k in tensors)
    assert all(torch.equal(unpack_record(content)[k], decoded[k]) for k in tensors)


def test_replace_tensors_repacks_a_message() -> None:
    content = payload_to_records(Payload({"a": _randn(4)}), filters=["int8"])
    replace_tensors(content, {"b": torch.ones(2, 2)})
    assert list(unpack_record(content)) == ["b"]


# ---- each filter's error bound ------------------------------------------------------------
def _round_trip(values: np.ndarray, specs: list[str]) -> np.ndarray:
    chain = parse_chain(specs)
    enc = filters.encode(values, chain)
    assert filters.nbytes(filters.layout(chain, values.size, enc.nnz, enc.index)) == sum(
        p.nbytes for p in enc.parts)
    return filters.decode(enc.parts, chain, values.size, enc.nnz, enc.index)


VALUES = np.random.default_rng(1).standard_normal(1000).astype(np.float32) * np.repeat(
    np.float32([1e-3, 1.0, 30.0, 0.05]), 250)  # blocks of very different scales


@pytest.mark.parametrize(("spec", "bits", "floor"), [("fp16", 11, 2.0 ** -25), ("bf16", 8, 0)])
def test_casts_have_relative_error_of_their_mantissa(spec: str, bits: int, floor: float) -> None:
    back = _round_trip(VALUES, [spec])  # floor: half the spacing of fp16's subnormals
    assert np.all(np.abs(back - VALUES) <= np.maximum(np.abs(VALUES) * 2.0 ** -bits, floor))
    assert not np.array_equal(back, VALUES)  # it did round


@pytest.mark.parametrize(("spec", "top", "block"), [("int8", 127, 256), ("int8:64", 127, 64),
                                                    ("int4", 7, 64), ("int4:128", 7, 128)])
def test_blockwise_quantisation_error_is_half_a_level_of_its_block(spec: str, top: int,
                                                                   block: int) -> None:
    back = _round_trip(VALUES, [spec])
    for start in range(0, VALUES.size, block):
        part = slice(start, start + block)
        level = np.abs(VALUES[part]).max() / top
        assert np.all(np.abs(back[part] - VALUES[part]) <= level / 2 * (1 + 1e-5))
    assert np.abs(back - VALUES).max() > 0
    assert np.array_equal(_round_trip(np.zeros(10, np.float32), [spec]), np.zeros(10))


def test_topk_keeps_exactly_the_largest_values() -> None:
    back = _round_trip(VALUES, ["topk:0.1"])
    kept = back != 0
    assert kept.sum() == 100
    assert np.array_equal(back[kept], VALUES[kept])  # kept values are exact (float32)
    assert np.abs(VALUES[~kept]).max() <= np.abs(VALUES[kept]).min()


def test_sign_sends_one_scale_the_mean_magnitude_of_the_kept_values() -> None:
    back = _round_trip(VALUES, ["topk:0.2", "sign"])
    top = _round_trip(VALUES, ["topk:0.2"])
    kept = top != 0
    scale = np.abs(top[kept]).mean()
    assert np.allclose(back[kept], np.sign(top[kept]) * scale, rtol=1e-6)
    assert np.all(back[~kept] == 0)
    # the least-squares scale: ||v - s sign v||^2 = ||v||^2 - m s^2 < ||v||^2
    err = np.sum((back - top) ** 2)
    assert err == pytest.approx(np.sum(top ** 2) - kept.sum() * scale ** 2, rel=1e-4)


@pytest.mark.parametrize("n", [1, 7, 100, 70_000])  # index (uint16/uint32) and bitmap forms
def test_topk_index_forms(n: int) -> None:
    values = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    for fraction in (0.001, 0.3, 1.0):
        back = _round_trip(values, [f"topk:{fraction}"])
        assert (back != 0).sum() == min(n, math.ceil(fraction * n))


# ---- composition --------------------------------------------------------------------------
def test_topk_then_int8_quantises_only_the_kept_values() -> None:
    top = _round_trip(VALUES, ["topk:0.1"])
    both = _round_trip(VALUES, ["topk:0.1", "int8:16"])
    kept = top != 0
    assert np.array_equal(both != 0, kept) or (both[kept] == 0).sum() < 3  # tiny values may -> 0
    assert np.all(both[~kept] == 0)
    levels = filters.quantise(top[kept], 127, 16)[1]
    bound = np.repeat(levels, 16)[:kept.sum()] / 2 * (1 + 1e-5)
    assert np.all(np.abs(both[kept] - top[kept]) <= bound)


def test_chain_parsing_and_bytes_shrink_along_the_chain() -> None:
    assert parse_chain(["topk:0.1", "int8"]) == Chain(0.1, "int8", 256)
    assert parse_chain(["int4:32"]).specs == ["int4:32"]
    assert parse_chain([]) == Chain() and not Chain().lossy
    sizes = [serialized_nbytes(payload_to_records(Payload({"w": torch.from_numpy(VALUES)}),
                                                  filters=c, reference={"w": torch.zeros(1000)}))
             for c in ([], ["fp16"], ["int8"], ["int4"], ["topk:0.1", "int8"],
                       ["topk:0.1", "sign"])]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)


@pytest.mark.parametrize("bad", [["int9"], ["topk"], ["topk:0"], ["topk:1.5"], ["int8:4"],
                                 ["int8:x"], ["fp16:2"], ["sign"], ["int8", "fp16"],
                                 ["int8", "topk:0.1"], ["topk:0.1", "topk:0.2"],
                                 ["deflate", "int8"], ["deflate", "deflate"], ["deflate:9"]])
def test_bad_chains_are_config_errors_naming_the_accepted_filters(bad: list[str]) -> None:
    with pytest.raises(ConfigError, match=r"compression\.up") as exc:
        load_config(None, [f"compression.up={json.dumps(bad)}"])
    if bad[0] in ("int9", "topk"):
        assert "accepted: fp16, bf16, int8" in str(exc.value)


def test_config_section_and_direction_rules() -> None:
    cfg = load_config(None, ["compression.up=topk:0.1,int8", 'compression.down=["fp16"]'])
    assert (cfg.compression.up, cfg.compression.down) == (["topk:0.1", "int8"], ["fp16"])
    with pytest.raises(ConfigError, match="no reference for its downlink"):
        load_config(None, ['compression.down=["topk:0.1", "int8"]'])
    with pytest.raises(ConfigError, match="client-fixed"):
        load_config(None, ['compression.up=["int8"]', 'privacy.client_level="client-fixed"',
                           'method.name="fedit"'])
    load_config(None, ['compression.up=["int8"]', 'privacy.client_level="server-fixed"'])


def test_methods_whose_maths_filters_break_refuse_them() -> None:
    from fedpeft.strategies import METHODS

    for name in ("ferret", "flora"):
        reason = compression_refusal(METHODS[name], ["int8"], [])
        assert reason and name in reason and METHODS[name].compression_refusal in reason
        assert compression_refusal(METHODS[name], [], []) is None  # packing alone is lossless
        assert compression_refusal(METHODS[name], ["deflate"], ["deflate"]) is None
    assert compression_refusal(METHODS["fedit"], ["topk:0.1", "sign"], ["fp16"]) is None

    class Flagged:
        name, compressible = "x", False

    assert "need the exact tensors" in str(compression_refusal(Flagged, [], ["fp16"]))


def _training_like_update(n: int = 8192) -> tuple[dict, dict]:
    """A downlink and an upload whose update looks like a few AdamW steps: most coordinates
    moved by about the same small amount, a few by more (not uniform noise)."""
    rng = np.random.default_rng(3)
    down = torch.from_numpy(rng.standard_normal(n).astype(np.float32) * 0.02)
    step = rng.standard_normal(n) * 1e-3 + rng.laplace(0, 5e-4, n)
    return {"w": down}, {"w": down + torch.from_numpy(step.astype(np.float32))}


def test_deflate_is_lossless_and_shrinks_quantised_updates() -> None:
    assert parse_chain(["int4:512", "deflate"]) == Chain(None, "int4", 512, True)
    assert not parse_chain(["deflate"]).lossy
    for tensors in (_every_dtype(), {"u": torch.arange(4096, dtype=torch.int64) % 7}):
        content = payload_to_records(Payload(tensors), filters=["deflate"])
        back = unpack_record(content)
        assert all(_same(back[k], v) for k, v in tensors.items())
    down, up = _training_like_update()
    int4 = payload_to_records(Payload(up), filters=["int4:512"], reference=down)
    packed = payload_to_records(Payload(up), filters=["int4:512", "deflate"], reference=down)
    assert torch.equal(unpack_record(int4, reference=down)["w"],
                       unpack_record(packed, reference=down)["w"])  # same values, fewer bytes
    assert serialized_nbytes(packed) < 0.95 * serialized_nbytes(int4)


# ---- updates against a reference, and top-k error feedback --------------------------------
def test_updates_decode_against_the_reference() -> None:
    ref = {"w": _randn(20, 30), "h": _randn(4)}
    up = {"w": ref["w"] + _randn(20, 30, scale=0.01), "h": ref["h"] + 0.5, "new": _randn(3)}
    content = payload_to_records(Payload(up), filters=["int8"], reference=ref)
    back = unpack_record(content, reference=ref)
    step = (up["w"] - ref["w"]).abs().max() / 127  # quantised update: far finer than weights
    assert (back["w"] - up["w"]).abs().max() <= step * 0.51
    assert (back["new"] - up["new"]).abs().max() <= up["new"].abs().max() / 254 * 1.01
    with pytest.raises(ValueError, match="reference has no such tensor"):
        unpack_record(content)
    with pytest.raises(ValueError, match=r"reference has shape \(30, 20\)"):
        unpack_record(content, reference={**ref, "w": ref["w"].T.clone()})
    with pytest.raises(ValueError, match="needs a reference"):
        payload_to_records(Payload(up), filters=["topk:0.1"])


@pytest.mark.parametrize("codec", [[], ["fp16"], ["int8:32"], ["int4"], ["sign"]])
def test_error_feedback_residual_carries_exactly_what_was_not_sent(codec: list[str]) -> None:
    chain = ["topk:0.1", *codec]
    state = ClientState({"method.own": torch.ones(2)})
    sent_total = {"a": torch.zeros(40, 8), "b": torch.zeros(8, 40)}
    update_total = {k: torch.zeros_like(v) for k, v in sent_total.items()}
    ref = {k: _randn(*v.shape) for k, v in sent_total.items()}
    for rnd in range(6):
        ref = {k: v + _randn(*v.shape, scale=0.01) for k, v in ref.items()}  # new downlink
        upload = {k: v + _randn(*v.shape, scale=0.1) for k, v in ref.items()}
        content = payload_to_records(Payload(upload), filters=chain, reference=ref, state=state)
        store = RecordDict()  # the state goes through Flower's Context.state between rounds
        save_client_state(store, state)
        state = load_client_state(store)
        back = unpack_record(content, reference=ref)
        for key in upload:
            sent = back[key] - ref[key]
            assert int((sent != 0).sum()) <= math.ceil(0.1 * sent.numel())
            sent_total[key] += sent
            update_total[key] += upload[key] - ref[key]
            residual = state.tensors[RESIDUAL_PREFIX + key]
            assert torch.allclose(sent_total[key] + residual, update_total[key], atol=2e-5), rnd
            if not codec and rnd == 0:  # nothing lost: each entry is either sent or kept
                assert torch.all((sent == 0) | (residual == 0))
    assert torch.equal(state.tensors["method.own"], torch.ones(2))  # method state untouched
    # the feedback reaches the server: over the rounds much more than one round's 10% is sent
    assert int((sent_total["a"] != 0).sum()) > 0.3 * sent_total["a"].numel()


def test_non_finite_updates_travel_as_they_are() -> None:
    ref = {"w": torch.zeros(10)}
    bad = torch.zeros(10)
    bad[3] = float("nan")
    state = ClientState({RESIDUAL_PREFIX + "w": torch.ones(10)})
    content = payload_to_records(Payload({"w": bad}), filters=["topk:0.1", "int8"],
                                 reference=ref, state=state)
    assert torch.isnan(unpack_record(content, reference=ref)["w"][3])  # the server sees it
    assert RESIDUAL_PREFIX + "w" not in state.tensors


def test_client_app_uploads_through_the_up_chain_and_keeps_the_residual(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from fedpeft.client import app as client_app
    from fedpeft.strategies import ClientProfile, build_method
    from flwr.app import Context, Message, MessageType
    from flwr.supercore.task_identity import TaskIdentity

    from fedpeft.core.wire import CONFIG_RECORD, config_record
    from fedpeft.core.workspace import get_workspace

    for attr in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    cfg = load_config(None, ['model.name="tiny-bert"', "federation.clients=4",
                             "federation.clients_per_round=2", "train.local_steps=2",
                             "train.batch_size=8", 'data.partitioner="iid"',
                             "data.test_size=100", 'compression.up=["topk:0.1", "int8"]'])
    method = build_method(cfg)
    state = method.init(get_workspace(cfg).adapter_model(cfg.model.rank).state())
    down = method.downlink(state, ClientProfile(0, cfg.model.rank))
    ctx = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    for rnd in (1, 2):
        content = payload_to_records(down, {"fedpeft.round": rnd, "fedpeft.partition": 0,
                                            "fedpeft.rank": cfg.model.rank})
        content[CONFIG_RECORD] = config_record(cfg)
        msg = Message(content=content, dst_node_id=5, message_type=MessageType.TRAIN,
                      group_id=str(rnd))
        reply = client_app.train(msg, ctx).content
        residuals = {k for k in load_client_state(ctx.state).tensors
                     if k.startswith(RESIDUAL_PREFIX)}
        assert residuals == {RESIDUAL_PREFIX + k for k in down.tensors}
        back = unpack_record(reply, reference=down.tensors)
        for key, value in back.items():
            moved = int((value != down.tensors[key]).sum())
            assert 0 < moved <= math.ceil(0.1 * value.numel()), key


# ---- hostile manifests --------------------------------------------------------------------
def _crafted(entries: list, chain: list | None = None, buffer: bytes = b"",
             manifest: bytes | None = None) -> RecordDict:
    doc = {"v": 1, "chain": chain or [], "t": entries}
    blob = zlib.compress(json.dumps(doc).encode()) if manifest is None else manifest
    data = Array(dtype="uint8", shape=(len(buffer),), stype=BYTES_STYPE, data=buffer)
    return RecordDict({PACKED: ArrayRecord({"data": data}), MANIFEST: ConfigRecord({"m": blob})})


HOSTILE = {
    "short buffer": (_crafted([["w", "float32", [4], "raw"]], buffer=bytes(12)), "describes 16"),
    "long buffer": (_crafted([["w", "float32", [4], "raw"]], buffer=bytes(20)), "describes 16"),
    "negative shape": (_crafted([["w", "float32", [-4], "raw"]]), "non-negative"),
    "float shape": (_crafted([["w", "float32", [2.0], "raw"]], buffer=bytes(8)),
                    "non-negative"),
    "bool shape": (_crafted([["w", "float32", [True], "raw"]], buffer=bytes(4)),
                   "non-negative"),
    "too many dims": (_crafted([["w", "float32", [1] * 17, "raw"]], buffer=bytes(4)),
                      "at most 16"),
    "huge raw": (_crafted([["w", "float32", [1 << 40, 1 << 20], "raw"]], buffer=bytes(16)),
                 "describes"),
    "huge quantised": (_crafted([["w", "float32", [1 << 45], "abs"]], ["int4"], bytes(16)),
                       "describes"),
    "unknown filter": (_crafted([], ["zstd"]), "unknown filter 'zstd'"),
    "unknown dtype": (_crafted([["w", "object", [1], "raw"]]), "dtype 'object'"),
    "unknown mode": (_crafted([["w", "float32", [1], "gzip"]], ["int8"]), "mode 'gzip'"),
    "filtered int": (_crafted([["w", "int64", [1], "abs"]], ["int8"]), "mode 'abs'"),
    "abs without a chain": (_crafted([["w", "float32", [1], "abs"]]), "does nothing"),
    "duplicate key": (_crafted([["w", "uint8", [1], "raw"]] * 2, buffer=bytes(2)), "twice"),
    "short entry": (_crafted([["w", "float32"]]), "malformed manifest entry"),
    "not a manifest": (_crafted([], manifest=b"not zlib"), "unreadable manifest"),
    "wrong version": (_crafted([], manifest=zlib.compress(b'{"v": 9}')), "version-1"),
    "deep json": (_crafted([], manifest=zlib.compress(b"[" * 100_000)), "unreadable"),
    "manifest bomb": (_crafted([], manifest=zlib.compress(b'{"v":1,"t":[' + b" " * (64 << 20))),
                      "exceeds"),
    "deflate bomb": (_crafted([["w", "uint8", [16], "raw"]], ["deflate"],
                              zlib.compress(bytes(256 << 20), 9)), "more than the 16 bytes"),
    "deflate short": (_crafted([["w", "uint8", [16], "raw"]], ["deflate"],
                               zlib.compress(bytes(15))), "describes 16 bytes, the buffer has 15"),
    "deflate truncated": (_crafted([["w", "uint8", [16], "raw"]], ["deflate"],
                                   zlib.compress(bytes(16))[:-3]), "truncated"),
    "deflate trailing": (_crafted([["w", "uint8", [16], "raw"]], ["deflate"],
                                  zlib.compress(bytes(16)) + b"x"), "trailing"),
    "not deflated": (_crafted([["w", "uint8", [4], "raw"]], ["deflate"], bytes(4)),
                     "unreadable"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_manifests_are_rejected_without_allocating(case: str) -> None:
    content, message = HOSTILE[case]
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=message):
            records_to_payload(content)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # never sized by a declared shape (the bomb stops at 4 MB)


def _sparse_entry(n: int, nnz: int, index: str) -> list:
    return ["w", "float32", [n], "delta", nnz, index]


@pytest.mark.parametrize(("entry", "buffer", "message"), [
    (_sparse_entry(100, 101, "index"), bytes(101 * 6), "101 kept values of 100"),
    (_sparse_entry(100, 3, "bitmap"), bytes(6 + 12), "sent as a index"),
    (_sparse_entry(100, 2, "index"), np.uint16([5, 5]).tobytes() + bytes(8), "not increasing"),
    (_sparse_entry(100, 2, "index"), np.uint16([5, 100]).tobytes() + bytes(8), "not increasing"),
    (_sparse_entry(100, 20, "bitmap"), bytes(13 + 80), "marks 0 values, not the declared 20"),
    (["w", "float32", [100], "delta", 2], bytes(12), "malformed manifest entry"),
])
def test_hostile_sparse_entries_are_rejected(entry: list, buffer: bytes, message: str) -> None:
    content = _crafted([entry], ["topk:0.1"], buffer)
    with pytest.raises(ValueError, match=message):
        unpack_record(content, reference={"w": torch.zeros(100)})


def test_malformed_records_are_rejected() -> None:
    good = payload_to_records(Payload({"w": torch.ones(3)}))
    both = RecordDict({**good, TENSORS: to_array_record({"w": torch.ones(3)})})
    with pytest.raises(ValueError, match="both packed and per-key"):
        unpack_record(both)
    floats = RecordDict({PACKED: ArrayRecord({"data": Array(np.zeros(3, np.float32))}),
                         MANIFEST: good[MANIFEST]})
    with pytest.raises(ValueError, match=r"expected the flat fedpeft\.bytes buffer"):
        unpack_record(floats)
    with pytest.raises(ValueError, match="one Array 'data' and a manifest"):
        unpack_record(RecordDict({PACKED: good[PACKED]}))
    with pytest.raises(ValueError, match="not bytes"):
        unpack_record(RecordDict({PACKED: good[PACKED], MANIFEST: ConfigRecord({"m": "x"})}))


# ---- bytes of a real upload ---------------------------------------------------------------
def test_fedit_upload_bytes_for_the_default_model() -> None:
    """FedIT's upload for MiniLM (LoRA r=8 on query/value plus the head) and a synthetic update
    (the byte counts do not depend on the values): per-key records vs packed and filtered."""
    from fedpeft.core.workspace import get_workspace

    cfg = load_config(None)
    down = get_workspace(cfg).adapter_model(cfg.model.rank).state()
    up = {k: v + _randn(*v.shape, scale=1e-3) for k, v in down.items()}
    per_key = serialized_nbytes(RecordDict({TENSORS: to_array_record(up),
                                            SCALARS: ConfigRecord({})}))

    def size(chain: list[str]) -> int:
        return serialized_nbytes(payload_to_records(Payload(up), filters=chain, reference=down,
                                                    state=ClientState()))

    raw = sum(v.numel() * 4 for v in up.values())
    assert per_key - raw > 10_000  # one array per key: ~14 KB of framing today
    assert size([]) - raw < 1500  # packed: one array, one manifest
    assert size(["fp16"]) < 0.51 * size([])
    assert size(["int8"]) < 0.27 * size([])
    assert per_key / size(["topk:0.1", "int8"]) > 16
    assert per_key / size(["topk:0.1", "sign"]) > 25


@pytest.mark.parametrize("kind", ["nan", "wrong_shape"])
def test_fault_injection_corrupts_a_compressed_upload(kind: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The fault mod unpacks the compressed upload (against the downlink), corrupts the tensors
    and sends them uncompressed; the server decodes what was injected."""
    from fedpeft.client.faults import inject_faults
    from flwr.app import Context, Message, MessageType
    from flwr.supercore.task_identity import TaskIdentity

    from fedpeft.core.wire import CONFIG_RECORD, config_record

    for attr in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)

    cfg = load_config(None, ["federation.clients=4", "federation.clients_per_round=2",
                             f"faults.{kind}=[0]", 'compression.up=["topk:0.1", "int8"]'])
    down = {"a": _randn(6, 4), "b": _randn(4, 6)}
    content = payload_to_records(Payload(down), {"fedpeft.round": 1, "fedpeft.partition": 0})
    content[CONFIG_RECORD] = config_record(cfg)
    msg = Message(content=content, dst_node_id=5, message_type=MessageType.TRAIN, group_id="1")
    upload = {k: v + 0.1 for k, v in down.items()}

    def client(message: Message, _: Context) -> Message:
        sent = unpack_record(message.content)
        reply = payload_to_records(Payload(upload), filters=cfg.compression.up, reference=sent)
        return Message(content=reply, reply_to=message)

    ctx = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    got = unpack_record(inject_faults(msg, ctx, client).content, reference=down)
    if kind == "nan":
        assert all(bool(torch.isnan(v).any()) for v in got.values())
    else:
        assert sorted(tuple(v.shape) for v in got.values()) == [(4, 6), (5, 4)]


def test_transmit_is_the_flower_free_wire() -> None:
    down, state = {"w": _randn(200, 100)}, ClientState()
    received, down_bytes = transmit(Payload(down, {"s": 1}), filters=["fp16"])
    assert received.scalars == {"s": 1} and received.tensors["w"].dtype == torch.float32
    assert 0 < (received.tensors["w"] - down["w"]).abs().max() < 1e-2
    upload = {"w": received.tensors["w"] + 0.1}
    got, up_bytes = transmit(Payload(upload), filters=["topk:0.1", "sign"],
                             reference=received.tensors, state=state)
    assert int((got.tensors["w"] != received.tensors["w"]).sum()) == 2000
    assert up_bytes < down_bytes / 8 and RESIDUAL_PREFIX + "w" in state.tensors
