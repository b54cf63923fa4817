"""ZeroS attention in plain PyTorch, O(N²): the executable spec (Lu et al., arXiv 2602.05230).

Notation follows the paper and docs/methods.md#zeros. For query t, S_t is the set of keys it may
use (i ≤ t when causal, every key otherwise, masked keys never), n_t = |S_t|, and s_i is the scalar
logit of key i (it depends on the key alone, which is what makes ZeroS linear):

  s̄_t = (1/n_t) Σ_{i∈S_t} s_i,          δ_{t,i} = s_i − s̄_t,
  ε_{t,i} = softmax_{S_t}(s)_i − 1/n_t − δ_{t,i}/n_t,
  w_{t,i} = σ¹_t · δ_{t,i}/n_t + σʰ_t · ε_{t,i}          (Σ_{i∈S_t} w_{t,i} = 0 exactly),
  o_t = Σ_{i∈S_t} w_{t,i} · cosθ_{t,i} · v_i,           cosθ_{t,i} = q̂_t · k̂_i,

with q̂, k̂ the L2-normalized queries and keys and σ¹_t, σʰ_t the query's gates in [0, 1]. There is no
denominator; the layer's per-head LayerNorm follows (not part of this op). A query with no allowed
key (n_t = 0) gets o_t = 0, the empty sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: The L2 normalization's floor on ‖x‖ (F.normalize's default); the kernels use the same value.
NORM_EPS = 1e-12


def allowed_keys(
    n_queries: int,
    n_keys: int,
    is_causal: bool,
    key_valid: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """Bool (..., Nq, Nk): key i is in S_t. Causal means i ≤ t (SDPA's top-left alignment)."""
    allowed = torch.ones(n_queries, n_keys, dtype=torch.bool, device=device)
    if is_causal:
        allowed = allowed.tril()
    if key_valid is not None:
        allowed = allowed & key_valid[..., None, :]
    return allowed


def zeros_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_logits: torch.Tensor,
    gate_first: torch.Tensor,
    gate_residual: torch.Tensor,
    *,
    is_causal: bool = False,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """ZeroS attention of q (..., Nq, d), k (..., Nk, d), v (..., Nk, dv); statistics in fp32.

    key_logits: s (..., Nk); gate_first: σ¹ (..., Nq); gate_residual: σʰ (..., Nq).
    key_valid: bool broadcastable to (..., Nk), True at the keys queries may use (None: every
    key).
    """
    stats = torch.promote_types(q.dtype, torch.float32)  # fp32 statistics for fp16/bf16
    q_hat = F.normalize(q.to(stats), dim=-1, eps=NORM_EPS)
    k_hat = F.normalize(k.to(stats), dim=-1, eps=NORM_EPS)
    cos_theta = q_hat @ k_hat.transpose(-2, -1)
    in_s = allowed_keys(q.shape[-2], k.shape[-2], is_causal, key_valid, q.device)
    in_s = in_s.expand(cos_theta.shape)

    s = key_logits.to(stats)[..., None, :].expand(cos_theta.shape)
    n = in_s.sum(dim=-1, keepdim=True).to(stats)
    n_safe = n.clamp_min(1.0)
    s_bar = torch.where(in_s, s, 0.0).sum(dim=-1, keepdim=True) / n_safe
    delta = s - s_bar
    # An empty S_t would make the softmax 0/0: give it finite logits; its weights are zeroed below.
    empty_row = n == 0
    logits = torch.where(in_s | empty_row, s, float("-inf"))
    softmax = torch.softmax(logits, dim=-1)
    epsilon = softmax - 1.0 / n_safe - delta / n_safe

    sigma_1 = gate_first.to(stats)[..., None]
    sigma_h = gate_residual.to(stats)[..., None]
    w = sigma_1 * delta / n_safe + sigma_h * epsilon
    w = torch.where(in_s, w, 0.0)
    o = (w * cos_theta) @ v.to(stats)
    return o.to(q.dtype)
