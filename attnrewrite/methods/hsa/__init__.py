"""Hierarchical Self-Attention (Amizadeh et al., NeurIPS 2025): the KL-closest block-structured
approximation of softmax attention over a token tree, exact by dynamic programming, zero-shot."""

from __future__ import annotations

import dataclasses
from typing import Any

from ...site import AttentionSite
from ..base import CustomOpMethod, MethodOptions
from .op import hsa_attention_op
from .reference import (
    check_branching,
    hierarchy,
    hsa_attention_flops,
    hsa_attention_reference,
    softmax_attention_flops,
)

__all__ = [
    "HSAMethod",
    "HSAOptions",
    "hierarchy",
    "hsa_attention_flops",
    "hsa_attention_op",
    "hsa_attention_reference",
    "softmax_attention_flops",
]


@dataclasses.dataclass(frozen=True)
class HSAOptions(MethodOptions):
    """branching: group sizes bottom-up, each an int ≥ 2: (16, 4) = windows of 16 tokens, groups
    of 4 windows, and a root over whatever groups remain. () is one level: exact softmax. A list
    is accepted and stored as a tuple.
    """

    branching: tuple[int, ...] = (16, 4)

    def __post_init__(self) -> None:
        if isinstance(self.branching, list):
            object.__setattr__(self, "branching", tuple(self.branching))

    def check(self) -> None:
        check_branching(self.branching)


class HSAMethod(CustomOpMethod):
    name = "hsa"
    key_masks_only = True
    options_type = HSAOptions
    op = staticmethod(hsa_attention_op)
    op_name = "hsa_attention"

    def unsupported_reason(self, site: AttentionSite, options: MethodOptions) -> str | None:
        if site.runs_causal:
            return (
                "causal attention: HSA's causal variant lets a row depend on later tokens of its "
                "top-level group (the tree's aggregates pool them), so it is not offered for "
                "causal sites"
            )
        return self.tiling_reason(site, "HSA", "one HSA tree spans queries and keys alike")

    def resolved_options(self, site: AttentionSite, options: MethodOptions) -> dict[str, Any]:
        """The options plus `tree`: the family sizes the site's length gives, root last (left
        out for a symbolic length: a dynamic-shape graph must not guard on the tree)."""
        resolved = options.as_dict()
        if isinstance(site.q_len, int):
            resolved["tree"] = hierarchy(site.q_len, resolved["branching"])
        return resolved
