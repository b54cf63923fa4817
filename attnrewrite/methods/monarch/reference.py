"""MonarchAttention in plain PyTorch: the executable spec (Yaras et al., arXiv 2505.18698).

Notation: the paper's, as in docs/methods.md#monarchattention. Token n = l·b + j: block l, slot j.
The attention matrix is restricted to Monarch form A[(l,j),(k,i)] = L[j,k,l] · R[k,j,i], with L a
softmax over key blocks k and R a softmax over key slots i. MonarchAttention maximizes
⟨A, s·QKᵀ + β⟩ + H(A) over such A by exact alternating updates, never materializing A:

  R-update: aR[k,j] = Σ_l ω_(l,j) L[j,k,l] q_(l,j),  cR[k,j] = Σ_l ω_(l,j) L[j,k,l],
            R[k,j,:] = softmax_i(s · aR[k,j]·k_(k,i) / cR[k,j] + β_(k,i))
  L-update: aL[j,k] = Σ_i R[k,j,i] k_(k,i),  cL[j,k] = Σ_i R[k,j,i] (log R[k,j,i] − β_(k,i)),
            L[j,:,l] = softmax_k(s · q_(l,j)·aL[j,k] − cL[j,k])
  output:   y[j,k] = Σ_i R[k,j,i] v_(k,i),   z_(l,j) = Σ_k L[j,k,l] y[j,k]

β is an additive per-key bias (0 when there is no mask, −inf for masked or padded keys); the
paper's mask-free updates are the special case β = 0. With a bias the derivation is unchanged:
the linear term Σ L R β splits into a per-key term for R and Σ_i R β for L. ω is 1 for real,
unmasked query positions and 0 for padding and masked positions, so those drop out of the
R-update (their outputs are still computed): outputs do not depend on padding. The exception:
in a slot j with no unmasked query, ω = 1 for every real position, since R[·,j,·] then serves
masked queries only; so b ≥ N is exact on every row, a masked query's too (SDPA gives it its
attention over the unmasked keys). A key block with no valid key gets R = 0 and zero
L weight, so every output is finite. b = N and b = 1 are exact softmax attention.

Causal variant (ours; the paper has none). Query (l, j) may see key (k, i) only if
k·b + i ≤ l·b + j: every key of the earlier blocks k < l, the keys i ≤ j of its own block,
nothing later. The family is

  A[(l,j),(k,i)] = L[j,k,l] · R[k,j,i]      for k < l   (Monarch over strictly earlier blocks)
  A[(l,j),(l,i)] = Λ[j,l] · D[l,j,i]        for i ≤ j   (its own row inside the diagonal block)

with Σ_{k<l} L[j,k,l] + Λ[j,l] = 1. Maximizing ⟨A, s·QKᵀ + β⟩ + H(A) over it by exact alternating
updates gives:
  D-update: D[l,j,:] = softmax_{i≤j}(s · q_(l,j)·k_(l,i) + β_(l,i)), with log-sum-exp δ[l,j]; D
            depends on nothing else, so it is exact causal softmax inside each block, computed once,
            and its best value ⟨D, z⟩ + H(D) is δ[l,j].
  R-update: as above with the sums over the queries that use block k off the diagonal (l > k);
            R needs no causal mask since every key of block k precedes those queries.
  L-update: [L[j,:l,l], Λ[j,l]] = softmax over {k < l} ∪ {diag} of
            [s · q_(l,j)·aL[j,k] − cL[j,k],  δ[l,j]]
  output:   z_(l,j) = Σ_{k<l} L[j,k,l] y[j,k] + Λ[j,l] · Σ_{i≤j} D[l,j,i] v_(l,i)
It starts from block-local causal attention (Λ = 1, L = 0), the baseline it must beat. There R
has no weight in the objective, so any R is an exact R-update: we take L = [k = l − 1] for it
(block k's R rows from the queries of block k + 1, the nearest that use block k off the diagonal;
measured on MiniLM run causally, this init beats the paper's L = [k = l], each block's own queries,
at T = 1: 0.30 vs 0.44 relative error at b = 16–32). Every later update maximizes exactly over a set
that holds the current point, so the objective, Σ_rows lse − KL(A_row ‖ causal softmax row), never
decreases: the summed row KL divergence to exact causal attention is never above the baseline's.
b = 1 and b ≥ N are exact causal softmax attention. Only the first step runs (`causal_steps`):
a later R-update would pool the queries of every block after k into R rows that earlier blocks
read, letting a row depend on later tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..shapes import softmax_scale


def causal_steps(num_steps: int, is_causal: bool) -> int:
    """The steps the causal variant runs: one. A later R-update pools the queries of every block
    after k into block k's R rows (q̃ = Σ_{l>k} L q), which every later block reads, so a query
    would depend on tokens after it (measured: T = 2 changed earlier rows by up to 0.67 when
    later tokens changed; T = 1 by 0). The first step's R rows of block k come from block k + 1's
    queries in the reader's own slot, never after the reader: T = 1 is causal."""
    return 1 if is_causal else num_steps


