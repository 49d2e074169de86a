"""Ferret (Shu et al., ICML 2025, arXiv 2409.06277): federated full-parameter tuning whose messages
are a few hundred random-projection coefficients instead of tensors.

Client, round r: load the global model W_{r-1}, take ``train.local_steps`` first-order steps on the
targeted parameters, and flatten its update Delta = W_after - W_before (targets in sorted-name
order) into one vector of D floats. Split it into G = ceil(D / block_size) consecutive blocks; block
g of length d is projected onto K basis vectors u_{k,g} in R^d with i.i.d. U[-1, 1) entries, drawn
from a ``torch.Generator`` seeded by (seed, round, block, first row of the chunk): every party
regenerates the same basis and nothing but the coefficients travels. Bases are generated in chunks
of at most ``CHUNK_FLOATS`` numbers, never K x d at once. Uplink: one (G, K) float32 tensor
``ferret.coef`` plus the scalar header (the round whose seeds were used and the round the client
holds), i.e. 4 G K bytes plus a constant record overhead (``uplink_nbytes`` documents it).

Coefficients and scaling. The client uploads c_{k,g} = a <Delta_g, u_{k,g}>, and every party
reconstructs Delta~_g = sum_k c_{k,g} u_{k,g}. Since E[u u^T] = I/3:
- ``unbiased`` (the paper's Theorem 1, default): a = 3 / K, so E[Delta~] = Delta;
- ``reference`` (allen4747/Ferret's code): a = 1 / K, i.e. gamma = (d/K) <Delta, v> with
  v = u / sqrt(d), so E[Delta~] = Delta / 3 (its server lr of 10 absorbs the factor).
The reconstruction error is E||Delta~_g - Delta_g||^2 ~ (d/K) ||Delta_g||^2 (unbiased), so over
all blocks it depends on the total coefficient count G K = D K / block_size only, while the RNG
work is K D per projection or reconstruction. Small K with small blocks gives the same variance
per uploaded number for less generation time. CPU default: K = 4 with blocks of 131072 floats
(MiniLM full target: G = 83 blocks, 332 coefficients, 1.3 KB; projection ~0.2 s and
reconstruction ~0.2 s per round on 2 cores, well under a round's training; the measured
trade-off is in simulations/results/compare_ferret.md).

Server: weighted mean of the coefficient tensors (by examples; shared seeds make this the
coefficients of the mean update), reconstruct once, W_r = W_{r-1} + server_lr * Delta~. Global
state: the accumulated update D_r = W_r - W_0 as one flat float32 vector (``ferret.delta``, for
evaluation and for clients far behind), the aggregated coefficients of the last ``history`` rounds
(``ferret.coef.<r>``), and each client's last synced round (echoed in its uploads).

Downlink and catch-up. Every client reconstructs the same global update from the aggregated
coefficients itself (which is what lets the downlink stay tiny): a client synced to round s gets
the coefficient tensors of rounds s+1..r (4 G K bytes each); if some of them fell out of the
history, it gets the dense D_r instead (4 D bytes, the model's size; counted by the real message).
The client applies the rounds to the D_s it holds (its ClientState, or this process's cache of
recent global states keyed by run and round, so in simulation one reconstruction per round serves
all virtual clients of a process) and sets its targets to W_0 + D_r.

Bit-identical parameters. Coefficients are aggregated once (server, float64 -> float32) and sent;
every party then runs the same code: per block, the basis rows from the same seeds, accumulated
with ``add_`` in row order in float32, then ``D_r = D_{r-1} + server_lr * Delta~`` block by block,
then W = W_0 + D. Elementwise float32 ops in a fixed order give the same bits on the same torch
build and CPU instruction set (no BLAS reductions, whose order can depend on threads).

Targets. ``full`` (Ferret's own setting): weight and bias of every ``nn.Linear`` whose module name
is in ``method.modules`` (default query, key, value, dense: all linear layers of MiniLM's encoder
and its pooler; 10.8M floats), plus the task head; LoRA tensors stay at their initialisation
(B = 0). ``lora``: every adapter tensor (LoRA A and B, head). W_0 of base weights is the model's
frozen weight (``AdapterModel.set_param_delta``, undone by ``reset_base``); W_0 of adapter tensors
is a freshly built adapter (deterministic, cached per process).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fedpeft.core.adapters import AdapterModel, build_adapter_model
from fedpeft.core.config import ModelConfig, option

from .base import (
    ClientProfile,
    ClientState,
    Export,
    Method,
    MethodContext,
    Payload,
    Tensors,
    TrainSpec,
    Upload,
    register,
)
from .lowrank import seed_of, weights_by_examples

COEF, DELTA = "ferret.coef", "ferret.delta"
ROUND, RUN, FROM, SYNCED, BASIS = (
    "ferret.round", "ferret.run", "ferret.from", "ferret.synced", "ferret.basis_round")
PROJECT_S, RECONSTRUCT_S = "ferret.project_s", "ferret.reconstruct_s"
BASE = "base::"  # target name prefix of a base-model parameter (named_parameters name follows)
CHUNK_FLOATS = 1 << 22  # at most this many basis numbers in memory at once (16 MiB)
CACHE_ROUNDS = 4  # global states kept per process


@dataclass
class FerretOptions:
    k: int = option(4, "random basis vectors (coefficients) per block", min=1)
    block_size: int = option(131072, "floats per block of the flattened update", min=1)
    scaling: str = option("unbiased", "coefficient scale: unbiased (paper) or reference (code)",
                          choices=("unbiased", "reference"))
    target: str = option("full", "train full weights of method.modules (+ head) or the LoRA "
                         "adapter", choices=("full", "lora"))
    modules: list[str] = option(["query", "key", "value", "dense"],  # noqa: RUF009 (copied)
                                "nn.Linear module names whose weight and bias train (full)")
    server_lr: float = option(1.0, "server learning rate on the reconstructed update", gt=0)
    history: int = option(64, "rounds of aggregated coefficients kept for catch-up", min=1)
    seed: int = option(-1, "seed of the random bases (-1: federation.seed)", min=-1)


@dataclass(frozen=True)
class Target:
    """One trained tensor: its name (adapter key, or BASE + parameter name) and flat slice."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# ---- the projection maths (module level: shared by both halves and the tests) ---------------
