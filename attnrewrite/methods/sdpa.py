"""Exact attention, `torch.nn.functional.scaled_dot_product_attention`: the canonical form."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..site import AttentionSite
from .base import AttentionMethod, MethodOptions
from .masks import with_causal


class SDPAMethod(AttentionMethod):
    """Keeps canonical sites as they are: rewriting with it only fuses eager attention to SDPA."""

    name = "sdpa"

    def unsupported_reason(self, site: AttentionSite, options: MethodOptions) -> str | None:
        return None

    def graph_target(self) -> Any:
        return torch.ops.aten.scaled_dot_product_attention.default

    def graph_arguments(self, site, options) -> tuple[tuple[Any, ...], dict[str, Any]]:
        sdpa = site.sdpa
        assert sdpa is not None
        return (sdpa.query, sdpa.key, sdpa.value), dict(
            attn_mask=sdpa.attn_mask,
            dropout_p=sdpa.dropout_p,
            is_causal=sdpa.is_causal,
            scale=sdpa.scale,
            enable_gqa=sdpa.enable_gqa,
        )

    def __call__(self, q, k, v, attn_mask, is_causal, scale, enable_gqa, options):
        if is_causal and attn_mask is not None:
            attn_mask, is_causal = with_causal(attn_mask, q.shape[-2], k.shape[-2]), False
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
        )
