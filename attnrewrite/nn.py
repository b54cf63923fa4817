"""Attention layers for training from scratch: `ZeroSAttention`, the ZeroS paper's layer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import OptionError, UnsupportedInputError
from .methods.zeros.op import refuse_key_padding_mask, zeros_attention

__all__ = ["ZeroSAttention", "apply_rope", "deviation_logits"]


def deviation_logits(
    u: torch.Tensor,
    mu: torch.Tensor,
    log_prior_weight: torch.Tensor,
    *,
    is_causal: bool,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The paper's key logits s_i = −u_i·ū_i/√d, ū_i = (e^τ μ + Σ_j u_j)/(e^τ + #j).

    u (B, H, N, d); mu (H, d) and log_prior_weight τ (H,): a prior mean worth e^τ tokens. The
    sums run over j ≤ i when causal and over every token otherwise (the bidirectional reading of
    the paper's running mean), tokens where key_valid (bool, broadcastable to (B, H, N)) is
    False excluded. A token is scored by how far it deviates from the mean of its context.
    Returns (B, H, N).
    """
    weight = torch.ones(u.shape[:-1], dtype=u.dtype, device=u.device)
    if key_valid is not None:
        weight = weight * key_valid.to(u.dtype)
    weighted = u * weight[..., None]
    if is_causal:
        total, count = weighted.cumsum(dim=-2), weight.cumsum(dim=-1)
    else:
        total = weighted.sum(dim=-2, keepdim=True).expand_as(u)
        count = weight.sum(dim=-1, keepdim=True).expand_as(weight)
    prior = log_prior_weight.exp()[:, None]  # (H, 1)
    u_bar = (prior[..., None] * mu[:, None, :] + total) / (prior + count)[..., None]
    return -(u * u_bar).sum(dim=-1) / math.sqrt(u.shape[-1])


def apply_rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding of x (…, N, d), positions 0…N−1, rotating pairs (i, i + d/2)."""
    n, d = x.shape[-2:]
    half = d // 2
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = torch.arange(n, device=x.device, dtype=torch.float32)[:, None] * inv_freq
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    first, second = x[..., :half], x[..., half:]
    return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)


class ZeroSAttention(nn.Module):
    """ZeroS attention (Lu et al., NeurIPS 2025) as a layer: x (B, N, dim) → (B, N, dim).

    q, k, v projections; deviation key logits (`deviation_logits`, with learned μ and τ per
    head); per-head sigmoid gates σ¹, σʰ from the token; optional RoPE on q and k; the ZeroS op;
    a per-head LayerNorm without affine; the output projection. O(N) in the sequence length.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        head_dim: int | None = None,
        is_causal: bool = False,
        rope: bool = False,
        rope_base: float = 10000.0,
        bias: bool = False,
    ) -> None:
        super().__init__()
        sizes = (("dim", dim), ("num_heads", num_heads), ("head_dim", head_dim))
        for name, value in sizes:
            if name == "head_dim" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise OptionError(f"{name} must be a positive int, got {value!r}")
        for name, flag in (("is_causal", is_causal), ("rope", rope), ("bias", bias)):
            if not isinstance(flag, bool):
                raise OptionError(f"{name} must be a bool, got {flag!r}")
        if isinstance(rope_base, bool) or not isinstance(rope_base, (int, float)) or rope_base <= 1:
            raise OptionError(f"rope_base must be a number > 1 (RoPE's θ base), got {rope_base!r}")
        if head_dim is None:
            if dim % num_heads:
                raise OptionError(
                    f"dim={dim} is not divisible by num_heads={num_heads}; pass head_dim"
                )
            head_dim = dim // num_heads
        if rope and head_dim % 2:
            raise OptionError(f"rope needs an even head_dim, got {head_dim}")
        self.num_heads, self.head_dim = num_heads, head_dim
        self.is_causal, self.rope, self.rope_base = is_causal, rope, rope_base
        inner = num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=bias)
        self.logit_input = nn.Linear(dim, inner, bias=bias)  # u
        self.mu = nn.Parameter(torch.zeros(num_heads, head_dim))
        self.log_prior_weight = nn.Parameter(torch.zeros(num_heads))  # τ
        self.gates = nn.Linear(dim, 2 * num_heads)
        self.out = nn.Linear(inner, dim, bias=bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, H·d) → (B, H, N, d)."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        *,
        key_padding_mask: object = None,
    ) -> torch.Tensor:
        """attn_mask: (B, N) bool in SDPA's convention, True = a real token (padding is
        excluded everywhere). key_padding_mask is refused: torch reads that name with
        True = ignore."""
        refuse_key_padding_mask("ZeroSAttention", key_padding_mask)
        if attn_mask is not None and (
            not isinstance(attn_mask, torch.Tensor)
            or attn_mask.dtype != torch.bool
            or attn_mask.shape != x.shape[:2]
        ):
            got = (
                f"{attn_mask.dtype} {tuple(attn_mask.shape)}"
                if isinstance(attn_mask, torch.Tensor)
                else type(attn_mask).__name__
            )
            raise UnsupportedInputError(
                f"attn_mask must be a (B, N) = {tuple(x.shape[:2])} bool tensor (True = a real "
                f"token), got {got}"
            )
        q, k, v = (self._heads(t) for t in self.qkv(x).chunk(3, dim=-1))
        if self.rope:
            q, k = apply_rope(q, self.rope_base), apply_rope(k, self.rope_base)
        key_valid = None if attn_mask is None else attn_mask[:, None, :]
        logits = deviation_logits(
            self._heads(self.logit_input(x)), self.mu, self.log_prior_weight,
            is_causal=self.is_causal, key_valid=key_valid,
        )  # fmt: skip
        gate_first, gate_residual = torch.sigmoid(self.gates(x)).transpose(1, 2).chunk(2, dim=1)
        o = zeros_attention(q, k, v, logits, gate_first, gate_residual, is_causal=self.is_causal,
                            attn_mask=attn_mask)  # fmt: skip
        o = F.layer_norm(o, o.shape[-1:])
        return self.out(o.transpose(1, 2).flatten(2))
