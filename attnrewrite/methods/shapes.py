"""SDPA's size conventions shared by the methods: the default scale, and calls with nothing to
compute."""

from __future__ import annotations

import math

import torch


def softmax_scale(scale: float | None, head_dim: int) -> float:
    """`scale`, else SDPA's 1/√d. With d = 0 every q·k is an empty sum, 0 whatever multiplies it
    (SDPA's attention is then softmax of the mask alone): 1 stands in for 1/√0."""
    if scale is not None:
        return scale
    return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0


def has_no_output(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether attention of q (..., Nq, d) and v (..., Nk, dv) has no output element (an empty
    batch, no heads, no query, or dv = 0): the ops return that empty output and zero gradients
    without running, since their chunking and reshapes assume a sequence to work on."""
    return math.prod(q.shape[:-1]) * v.shape[-1] == 0
