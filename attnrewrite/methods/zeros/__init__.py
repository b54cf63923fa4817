"""ZeroS zero-sum linear attention (Lu et al., NeurIPS 2025): O(N) attention with signed weights.

Not zero-shot: a rewritten site gets a small trainable adapter (adapter.py) and needs
`attnrewrite.distill` before it approximates the original attention.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
import torch.fx

from ...errors import UnsupportedInputError
from ...site import AttentionSite
from ..base import AttentionMethod, MethodOptions, check_int_option
from .adapter import ZeroSAdapter, site_mask_terms, zeros_site_attention_op
from .linear import zeros_linear
from .op import force_triton_kernels, zeros_attention, zeros_attention_op
from .reference import zeros_attention_reference

__all__ = [
    "ZeroSAdapter",
    "ZeroSMethod",
    "ZeroSOptions",
    "force_triton_kernels",
    "site_mask_terms",
    "zeros_attention",
    "zeros_attention_op",
    "zeros_attention_reference",
    "zeros_linear",
    "zeros_site_attention_op",
]


@dataclasses.dataclass(frozen=True)
class ZeroSOptions(MethodOptions):
    """qk_rank: rank of the adapters' trainable low-rank q/k updates (0: none)."""

    qk_rank: int = 0

    def check(self) -> None:
        check_int_option("qk_rank", self.qk_rank, 0, "an int ≥ 0 (0: no q/k update)")


class ZeroSMethod(AttentionMethod):
    """ZeroS at rewritten sites. Its sums run over any set of keys, so non-causal
    cross-attention (Nq ≠ Nk) is replaced too; masks as Monarch's and HSA's (`key_masks_only`)."""

    name = "zeros"
    key_masks_only = True
    options_type = ZeroSOptions

    def unsupported_reason(self, site: AttentionSite, options: MethodOptions) -> str | None:
        reason = self.approximation_reason(site, "ZeroS")
        if reason:
            return reason
        if site.q_shape is None or site.k_shape is None or site.v_shape is None:
            return "q/k/v shapes are unknown; ZeroS adapters are built per head from them"
        if len(site.q_shape) != 4:
            return (
                f"q has shape {site.q_shape}; a ZeroS adapter has per-head parameters and "
                "needs the (batch, heads, N, d) layout"
            )
        if site.is_causal and not site.same_length:
            return (
                f"causal attention with Nq={site.q_len}, Nk={site.k_len} not known equal (a KV "
                "cache): ZeroS's "
                "causal form needs Nq = Nk"
            )
        if site.enable_gqa and site.q_shape[1] % site.k_shape[1]:
            return f"{site.q_shape[1]} query heads are not a multiple of {site.k_shape[1]} kv heads"
        return None

    def resolved_options(self, site: AttentionSite, options: MethodOptions) -> dict[str, Any]:
        return {**options.as_dict(), "needs_distillation": True}

    def graph_target(self) -> Any:
        """A rewritten site calls a per-site ZeroSAdapter submodule (see `insert`)."""
        return ZeroSAdapter

    def graph_arguments(
        self, site: AttentionSite, options: MethodOptions
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        sdpa = site.sdpa
        assert sdpa is not None
        return (sdpa.query, sdpa.key, sdpa.value, sdpa.attn_mask), {}

    def insert(
        self, gm: torch.fx.GraphModule, site: AttentionSite, options: MethodOptions
    ) -> torch.fx.Node:
        """Register a ZeroSAdapter for the site on `gm` and call it with the site's q, k, v, mask.

        The submodule is named after the site (`zeros_<module path>`, made unique) and recorded in
        the report as the site option "adapter".
        """
        assert isinstance(options, ZeroSOptions) and site.sdpa is not None
        sdpa = site.sdpa
        _, heads, _, head_dim = site.q_shape
        adapter = ZeroSAdapter(
            heads, head_dim, site.v_shape[-1], is_causal=sdpa.is_causal, scale=sdpa.scale,
            enable_gqa=sdpa.enable_gqa, qk_rank=options.qk_rank,
        )  # fmt: skip
        query_value = sdpa.query.meta.get("val")
        if isinstance(query_value, torch.Tensor):
            adapter = adapter.to(query_value.device)
        base = "zeros_" + re.sub(r"\W", "_", site.name)
        name, suffix = base, 1
        while hasattr(gm, name):
            name, suffix = f"{base}_{suffix}", suffix + 1
        gm.add_submodule(name, adapter)
        site.options["adapter"] = name
        args, _ = self.graph_arguments(site, options)
        with gm.graph.inserting_before(site.sdpa_node):
            return gm.graph.call_module(name, args)

    def __call__(self, q, k, v, attn_mask, is_causal, scale, enable_gqa, options):
        raise UnsupportedInputError(
            "ZeroS needs a logit per key and two gates per query, which SDPA's arguments do not "
            "carry: call attnrewrite.zeros_attention(q, k, v, key_logits, gate_first, "
            "gate_residual), train attnrewrite.nn.ZeroSAttention, or rewrite a model with "
            "method='zeros' (trainable adapters) and then attnrewrite.distill it"
        )
