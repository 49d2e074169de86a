"""Ferret (Shu et al., ICML 2025, arXiv 2409.06277): federated full-parameter tuning whose messages
are a few hundred random-projection coefficients instead of tensors. Mechanism, options and bytes:
docs/methods.md (Ferret); measurements: docs/results.md#ferret.

Client, round r: train the targets, flatten the update Delta = W_after - W_before (targets in
sorted-name order, D floats), split it into G = ceil(D / block_size) blocks and upload
c_{k,g} = a <Delta_g, u_{k,g}> as one (G, K) float32 tensor ``ferret.coef`` plus a scalar header
(the round whose seeds were used, the round the client holds; ``uplink_nbytes``). The bases have
U[-1, 1) entries from a ``torch.Generator`` seeded by (seed, round, block, first row of the chunk,
basis id), made in chunks of at most ``CHUNK_FLOATS`` numbers; the basis id is the client's
partition id (``seeds = "client"``) or SHARED. Since E[u u^T] = I/3, ``unbiased`` scaling
(a = 3 / K) gives E[Delta~] = Delta; ``reference`` (the official code, a = 1 / K) a third of it.

Server: the coefficients weighted by examples (float64 -> float32, once). Global state: the
accumulated update D_r = W_r - W_0 (``ferret.delta``), the coefficient rows (``ferret.coef.<r>``)
and basis ids (``ferret.ids.<r>``) of at most ``history`` recent rounds, each client's last synced
round. A downlink holds the rows of the rounds a client missed, or the dense D_r when that is
smaller or the rows are gone; a client without the state the downlink builds on uploads zeros
marked synced -1 with ``needs_sync`` = 1 and gets D_r the next time.

Bit-identical parameters: every party runs the same elementwise float32 code in a fixed order
(per block, basis rows accumulated with ``add_`` in row order; D_r = D_{r-1} + server_lr * Delta~;
W = W_0 + D_r), with no BLAS reduction whose order could depend on threads. Targets: ``full``
(weights and biases of the ``nn.Linear`` layers named in ``method.modules``, plus the head) or
``lora`` (every adapter tensor); W_0 of an adapter tensor is a fresh adapter (cached per process).
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
from fedpeft.core.keys import NEEDS_SYNC

from .base import (
    Aggregate,
    Bound,
    ClientProfile,
    ClientState,
    Export,
    Method,
    MethodContext,
    Payload,
    Tensors,
    TrainSpec,
    Upload,
    UploadSpec,
    register,
)
from .lowrank import seed_of, weights_by_examples

COEF, DELTA, IDS = "ferret.coef", "ferret.delta", "ferret.ids"
ROUND, RUN, FROM, SYNCED, BASIS, CLIENT = (
    "ferret.round", "ferret.run", "ferret.from", "ferret.synced", "ferret.basis_round",
    "ferret.basis_id")
PROJECT_S, RECONSTRUCT_S = "ferret.project_s", "ferret.reconstruct_s"
BASE = "base::"  # target name prefix of a base-model parameter (named_parameters name follows)
CHUNK_FLOATS = 1 << 22  # at most this many basis numbers in memory at once (16 MiB)
CACHE_ROUNDS = 4  # global states kept per process
# Default client learning rates (AdamW) per target: FedIT's on the LoRA target; on full
# weights 1e-4 measured worse than 5e-5 (noisier reconstructions).
LORA_LR, FULL_LR = 0.002, 5e-5
SHARED = -1  # basis id of a round's shared bases (every client projects on them)
LOST = "ferret.lost"  # ClientState value: this round's load found no usable global state
BEFORE = "ferret.before"  # ClientState tensor from load to uplink: the targets before training


@dataclass
class FerretOptions:
    k: int = option(54, "random basis vectors (coefficients) per block", min=1)
    block_size: int = option(4096, "floats per block of the flattened update", min=1)
    scaling: str = option("unbiased", "coefficient scale: unbiased (paper) or reference (code)",
                          choices=("unbiased", "reference"))
    target: str = option("lora", "train the LoRA adapter (+ head; default lr 0.002) or the full "
                         "weights of method.modules (+ head; default lr 5e-5)",
                         choices=("lora", "full"))
    modules: list[str] = option(["query", "key", "value", "dense"],  # noqa: RUF009 (copied)
                                "nn.Linear module names whose weight and bias train (full)")
    server_lr: float = option(1.0, "server learning rate on the reconstructed update", gt=0)
    seeds: str = option("client", "bases of a round: each client its own (client: the paper's "
                        "choice, less reconstruction variance, a downlink of every client's "
                        "coefficients) or one set shared by all (shared)",
                        choices=("client", "shared"))
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


def basis_seed(seed: int, rnd: int, block: int, start: int, basis: int) -> int:
    """The generator seed of one chunk of basis rows: the round's shared bases (``basis`` =
    SHARED) or client ``basis``'s own (its partition id)."""
    if basis == SHARED:
        return seed_of(seed, rnd, block, start, 3)
    return seed_of(seed, rnd, block, start, 4, basis)


