"""Hierarchical Self-Attention in plain PyTorch: the executable spec (Amizadeh et al., arXiv
2509.15448; docs/methods.md#hierarchical-self-attention).

Tree. Tokens are the leaves. `branching` lists group sizes bottom-up: (16, 4) makes windows of 16
tokens, groups of 4 windows, and a root over whatever groups remain (`hierarchy`). N is padded at
the end with invalid tokens. ℓ(C) is the set of valid tokens under node C (masked keys and padding
are invalid), c_C = |ℓ(C)|, and q̄_C, k̄_C, v̄_C, β̄_C are means over ℓ(C) (β: additive per-key bias).
A family is a node A and its children; B, C below are always siblings in one family.

Family of matrices. For query i and key j with lowest common ancestor A, i under child B and j
under child C, the weight is one value α(B, C) for every valid i ∈ B, j ∈ C (and 0 for invalid j).
Parametrization: the mass a row i ∈ B puts outside B is a sum of α's of blocks that all rows of B
share, so the mass P(B) kept inside B is the same for every row of B. Hence every row-stochastic
matrix of the family (with P > 0) is written exactly once as
    w_B = (w_B[B], w_B[C] for C ≠ B)  a distribution per child B of each family,
    P(root) = 1,  P(B) = P(A)·w_B[B],  α(B, C) = P(A)·w_B[C] / c_C.

HSA is the member closest to softmax(S), S_ij = s·q_i·k_j + β_j, in summed KL(A_i ‖ softmax(S_i))
over valid rows i; equivalently it maximizes ⟨A, S⟩ + H(A). Derivation. Row i reaches key j by
walking down: at each family it stays in its own child B (w_B[B]) or jumps to a sibling C (w_B[C])
and then picks a key of ℓ(C) uniformly. By the chain rule of entropy and linearity of ⟨A, S⟩,
    Σ_{valid i ∈ A} (⟨A_i, S_i⟩ + H(A_i)) restricted to keys in A, with P(A) = 1, =: c_A·a(A)
splits over the children B of A into c_B·[Σ_C w_B[C]·L(B, C) + w_B[B]·a(B) + H(w_B)] with
    L(B, C) = s·q̄_B·k̄_C + β̄_C + log c_C     (the mean score of block (B, C) plus its entropy),
because Σ_{i ∈ ℓ(B)} mean_{j ∈ ℓ(C)} S_ij = c_B·(s·q̄_B·k̄_C + β̄_C). Each w_B appears in one term
only, and max_w ⟨w, x⟩ + H(w) = logsumexp(x) at w = softmax(x). So, exactly:
    bottom-up: a(leaf i) = s·q_i·k_i + β_i;  Z_B = logsumexp([a(B), L(B, C) for C ≠ B]);
               a(A) = Σ_B (c_B / c_A)·Z_B
    top-down:  w_B = softmax([a(B), L(B, C) ...]);  P(root) = 1, U(root) = 0;
               P(B) = P(A)·w_B[B];  U(B) = U(A) + P(A)·Σ_{C ≠ B} w_B[C]·v̄_C;  o_i = U(i) + P(i)·v_i.
In the leaf family L(i, j) = S_ij, so it is exact softmax over the window's keys (scaled by P).

Causal variant. The family of causal block matrices keeps only keys j ≤ i: a row of B may jump to
siblings C left of B only (all their tokens precede B's), and inside the leaf family to tokens
j ≤ i. Rows of B still share the α's of their left-sibling blocks, so the parametrization and the
derivation above hold word for word with the sums over C restricted to C < B; the target is
causal softmax. The DP is the same with the strictly upper triangle of every family masked.
It is causal in its support only, not autoregressively: a node's a(B), P(A) and means pool all
its tokens, later ones too, so a row depends on later tokens of its top-level group
(tests/test_decoder_masks.py measures it). Rewrites therefore keep causal sites (op.py).

Invalid tokens. An empty node (c_C = 0) has L(·, C) = −inf and a(C) = −inf, so it gets zero
weight as a sibling and as a child; invalid queries are left out of the means and of a(A) but
still get an output row (their leaf row uses their own q_i); a row with no valid key at all is 0
(the op gives it SDPA's output instead: `masked_rows`). The KL objective is over valid rows. A
NaN bias is a valid key with a NaN logit: every row that reaches it is NaN, as in SDPA.

Cost. A family of b children costs ≈ 4·b²·d; the leaf level dominates: O(N·b₁·d) against
softmax's O(N²·d) (`hsa_attention_flops`). No Python loop over nodes: one batched step per level.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from ...errors import OptionError
from ..masks import per_token
from ..shapes import softmax_scale


def check_branching(branching: Sequence[int]) -> tuple[int, ...]:
    """`branching` as a tuple of ints ≥ 2, or OptionError naming the problem and the fix.

    () is allowed: a one-level tree, which is exact softmax attention. A group of 1 is refused
    because it is its own parent (a level that changes nothing but costs time).
    """
    if isinstance(branching, (str, bytes)) or not isinstance(branching, Sequence):
        hint = (
            f" (for one level of windows write ({branching},))"
            if isinstance(branching, int)
            else ""
        )
        raise OptionError(
            f"branching must be a sequence of group sizes, bottom-up, e.g. (16, 4); got "
            f"{branching!r}{hint}"
        )
    sizes = tuple(branching)
    for size in sizes:
        if not isinstance(size, int) or isinstance(size, bool) or size < 2:
            raise OptionError(
                f"branching entries must be ints ≥ 2 (a group of 1 is its own parent); got "
                f"{size!r} in {sizes!r}"
            )
    return sizes


def hierarchy(n: int, branching: Sequence[int]) -> tuple[int, ...]:
    """Family sizes of the tree over n tokens, bottom-up; the last one is the root's.

    Levels stop at the first one whose nodes all fit into one group: that group is the root (a
    root with a single child would be a level that changes nothing). Padding the N tokens to
    prod(result) with invalid ones does not change HSA: empty nodes get zero weight.
    """
    sizes = []
    nodes = max(n, 1)
    for size in branching:
        if nodes <= size:
            break
        sizes.append(size)
        nodes = math.ceil(nodes / size)
    return (*sizes, nodes)


def softmax_attention_flops(n: int, d: int) -> int:
    """FLOPs of softmax attention over n tokens: 2·n²·d for Q·Kᵀ and 2·n²·d for P·V.

    Multiply-adds count 2; work without a factor d (the softmax itself) is left out, as in
    `hsa_attention_flops`, so the two compare like for like.
    """
    return 4 * n * n * d


def hsa_attention_flops(n: int, d: int, branching: Sequence[int]) -> int:
    """FLOPs of HSA over n tokens (n padded as `hierarchy` pads it), counted like softmax's.

    Per family of b children: 2·b²·d for the logits L(B, C) and 2·b²·d for Σ_C w_B[C]·v̄_C; per
    child: 2·d for U(B) = U(A) + P(A)·(…); per child below the root's family: 6·d for the parent's
    means q̄, k̄, v̄ (weight by c, add).
    """
    sizes = hierarchy(n, check_branching(branching))
    children = math.prod(sizes)
    flops = 0
    for level, size in enumerate(sizes):
        families = children // size
        flops += 4 * families * size * size * d + 2 * children * d
        if level < len(sizes) - 1:
            flops += 6 * children * d
        children = families
    return flops if n > 0 else 0


@dataclasses.dataclass
class LevelNodes:
    """Statistics of the nodes of one tree level, each (G, nodes[, d]), in the statistics dtype.

    At the leaves q̄, k̄, v̄ are the tokens themselves (an invalid query keeps its own q for its
    own row); `self_logit` is a(·), None at the leaves (there it is S_ii, a logit like the others).
    """

    q_mean: torch.Tensor
    k_mean: torch.Tensor
    v_mean: torch.Tensor
    bias_mean: torch.Tensor
    count: torch.Tensor
    self_logit: torch.Tensor | None = None

    def key_logit(self) -> torch.Tensor:
        """β̄_C + log c_C, −inf for an empty node: the key-side term of L(·, C)."""
        safe = self.count.clamp_min(1.0)
        return torch.where(self.count > 0, self.bias_mean + safe.log(), float("-inf"))


def family_logits(nodes: LevelNodes, size: int, scale: float, is_causal: bool) -> torch.Tensor:
    """Logits [G, F, b, b] of every family of `size` children: L(B, C) off the diagonal, a(B)
    on it (S_ii at the leaves), −inf for C right of B when causal."""
    groups, count = nodes.count.shape
    families = count // size

    def by_family(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(groups, families, size, *x.shape[2:])

    q_mean, k_mean = by_family(nodes.q_mean), by_family(nodes.k_mean)
    logits = (
        scale * (q_mean @ k_mean.transpose(-2, -1)) + by_family(nodes.key_logit())[..., None, :]
    )
    eye = torch.eye(size, dtype=torch.bool, device=logits.device)
    if nodes.self_logit is not None:
        logits = torch.where(eye, by_family(nodes.self_logit)[..., None], logits)
    if is_causal:
        logits = logits.masked_fill(torch.ones_like(eye).triu(1), float("-inf"))
    return logits


def softmax_and_lse(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax and logsumexp over the last dim; an all −inf row gives zeros and −inf, with
    finite gradients everywhere (the shift is detached: it does not change the result)."""
    shift = logits.amax(dim=-1, keepdim=True).detach()
    shift = torch.where(torch.isfinite(shift), shift, 0.0)
    exp = torch.exp(logits - shift)
    total = exp.sum(dim=-1, keepdim=True)
    nonzero = total > 0
    safe_total = torch.where(nonzero, total, 1.0)
    lse = torch.where(nonzero, shift + safe_total.log(), float("-inf"))
    return exp / safe_total, lse.squeeze(-1)


