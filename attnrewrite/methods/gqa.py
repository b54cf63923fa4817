"""Grouped-query attention helpers shared by the methods: repeat key/value heads, and back."""

from __future__ import annotations

import torch


def expand_gqa(q: torch.Tensor, x: torch.Tensor, enable_gqa: bool) -> torch.Tensor:
    """Repeat key/value heads for grouped-query attention, as SDPA's enable_gqa does."""
    if not enable_gqa or x.dim() < 3 or x.shape[-3] == q.shape[-3]:
        return x
    return x.repeat_interleave(q.shape[-3] // x.shape[-3], dim=-3)


def reduce_gqa(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The adjoint of `expand_gqa`: sum the gradients of the repeated heads."""
    if grad.shape == like.shape:
        return grad
    heads = like.shape[-3]
    return grad.unflatten(-3, (heads, grad.shape[-3] // heads)).sum(-3)
