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

from ...errors import UnsupportedInputError, warn_once
from ..gqa import expand_gqa, reduce_gqa
from ..masks import self_attention_mask_terms, with_causal
from ..op_context import autocast_off, autograd_inside_op, save_sdpa_like_inputs
from ..shapes import has_no_output
from .reference import (
    check_branching,
    hierarchy,
    hsa_attention_reference,
    masked_rows,
    with_masked_rows,
)

TRITON_CPU_VARIABLE = "ATTNREWRITE_TRITON_CPU"
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def uses_triton(q: torch.Tensor, branching: Sequence[int]) -> bool:
    """Whether these inputs run the Triton kernels (else the PyTorch reference).

    The kernels cover trees with at least one level below the root (a lone root family is plain
    softmax, left to PyTorch) whose groups below the root are at most the kernels' largest tile,
    and calls with an output and logits (`_forward` runs the others without a tree).
    """
    on_device = q.is_cuda or (q.device.type == "cpu" and os.environ.get(TRITON_CPU_VARIABLE) == "1")
    if not on_device or q.dtype not in TRITON_DTYPES or q.shape[-1] == 0:
        return False
    from ...kernels.hsa import MAX_GROUP

    sizes = hierarchy(q.shape[-2], branching)
    if len(sizes) > 1 and max(sizes[:-1]) > MAX_GROUP:
        warn_once(
            "hsa-group-size",
            f"the HSA Triton kernels take groups of up to {MAX_GROUP} below the root, got "
            f"branching {tuple(branching)}; HSA ran its PyTorch reference instead (the same "
            "result, slower).",
        )
        return False
    return len(sizes) > 1


def _key_terms(
    q: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool, fallback: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None, bool] | None:
    """(key_bias, valid, is_causal) from a key-padding mask, or a causal mask combined with key
    padding (then causal); None when the mask is neither and `fallback` allows exact attention
    (otherwise that is an error)."""
    if attn_mask is None:
        terms = None, None, is_causal
    else:
        stats = torch.promote_types(q.dtype, torch.float32)
        n = q.shape[-2]
        shape = tuple(q.shape[:-2])
        found = self_attention_mask_terms("HSA", attn_mask, shape, n, stats, fallback)
        if found is None:
            return None
        key_bias, valid, causal_mask = found
        terms = key_bias, valid, is_causal or causal_mask
    if terms[2]:
        return _causal_terms(terms, fallback)
    return terms


def _causal_terms(terms: tuple, fallback: bool) -> tuple | None:
    """The causal variant is not causal in the autoregressive sense: a node's aggregates a(B),
    P(A) pool every token below it, later ones too, so a row depends on the q and k of later
    tokens of its top-level group (measured up to 0.35 on random inputs). A rewritten graph
    (fallback) runs exact causal attention instead; a direct call runs it, warned."""
    if fallback:
        warn_once(
            "hsa-causal-exact",
            "an hsa site ran causal attention, which HSA's causal variant does not keep causal "
            "(later tokens reach earlier rows through the tree's aggregates); it ran exact "
            "causal attention instead.",
        )
        return None
    warn_once(
        "hsa-causal",
        "HSA's causal variant lets a row depend on later tokens of its top-level group (the "
        "tree's aggregates pool them): not for autoregressive use; method='sdpa' is exact.",
    )
    return terms


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
    if has_no_output(q, v):  # SDPA's empty output (the tree needs a sequence to work on)
        return q.new_empty((*q.shape[:-1], v.shape[-1]))
    terms = _key_terms(q, attn_mask, is_causal, fallback)
    # exact: a mask HSA cannot honor, causal attention in a graph, or d = 0 (no logits to
    # approximate: every q·k is 0, SDPA's softmax of the mask alone)
    if terms is None or q.shape[-1] == 0:
        if is_causal and attn_mask is not None:
            attn_mask = with_causal(attn_mask, q.shape[-2], k.shape[-2])
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=enable_gqa,
            is_causal=is_causal and attn_mask is None,
        )  # fmt: skip
    key_bias, valid, is_causal = terms
    k, v = expand_gqa(q, k, enable_gqa), expand_gqa(q, v, enable_gqa)
    if uses_triton(q, sizes):
        from ...kernels.hsa import hsa_forward

        out = hsa_forward(q, k, v, key_bias, valid, scale, sizes, is_causal)
    else:
        out = hsa_attention_reference(
            q, k, v, key_bias, valid, scale=scale, branching=sizes, is_causal=is_causal
        )
    return with_masked_rows(out, v, key_bias, valid, is_causal)


