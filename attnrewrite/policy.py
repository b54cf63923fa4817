"""Policies: which attention sites a rewrite replaces. A policy maps a site to a reason to keep it
(a string) or None to replace it."""

from __future__ import annotations

import dataclasses
import fnmatch
import numbers
from collections.abc import Callable, Sequence
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
        for option, valid, item, items, example in (
            ("layers", is_index, "a layer index", "layer indices (ints ≥ 0)", "[0, 2]"),
            ("names", _is_str, "a glob pattern", "glob patterns (strs)", '["encoder.*"]'),
            ("heads", is_index, "a head index", "head indices (ints ≥ 0)", "[0, 3]"),
        ):
            _check_list(option, getattr(self, option), valid, item, items, example)
        if self.min_seq_len is not None and not is_index(self.min_seq_len):
            raise OptionError(
                f"Select(min_seq_len={self.min_seq_len!r}): min_seq_len must be an int ≥ 0, "
                "e.g. min_seq_len=512"
            )

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


def is_index(value: Any) -> bool:
    """An int ≥ 0 (numpy's too), not a bool: True would silently mean 1."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _check_list(
    option: str, value: Any, valid: Callable[[Any], bool], item: str, items: str, example: str
) -> None:
    """`value` is None or a list (any sequence but a string) of valid items; else say so."""
    if value is None:
        return
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise OptionError(
            f"Select({option}={value!r}) takes a list of {items}, e.g. Select({option}={example})"
        )
    bad = [x for x in value if not valid(x)]
    if bad:
        raise OptionError(
            f"Select({option}={value!r}): {bad[0]!r} is not {item}; the option takes a list of "
            f"{items}, e.g. Select({option}={example})"
        )


def check_policy(policy: Any) -> None:
    """A policy is None or a callable site → reason to keep it (None: replace it)."""
    if policy is not None and not callable(policy):
        raise OptionError(
            f"policy={policy!r} is not a policy: pass a callable site → reason to keep it or "
            "None, e.g. policy=attnrewrite.Select(layers=[0]) or attnrewrite.ErrorBudget(0.05), "
            "or policy=None to replace every site"
        )


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
