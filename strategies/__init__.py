"""Federated methods, one module each; importing this package registers all of them."""

from . import fedit, ferret, ffa_lora, flexlora, flora, hetlora, lora_fair  # noqa: F401  (registers the methods)
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