@torch.library.custom_op(
    "attnrewrite::hsa_attention",
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float? scale, int[] branching, "
    "bool is_causal=False, bool enable_gqa=False, bool fallback=False) -> Tensor",
)
@autocast_off
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
    out = _forward(q, k, v, attn_mask, scale, branching, is_causal, enable_gqa, fallback)
    return out.contiguous()  # as the fake implementation declares (SDPA's fallback may not be)


@hsa_attention_op.register_fake
def _(q, k, v, attn_mask, scale, branching, is_causal=False, enable_gqa=False, fallback=False):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op(
    "attnrewrite::hsa_attention_backward",
    mutates_args=(),
    schema="(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float? scale, "
    "int[] branching, bool is_causal, bool enable_gqa, bool fallback) -> (Tensor, Tensor, Tensor)",
)
@autocast_off
def hsa_attention_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    branching: Sequence[int],
    is_causal: bool,
    enable_gqa: bool,
    fallback: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `hsa_attention` for q, k, v where it ran the PyTorch reference or the exact
    fallback: that computation differentiated by autograd.

    An op of its own, so that a training graph traced by torch.compile or torch.export holds one
    opaque call: a traced reference would specialize the graph to the tree of one length.
    """
    if has_no_output(q, v):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    with autograd_inside_op():
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        out = _forward(*leaves, attn_mask, scale, branching, is_causal, enable_gqa, fallback)
        grads = torch.autograd.grad(out, leaves, grad_out, materialize_grads=True)
    return tuple(g.contiguous() for g in grads)


@hsa_attention_backward_op.register_fake
def _(grad_out, q, k, v, attn_mask, scale, branching, is_causal, enable_gqa, fallback):
    """Contiguous gradients, as the implementation returns (empty_like would keep q's strides)."""
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _masked_rows_backward(
    v: torch.Tensor,
    key_bias: torch.Tensor | None,
    valid: torch.Tensor | None,
    is_causal: bool,
    grad_out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the output gradient left for the tree, v's gradient through `masked_rows`): rows that
    see no valid key take SDPA's output, so their gradient reaches the values they average
    (by autograd: a sum or prefix sum) and not the tree."""
    with torch.enable_grad():
        v_leaf = v.detach().to(torch.promote_types(v.dtype, torch.float32)).requires_grad_()
        found = masked_rows(v_leaf, key_bias, valid, is_causal)
    if found is None:
        return grad_out, None
    rows, values = found
    grad = grad_out.to(values.dtype).masked_fill(~rows, 0.0)
    (d_v,) = torch.autograd.grad(values, v_leaf, grad)
    return grad_out.masked_fill(rows, 0.0), d_v


def _setup_context(ctx, inputs, output):
    save_sdpa_like_inputs("HSA", ctx, inputs)


def _backward(ctx, grad_out):
    """Gradients for q, k, v: the Triton backward kernels where the forward ran them (called here:
    they differentiate the tree statistics with autograd, which an op implementation cannot
    use), else `hsa_attention_backward_op`."""
    saved = ctx.saved_tensors
    q, k, v = saved[:3]
    attn_mask = saved[3] if ctx.has_mask else None
    scale, branching, is_causal, enable_gqa, fallback = ctx.options
    triton = uses_triton(q, branching) and not has_no_output(q, v)
    terms = _key_terms(q, attn_mask, is_causal, fallback) if triton else None
    if terms is not None:
        from ...kernels.hsa import hsa_backward

        key_bias, valid, is_causal = terms
        k_heads, v_heads = expand_gqa(q, k, enable_gqa), expand_gqa(q, v, enable_gqa)
        grad_out, d_v_rows = _masked_rows_backward(v_heads, key_bias, valid, is_causal, grad_out)
        dq, dk, dv = hsa_backward(
            q, k_heads, v_heads, key_bias, valid, scale, tuple(branching), is_causal, grad_out
        )
        if d_v_rows is not None:
            dv = dv + d_v_rows.to(dv.dtype)
        dk, dv = reduce_gqa(dk, k), reduce_gqa(dv, v)
    else:
        dq, dk, dv = hsa_attention_backward_op(grad_out, q, k, v, attn_mask, *ctx.options)
    return dq, dk, dv, None, None, None, None, None, None


hsa_attention_op.register_autograd(_backward, setup_context=_setup_context)
