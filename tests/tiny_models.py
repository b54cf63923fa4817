"""A one-layer attention encoder small enough to compile, export and train in seconds, shared by
the hardening tests (dynamic shapes, export, DDP, precision)."""

from __future__ import annotations

import torch
from torch import nn

from attnrewrite.methods.zeros import ZeroSAdapter

DIM, HEADS = 32, 4
HEAD_DIM = DIM // HEADS

#: Options per approximate method. Monarch's block size is left to the run-time length (≈ √N)
#: and HSA's small groups give a tree of three levels at every length tested.
METHOD_OPTIONS: dict[str, dict] = {"monarch": {}, "hsa": {"branching": [4, 2]}, "zeros": {}}


class Encoder(nn.Module):
    """Self-attention with an additive key-padding mask, spelled as eager encoders spell it."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.out = nn.Linear(DIM, DIM)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of shape (batch, heads, N, head_dim)."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        return q, k, v

    def merge(self, attended: torch.Tensor) -> torch.Tensor:
        """The output projection of the heads' attention output."""
        return self.out(attended.transpose(1, 2).flatten(2))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.heads(x)
        scores = q @ k.transpose(-2, -1) / HEAD_DIM**0.5 + mask
        return self.merge(torch.softmax(scores, dim=-1) @ v)


def encoder_inputs(
    batch: int, n: int, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, additive key mask): the last sequence of the batch ends in n // 4 padding tokens."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, DIM, generator=generator).to(dtype)
    mask = torch.zeros(batch, 1, 1, n, dtype=dtype)
    mask[-1, ..., n - n // 4 :] = float("-inf")
    return x, mask


def perturb_adapters(module: nn.Module, seed: int = 0) -> None:
    """Give every ZeroS adapter in `module` random weights: a fresh adapter outputs its bias (0)
    for every input, which would make comparing outputs vacuous."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in module.modules():
            if isinstance(adapter, ZeroSAdapter):
                for parameter in adapter.parameters():
                    noise = torch.randn(parameter.shape, generator=generator)
                    parameter.add_(0.5 * noise.to(parameter))
