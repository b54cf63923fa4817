"""Policies: which attention sites a rewrite replaces. A policy maps a site to a reason to keep it
(a string) or None to replace it."""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Sequence
from typing import Any

import torch

from .errors import OptionError
from .site import AttentionSite, holds_for_every_call


@dataclasses.dataclass(frozen=True)
class Select:
    """Replace only the sites that match every given criterion.

    layers: layer indices (the first integer in the module path, e.g. encoder.layer.3 → 3);
    names: glob patterns on the module path; min_seq_len: shortest query length worth replacing;
    heads: replace only these heads of each selected site, the others staying exact (Monarch
    and HSA; see passes/head_split.py).
    """

    layers: Sequence[int] | None = None
    names: Sequence[str] | None = None
    min_seq_len: int | None = None
    heads: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.names, str):
            raise OptionError("Select(names=...) takes a list of glob patterns, not one string")
        if self.min_seq_len is not None and self.min_seq_len < 0:
            raise OptionError(f"min_seq_len must be ≥ 0, got {self.min_seq_len}")

    def site_options(self, site: AttentionSite) -> dict[str, Any]:
        return {} if self.heads is None else {"heads": list(self.heads)}

    def __call__(self, site: AttentionSite) -> str | None:
        if self.layers is not None and site.layer not in set(self.layers):
            return f"policy: layer {site.layer} is not in the selected layers {list(self.layers)}"
        if self.names is not None and not any(fnmatch.fnmatch(site.name, p) for p in self.names):
            return f"policy: {site.name!r} matches none of {list(self.names)}"
        if self.min_seq_len is not None and _shorter(site.q_len, self.min_seq_len):
            return f"policy: sequence length {site.q_len} < min_seq_len {self.min_seq_len}"
        return None


def _shorter(length: Any, minimum: int) -> bool:
    """length < minimum, for a static length or a symbolic one (`holds_for_every_call`: under
    Dynamo a guard, under torch.export the length's range). Otherwise refused, naming the
    fixes, rather than decided from the example's length."""
    if length is None or isinstance(length, int):
        return (length or 0) < minimum
    if isinstance(length, torch.SymInt):
        if holds_for_every_call(length >= minimum):
            return False
        if holds_for_every_call(length < minimum):
            return True
    fixes = (
        "an ONNX model's dynamic dims have no range: rewrite one exported with a static length, "
        "or the PyTorch model"
        if isinstance(length, str)
        else f"give the dynamic dim a range that decides it (torch.export.Dim(..., min={minimum}"
        "), compile with the attnrewrite backend (which recompiles per length range), or "
        "rewrite a static-length model"
    )
    raise OptionError(
        f"Select(min_seq_len={minimum}) cannot decide the dynamic sequence length {length} once "
        f"for every call: {fixes}"
    )