def num_blocks(total: int, block_size: int) -> int:
    return -(-total // block_size)


def block_slices(total: int, block_size: int) -> Iterator[tuple[int, slice]]:
    for g in range(num_blocks(total, block_size)):
        yield g, slice(g * block_size, min((g + 1) * block_size, total))


def basis_chunks(seed: int, rnd: int, block: int, d: int,
                 k: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, rows) of block ``block``'s K x d basis, U[-1, 1) float32, at most
    ``CHUNK_FLOATS`` numbers at a time; each chunk has its own generator seed, so the basis does
    not depend on how it is consumed."""
    rows = max(1, CHUNK_FLOATS // d)
    for start in range(0, k, rows):
        gen = torch.Generator().manual_seed(seed_of(seed, rnd, block, start, 3))
        chunk = torch.rand(min(rows, k - start), d, generator=gen, dtype=torch.float32)
        yield start, chunk.mul_(2.0).sub_(1.0)


def coef_scale(scaling: str, k: int) -> float:
    """a in c = a <Delta, u>: 3/K makes the reconstruction unbiased (E[u u^T] = I/3)."""
    return (3.0 if scaling == "unbiased" else 1.0) / k


def project(update: torch.Tensor, seed: int, rnd: int, k: int, block_size: int,
            scaling: str = "unbiased") -> torch.Tensor:
    """The (G, K) float32 coefficients of a flat update."""
    update = update.to(torch.float32)
    coefs = torch.zeros(num_blocks(update.numel(), block_size), k, dtype=torch.float32)
    for g, sl in block_slices(update.numel(), block_size):
        block = update[sl]
        for start, chunk in basis_chunks(seed, rnd, g, block.numel(), k):
            coefs[g, start:start + chunk.shape[0]] = chunk @ block
    return coefs * coef_scale(scaling, k)


def reconstruct_block(coefs: torch.Tensor, seed: int, rnd: int, block: int,
                      d: int) -> torch.Tensor:
    """sum_k coefs[k] u_k in float32, row by row (deterministic: no BLAS reduction)."""
    out = torch.zeros(d, dtype=torch.float32)
    values = coefs.tolist()
    for start, chunk in basis_chunks(seed, rnd, block, d, len(values)):
        for j in range(chunk.shape[0]):
            out.add_(chunk[j], alpha=values[start + j])
    return out


def reconstruct(coefs: torch.Tensor, seed: int, rnd: int, total: int,
                block_size: int) -> torch.Tensor:
    """The flat update (length ``total``) that coefficients (G, K) stand for."""
    out = torch.empty(total, dtype=torch.float32)
    for g, sl in block_slices(total, block_size):
        out[sl] = reconstruct_block(coefs[g], seed, rnd, g, sl.stop - sl.start)
    return out


def apply_round(delta: torch.Tensor, coefs: torch.Tensor, seed: int, rnd: int, block_size: int,
                server_lr: float) -> torch.Tensor:
    """D_r = D_{r-1} + server_lr * reconstruction (a new tensor; ``delta`` is never changed: it
    may be shared by many clients' states and the process cache)."""
    out = delta.clone()
    for g, sl in block_slices(delta.numel(), block_size):
        out[sl].add_(reconstruct_block(coefs[g], seed, rnd, g, sl.stop - sl.start),
                     alpha=server_lr)
    return out


# ---- model side: targets, pristine values, applying a global state ----------------------
def select_targets(model: AdapterModel, target: str,
                   modules: list[str]) -> dict[str, torch.nn.Parameter]:
    """name -> live parameter of every trained tensor (sorted by name)."""
    if target == "lora":
        return dict(sorted(model.params.items()))
    chosen: dict[str, torch.nn.Parameter] = {}
    skip = ("modules_to_save", "original_module")
    for mod_name, module in model.model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        parts = mod_name.split(".")
        if parts[-1] == "base_layer":
            parts = parts[:-1]
        if parts[-1] not in modules or any(p.startswith("lora_") or p in skip for p in parts):
            continue
        for pname, param in module.named_parameters(recurse=False):
            chosen[f"{BASE}{mod_name}.{pname}"] = param
    chosen.update({k: model.params[k] for k in model.head_keys})
    return dict(sorted(chosen.items()))


def layout(params: dict[str, torch.nn.Parameter]) -> tuple[list[Target], int]:
    targets, offset = [], 0
    for name, param in params.items():
        targets.append(Target(name, tuple(param.shape), offset))
        offset += param.numel()
    return targets, offset


def flatten(params: dict[str, torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).to("cpu", torch.float32) for p in params.values()])


@functools.lru_cache(maxsize=2)
def _pristine(model_json: str, num_labels: int, rank: int) -> AdapterModel:
    return build_adapter_model(ModelConfig(**json.loads(model_json)), num_labels, rank)


def pristine_model(cfg: ModelConfig, num_labels: int, rank: int) -> AdapterModel:
    """A freshly built model (W_0 of adapter tensors, the layout), one per process."""
    return _pristine(json.dumps(dataclasses.asdict(cfg), sort_keys=True), num_labels, rank)


def apply_global(model: AdapterModel, delta: torch.Tensor, pristine: AdapterModel, target: str,
                 modules: list[str], trainable: bool) -> None:
    """Set every target to W_0 + its slice of ``delta``; adapter tensors not targeted go back to
    their initial values (LoRA B = 0 under ``full``)."""
    adapter = pristine.state()
    for tgt in layout(select_targets(model, target, modules))[0]:
        part = delta[tgt.offset:tgt.offset + tgt.numel].view(tgt.shape)
        if tgt.name.startswith(BASE):
            model.set_param_delta(tgt.name[len(BASE):], part, trainable=trainable)
        else:
            adapter[tgt.name] = adapter[tgt.name] + part
    model.load(adapter)


def hist_key(rnd: int) -> str:
    return f"{COEF}.{rnd}"


def client_key(profile: ClientProfile) -> str:
    return f"{SYNCED}.{profile.node_id}:{profile.partition_id}"


@register("ferret")
class Ferret(Method):
    """Full-parameter tuning; clients upload K random-projection coefficients per block, all
    parties reconstruct the same update from shared seeds."""

    Options = FerretOptions
    default_lr = 5e-5  # AdamW on full weights: 1e-4 measured worse (noisier reconstructions)
    dp_refusal = ("ferret trains base-model weights, which fedpeft's DP-SGD (Opacus over the "
                  "adapter tensors) does not cover")

    compression_refusal = ("its uploads are random-projection coefficients that every party "
                           "expands with shared seeds; a lossy filter would corrupt every "
                           "reconstruction")
    timings = ("project_s", "reconstruct_s")

    def __init__(self, options: FerretOptions, ctx: MethodContext) -> None:
        super().__init__(options, ctx)
        self.seed = options.seed if options.seed >= 0 else ctx.seed
        self._before: tuple[int, torch.Tensor] | None = None  # (id(model), W before training)
        # Recent global states (run, round) -> D_round, shared by every client this process
        # runs: in simulation one reconstruction per round serves them all.
        self._cache: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()

    def _remember(self, run: int, rnd: int, delta: torch.Tensor) -> None:
        self._cache[(run, rnd)] = delta
        self._cache.move_to_end((run, rnd))
        while len(self._cache) > CACHE_ROUNDS:
            self._cache.popitem(last=False)

    def clear_cache(self) -> None:
        """Forget the held global states (every client then reconstructs on its own)."""
        self._cache.clear()

    def _pristine_for(self, model: AdapterModel) -> AdapterModel:
        return pristine_model(self.ctx.model, int(model.model.config.num_labels), model.rank)

    def _server_pristine(self) -> AdapterModel:
        if self.ctx.num_labels is None:
            raise RuntimeError("ferret: the server half needs the task's number of labels "
                               "(build_method(cfg, num_labels=...))")
        return pristine_model(self.ctx.model, self.ctx.num_labels, self.ctx.rank)

    def _apply(self, model: AdapterModel, delta: torch.Tensor, trainable: bool) -> None:
        opts = self.options
        apply_global(model, delta, self._pristine_for(model), opts.target, opts.modules,
                     trainable)

    # ---- server half ---------------------------------------------------------------------
    def init(self, template: Tensors) -> Payload:
        pristine = self._server_pristine()
        _, total = layout(select_targets(pristine, self.options.target, self.options.modules))
        run = int.from_bytes(os.urandom(7), "little")  # tells runs apart in a process's cache
        return Payload({DELTA: torch.zeros(total, dtype=torch.float32)}, {ROUND: 0, RUN: run})

    def downlink(self, state: Payload, profile: ClientProfile) -> Payload:
        now = int(state.scalars[ROUND])
        synced = int(state.scalars.get(client_key(profile), 0))
        scalars = {ROUND: now, RUN: int(state.scalars[RUN]), FROM: synced}
        missing = [hist_key(r) for r in range(synced + 1, now + 1)]
        if all(k in state.tensors for k in missing):
            return Payload({k: state.tensors[k] for k in missing}, scalars)
        scalars[FROM] = now  # beyond the history: the dense global update, model-sized
        return Payload({DELTA: state.tensors[DELTA]}, scalars)

    def expected_upload(self, state: Payload,
                        profile: ClientProfile) -> dict[str, tuple[int, ...]]:
        total = state.tensors[DELTA].numel()
        return {COEF: (num_blocks(total, self.options.block_size), self.options.k)}

    def check_upload(self, state: Payload, profile: ClientProfile,
                     payload: Payload) -> str | None:
        now = int(state.scalars[ROUND]) + 1
        basis = int(payload.scalars.get(BASIS, -1))
        if basis != now:
            return f"projected on the bases of round {basis}, expected {now}"
        return None

    def aggregate(self, state: Payload, uploads: list[Upload]) -> Payload:
        now = int(state.scalars[ROUND]) + 1
        for upload in uploads:  # the server rejects these first; an invariant here
            problem = self.check_upload(state, upload.profile, upload.payload)
            if problem:
                raise ValueError(f"ferret: client {upload.profile.partition_id} {problem}")
        weights = torch.tensor(weights_by_examples([u.num_examples for u in uploads]),
                               dtype=torch.float64)
        stacked = torch.stack([u.payload.tensors[COEF].to(torch.float64) for u in uploads])
        coefs = torch.tensordot(weights, stacked, dims=1).to(torch.float32)
        tensors = {k: v for k, v in state.tensors.items()
                   if not k.startswith(COEF + ".") or int(k.rsplit(".", 1)[1])
                   > now - self.options.history}
        tensors[DELTA] = apply_round(state.tensors[DELTA], coefs, self.seed, now,
                                     self.options.block_size, self.options.server_lr)
        tensors[hist_key(now)] = coefs
        scalars = dict(state.scalars)
        scalars[ROUND] = now
        for upload in uploads:
            if SYNCED in upload.payload.scalars:
                scalars[client_key(upload.profile)] = int(upload.payload.scalars[SYNCED])
        self._remember(int(state.scalars[RUN]), now, tensors[DELTA])
        return Payload(tensors, scalars)

    def export(self, state: Payload) -> Export:
        """The adapter tensors of the global model (under ``full``: the trained head and
        the untouched LoRA init; the base-weight updates stay in the checkpoint's
        ``ferret.delta``, since a LoRA adapter cannot hold a full-rank update)."""
        pristine = self._server_pristine()
        out = pristine.state()
        targets, _ = layout(select_targets(pristine, self.options.target, self.options.modules))
        delta = state.tensors[DELTA]
        for tgt in targets:
            if not tgt.name.startswith(BASE):
                out[tgt.name] = out[tgt.name] + delta[tgt.offset:tgt.offset + tgt.numel].view(
                    tgt.shape)
        if self.options.target != "full":
            return Export(out)
        return Export(out, note="a LoRA adapter cannot hold Ferret's full-weight updates: "
                      "adapter/ has the trained head only; the weight updates are in "
                      "checkpoint/ (ferret.delta)")

    def load_global(self, model: AdapterModel, state: Payload) -> None:
        self._apply(model, state.tensors[DELTA], trainable=False)

    # ---- client half ---------------------------------------------------------------------
    def load(self, model: AdapterModel, payload: Payload, client_state: ClientState) -> None:
        start = time.perf_counter()
        run, now = int(payload.scalars[RUN]), int(payload.scalars[ROUND])
        delta = self._global_delta(model, payload, client_state)
        self._remember(run, now, delta)
        client_state.tensors[DELTA] = delta
        client_state.values.update({RUN: run, SYNCED: now})
        self._apply(model, delta, trainable=True)
        params = select_targets(model, self.options.target, self.options.modules)
        self._before = (id(model), flatten(params))
        client_state.values[RECONSTRUCT_S] = time.perf_counter() - start

    def _global_delta(self, model: AdapterModel, payload: Payload,
                      client_state: ClientState) -> torch.Tensor:
        """D_now from the cache, the dense downlink, or a held D_s plus rounds s+1..now."""
        run, now, first = (int(payload.scalars[k]) for k in (RUN, ROUND, FROM))
        if (run, now) in self._cache:
            return self._cache[(run, now)]
        if DELTA in payload.tensors:
            return payload.tensors[DELTA].to(torch.float32).clone()
        held = {r: d for (c_run, r), d in self._cache.items() if c_run == run and first <= r < now}
        synced = int(client_state.values.get(SYNCED, -1))
        if client_state.values.get(RUN) == run and first <= synced <= now:
            held.setdefault(synced, client_state.tensors[DELTA])
        if first == 0:
            total = layout(select_targets(model, self.options.target, self.options.modules))[1]
            held.setdefault(0, torch.zeros(total, dtype=torch.float32))
        if not held:
            raise RuntimeError(
                f"ferret: the server sent the rounds {first + 1}..{now} for a client synced to "
                f"round {first}, but this client holds no global state of that round (its "
                "client state was lost or is from another run)")
        base = max(held)
        delta = held[base]
        for rnd in range(base + 1, now + 1):
            delta = apply_round(delta, payload.tensors[hist_key(rnd)], self.seed, rnd,
                                self.options.block_size, self.options.server_lr)
        return delta

    def train_spec(self, model: AdapterModel) -> TrainSpec:
        """The adapter tensors among the targets (base weights were unfrozen by ``load``)."""
        return TrainSpec(keys={k for k in select_targets(model, self.options.target,
                                                         self.options.modules)
                               if not k.startswith(BASE)})

    def uplink(self, model: AdapterModel, payload: Payload, client_state: ClientState) -> Payload:
        start = time.perf_counter()
        if self._before is None or self._before[0] != id(model):
            raise RuntimeError("ferret: uplink without a matching load on this model")
        params = select_targets(model, self.options.target, self.options.modules)
        update = flatten(params) - self._before[1]
        self._before = None
        basis_round = int(payload.scalars[ROUND]) + 1
        coefs = project(update, self.seed, basis_round, self.options.k, self.options.block_size,
                        self.options.scaling)
        client_state.values[PROJECT_S] = time.perf_counter() - start
        return Payload({COEF: coefs}, {BASIS: basis_round, SYNCED: int(payload.scalars[ROUND])})

    def client_metrics(self, client_state: ClientState) -> dict[str, float]:
        held = (PROJECT_S, RECONSTRUCT_S)  # ClientState keys of the two timings
        return {name: float(client_state.values.pop(key, 0.0))
                for name, key in zip(self.timings, held, strict=True)}


def uplink_nbytes(num_coefs: int, header: int) -> int:
    """Uplink bytes: 4 per float32 coefficient plus ``header``, the constant Flower record
    overhead of the message (record names, the array's npy header, the two scalars)."""
    return 4 * num_coefs + header
