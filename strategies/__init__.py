"""Federated methods, one module each; importing this package registers all of them."""

from . import fedit  # noqa: F401  (registers the method)
from .base import (
    METHODS,
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
