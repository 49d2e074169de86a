"""FLoRA (Wang et al., NeurIPS 2024): stack the clients' factors so the stacked product is exactly
the weighted sum of their updates; every client merges it into its frozen base and starts a fresh
adapter of its own rank each round.

Server, per wrapped layer and round t: A_t = [p_1 s_1 A_1; ...; p_K s_K A_K] ((sum r_k) x d_in) and
B_t = [B_1 ... B_K] (d_out x sum r_k), so B_t A_t = sum_k p_k s_k B_k A_k exactly (p_k by examples;
the client scale s_k = alpha / r_k goes on A with the weight, so the merge is W <- W + B_t A_t).

Keeping every client's merged base consistent: one model object serves many virtual clients, so
a client's base is rebuilt on every ``load`` as W0 + (its merged updates), never accumulated in
place. The server keeps the dense sum of all merged updates (``flora.delta::<layer>``) and the
stacked factors of the recent rounds (``flora.hist.<t>.{A,B}::<layer>``), dropped once the
factors since then outweigh the dense matrix. A client's last merged round and its merged update
live in its ClientState (``flora.synced``, ``flora.delta::<layer>``); the round is echoed in its
upload. The downlink carries the stacked factors of the rounds after the client's last sync or,
when those hold more numbers (or are gone), the dense sum, which replaces the client's copy. The
client then loads the averaged head and starts a fresh rank-r_k adapter (A from a seed of round
and client, B = 0). Server evaluation: W0 + the dense sum. Each ClientState holds a dense merged
update (L d_out d_in floats): FLoRA's inherent cost of a per-client merged base.

``default_lr`` is 0.01, not FedIT's 0.002: a round's update is what ``train.local_steps`` steps
from B = 0 reach (docs/results.md has the run that set it). A client without the merged base
the downlink builds on uploads zeros marked synced -1 with ``needs_sync`` = 1; the server leaves
it out of the stack, counts it, and sends that client the dense sum the next time.
"""

from __future__ import annotations

import torch

from fedpeft.core.adapters import AdapterModel
from fedpeft.core.keys import NEEDS_SYNC

from .base import (
    Aggregate,
    Bound,
    ClientProfile,
    ClientState,
    Export,
    Method,
    Payload,
    Upload,
    UploadSpec,
    register,
)
from .lowrank import (
    Layer,
    adapter_layers,
    average_head,
    factor_shapes,
    head_of,
    init_a,
    load_dense,
    scale,
    seed_of,
    truncated_svd,
    weights_by_examples,
)

DELTA = "flora.delta::"
ROUND, SYNCED, FROM, SEED = "flora.round", "flora.synced", "flora.from", "flora.seed"
LOST = "flora.lost"  # ClientState value: this round's load found no usable merged base


def hist_key(t: int, factor: str, layer: str) -> str:
    return f"flora.hist.{t}.{factor}::{layer}"


def client_key(profile: ClientProfile) -> str:
    return f"flora.sync.{profile.node_id}:{profile.partition_id}"