def default_block_size(seq_len: int) -> int:
    """A power of two near √N, which balances the b² and M² terms of the cost."""
    if seq_len <= 1:
        return 1
    return 2 ** int(math.log2(seq_len) / 2 + 0.5)


def _softmax_and_lse(logits: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax and log-sum-exp along `dim`; an all −inf slice gives zeros and an lse of 0
    (with a zero gradient: logsumexp's own gradient on such a slice is NaN). The softmax is not
    exp(logits − lse): near finfo.min (Hugging Face's mask value) the lse rounds to the logits
    themselves, and a fully masked slice would sum to its length instead of 1."""
    empty = torch.isneginf(logits).all(dim=dim, keepdim=True)
    safe = logits.masked_fill(empty, 0.0)
    lse = torch.logsumexp(safe, dim=dim, keepdim=True).masked_fill(empty, 0.0)
    return torch.softmax(safe, dim=dim).masked_fill(empty, 0.0), lse


def _entropy_terms(
    probs: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_i p_i (log p_i − β_i) = Σ_i p_i z_i − lse for p = softmax(z + β) (Σ p = 1; an empty row,
    p = 0, gives 0), as its two terms: the L logit adds them in the order s·q·aL − Σ p z + lse,
    since with biases near finfo.min (Hugging Face's masks) Σ p z − lse alone overflows."""
    weighted = torch.where(probs > 0, probs * logits, 0.0).sum(dim=-1)
    return weighted, torch.where(probs.sum(dim=-1) > 0, lse.squeeze(-1), 0.0)


def monarch_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_bias: torch.Tensor | None = None,
    query_weight: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    block_size: int | None = None,
    num_steps: int = 2,
    pad: str = "post",
    is_causal: bool = False,
) -> torch.Tensor:
    """MonarchAttention of q, k (..., N, d) and v (..., N, dv); statistics in fp32.

    key_bias: (..., N) additive per-key bias, −inf for masked keys (None: no mask).
    query_weight: (..., N) with 1 for queries that take part in the R-update (None: all).
    pad: "post" pads N up to a multiple of b at the end, "pre" at the front.
    is_causal: the causal variant (module docstring); query n sees keys ≤ n of the padded sequence.
    """
    *batch, n, d = q.shape
    dv = v.shape[-1]
    out_dtype = q.dtype
    s = softmax_scale(scale, d)
    b = block_size if block_size is not None else default_block_size(n)
    m = max(1, math.ceil(n / b))
    n_pad = m * b - n
    groups = math.prod(batch)
    stats = torch.promote_types(q.dtype, torch.float32)  # fp32 statistics for fp16/bf16

    def flat(x: torch.Tensor, width: int) -> torch.Tensor:
        return x.reshape(groups, n, width).to(stats)

    qf, kf, vf = flat(q, d), flat(k, d), flat(v, dv)
    beta = (
        torch.zeros(groups, n, device=q.device, dtype=stats)
        if key_bias is None
        else key_bias.reshape(groups, n).to(stats)
    )
    omega = (
        torch.ones(groups, n, device=q.device, dtype=stats)
        if query_weight is None
        else query_weight.reshape(groups, n).to(stats)
    )
    present = torch.ones(groups, n, device=q.device, dtype=stats)
    if n_pad:
        front = n_pad if pad == "pre" else 0
        back = n_pad - front
        qf, kf, vf = (F.pad(x, (0, 0, front, back)) for x in (qf, kf, vf))
        beta = F.pad(beta, (front, back), value=-math.inf)
        omega, present = (F.pad(x, (front, back), value=0.0) for x in (omega, present))

    # Blocked views: [g, block, slot, feature]. Queries are indexed (l, j), keys (k, i).
    qb = qf.view(groups, m, b, d)
    kb = kf.view(groups, m, b, d)
    vb = vf.view(groups, m, b, dv)
    beta_b = beta.view(groups, m, b)
    omega_jl = omega.view(groups, m, b).transpose(1, 2)  # [g, j, l]
    unread = (omega_jl == 0).all(dim=-1, keepdim=True)  # slots no unmasked query reads
    present_jl = present.view(groups, m, b).transpose(1, 2) > 0
    omega_jl = torch.where(unread & present_jl, 1.0, omega_jl)
    empty_block = torch.isneginf(beta_b).all(dim=-1)  # [g, k]
    hidden_l = empty_block[:, None, :, None]  # L logits that are −inf: [g, 1, k, 1]
    if is_causal:
        # D-update, once: exact causal softmax inside each block, D[g, l, j, i] for i ≤ j.
        later_slot = torch.ones(b, b, device=q.device, dtype=torch.bool).triu(1)  # [j, i]
        z_d = s * torch.einsum("gljd,glid->glji", qb, kb) + beta_b[:, :, None, :]
        z_d = z_d.masked_fill(later_slot, -math.inf)
        big_d, lse_d = _softmax_and_lse(z_d, dim=-1)
        out_d = torch.einsum("glji,glid->gljd", big_d, vb)
        lse_d = lse_d.masked_fill(torch.isneginf(z_d).all(-1, keepdim=True), -math.inf)  # sees none
        not_earlier = torch.ones(m, m, device=q.device, dtype=torch.bool).tril()  # [k, l]: k ≥ l
        hidden_l = hidden_l | not_earlier

    # L[g, j, k, l], initialized to [k = l] (the first R-update is softmax inside each block), or
    # to [k = l − 1] in the causal variant.
    offset = 1 if is_causal else 0
    blocks = torch.arange(m, device=q.device)
    init_l = (blocks[:, None] == blocks[None, :] - offset).to(stats)  # [k, l]
    big_l = init_l.expand(groups, b, m, m)
    for _ in range(causal_steps(num_steps, is_causal)):
        # R-update.
        weighted_l = big_l * omega_jl[:, :, None, :]
        a_r = torch.einsum("gjkl,gljd->gkjd", weighted_l, qb)
        c_r = weighted_l.sum(dim=-1).transpose(1, 2)  # [g, k, j]
        z_r = s * torch.einsum("gkjd,gkid->gkji", a_r, kb)
        z_r = z_r / c_r.clamp_min(torch.finfo(stats).tiny)[..., None]
        big_r, lse_r = _softmax_and_lse(z_r + beta_b[:, :, None, :], dim=-1)
        # L-update. Σ_i R (log R − β) = Σ_i R (z_R − lse); terms with R = 0 vanish.
        a_l = torch.einsum("gkji,gkid->gjkd", big_r, kb)
        weighted_z, shift = (
            x.transpose(1, 2)[..., None] for x in _entropy_terms(big_r, z_r, lse_r)
        )
        logits_l = s * torch.einsum("gljd,gjkd->gjkl", qb, a_l) - weighted_z + shift  # − cL
        logits_l = logits_l.masked_fill(hidden_l, -math.inf)
        if is_causal:  # the diagonal block competes as one more entry, with logit δ[l, j]
            diag_logit = lse_d.squeeze(-1).transpose(1, 2)[:, :, None, :]  # [g, j, 1, l]
            weights, _ = _softmax_and_lse(torch.cat([logits_l, diag_logit], dim=2), dim=2)
            big_l, diag_weight = weights[:, :, :-1], weights[:, :, -1]  # Λ[g, j, l]
        else:
            big_l, _ = _softmax_and_lse(logits_l, dim=2)

    y = torch.einsum("gkji,gkid->gjkd", big_r, vb)
    z = torch.einsum("gjkl,gjkd->gljd", big_l, y)
    if is_causal:
        z = z + diag_weight.transpose(1, 2)[..., None] * out_d
    z = z.reshape(groups, m * b, dv)
    if n_pad:
        z = z[:, n_pad:] if pad == "pre" else z[:, :n]
    return z.reshape(*batch, n, dv).to(out_dtype).contiguous()
