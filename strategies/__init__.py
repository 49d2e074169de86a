"""Federated methods, one module each; importing this package registers all of them."""

from . import (  # noqa: F401  (importing a method's module registers it)
    fed_sb,
    fedex_lora,
    fedit,
    fedsa_lora,
    fedsvd,
    ferret,
    ffa_lora,
    flexlora,
    flora,
    hetlora,
    local,
    lora_fair,
    rolora,
)
from .base import (
    METHODS,
    RANK_KEY,
    ClientProfile,
    ClientState,
    Method,
    Payload,
    Upload,
    build_method,
    method_help,
    register,
    weighted_mean,
)

__all__ = [
    "METHODS",
    "RANK_KEY",
    "ClientProfile",
    "ClientState",
    "Method",
    "Payload",
    "Upload",
    "build_method",
    "method_help",
    "register",
    "weighted_mean",
]
