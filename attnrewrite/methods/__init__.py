"""The registry of attention methods: one module (or folder) per method."""

from __future__ import annotations

from ..errors import OptionError
from .base import AttentionMethod, MethodOptions
from .hsa import HSAMethod
from .monarch import MonarchMethod
from .sdpa import SDPAMethod
from .zeros import ZeroSMethod

METHODS: dict[str, AttentionMethod] = {}


def register_method(method: AttentionMethod) -> None:
    """Make `method` available by name to `rewrite`, `attention` and the compile backend."""
    METHODS[method.name] = method


def get_method(name: str) -> AttentionMethod:
    if not isinstance(name, str) or name not in METHODS:
        raise OptionError(f"unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


register_method(SDPAMethod())
register_method(MonarchMethod())
register_method(HSAMethod())
register_method(ZeroSMethod())

__all__ = ["METHODS", "AttentionMethod", "MethodOptions", "get_method", "register_method"]
