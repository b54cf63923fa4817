"""How each method's custom op becomes an ONNX function: its configuration and PyTorch body.

A body must be exportable with dynamic shapes: no data-dependent Python branches. The run-time
check that a (…, N, N) mask is a key-padding mask becomes `torch.cond`, i.e. an ONNX `If` that
runs exact attention when the rows differ, as the PyTorch op does.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UnsupportedInputError
from ..methods.hsa.reference import hsa_attention_reference
from ..methods.masks import key_mask_terms
from ..methods.monarch.reference import default_block_size, monarch_attention_reference
from .functions import FunctionSpec, TensorLayout


def _key_masked(
    approximate: Callable[..., torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float | None,
    enable_gqa: bool,
) -> torch.Tensor:
    """Run `approximate(q, k, v, key_bias, query_weight)` on a key mask; exact attention for a
    mask that varies between queries (decided in the graph, like the PyTorch op decides)."""
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    stats = torch.promote_types(q.dtype, torch.float32)

    def with_key_mask(q, k, v, mask):
        terms = (
            (None, None)
            if mask is None
            else key_mask_terms(mask[..., :1, :], tuple(q.shape[:-2]), q.shape[-2], stats)
        )
        return approximate(q, k, v, *terms)

    if mask is None or mask.dim() < 2 or mask.shape[-2] == 1:
        return with_key_mask(q, k, v, mask)
    rows_equal = (mask == mask[..., :1, :]).all()
    return torch.cond(
        rows_equal,
        with_key_mask,
        lambda q, k, v, mask: F.scaled_dot_product_attention(q, k, v, mask, scale=scale),
        (q, k, v, mask),
    )


def monarch_spec(
    q: Any,
    k: Any,
    v: Any,
    attn_mask: Any = None,
    scale: float | None = None,
    block_size: int | None = None,
    num_steps: int = 2,
    pad: str = "post",
    enable_gqa: bool = False,
    fallback: bool = False,
    is_causal: bool = False,
    **unknown: Any,
) -> FunctionSpec:
    """The ONNX function of one `attnrewrite::monarch_attention` call."""
    if unknown:  # an argument this lowering does not know could change the function
        raise UnsupportedInputError(f"no ONNX lowering for monarch_attention arguments {unknown}")
    if block_size is None:
        raise UnsupportedInputError(
            "ONNX export needs a fixed Monarch block_size; export_onnx resolves it from the "
            "example length, or pass block_size=..."
        )
    approximate = functools.partial(
        _monarch_approximation,
        scale=scale,
        block_size=block_size,
        num_steps=num_steps,
        pad=pad,
        is_causal=is_causal,
    )
    inputs = [("q", TensorLayout.of(q)), ("k", TensorLayout.of(k)), ("v", TensorLayout.of(v))]
    if attn_mask is not None:
        inputs.append(("mask", TensorLayout.of(attn_mask)))
    options = (
        ("b", block_size),
        ("T", num_steps),
        ("pad", pad),
        ("causal", is_causal),
        ("scale", scale),
        ("gqa", enable_gqa),
    )
    body = functools.partial(_key_masked, approximate, scale=scale, enable_gqa=enable_gqa)
    # More than one block, and a ragged last one: the export then keeps padding and block count
    # symbolic instead of specializing them.
    example_length = 2 * block_size + (3 if block_size > 3 else 1)
    return FunctionSpec(
        "MonarchAttention", options, tuple(inputs), body, example_length=example_length
    )


def _monarch_approximation(q, k, v, key_bias, query_weight, **options):
    return monarch_attention_reference(q, k, v, key_bias, query_weight, **options)


def hsa_spec(
    q: Any,
    k: Any,
    v: Any,
    attn_mask: Any = None,
    scale: float | None = None,
    branching: tuple[int, ...] = (16, 4),
    is_causal: bool = False,
    enable_gqa: bool = False,
    fallback: bool = False,
    **_: Any,
) -> FunctionSpec:
    """The ONNX function of one `attnrewrite::hsa_attention` call."""
    branching = tuple(branching)
    approximate = functools.partial(
        _hsa_approximation, scale=scale, branching=branching, is_causal=is_causal
    )
    inputs = [("q", TensorLayout.of(q)), ("k", TensorLayout.of(k)), ("v", TensorLayout.of(v))]
    if attn_mask is not None:
        inputs.append(("mask", TensorLayout.of(attn_mask)))
    options = (
        ("branching", branching),
        ("causal", is_causal),
        ("scale", scale),
        ("gqa", enable_gqa),
    )
    body = functools.partial(_key_masked, approximate, scale=scale, enable_gqa=enable_gqa)
    # Every level of the tree present, and ragged groups: nothing specializes in the export.
    example_length = 2 * math.prod(branching) + 3
    return FunctionSpec(
        "HierarchicalSelfAttention", options, tuple(inputs), body, example_length=example_length
    )


def _hsa_approximation(q, k, v, key_bias, query_weight, **options):
    valid = None if query_weight is None else query_weight > 0
    return hsa_attention_reference(q, k, v, key_bias, valid, **options)


def _monarch_for_site(q, k, v, mask, scale, seq_len, options) -> FunctionSpec:
    if options.block_size is None and not isinstance(seq_len, int):
        raise UnsupportedInputError(
            f"the sequence length is dynamic ({seq_len}): pass an explicit block size "
            "(block_size=..., or --block-size on the command line)"
        )
    block_size = options.block_size or default_block_size(seq_len)
    return monarch_spec(q, k, v, mask, scale, block_size, options.num_steps, options.pad)


#: method name → FunctionSpec from (q, k, v, mask, scale, sequence length, parsed options),
#: for sites found in ONNX graphs
METHOD_SPECS: dict[str, Callable[..., FunctionSpec]] = {"monarch": _monarch_for_site}

#: custom op → function that builds the FunctionSpec from the op's call arguments
LOWERINGS: dict[Any, Callable[..., FunctionSpec]] = {
    torch.ops.attnrewrite.monarch_attention.default: monarch_spec,
    torch.ops.attnrewrite.hsa_attention.default: hsa_spec,
}