@register("flora")
class FLoRA(Method):
    """Stacking: the server stacks the clients' factors, clients merge into their base and
    re-initialise their own-rank adapter every round."""

    mixed_ranks = True
    default_lr = 0.01  # a fresh adapter every round: see the module docstring
    secagg_refusal = ("stacking concatenates the clients' factors: the server needs each "
                      "one, and a sum loses them")
    compression_refusal = ("the server stacks the clients' exact factors into a product of "
                           "rank sum(r_k); quantised or sparsified factors would put their errors "
                           "straight into every client's merged base")

    @staticmethod
    def layers(tensors: dict[str, torch.Tensor]) -> list[Layer]:
        names = sorted(k[len(DELTA):] for k in tensors if k.startswith(DELTA))
        return [Layer(n, i, tensors[DELTA + n].shape[1], tensors[DELTA + n].shape[0])
                for i, n in enumerate(names)]

    # ---- server half ---------------------------------------------------------------------
    def init(self, template: dict[str, torch.Tensor]) -> Payload:
        tensors = dict(head_of(template))
        for layer in adapter_layers(template):
            tensors[DELTA + layer.name] = torch.zeros(layer.d_out, layer.d_in,
                                                      dtype=template[layer.a_key].dtype)
        return Payload(tensors, {ROUND: 0})

    def downlink(self, state: Payload, profile: ClientProfile) -> Payload:
        now = int(state.scalars[ROUND])
        synced = int(state.scalars.get(client_key(profile), 0))
        tensors = dict(head_of(state.tensors))
        scalars = {ROUND: now, FROM: synced,
                   SEED: seed_of(self.ctx.seed, now, profile.partition_id, 47)}
        if synced < 0:  # the client said it holds no usable merged base: the dense sum
            tensors.update({k: v for k, v in state.tensors.items() if k.startswith(DELTA)})
            scalars[FROM] = now
        elif synced < now:
            missing = list(range(synced + 1, now + 1))
            layers = self.layers(state.tensors)
            if all(hist_key(t, "A", layers[0].name) in state.tensors for t in missing) and (
                history_floats(state.tensors, missing) <= dense_floats(layers)
            ):
                tensors.update({k: v for k, v in state.tensors.items()
                                if k.startswith("flora.hist.") and hist_round(k) in missing})
            else:
                tensors.update({k: v for k, v in state.tensors.items() if k.startswith(DELTA)})
        return Payload(tensors, scalars)

    def expected_upload(self, state: Payload, profile: ClientProfile) -> UploadSpec:
        """The head and the client's rank-r factors; ``flora.synced``: the round whose merged
        base the client trained on (at most the current one), or -1 (it held none)."""
        shapes = {k: tuple(v.shape) for k, v in head_of(state.tensors).items()}
        return UploadSpec({**shapes, **factor_shapes(self.layers(state.tensors), profile.rank)},
                          {SYNCED: Bound(-1, int(state.scalars[ROUND]), required=True)})

    def aggregate(self, state: Payload, uploads: list[Upload]) -> Aggregate:
        """Stack the round's factors. Uploads of clients that held no usable merged base
        (synced -1, zero tensors) are left out and counted as ``needs_sync``; the server notes
        them and sends them the dense sum next time."""
        now = int(state.scalars[ROUND]) + 1
        marks = {id(u): int(u.payload.scalars.get(SYNCED, 0)) for u in uploads}
        scalars = dict(state.scalars)
        for upload in uploads:
            if SYNCED in upload.payload.scalars:
                scalars[client_key(upload.profile)] = marks[id(upload)]
        uploads = [u for u in uploads if marks[id(u)] >= 0]
        if not uploads:
            raise ValueError("flora: every upload of the round came from a client that holds no "
                             "merged base (each asked for a resynchronisation)")
        weights = weights_by_examples([u.num_examples for u in uploads])
        layers = self.layers(state.tensors)
        tensors = {k: v for k, v in state.tensors.items() if k not in head_of(state.tensors)}
        tensors.update(average_head([head_of(u.payload.tensors) for u in uploads], weights))
        for layer in layers:
            b_stack, a_stack = stack(layer, uploads, weights, self.ctx.alpha)
            delta = state.tensors[DELTA + layer.name]
            tensors[DELTA + layer.name] = (delta.double() + b_stack @ a_stack).to(delta.dtype)
            tensors[hist_key(now, "B", layer.name)] = b_stack.to(delta.dtype)
            tensors[hist_key(now, "A", layer.name)] = a_stack.to(delta.dtype)
        drop_old_history(tensors, layers, now)
        scalars[ROUND] = now
        return Aggregate(Payload(tensors, scalars), {NEEDS_SYNC: float(len(marks) - len(uploads))})

    def export(self, state: Payload) -> Export:
        """The rank-``model.rank`` truncated SVD of the merged update (an approximation:
        FLoRA's global model is W0 + a dense update, which a LoRA adapter cannot hold exactly)."""
        s = scale(self.ctx.alpha, self.ctx.rank)
        out = dict(head_of(state.tensors))
        for layer in self.layers(state.tensors):
            delta = state.tensors[DELTA + layer.name]
            us, vh = truncated_svd(delta, self.ctx.rank)
            rank = self.ctx.rank
            b = torch.zeros(layer.d_out, rank, dtype=torch.float64)
            a = torch.zeros(rank, layer.d_in, dtype=torch.float64)
            b[:, : us.shape[1]], a[: vh.shape[0]] = us / s, vh
            out[layer.b_key], out[layer.a_key] = b.to(delta.dtype), a.to(delta.dtype)
        return Export(out, note=f"adapter/ holds the rank-{self.ctx.rank} truncated SVD of "
                      "FLoRA's merged update (base + every round's stacked product), which is "
                      "dense")

    def load_global(self, model: AdapterModel, state: Payload) -> None:
        deltas = {layer.name: state.tensors[DELTA + layer.name]
                  for layer in self.layers(state.tensors)}
        load_dense(model, deltas, head_of(state.tensors))

    # ---- client half ---------------------------------------------------------------------
    def load(self, model: AdapterModel, payload: Payload, client_state: ClientState) -> None:
        """Merge the downlink into this client's base and start a fresh adapter. A client that
        holds no merged base the downlink builds on (its state was lost) keeps W0, uploads zeros
        marked synced -1 and reports ``needs_sync`` = 1; the server sends it the dense sum
        next time."""
        merged = merged_update(model, payload, client_state)
        if merged is None:
            for key in [k for k in client_state.tensors if k.startswith(DELTA)]:
                del client_state.tensors[key]
            client_state.values[SYNCED] = -1
            client_state.values[LOST] = 1
        for layer, delta in (merged or {}).items():
            model.set_base_delta(layer, delta)
            client_state.tensors[DELTA + layer] = delta
        if merged is not None:
            client_state.values[SYNCED] = int(payload.scalars[ROUND])
        seed = int(payload.scalars[SEED])
        fresh = dict(head_of(payload.tensors))
        for i, name in enumerate(sorted(model.pairs)):
            pair, param = model.pairs[name], model.params[model.pairs[name].a_key]
            a = init_a(model.rank, param.shape[1], seed_of(seed, i))
            fresh[pair.a_key] = a.to(param.dtype)
            fresh[pair.b_key] = torch.zeros_like(model.params[pair.b_key], device="cpu")
        model.load(fresh)

    def uplink(self, model: AdapterModel, payload: Payload, client_state: ClientState) -> Payload:
        if client_state.values.get(LOST):  # trained on W0: nothing the server may stack
            zeros = {k: torch.zeros_like(v) for k, v in model.state().items()}
            return Payload(zeros, {SYNCED: -1})
        return Payload(model.state(), {SYNCED: int(client_state.values[SYNCED])})

    def client_metrics(self, client_state: ClientState) -> dict[str, float]:
        return {NEEDS_SYNC: 1.0} if client_state.values.pop(LOST, 0) else {}


