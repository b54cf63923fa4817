"""`attnrewrite.attention`: SDPA's signature, any method."""

from __future__ import annotations

from typing import Any

import torch

from .errors import UnsupportedInputError
from .methods import get_method


def _require_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise UnsupportedInputError(f"{name} must be a bool, got {value!r}")


def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> None:
    """Raise UnsupportedInputError naming the problem and the fix for inputs SDPA's contract
    rules out: every method checks here, before any of its own code sees the tensors."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise UnsupportedInputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 2:
            raise UnsupportedInputError(f"{name} must have shape (..., N, d), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise UnsupportedInputError(
                f"{name} must be floating point (fp16, bf16, fp32 or fp64), got {x.dtype}; "
                f"cast it, e.g. {name}.float()"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise UnsupportedInputError(
            f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one dtype"
        )
    if not (q.device == k.device == v.device):
        raise UnsupportedInputError(
            f"q, k, v are on different devices ({q.device}, {k.device}, {v.device}); move them "
            "to one device, e.g. k.to(q.device)"
        )
    _require_flag("is_causal", is_causal)
    _require_flag("enable_gqa", enable_gqa)
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float, torch.SymInt, torch.SymFloat))
    ):
        raise UnsupportedInputError(f"scale must be a float or None (None: 1/√d), got {scale!r}")
    if q.shape[-1] != k.shape[-1]:
        raise UnsupportedInputError(f"q and k head dims differ ({q.shape[-1]} vs {k.shape[-1]})")
    if k.shape[:-1] != v.shape[:-1]:
        raise UnsupportedInputError(
            f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in all but the last dim"
        )
    if q.shape[:-2] != k.shape[:-2]:
        if not enable_gqa or q.dim() < 3 or q.shape[:-3] != k.shape[:-3]:
            raise UnsupportedInputError(
                f"q {tuple(q.shape)} and k {tuple(k.shape)} batch dims differ"
                + ("" if enable_gqa else " (pass enable_gqa=True for grouped-query attention)")
            )
        if k.shape[-3] == 0 or q.shape[-3] % k.shape[-3]:
            raise UnsupportedInputError(
                f"{q.shape[-3]} query heads are not a multiple of {k.shape[-3]} key/value heads; "
                "grouped-query attention shares each key/value head among a whole group"
            )
    if attn_mask is not None:
        check_attention_mask(attn_mask, q, k)


def check_attention_mask(attn_mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
    """An SDPA mask: a bool or q-dtype tensor on q's device, broadcastable to (..., Nq, Nk)."""
    if not isinstance(attn_mask, torch.Tensor):
        raise UnsupportedInputError(
            f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}"
        )
    if attn_mask.device != q.device:
        raise UnsupportedInputError(
            f"attn_mask is on {attn_mask.device} but q is on {q.device}; move it with "
            "attn_mask.to(q.device)"
        )
    if attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
        raise UnsupportedInputError(
            f"attn_mask must be bool (True = attend) or {q.dtype} (additive), got "
            f"{attn_mask.dtype}; convert a 0/1 mask with attn_mask.bool(), an additive one with "
            "attn_mask.to(q.dtype)"
        )
    target = (*q.shape[:-1], k.shape[-2])
    try:
        # SDPA broadcasts the mask to the attention shape, never the attention to the mask's
        fits = torch.broadcast_shapes(attn_mask.shape, target) == target
    except RuntimeError:
        fits = False
    if not fits:
        raise UnsupportedInputError(
            f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to the "
            f"attention shape {target} (..., Nq, Nk); a key-padding mask is (B, 1, 1, Nk)"
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
    check_attention_inputs(q, k, v, attn_mask, is_causal, scale, enable_gqa)
    if attn_mask is not None and attn_mask.dim() < 2:  # a per-key (Nk,) mask: SDPA wants 2-D
        attn_mask = attn_mask.reshape(1, -1)
    return attention_method(q, k, v, attn_mask, is_causal, scale, enable_gqa, parsed)
