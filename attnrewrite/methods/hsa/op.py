"""`attnrewrite::hsa_attention`: the custom op the rewritten graphs call.

A `torch.library.custom_op` keeps compiled graphs whole (no graph break), gives `torch.export` and
the ONNX exporter one named node per site, and carries a backward so a rewritten model can be
fine-tuned. CUDA tensors run the Triton kernels (`attnrewrite.kernels.hsa`); CPU tensors run the
PyTorch reference, unless ATTNREWRITE_TRITON_CPU=1 forces the kernels (tests, with the Triton
interpreter: TRITON_INTERPRET=1 must be set before triton is imported).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ...errors import UnsupportedInputError
from ..gqa import expand_gqa, reduce_gqa
from ..masks import key_mask_terms, warn_exact_fallback
from .reference import check_branching, hierarchy, hsa_attention_reference

TRITON_CPU_VARIABLE = "ATTNREWRITE_TRITON_CPU"
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def uses_triton(q: torch.Tensor, branching: Sequence[int]) -> bool:
    """Whether these inputs run the Triton kernels (else the PyTorch reference).

    The kernels cover trees with at least one level below the root (a lone root family is plain
    softmax, left to PyTorch) whose groups below the root are at most the kernels' largest tile.
    """
    on_device = q.is_cuda or (q.device.type == "cpu" and os.environ.get(TRITON_CPU_VARIABLE) == "1")
    if not on_device or q.dtype not in TRITON_DTYPES:
        return False
    from ...kernels.hsa import MAX_GROUP

    sizes = hierarchy(q.shape[-2], branching)
    return len(sizes) > 1 and max(sizes[:-1]) <= MAX_GROUP


def _key_terms(
    q: torch.Tensor, attn_mask: torch.Tensor | None, fallback: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    """(key_bias, valid) from a key-padding mask; None when the mask differs between queries and
    `fallback` allows exact attention (otherwise that is an error)."""
    if attn_mask is None:
        return None, None
    stats = torch.promote_types(q.dtype, torch.float32)
    terms = key_mask_terms(attn_mask, tuple(q.shape[:-2]), q.shape[-2], stats)
    if terms is None:
        if not fallback:
            raise UnsupportedInputError(
                "Hierarchical Self-Attention honors key-padding masks only (a mask whose rows "
                "are all equal, e.g. shape (B, 1, 1, N)); this mask differs between queries. "
                "Use method='sdpa' for it, pass a key-padding mask, or is_causal=True for causal."
            )
        warn_exact_fallback("HSA")
        return None
    key_bias, query_weight = terms
    return key_bias, query_weight > 0


def _check_lengths(q: torch.Tensor, k: torch.Tensor) -> None:
    if q.shape[-2] != k.shape[-2]:
        raise UnsupportedInputError(
            f"Hierarchical Self-Attention needs as many queries as keys (got {q.shape[-2]} and "
            f"{k.shape[-2]}): one tree spans both. Use method='sdpa' for cross-attention."
        )


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    branching: Sequence[int],
    is_causal: bool,
    enable_gqa: bool,
    fallback: bool,
) -> torch.Tensor:
    sizes = check_branching(branching)
    _check_lengths(q, k)
    terms = _key_terms(q, attn_mask, fallback)
    if terms is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
        )
    key_bias, valid = terms
    k, v = expand_gqa(q, k, enable_gqa), expand_gqa(q, v, enable_gqa)
    if uses_triton(q, sizes):
        from ...kernels.hsa import hsa_forward

        return hsa_forward(q, k, v, key_bias, valid, scale, sizes, is_causal)
    return hsa_attention_reference(
        q, k, v, key_bias, valid, scale=scale, branching=sizes, is_causal=is_causal
    )


@torch.library.custom_op(
    "attnrewrite::hsa_attention",
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float? scale, int[] branching, "
    "bool is_causal=False, bool enable_gqa=False, bool fallback=False) -> Tensor",
)
def hsa_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    branching: Sequence[int],
    is_causal: bool = False,
    enable_gqa: bool = False,
    fallback: bool = False,
) -> torch.Tensor:
    """Hierarchical Self-Attention with SDPA's argument conventions (see `attnrewrite.attention`).

    branching: group sizes bottom-up (see `hierarchy`); required, as custom-op schemas cannot
    default a list.

    fallback: a mask that differs between queries runs exact attention with a warning (True, for
    rewritten graphs) or raises UnsupportedInputError (False, for direct calls).
    """
    return _forward(q, k, v, attn_mask, scale, branching, is_causal, enable_gqa, fallback)


@hsa_attention_op.register_fake
def _(q, k, v, attn_mask, scale, branching, is_causal=False, enable_gqa=False, fallback=False):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, *options = inputs
    ctx.has_mask = attn_mask is not None
    ctx.save_for_backward(q, k, v, *([attn_mask] if ctx.has_mask else []))
    ctx.options = tuple(options)


def _backward(ctx, grad_out):
    """Gradients for q, k, v: the Triton backward kernels where the forward ran them, else the
    reference (or the exact fallback) recomputed under autograd."""
    saved = ctx.saved_tensors
    q, k, v = saved[:3]
    attn_mask = saved[3] if ctx.has_mask else None
    scale, branching, is_causal, enable_gqa, fallback = ctx.options
    terms = _key_terms(q, attn_mask, fallback)
    if terms is not None and uses_triton(q, branching):
        from ...kernels.hsa import hsa_backward

        key_bias, valid = terms
        k_heads, v_heads = expand_gqa(q, k, enable_gqa), expand_gqa(q, v, enable_gqa)
        dq, dk, dv = hsa_backward(
            q, k_heads, v_heads, key_bias, valid, scale, tuple(branching), is_causal, grad_out
        )
        dk, dv = reduce_gqa(dk, k), reduce_gqa(dv, v)
    else:
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_() for x in (q, k, v)]
            out = _forward(*leaves, attn_mask, *ctx.options)
            dq, dk, dv = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    return dq, dk, dv, None, None, None, None, None, None


hsa_attention_op.register_autograd(_backward, setup_context=_setup_context)