def basis_chunks(seed: int, rnd: int, block: int, d: int, k: int,
                 basis: int = -1) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, rows) of block ``block``'s K x d basis, U[-1, 1) float32, at most
    ``CHUNK_FLOATS`` numbers at a time; each chunk has its own generator seed, so the basis does
    not depend on how it is consumed."""
    rows = max(1, CHUNK_FLOATS // d)
    for start in range(0, k, rows):
        gen = torch.Generator().manual_seed(basis_seed(seed, rnd, block, start, basis))
        chunk = torch.rand(min(rows, k - start), d, generator=gen, dtype=torch.float32)
        yield start, chunk.mul_(2.0).sub_(1.0)


def coef_scale(scaling: str, k: int) -> float:
    """a in c = a <Delta, u>: 3/K makes the reconstruction unbiased (E[u u^T] = I/3)."""
    return (3.0 if scaling == "unbiased" else 1.0) / k


def project(update: torch.Tensor, seed: int, rnd: int, k: int, block_size: int,
            scaling: str = "unbiased", basis: int = -1) -> torch.Tensor:
    """The (G, K) float32 coefficients of a flat update on the bases ``basis``."""
    update = update.to(torch.float32)
    coefs = torch.zeros(num_blocks(update.numel(), block_size), k, dtype=torch.float32)
    for g, sl in block_slices(update.numel(), block_size):
        block = update[sl]
        for start, chunk in basis_chunks(seed, rnd, g, block.numel(), k, basis):
            coefs[g, start:start + chunk.shape[0]] = chunk @ block
    return coefs * coef_scale(scaling, k)


def reconstruct_block(coefs: torch.Tensor, seed: int, rnd: int, block: int, d: int,
                      basis: int = -1, out: torch.Tensor | None = None) -> torch.Tensor:
    """``out`` (default zeros) + sum_k coefs[k] u_k in float32, row by row (deterministic: no
    BLAS reduction)."""
    out = torch.zeros(d, dtype=torch.float32) if out is None else out
    values = coefs.tolist()
    for start, chunk in basis_chunks(seed, rnd, block, d, len(values), basis):
        for j in range(chunk.shape[0]):
            out.add_(chunk[j], alpha=values[start + j])
    return out


def reconstruct(coefs: torch.Tensor, seed: int, rnd: int, total: int,
                block_size: int, basis: int = -1) -> torch.Tensor:
    """The flat update (length ``total``) that coefficients (G, K) on bases ``basis`` stand
    for."""
    out = torch.empty(total, dtype=torch.float32)
    for g, sl in block_slices(total, block_size):
        out[sl] = reconstruct_block(coefs[g], seed, rnd, g, sl.stop - sl.start, basis)
    return out


def apply_round(delta: torch.Tensor, coefs: torch.Tensor, seed: int, rnd: int, block_size: int,
                server_lr: float, bases: torch.Tensor | None = None) -> torch.Tensor:
    """D_r = D_{r-1} + server_lr * reconstruction (a new tensor; ``delta`` is never changed: it
    may be shared by many clients' states and the process cache). ``coefs``: the round's (G, K)
    coefficients on its shared bases, or (M, G, K) weighted coefficients of M clients with their
    basis ids ``bases`` (M,), summed per block in that order."""
    if coefs.dim() == 2:
        coefs, bases = coefs.unsqueeze(0), torch.tensor([SHARED])
    assert bases is not None and len(bases) == coefs.shape[0]
    ids = [int(b) for b in bases]
    out = delta.clone()
    for g, sl in block_slices(delta.numel(), block_size):
        block = torch.zeros(sl.stop - sl.start, dtype=torch.float32)
        for j, basis in enumerate(ids):
            reconstruct_block(coefs[j, g], seed, rnd, g, block.numel(), basis, out=block)
        out[sl].add_(block, alpha=server_lr)
    return out


def round_coefficients(uploads: list[Upload], seeds: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A round's (M, G, K) float32 coefficients and (M,) int64 basis ids, as every party
    applies them: the weighted mean of the uploads (M = 1, SHARED: shared seeds make it the
    coefficients of the mean update), or each client's coefficients times its weight (M clients,
    in partition order, each on its own bases)."""
    weights = torch.tensor(weights_by_examples([u.num_examples for u in uploads]),
                           dtype=torch.float64)
    stacked = torch.stack([u.payload.tensors[COEF].to(torch.float64) for u in uploads])
    if seeds == "shared":
        mean = torch.tensordot(weights, stacked, dims=1).to(torch.float32)
        return mean.unsqueeze(0), torch.tensor([SHARED], dtype=torch.int64)
    weighted = (weights.view(-1, 1, 1) * stacked).to(torch.float32)
    return weighted, torch.tensor([u.profile.partition_id for u in uploads], dtype=torch.int64)


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


def ids_key(rnd: int) -> str:
    """The basis ids of round ``rnd``'s coefficient rows (SHARED, or partition ids)."""
    return f"{IDS}.{rnd}"


def hist_round(key: str) -> int | None:
    """The round of a history key (coefficients or basis ids), else None."""
    for prefix in (COEF + ".", IDS + "."):
        if key.startswith(prefix):
            return int(key[len(prefix):])
    return None


def client_key(profile: ClientProfile) -> str:
    return f"{SYNCED}.{profile.node_id}:{profile.partition_id}"


@register("ferret")
class Ferret(Method):
    """Full-parameter tuning; clients upload K random-projection coefficients per block, all
    parties reconstruct the same update from shared seeds."""

    Options = FerretOptions
    default_lr = LORA_LR  # the default target's; each instance uses its own target's
    secagg_refusal = ("the server rebuilds and checks each client's update from its own "
                      "coefficients (a summed-coefficient variant is not implemented)")
    dp_refusal = ("ferret trains base-model weights, which fedpeft's DP-SGD (Opacus over the "
                  "adapter tensors) does not cover")

    compression_refusal = ("its uploads are random-projection coefficients that every party "
                           "expands with shared seeds; a lossy filter would corrupt every "
                           "reconstruction")
    timings = ("project_s", "reconstruct_s")

    def __init__(self, options: FerretOptions, ctx: MethodContext) -> None:
        super().__init__(options, ctx)
        # train.lr = 0: the target's own default (AdamW on full weights needs ~40x less)
        self.default_lr = FULL_LR if options.target == "full" else LORA_LR
        self.seed = options.seed if options.seed >= 0 else ctx.seed
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
        """The rounds the client missed (their coefficients and basis ids) when the server
        holds them all and they hold fewer numbers than the dense D_now, else D_now: always for
        a client that said it holds no usable state (synced -1)."""
        now = int(state.scalars[ROUND])
        synced = int(state.scalars.get(client_key(profile), 0))
        basis = SHARED if self.options.seeds == "shared" else profile.partition_id
        scalars = {ROUND: now, RUN: int(state.scalars[RUN]), FROM: synced, CLIENT: basis}
        missing = [k for r in range(synced + 1, now + 1) for k in (hist_key(r), ids_key(r))]
        if synced >= 0 and all(k in state.tensors for k in missing) and sum(
                state.tensors[k].numel() for k in missing[::2]) <= state.tensors[DELTA].numel():
            return Payload({k: state.tensors[k] for k in missing}, scalars)
        scalars[FROM] = now  # beyond the history: the dense global update, model-sized
        return Payload({DELTA: state.tensors[DELTA]}, scalars)

    def expected_upload(self, state: Payload, profile: ClientProfile) -> UploadSpec:
        """The (G, K) coefficients, projected on the bases of the round being aggregated
        (``ferret.basis_round``), from the global state of a round the server has reached
        (``ferret.synced``; -1: the client held none)."""
        total, now = state.tensors[DELTA].numel(), int(state.scalars[ROUND])
        return UploadSpec({COEF: (num_blocks(total, self.options.block_size), self.options.k)},
                          {BASIS: Bound(now + 1, now + 1, required=True),
                           SYNCED: Bound(-1, now, required=True)})

    def aggregate(self, state: Payload, uploads: list[Upload]) -> Aggregate:
        """Apply the round's coefficients. Uploads of clients that held no usable global state
        (synced -1, zero coefficients) are left out of the mean and counted as ``needs_sync``;
        the server notes them and sends them the dense global update next time."""
        now = int(state.scalars[ROUND]) + 1
        for upload in uploads:  # the server rejects these first; an invariant here
            basis = upload.payload.scalars.get(BASIS)
            if basis != now:
                raise ValueError(f"ferret: client {upload.profile.partition_id} projected on the "
                                 f"bases of round {basis}, expected {now}")
        synced = [u for u in uploads if int(u.payload.scalars.get(SYNCED, 0)) >= 0]
        if not synced:
            raise ValueError(f"ferret: none of the {len(uploads)} uploads holds the global state "
                             "(every client asked for a resynchronisation)")
        coefs, bases = round_coefficients(synced, self.options.seeds)
        tensors = {k: v for k, v in state.tensors.items() if hist_round(k) is None}
        tensors[DELTA] = apply_round(state.tensors[DELTA], coefs, self.seed, now,
                                     self.options.block_size, self.options.server_lr, bases)
        tensors.update(self._history(state.tensors, now, coefs, bases))
        scalars = {**state.scalars, ROUND: now}
        for upload in uploads:
            if SYNCED in upload.payload.scalars:
                scalars[client_key(upload.profile)] = int(upload.payload.scalars[SYNCED])
        self._remember(int(state.scalars[RUN]), now, tensors[DELTA])
        return Aggregate(Payload(tensors, scalars),
                         {NEEDS_SYNC: float(len(uploads) - len(synced))})

    def _history(self, old: Tensors, now: int, coefs: torch.Tensor,
                 bases: torch.Tensor) -> Tensors:
        """The newest rounds' coefficients and basis ids: at most ``history`` rounds, and no
        more than the dense D holds in numbers (a client missing more rounds gets D anyway)."""
        kept = {hist_key(now): coefs, ids_key(now): bases}
        room = old[DELTA].numel() - coefs.numel()
        for rnd in range(now - 1, now - self.options.history, -1):
            if hist_key(rnd) not in old or old[hist_key(rnd)].numel() > room:
                break
            room -= old[hist_key(rnd)].numel()
            kept.update({hist_key(rnd): old[hist_key(rnd)], ids_key(rnd): old[ids_key(rnd)]})
        return kept

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
    def downlink_floats(self, model: AdapterModel) -> int:
        """The most numbers a downlink to ``model`` holds (a device refuses a larger one before
        decoding it): the dense D (the history sent instead is never larger) and its ids."""
        _, total = layout(select_targets(model, self.options.target, self.options.modules))
        return 2 * total

    def load(self, model: AdapterModel, payload: Payload, client_state: ClientState) -> None:
        """Rebuild D_now and set the targets to W_0 + D_now. A client that holds no usable
        global state (lost, or from another run) trains nothing useful this round: it loads
        W_0, uploads zero coefficients marked synced -1 and reports ``needs_sync`` = 1, and the
        server sends it the dense D next time."""
        start = time.perf_counter()
        run, now = int(payload.scalars[RUN]), int(payload.scalars[ROUND])
        delta = self._global_delta(model, payload, client_state)
        if delta is None:
            client_state.tensors.pop(DELTA, None)
            for key in (RUN, SYNCED):
                client_state.values.pop(key, None)
            client_state.values[LOST] = 1
            total = layout(select_targets(model, self.options.target, self.options.modules))[1]
            self._apply(model, torch.zeros(total, dtype=torch.float32), trainable=False)
            return
        self._remember(run, now, delta)
        client_state.tensors[DELTA] = delta
        client_state.values.update({RUN: run, SYNCED: now})
        client_state.values.pop(LOST, None)
        self._apply(model, delta, trainable=True)
        params = select_targets(model, self.options.target, self.options.modules)
        client_state.tensors[BEFORE] = flatten(params)  # popped by uplink: never persisted
        client_state.values[RECONSTRUCT_S] = time.perf_counter() - start

    def _global_delta(self, model: AdapterModel, payload: Payload,
                      client_state: ClientState) -> torch.Tensor | None:
        """D_now from the cache, the dense downlink, or a held D_s plus rounds s+1..now; None
        when this client holds no global state the downlink builds on."""
        run, now, first = (int(payload.scalars[k]) for k in (RUN, ROUND, FROM))
        if (run, now) in self._cache:
            return self._cache[(run, now)]
        if DELTA in payload.tensors:
            return payload.tensors[DELTA].to(torch.float32).clone()
        held = {r: d for (c_run, r), d in self._cache.items() if c_run == run and first <= r < now}
        synced = int(client_state.values.get(SYNCED, -1))
        if client_state.values.get(RUN) == run and first <= synced <= now \
                and DELTA in client_state.tensors:
            held.setdefault(synced, client_state.tensors[DELTA])
        if first == 0:
            total = layout(select_targets(model, self.options.target, self.options.modules))[1]
            held.setdefault(0, torch.zeros(total, dtype=torch.float32))
        if not held:
            return None
        base = max(held)
        delta = held[base]
        for rnd in range(base + 1, now + 1):
            delta = apply_round(delta, payload.tensors[hist_key(rnd)], self.seed, rnd,
                                self.options.block_size, self.options.server_lr,
                                payload.tensors[ids_key(rnd)])
        return delta

    def train_spec(self, model: AdapterModel) -> TrainSpec:
        """The adapter tensors among the targets (base weights were unfrozen by ``load``)."""
        return TrainSpec(keys={k for k in select_targets(model, self.options.target,
                                                         self.options.modules)
                               if not k.startswith(BASE)})

    def uplink(self, model: AdapterModel, payload: Payload, client_state: ClientState) -> Payload:
        """The update's coefficients on this client's bases for the next round (its own seed
        or the round's shared one, as the downlink says)."""
        start = time.perf_counter()
        params = select_targets(model, self.options.target, self.options.modules)
        before = client_state.tensors.pop(BEFORE, None)
        basis_round = int(payload.scalars[ROUND]) + 1
        if client_state.values.get(LOST):  # no usable global state: ask for a resync
            shape = (num_blocks(layout(params)[1], self.options.block_size), self.options.k)
            return Payload({COEF: torch.zeros(shape, dtype=torch.float32)},
                           {BASIS: basis_round, SYNCED: -1})
        if before is None:
            raise RuntimeError("ferret: uplink without a matching load of this client's state")
        coefs = project(flatten(params) - before, self.seed, basis_round, self.options.k,
                        self.options.block_size, self.options.scaling,
                        int(payload.scalars.get(CLIENT, SHARED)))
        client_state.values[PROJECT_S] = time.perf_counter() - start
        return Payload({COEF: coefs}, {BASIS: basis_round, SYNCED: int(payload.scalars[ROUND])})

    def client_metrics(self, client_state: ClientState) -> dict[str, float]:
        held = (PROJECT_S, RECONSTRUCT_S)  # ClientState keys of the two timings
        metrics = {name: float(client_state.values.pop(key, 0.0))
                   for name, key in zip(self.timings, held, strict=True)}
        if client_state.values.pop(LOST, 0):
            metrics[NEEDS_SYNC] = 1.0
        return metrics


def uplink_nbytes(num_coefs: int, header: int) -> int:
    """Uplink bytes: 4 per float32 coefficient plus ``header``, the constant Flower record
    overhead of the message (record names, the array's npy header, the two scalars)."""
    return 4 * num_coefs + header
