"""`attnrewrite.attention`: SDPA's signature, any method."""

from __future__ import annotations

from typing import Any

import torch

from .errors import UnsupportedInputError
from .methods import get_method


def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    enable_gqa: bool,
) -> None:
    """Raise UnsupportedInputError naming the problem for inputs SDPA's contract rules out."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise UnsupportedInputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 2:
            raise UnsupportedInputError(f"{name} must have shape (..., N, d), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise UnsupportedInputError(f"{name} must be floating point, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise UnsupportedInputError(
            f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one dtype"
        )
    if not (q.device == k.device == v.device):
        raise UnsupportedInputError(
            f"q, k, v are on different devices ({q.device}, {k.device}, {v.device})"
        )
    if q.shape[-1] != k.shape[-1]:
        raise UnsupportedInputError(f"q and k head dims differ ({q.shape[-1]} vs {k.shape[-1]})")
    if k.shape[:-1] != v.shape[:-1]:
        raise UnsupportedInputError(
            f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in all but the last dim"
        )
    heads_ok = enable_gqa and q.dim() >= 3 and q.shape[-3] % k.shape[-3] == 0
    if q.shape[:-2] != k.shape[:-2] and not (heads_ok and q.shape[:-3] == k.shape[:-3]):
        raise UnsupportedInputError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} batch dims differ"
            + ("" if enable_gqa else " (pass enable_gqa=True for grouped-query attention)")
        )
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
            raise UnsupportedInputError(
                f"attn_mask must be bool (True = attend) or {q.dtype} (additive), "
                f"got {attn_mask.dtype}"
            )
        target = (*q.shape[:-1], k.shape[-2])
        try:
            torch.broadcast_shapes(attn_mask.shape, target)
        except RuntimeError:
            raise UnsupportedInputError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to the "
                f"attention shape {target}"
            ) from None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    enable_gqa: bool = False,
    method: str = "sdpa",
    **options: Any,
) -> torch.Tensor:
    """Attention with `F.scaled_dot_product_attention`'s conventions, computed by `method`.

    attn_mask: bool (True = attend) or an additive float mask, broadcastable to (..., Nq, Nk).
    method="sdpa" is exact attention; "monarch" takes block_size, num_steps, pad and honors
    key-padding masks only (a mask it cannot honor is an error, never an approximation).
    """
    attention_method = get_method(method)
    parsed = attention_method.parse_options(options)
    check_attention_inputs(q, k, v, attn_mask, enable_gqa)
    return attention_method(q, k, v, attn_mask, is_causal, scale, enable_gqa, parsed)
