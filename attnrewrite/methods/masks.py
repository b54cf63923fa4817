"""Mask handling shared by the approximate methods: which SDPA masks are key-padding masks."""

from __future__ import annotations

import warnings

import torch

_WARNED: set[str] = set()


def key_mask_terms(
    attn_mask: torch.Tensor, batch: tuple[int, ...], n: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(key_bias, query_weight), each (*batch, n), from an SDPA mask that only depends on the key.

    A bool mask (True = attend) becomes a 0/−inf bias; a float mask is the bias itself. Keys whose
    mask is False, −inf or at most the mask dtype's finfo.min (the value Hugging Face uses) count
    as masked for the query weights. A mask with a query axis is accepted when all its rows are
    equal (as Hugging Face's expanded padding masks are); None when they are not.
    """
    if attn_mask.dim() >= 2 and attn_mask.shape[-2] != 1:
        first_row = attn_mask[..., :1, :]
        if not torch.equal(attn_mask, first_row.expand_as(attn_mask)):
            return None
        attn_mask = first_row
    attn_mask = attn_mask.broadcast_to(*batch, 1, n).squeeze(-2)
    if attn_mask.dtype == torch.bool:
        key_bias = torch.zeros(attn_mask.shape, device=attn_mask.device, dtype=dtype).masked_fill(
            ~attn_mask, float("-inf")
        )
        masked = ~attn_mask
    else:
        key_bias = attn_mask.to(dtype)
        masked = attn_mask <= torch.finfo(attn_mask.dtype).min
    return key_bias, (~masked).to(dtype)


def warn_exact_fallback(method: str) -> None:
    """Warn once per method that a site got a mask it cannot honor and ran exact attention."""
    if method in _WARNED:
        return
    _WARNED.add(method)
    warnings.warn(
        f"attnrewrite: a {method} site received a mask that differs between queries (not a "
        "key-padding mask); it ran exact attention instead. This warning is shown once.",
        RuntimeWarning,
        stacklevel=3,
    )
