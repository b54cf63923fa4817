"""Mask handling shared by the approximate methods: which SDPA masks are key-padding masks."""

from __future__ import annotations

import math

import torch

from ..errors import UnsupportedInputError, warn_once


def per_token(x: torch.Tensor | None, batch: tuple[int, ...], n: int) -> torch.Tensor | None:
    """A per-token term broadcastable to (*batch, n) (key bias, query validity) as (g, n) with
    g = prod(batch), the stages' flat layout; None stays None."""
    return None if x is None else x.broadcast_to(*batch, n).reshape(math.prod(batch), n)


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


def site_mask_terms(
    attn_mask: torch.Tensor,
    batch: tuple[int, ...],
    n_queries: int,
    n_keys: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
    """(key_bias, key_valid, is_causal) for an SDPA mask the approximate methods honor exactly;
    None for any other.

    Honored: a key-padding mask (`key_mask_terms`: a mask whose rows are all equal), and a
    (…, N, N) mask that is a causal mask combined with a key-padding mask, as decoder models
    build them (`is_causal_padding_mask`): the method then runs its causal form with the last
    row's key terms. key_bias (…, Nk) is the additive per-key bias, key_valid (…, Nk) marks the
    unmasked keys.
    """
    terms = key_mask_terms(attn_mask, batch, n_keys, dtype)
    if terms is None:
        if attn_mask.dim() < 2 or n_queries != n_keys or attn_mask.shape[-2] != n_queries:
            return None
        if not bool(is_causal_padding_mask(attn_mask)):
            return None
        key_bias, query_weight = key_mask_terms(attn_mask[..., -1:, :], batch, n_keys, dtype)
        return key_bias, query_weight > 0, True
    key_bias, query_weight = terms
    return key_bias, query_weight > 0, False


def self_attention_mask_terms(
    method: str,
    attn_mask: torch.Tensor,
    batch: tuple[int, ...],
    n: int,
    dtype: torch.dtype,
    fallback: bool,
) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
    """`site_mask_terms` for a method whose queries and keys are the same N tokens; for any other
    mask, None after a one-time warning when `fallback` lets the site run exact attention, and
    otherwise an error naming the masks `method` honors."""
    terms = site_mask_terms(attn_mask, batch, n, n, dtype)
    if terms is None:
        if not fallback:
            raise UnsupportedInputError(
                f"{method} honors key-padding masks (a mask whose rows are all equal, e.g. shape "
                "(B, 1, 1, N)) and causal masks combined with key padding; this mask is neither. "
                "Use method='sdpa' for it."
            )
        warn_exact_fallback(method)
    return terms


def is_causal_padding_mask(attn_mask: torch.Tensor) -> torch.Tensor:
    """Whether a (…, N, N) SDPA mask is a causal mask combined with a key-padding mask: every key
    j > t masked in row t, and row t equal to the last row on keys j ≤ t. A 0-d bool tensor, not
    a bool, so that an exported graph (the ONNX lowering) decides it at run time.

    A float mask must also leave every row a key: SDPA spreads a row whose keys are all masked
    with a finite value (finfo.min, as Hugging Face's eager masks do for left padding) evenly over
    all N keys, later ones included, which no causal form reproduces.
    """
    n = attn_mask.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=attn_mask.device).tril()
    lower_equals_last_row = ((attn_mask == attn_mask[..., -1:, :]) | ~causal).all()
    if attn_mask.dtype == torch.bool:
        return (causal | ~attn_mask).all() & lower_equals_last_row
    masked = attn_mask <= torch.finfo(attn_mask.dtype).min
    every_row_sees_a_key = (~masked).any(dim=-1).all()
    return (causal | masked).all() & lower_equals_last_row & every_row_sees_a_key


def with_causal(attn_mask: torch.Tensor, n_queries: int, n_keys: int) -> torch.Tensor:
    """attn_mask with every key after its query masked too (SDPA's top-left alignment), for
    exact attention with both: some SDPA backends refuse a mask together with is_causal=True."""
    later = torch.ones(n_queries, n_keys, device=attn_mask.device, dtype=torch.bool).triu(1)
    if attn_mask.dtype == torch.bool:
        return attn_mask & ~later
    return attn_mask.masked_fill(later, -math.inf)


def warn_exact_fallback(method: str) -> None:
    """Warn once per method that a site got a mask it cannot honor and ran exact attention."""
    warn_once(
        method,
        f"a {method} site received a mask that differs between queries and is neither a "
        "key-padding mask nor causal with key padding; it ran exact attention instead.",
    )