def parent_nodes(nodes: LevelNodes, size: int, lse: torch.Tensor) -> LevelNodes:
    """The next level up: count-weighted means of the children and a(A) = Σ_B (c_B/c_A)·Z_B."""
    groups, count = nodes.count.shape
    families = count // size
    weight = nodes.count.reshape(groups, families, size)
    total = weight.sum(dim=-1)
    safe_total = total.clamp_min(1.0)

    def mean(x: torch.Tensor) -> torch.Tensor:
        per_family = x.reshape(groups, families, size, *x.shape[2:])
        if per_family.dim() == 4:
            return (weight[..., None] * per_family).sum(dim=2) / safe_total[..., None]
        return (weight * per_family).sum(dim=2) / safe_total

    weighted_lse = torch.where(weight > 0, weight * lse, 0.0).sum(dim=-1)
    return LevelNodes(
        q_mean=mean(nodes.q_mean),
        k_mean=mean(nodes.k_mean),
        v_mean=mean(nodes.v_mean),
        bias_mean=mean(nodes.bias_mean),
        count=total,
        self_logit=torch.where(total > 0, weighted_lse / safe_total, float("-inf")),
    )


def descend(
    weights: torch.Tensor,
    v_mean: torch.Tensor,
    mass: torch.Tensor,
    carried: torch.Tensor,
    leaf: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One top-down step: (P, U) of the children [G, F·b] and [G, F·b, dv] from the parents'.

    weights: w [G, F, b, b]; v_mean: v̄ of the children [G, F·b, dv]; mass, carried: P(A), U(A)
    [G, F] and [G, F, dv]. At the leaves U(i) + P(i)·v_i is folded into one product with the
    diagonal kept, so the second result is the output and the first is P(i).
    """
    groups, families, size, _ = weights.shape
    values = v_mean.reshape(groups, families, size, v_mean.shape[-1])
    self_weight = weights.diagonal(dim1=-2, dim2=-1)
    if not leaf:
        eye = torch.eye(size, dtype=torch.bool, device=weights.device)
        weights = weights.masked_fill(eye, 0.0)
    child_carried = carried[:, :, None, :] + mass[:, :, None, None] * (weights @ values)
    child_mass = mass[:, :, None] * self_weight
    return child_mass.reshape(groups, -1), child_carried.reshape(groups, families * size, -1)


def token_terms(
    key_bias: torch.Tensor | None,
    valid: torch.Tensor | None,
    groups: int,
    n: int,
    stats: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(β, c) per token, each (G, N): the bias (0 where invalid) and 1 for valid tokens, else 0.

    A token is invalid when `valid` says False or its bias is −inf (a NaN bias stays: NaN is
    never hidden).
    """
    is_valid = torch.ones(groups, n, dtype=torch.bool, device=device)
    if valid is not None:
        is_valid = is_valid & valid.reshape(groups, n).bool()
    bias = torch.zeros(groups, n, dtype=stats, device=device)
    if key_bias is not None:
        bias = key_bias.reshape(groups, n).to(stats)
        is_valid = is_valid & (bias != float("-inf"))
        bias = torch.where(is_valid, bias, 0.0)
    return bias, is_valid.to(stats)


def masked_rows(
    v: torch.Tensor, key_bias: torch.Tensor | None, valid: torch.Tensor | None, is_causal: bool
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows, values) for the op's SDPA semantics: the rows of v's shape (..., N, dv) that see no
    valid key (rows (..., N, 1), bool), and what SDPA gives them (values (..., N, dv), in v's
    dtype); None without a bias.

    HSA gives such a row 0, but SDPA's softmax spreads it over the keys it sees that the mask
    masks with a finite value: the op's key terms (`masks.key_mask_terms`) mark those invalid
    with their finite bias, finfo.min, where every logit rounds to the bias itself, so SDPA
    gives the mean of their values (0 where there are none: −inf or bool masks). key_bias and
    valid: broadcastable to (..., N), as the op passes them to `hsa_attention_reference`; a row
    sees every key, or keys j ≤ i when causal.
    """
    if key_bias is None:
        return None
    shape = v.shape[:-1]
    bias = key_bias.broadcast_to(shape)
    is_valid = bias != float("-inf")
    if valid is not None:
        is_valid = is_valid & valid.broadcast_to(shape).bool()
    spread = ~is_valid & (bias > float("-inf")) & (bias < float("inf"))
    weight = spread.to(v.dtype)
    spread_v = torch.where(spread[..., None], v, 0.0)
    if is_causal:
        seen, count, total = is_valid.cumsum(-1), weight.cumsum(-1), spread_v.cumsum(-2)
    else:
        seen = is_valid.sum(-1, keepdim=True)
        count, total = weight.sum(-1, keepdim=True), spread_v.sum(-2, keepdim=True)
    rows = ((seen == 0) & (count > 0))[..., None]
    values = total / count.clamp_min(1.0)[..., None]
    return rows, values.broadcast_to(v.shape)


def with_masked_rows(
    out: torch.Tensor,
    v: torch.Tensor,
    key_bias: torch.Tensor | None,
    valid: torch.Tensor | None,
    is_causal: bool,
) -> torch.Tensor:
    """HSA's output `out` with SDPA's on the rows that see no valid key (`masked_rows`)."""
    found = masked_rows(v.to(torch.promote_types(v.dtype, torch.float32)), key_bias, valid,
                        is_causal)  # fmt: skip
    return out if found is None else torch.where(found[0], found[1].to(out.dtype), out)


def leaf_nodes(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_bias: torch.Tensor | None,
    valid: torch.Tensor | None,
    padded: int,
    stats: torch.dtype,
) -> LevelNodes:
    """The leaf level over q, k (G, N, d), v (G, N, dv), padded to `padded` with invalid tokens."""
    groups, n, _ = q.shape
    bias, count = token_terms(key_bias, valid, groups, n, stats, q.device)
    extra = padded - n

    def pad(x: torch.Tensor) -> torch.Tensor:
        x = x.to(stats)
        return torch.nn.functional.pad(x, (0, 0, 0, extra) if x.dim() == 3 else (0, extra))

    return LevelNodes(pad(q), pad(k), pad(v), pad(bias), pad(count))


def hsa_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_bias: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    branching: Sequence[int] = (16, 4),
    is_causal: bool = False,
) -> torch.Tensor:
    """HSA of q, k (..., N, d) and v (..., N, dv); statistics in fp32 (fp64 stays fp64).

    key_bias: additive per-key bias broadcastable to (..., N); −inf marks a masked key (None: 0).
    valid: bool broadcastable to (..., N), False for masked tokens (None: all valid). A token is
    invalid when either says so; invalid tokens are never attended to nor enter the means.
    """
    *batch, n, d = q.shape
    dv = v.shape[-1]
    s = softmax_scale(scale, d)
    sizes = hierarchy(n, check_branching(branching))
    groups = math.prod(batch)
    stats = torch.promote_types(q.dtype, torch.float32)

    def flat(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(groups, n, x.shape[-1])

    key_terms = (per_token(key_bias, batch, n), per_token(valid, batch, n))
    nodes = leaf_nodes(flat(q), flat(k), flat(v), *key_terms, math.prod(sizes), stats)
    levels = []
    for size in sizes:
        weights, lse = softmax_and_lse(family_logits(nodes, size, s, is_causal))
        levels.append((weights, nodes.v_mean))
        nodes = parent_nodes(nodes, size, lse)

    mass = torch.ones(groups, 1, dtype=stats, device=q.device)
    carried = torch.zeros(groups, 1, dv, dtype=stats, device=q.device)
    for depth, (weights, v_mean) in reversed(list(enumerate(levels))):
        mass, carried = descend(weights, v_mean, mass, carried, leaf=depth == 0)
    return carried[:, :n].reshape(*batch, n, dv).to(q.dtype).contiguous()
