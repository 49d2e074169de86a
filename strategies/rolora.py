"""RoLoRA (Chen, Guo, Ju, Dalal, Khisti; NeurIPS 2025, arXiv 2502.01755): alternating
optimisation. In each round every client trains, and uploads, one LoRA factor only, with the other
frozen at the shared global value; the server averages that factor. Because the frozen factor is
the same on every client, the average is exact:

    B-phase:  B_bar = sum_k p_k B_k,  A unchanged   ->  B_bar A = sum_k p_k B_k A
    A-phase:  A_bar = sum_k p_k A_k,  B unchanged   ->  B A_bar = sum_k p_k B A_k

(p_k by examples; the head trains and is averaged every round, as in FedIT.) Uplink: the trained
factor and the head, half of FedIT's bytes; a robust rule replaces its mean (B A = median_k(B_k) A,
A shared), SecAgg computes it, client-level DP noises it (the frozen factor: no noise). Downlink:
both factors (a client may have missed rounds) and the phase, so clients keep no state.

Phases. The first aggregate is a B-phase, then they alternate. B-first is required: with peft's
initialisation B = 0, and the gradient of A is s B^T dL/dW = 0, so an A-phase first would train
nothing. The phase is a function of the number of aggregates the server has made (the state's
``rolora.rounds``), not of the server round number: a round that is skipped (too few replies)
does not flip it, so phases alternate strictly and a skipped B-phase at B = 0 is not followed by a
no-op A-phase. With no skipped rounds this is the paper's schedule (odd rounds B, even rounds A).

Learning rate: only one factor moves per round, and in B-phases the update s dB A with a frozen
A of entries ~1/sqrt(d_in) is FFA-LoRA's (which needs a larger step than LoRA), so the default
``default_lr`` (used when ``train.lr = 0``) is 0.01, between FedIT's 0.002 and FFA-LoRA's 0.02;
docs/results.md has the runs at this default.
"""

from __future__ import annotations

from fedpeft.core.adapters import AdapterModel, lora_pairs
from fedpeft.core.config import ConfigError

from .aggregators import robust_mean
from .base import (
    Aggregate,
    ClientProfile,
    ClientState,
    Method,
    Payload,
    Tensors,
    TrainSpec,
    Upload,
    UploadSpec,
    register,
)

ROUNDS = "rolora.rounds"  # state scalar: aggregates made so far
PHASE = "rolora.phase"  # downlink scalar: "B" or "A", the factor this round trains
PHASES = ("B", "A")


def phase_of(aggregates: int) -> str:
    """The factor the next round trains, after ``aggregates`` aggregates: B, A, B, A, ..."""
    return PHASES[aggregates % 2]


def factor_keys(keys: list[str], factor: str, method: str = "rolora") -> list[str]:
    """The keys of one factor (``"A"`` or ``"B"``) of every wrapped linear layer."""
    pairs = lora_pairs(keys, 1.0)
    if not pairs:
        raise ConfigError(f"method.name = {method!r} needs LoRA layers, but the adapter has none")
    return sorted(p.a_key if factor == "A" else p.b_key for p in pairs.values())


def trained_keys(keys: list[str], phase: str) -> list[str]:
    """What a client trains and uploads in ``phase``: that factor and the head."""
    other = set(factor_keys(keys, "A" if phase == "B" else "B"))
    return [k for k in keys if k not in other]


@register("rolora")
class RoLoRA(Method):
    """RoLoRA (Chen et al., NeurIPS 2025): alternating rounds train and average B (A frozen),
    then A (B frozen); exact, half of FedIT's uplink."""

    default_lr = 0.01
    # The aggregate is the mean of the uploaded factor (and head), the other factor kept: a
    # robust rule, secure aggregation and client-level DP (updates of the shared downlink's
    # trained factor) replace, compute or noise that mean, and the result stays exact (the
    # frozen factor is the same on every client).
    mean_aggregate = True

    # ---- server half -------------------------------------------------------------------
    def init(self, template: Tensors) -> Payload:
        factor_keys(list(template), "A")  # refuses an adapter without LoRA layers
        return Payload({k: v.clone() for k, v in template.items()}, {ROUNDS: 0})

    def downlink(self, state: Payload, profile: ClientProfile) -> Payload:
        return Payload(dict(state.tensors), {PHASE: phase_of(int(state.scalars[ROUNDS]))})

    def expected_upload(self, state: Payload, profile: ClientProfile) -> UploadSpec:
        phase = phase_of(int(state.scalars[ROUNDS]))
        return UploadSpec({k: tuple(state.tensors[k].shape)
                           for k in trained_keys(list(state.tensors), phase)})

    def aggregate(self, state: Payload, uploads: list[Upload]) -> Aggregate:
        """Average the phase's factor (and the head); the frozen factor is kept bit for bit."""
        done = int(state.scalars[ROUNDS])
        keys = trained_keys(list(state.tensors), phase_of(done))
        robust = robust_mean(self.ctx.aggregator, uploads, keys, state.tensors)
        tensors = {**state.tensors, **robust.tensors}
        return Aggregate(Payload(tensors, {**state.scalars, ROUNDS: done + 1}),
                         {**robust.metrics, "rolora_phase_b": float(phase_of(done) == "B")})

    # ---- client half -------------------------------------------------------------------
    def load(self, model: AdapterModel, payload: Payload, client_state: ClientState) -> None:
        phase = payload.scalars.get(PHASE)
        if phase not in PHASES:
            raise ValueError(f"rolora downlink without a valid phase ({PHASE!r} = {phase!r})")
        model.load(payload.tensors)
        model.set_trainable(set(trained_keys(list(model.params), str(phase))))

    def train_spec(self, model: AdapterModel) -> TrainSpec:
        """What ``load`` made trainable: the phase's factor and the head."""
        return TrainSpec(keys=set(model.trainable_keys()))

    def uplink(self, model: AdapterModel, payload: Payload, client_state: ClientState) -> Payload:
        keys = trained_keys(list(model.params), str(payload.scalars[PHASE]))
        state = model.state()
        return Payload({k: state[k] for k in keys})
