"""`attnrewrite::monarch_attention`: the custom op the rewritten graphs call.

A `torch.library.custom_op` keeps compiled graphs whole (no graph break), gives `torch.export` and
the ONNX exporter one named node per site, and carries a recompute-based backward so a rewritten
model can be fine-tuned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import UnsupportedInputError
from ..masks import key_mask_terms, warn_exact_fallback
from .reference import monarch_attention_reference


def _expand_gqa(q: torch.Tensor, x: torch.Tensor, enable_gqa: bool) -> torch.Tensor:
    """Repeat key/value heads for grouped-query attention, as SDPA's enable_gqa does."""
    if not enable_gqa or x.dim() < 3 or x.shape[-3] == q.shape[-3]:
        return x
    return x.repeat_interleave(q.shape[-3] // x.shape[-3], dim=-3)


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    block_size: int | None,
    num_steps: int,
    pad: str,
    enable_gqa: bool,
    fallback: bool,
) -> torch.Tensor:
    k = _expand_gqa(q, k, enable_gqa)
    v = _expand_gqa(q, v, enable_gqa)
    key_bias = query_weight = None
    if attn_mask is not None:
        stats = torch.promote_types(q.dtype, torch.float32)
        terms = key_mask_terms(attn_mask, tuple(q.shape[:-2]), q.shape[-2], stats)
        if terms is None:
            if not fallback:
                raise UnsupportedInputError(
                    "MonarchAttention honors key-padding masks only (a mask whose rows are all "
                    "equal, e.g. shape (B, 1, 1, N)); this mask differs between queries. "
                    "Use method='sdpa' for it, or pass a key-padding mask."
                )
            warn_exact_fallback("Monarch")
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
        key_bias, query_weight = terms
    return monarch_attention_reference(
        q,
        k,
        v,
        key_bias,
        query_weight,
        scale=scale,
        block_size=block_size,
        num_steps=num_steps,
        pad=pad,
    )


@torch.library.custom_op("attnrewrite::monarch_attention", mutates_args=())
def monarch_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    block_size: int | None = None,
    num_steps: int = 2,
    pad: str = "post",
    enable_gqa: bool = False,
    fallback: bool = False,
) -> torch.Tensor:
    """MonarchAttention with SDPA's argument conventions (see `attnrewrite.attention`)."""
    return _forward(q, k, v, attn_mask, scale, block_size, num_steps, pad, enable_gqa, fallback)


@monarch_attention_op.register_fake
def _(q, k, v, attn_mask=None, scale=None, block_size=None, num_steps=2, pad="post",
      enable_gqa=False, fallback=False):  # fmt: skip
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, *options = inputs
    ctx.has_mask = attn_mask is not None
    ctx.save_for_backward(q, k, v, *([attn_mask] if ctx.has_mask else []))
    ctx.options = tuple(options)


def _backward(ctx, grad_out):
    """Gradients for q, k, v by recomputing the reference forward under autograd.

    Memory grows with b (the reference keeps its b×b and M×M tiles for the backward pass).
    """
    saved = ctx.saved_tensors
    attn_mask = saved[3] if ctx.has_mask else None
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_() for x in saved[:3]]
        out = _forward(*leaves, attn_mask, *ctx.options)
        dq, dk, dv = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    return dq, dk, dv, None, None, None, None, None, None, None


monarch_attention_op.register_autograd(_backward, setup_context=_setup_context)