def merged_update(model: AdapterModel, payload: Payload,
                  client_state: ClientState) -> dict[str, torch.Tensor] | None:
    """W - W0 per layer after applying the downlink to what this client merged before; None
    when the client does not hold the merged base the downlink builds on (its client state was
    lost, or is from another run)."""
    dense = {k[len(DELTA):]: v for k, v in payload.tensors.items() if k.startswith(DELTA)}
    if dense:
        return {layer: t.clone() for layer, t in dense.items()}
    synced = int(client_state.values.get(SYNCED, 0))
    start, now = int(payload.scalars[FROM]), int(payload.scalars[ROUND])
    if synced < start or synced > now:
        return None
    merged = {}
    for name in model.pairs:
        weight = model.base_weight(name)
        delta = client_state.tensors.get(DELTA + name)
        merged[name] = (delta.clone() if delta is not None
                        else torch.zeros(weight.shape, dtype=weight.dtype))
        for t in range(synced + 1, now + 1):
            b, a = payload.tensors[hist_key(t, "B", name)], payload.tensors[hist_key(t, "A", name)]
            merged[name] += (b.double() @ a.double()).to(merged[name].dtype)
    return merged


def stack(layer: Layer, uploads: list[Upload], weights: list[float],
          alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B_stack, A_stack) in float64 with B_stack A_stack = sum_k p_k s_k B_k A_k."""
    bs, as_ = [], []
    for p, upload in zip(weights, uploads, strict=True):
        a = upload.payload.tensors[layer.a_key].double()
        bs.append(upload.payload.tensors[layer.b_key].double())
        as_.append(p * scale(alpha, a.shape[0]) * a)
    return torch.cat(bs, dim=1), torch.cat(as_, dim=0)


def hist_round(key: str) -> int:
    return int(key.split(".")[2])


def history_floats(tensors: dict[str, torch.Tensor], rounds: list[int]) -> int:
    return sum(v.numel() for k, v in tensors.items()
               if k.startswith("flora.hist.") and hist_round(k) in rounds)


def dense_floats(layers: list[Layer]) -> int:
    return sum(layer.d_in * layer.d_out for layer in layers)


def drop_old_history(tensors: dict[str, torch.Tensor], layers: list[Layer], now: int) -> None:
    """Keep the newest rounds whose factors together hold no more numbers than the dense sum:
    a client missing older rounds gets the dense sum anyway."""
    rounds = sorted({hist_round(k) for k in tensors if k.startswith("flora.hist.")}, reverse=True)
    keep, total = set(), 0
    for t in rounds:
        total += history_floats(tensors, [t])
        if total > dense_floats(layers):
            break
        keep.add(t)
    for key in [k for k in tensors if k.startswith("flora.hist.") and hist_round(k) not in keep]:
        del tensors[key]
