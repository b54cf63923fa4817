"""Triton kernels for Hierarchical Self-Attention, forward and backward.

The math, its notation and its derivation are in `attnrewrite/methods/hsa/reference.py`. Every
family level below the root is one launch of a generic family kernel; a program holds whole
families (several small ones at once, as a block-diagonal tile of at most 64 rows, or one of up to
`MAX_GROUP` children), so parent statistics are reduced in registers, without atomics.

Forward.
  up, bottom-up:   Z_B = logsumexp of each family row; the parents' means, counts and
                   a(A) = Σ_B (c_B/c_A)·Z_B.
  root family:     the reference's PyTorch step (it has N / prod(branching) children, which can
                   be many, and costs one small batched matmul).
  down, top-down:  P(B), U(B) of the children; at the leaves o_i = U(A) + P(A)·Σ_j w_ij·v_j.
Backward. The forward statistics are recomputed (only q, k, v and the mask are saved), then
  up, bottom-up:   t_B = dU_B·Σ_{C≠B} w_BC·v̄_C + dP_B·w_BB (= Σ_C w_BC·∂w_BC / P(A)),
                   dU_A = Σ_B dU_B, dP_A = Σ_B t_B; at the leaves dU_i = dO_i, dP_i = dO_i·v_i.
  root family:     autograd through the reference's step.
  down, top-down:  dL_BC = w_BC·(P(A)·(dw_BC − t_B) + (c_B/c_A)·∂a(A)), dw_BC = dU_B·v̄_C (C ≠ B)
                   or dP_B (C = B); ∂a(B) = dL_BB. The mean gradients s·dL·k̄, s·dLᵀ·q̄ and
                   P(A)·wᵀ·dU reach the tokens through D(B) = D(A) + ∂x̄_B / c_B:
                   ∂x_i = ∂x_i(leaf family) + [i valid]·D(window of i).

Logits, softmax statistics and accumulators are fp32; q, k, v stay in their dtype for the leaf
products (tensor cores for fp16/bf16, fp32 accumulation); fp32 products use IEEE fp32 unless
`torch.backends.cuda.matmul.allow_tf32` allows TF32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from attnrewrite.methods.hsa.reference import (
    LevelNodes,
    descend,
    family_logits,
    hierarchy,
    softmax_and_lse,
    token_terms,
)

MAX_GROUP = 64  # the largest family below the root that one program holds (64×64 logits)
_ROWS_TARGET = 64  # children per program when families are small

if triton.knobs.runtime.interpret:
    _CONFIGS = [triton.Config({}, num_warps=4, num_stages=1)]
else:
    _CONFIGS = [triton.Config({}, num_warps=warps, num_stages=1) for warps in (2, 4, 8)]
_TUNING_KEY = ["B", "ROWS", "D_PAD", "DV_PAD"]


@triton.jit
def _family_tile(
    q_ptr, k_ptr, bias_ptr, count_ptr, self_ptr, g, tile, n_rows, n_children, n_families, d, scale,
    B: tl.constexpr, FAMILIES: tl.constexpr, ROWS: tl.constexpr, D_PAD: tl.constexpr,
    LEAF: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Load the children of FAMILIES families and build their logits as one block-diagonal tile.

    Off the diagonal L(B, C) = s·q̄_B·k̄_C + β̄_C + log c_C; on it a(B) (S_ii at the leaves); −inf
    between families, for empty keys and, when causal, right of the diagonal.
    """
    rows = tl.arange(0, ROWS)
    local_family = rows // B
    member = rows % B
    family = tile * FAMILIES + local_family
    child = family * B + member
    row_ok = (local_family < FAMILIES) & (family < n_families)
    features = tl.arange(0, D_PAD)
    load_ok = (row_ok & (child < n_rows))[:, None] & (features < d)[None, :]
    offsets = g * n_rows * d + child[:, None] * d + features[None, :]
    q = tl.load(q_ptr + offsets, mask=load_ok, other=0.0)
    k = tl.load(k_ptr + offsets, mask=load_ok, other=0.0)
    node = g * n_children + child
    count = tl.load(count_ptr + node, mask=row_ok, other=0.0)
    bias = tl.load(bias_ptr + node, mask=row_ok, other=0.0)
    key_logit = tl.where(count > 0, bias + tl.log(tl.maximum(count, 1.0)), float("-inf"))
    logits = scale * tl.dot(q, tl.trans(k), input_precision=PRECISION) + key_logit[None, :]
    diagonal = rows[:, None] == rows[None, :]
    if not LEAF:
        self_logit = tl.load(self_ptr + node, mask=row_ok, other=float("-inf"))
        logits = tl.where(diagonal, self_logit[:, None], logits)
    allowed = (local_family[:, None] == local_family[None, :]) & row_ok[None, :]
    if CAUSAL:
        allowed = allowed & (member[None, :] <= member[:, None])
    logits = tl.where(allowed, logits, float("-inf"))
    return q, k, logits, diagonal, local_family, family, child, row_ok, count, bias


@triton.jit
def _weights(logits, lse):
    """w = exp(L − Z) per row; rows with no admissible entry (Z = −inf) are all zero."""
    return tl.exp(logits - tl.where(lse == float("-inf"), 0.0, lse)[:, None])


@triton.jit
def _load_rows(ptr, g, index, n_rows, width, row_ok, WIDTH_PAD: tl.constexpr):
    """Rows `index` of a [G, n_rows, width] tensor as fp32 [len(index), WIDTH_PAD], zero-padded."""
    features = tl.arange(0, WIDTH_PAD)
    mask = (row_ok & (index < n_rows))[:, None] & (features < width)[None, :]
    offsets = g * n_rows * width + index[:, None] * width + features[None, :]
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_rows(ptr, value, g, index, n_rows, width, row_ok, WIDTH_PAD: tl.constexpr):
    features = tl.arange(0, WIDTH_PAD)
    mask = (row_ok & (index < n_rows))[:, None] & (features < width)[None, :]
    offsets = g * n_rows * width + index[:, None] * width + features[None, :]
    tl.store(ptr + offsets, value.to(ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_CONFIGS, key=_TUNING_KEY)
@triton.jit
def _up_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, count_ptr, self_ptr, lse_ptr,
    parent_q_ptr, parent_k_ptr, parent_v_ptr, parent_bias_ptr, parent_count_ptr, parent_self_ptr,
    n_rows, n_children, n_families, d, dv, scale,
    B: tl.constexpr, FAMILIES: tl.constexpr, ROWS: tl.constexpr, PARENTS: tl.constexpr,
    D_PAD: tl.constexpr, DV_PAD: tl.constexpr, LEAF: tl.constexpr, CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Bottom-up step of one family level: Z of the children, statistics of the parents."""
    g = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    q, k, logits, _, local_family, _, child, row_ok, count, bias = _family_tile(
        q_ptr, k_ptr, bias_ptr, count_ptr, self_ptr, g, tile, n_rows, n_children, n_families, d,
        scale, B, FAMILIES, ROWS, D_PAD, LEAF, CAUSAL, PRECISION,
    )  # fmt: skip
    top = tl.max(logits, axis=1)
    top = tl.where(top == float("-inf"), 0.0, top)
    total_exp = tl.sum(tl.exp(logits - top[:, None]), axis=1)
    lse = tl.where(total_exp > 0, top + tl.log(tl.maximum(total_exp, 1e-30)), float("-inf"))
    tl.store(lse_ptr + g * n_children + child, lse, mask=row_ok)

    parents = tl.arange(0, PARENTS)
    parent = tile * FAMILIES + parents
    parent_ok = (parents < FAMILIES) & (parent < n_families)
    member_of = (parents[:, None] == local_family[None, :]) & row_ok[None, :]
    weight = tl.where(member_of, count[None, :], 0.0)
    total = tl.sum(weight, axis=1)
    safe_total = tl.maximum(total, 1.0)
    v = _load_rows(v_ptr, g, child, n_rows, dv, row_ok, DV_PAD)
    q_mean = tl.dot(weight, q.to(tl.float32), input_precision="ieee") / safe_total[:, None]
    k_mean = tl.dot(weight, k.to(tl.float32), input_precision="ieee") / safe_total[:, None]
    v_mean = tl.dot(weight, v, input_precision="ieee") / safe_total[:, None]
    bias_mean = tl.sum(weight * bias[None, :], axis=1) / safe_total
    weighted_lse = tl.sum(weight * tl.where(count > 0, lse, 0.0)[None, :], axis=1)
    self_logit = tl.where(total > 0, weighted_lse / safe_total, float("-inf"))
    _store_rows(parent_q_ptr, q_mean, g, parent, n_families, d, parent_ok, D_PAD)
    _store_rows(parent_k_ptr, k_mean, g, parent, n_families, d, parent_ok, D_PAD)
    _store_rows(parent_v_ptr, v_mean, g, parent, n_families, dv, parent_ok, DV_PAD)
    node = g * n_families + parent
    tl.store(parent_bias_ptr + node, bias_mean, mask=parent_ok)
    tl.store(parent_count_ptr + node, total, mask=parent_ok)
    tl.store(parent_self_ptr + node, self_logit, mask=parent_ok)


@triton.autotune(configs=_CONFIGS, key=_TUNING_KEY)
@triton.jit
def _down_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, count_ptr, self_ptr, lse_ptr,
    parent_mass_ptr, parent_carried_ptr, mass_ptr, carried_ptr,
    n_rows, n_children, n_families, d, dv, scale,
    B: tl.constexpr, FAMILIES: tl.constexpr, ROWS: tl.constexpr, D_PAD: tl.constexpr,
    DV_PAD: tl.constexpr, LEAF: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Top-down step: P(B), U(B) of the children (at the leaves, the output into carried_ptr)."""
    g = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    _, _, weights, diagonal, _, family, child, row_ok, _ = _weighted_tile(
        q_ptr, k_ptr, bias_ptr, count_ptr, self_ptr, lse_ptr, g, tile, n_rows, n_children,
        n_families, d, scale, B, FAMILIES, ROWS, D_PAD, LEAF, CAUSAL, PRECISION,
    )  # fmt: skip
    mass = tl.load(parent_mass_ptr + g * n_families + family, mask=row_ok, other=0.0)
    carried = _load_rows(parent_carried_ptr, g, family, n_families, dv, row_ok, DV_PAD)
    features = tl.arange(0, DV_PAD)
    v_offsets = g * n_rows * dv + child[:, None] * dv + features[None, :]
    v_ok = (row_ok & (child < n_rows))[:, None] & (features < dv)[None, :]
    v = tl.load(v_ptr + v_offsets, mask=v_ok, other=0.0)
    if LEAF:
        mixed = tl.dot(weights.to(v.dtype), v, input_precision=PRECISION)
        _store_rows(carried_ptr, carried + mass[:, None] * mixed, g, child, n_rows, dv, row_ok,
                    DV_PAD)  # fmt: skip
    else:
        self_weight = tl.sum(tl.where(diagonal, weights, 0.0), axis=1)
        others = tl.where(diagonal, 0.0, weights)
        mixed = tl.dot(others, v, input_precision=PRECISION)
        _store_rows(carried_ptr, carried + mass[:, None] * mixed, g, child, n_children, dv,
                    row_ok, DV_PAD)  # fmt: skip
        tl.store(mass_ptr + g * n_children + child, mass * self_weight, mask=row_ok)


@triton.jit
def _output_grads(
    grad_ptr, d_carried_ptr, d_mass_ptr, v, g, child, n_rows, n_children, dv, row_ok,
    DV_PAD: tl.constexpr, LEAF: tl.constexpr,
):  # fmt: skip
    """(dU_B, dP_B) of the children: at the leaves dU_i = dO_i and dP_i = dO_i·v_i."""
    if LEAF:
        d_carried = _load_rows(grad_ptr, g, child, n_rows, dv, row_ok, DV_PAD)
        d_mass = tl.sum(d_carried * v.to(tl.float32), axis=1)
    else:
        d_carried = _load_rows(d_carried_ptr, g, child, n_children, dv, row_ok, DV_PAD)
        d_mass = tl.load(d_mass_ptr + g * n_children + child, mask=row_ok, other=0.0)
    return d_carried, d_mass


@triton.jit
def _weighted_tile(
    q_ptr, k_ptr, bias_ptr, count_ptr, self_ptr, lse_ptr, g, tile, n_rows, n_children,
    n_families, d, scale,
    B: tl.constexpr, FAMILIES: tl.constexpr, ROWS: tl.constexpr, D_PAD: tl.constexpr,
    LEAF: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """`_family_tile` with the logits turned into weights by the up pass's lse (the passes
    after it): (q, k, weights, diagonal, local_family, family, child, row_ok, count)."""
    q, k, logits, diagonal, local_family, family, child, row_ok, count, _ = _family_tile(
        q_ptr, k_ptr, bias_ptr, count_ptr, self_ptr, g, tile, n_rows, n_children, n_families, d,
        scale, B, FAMILIES, ROWS, D_PAD, LEAF, CAUSAL, PRECISION,
    )  # fmt: skip
    lse = tl.load(lse_ptr + g * n_children + child, mask=row_ok, other=float("-inf"))
    weights = _weights(logits, lse)
    return q, k, weights, diagonal, local_family, family, child, row_ok, count


@triton.autotune(configs=_CONFIGS, key=_TUNING_KEY)
@triton.jit
def _backward_up_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, count_ptr, self_ptr, lse_ptr, grad_ptr,
    d_carried_ptr, d_mass_ptr, t_ptr, parent_d_carried_ptr, parent_d_mass_ptr,
    n_rows, n_children, n_families, d, dv, scale,
    B: tl.constexpr, FAMILIES: tl.constexpr, ROWS: tl.constexpr, PARENTS: tl.constexpr,
    D_PAD: tl.constexpr, DV_PAD: tl.constexpr, LEAF: tl.constexpr, CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Bottom-up backward step: t_B of the children, dU_A = Σ dU_B and dP_A = Σ t_B."""
    g = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    _, _, weights, diagonal, local_family, _, child, row_ok, _ = _weighted_tile(
        q_ptr, k_ptr, bias_ptr, count_ptr, self_ptr, lse_ptr, g, tile, n_rows, n_children,
        n_families, d, scale, B, FAMILIES, ROWS, D_PAD, LEAF, CAUSAL, PRECISION,
    )  # fmt: skip
    v = _load_rows(v_ptr, g, child, n_rows, dv, row_ok, DV_PAD)
    d_carried, d_mass = _output_grads(
        grad_ptr, d_carried_ptr, d_mass_ptr, v, g, child, n_rows, n_children, dv, row_ok, DV_PAD,
        LEAF,
    )  # fmt: skip
    self_weight = tl.sum(tl.where(diagonal, weights, 0.0), axis=1)
    mixed = tl.dot(tl.where(diagonal, 0.0, weights), v, input_precision=PRECISION)
    t = tl.sum(d_carried * mixed, axis=1) + d_mass * self_weight
    tl.store(t_ptr + g * n_children + child, t, mask=row_ok)

    parents = tl.arange(0, PARENTS)
    parent = tile * FAMILIES + parents
    parent_ok = (parents < FAMILIES) & (parent < n_families)
    member_of = ((parents[:, None] == local_family[None, :]) & row_ok[None, :]).to(tl.float32)
    parent_d_carried = tl.dot(member_of, d_carried, input_precision="ieee")
    _store_rows(parent_d_carried_ptr, parent_d_carried, g, parent, n_families, dv, parent_ok,
                DV_PAD)  # fmt: skip
    tl.store(parent_d_mass_ptr + g * n_families + parent, tl.sum(member_of * t[None, :], axis=1),
             mask=parent_ok)  # fmt: skip


@triton.autotune(configs=_CONFIGS, key=_TUNING_KEY)
@triton.jit
def _backward_down_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, count_ptr, self_ptr, lse_ptr, grad_ptr,
    d_carried_ptr, d_mass_ptr, t_ptr,
    parent_mass_ptr, parent_count_ptr, parent_d_self_ptr,
    parent_dq_ptr, parent_dk_ptr, parent_dv_ptr,
    d_self_ptr, dq_ptr, dk_ptr, dv_ptr,
    n_rows, n_children, n_families, d, dv, scale,
    B: tl.constexpr, FAMILIES: tl.constexpr, ROWS: tl.constexpr, D_PAD: tl.constexpr,
    DV_PAD: tl.constexpr, LEAF: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Top-down backward step: ∂a and the accumulated mean gradients D of the children; at the
    leaves, dq, dk, dv of the tokens."""
    g = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    q, k, weights, diagonal, _, family, child, row_ok, count = _weighted_tile(
        q_ptr, k_ptr, bias_ptr, count_ptr, self_ptr, lse_ptr, g, tile, n_rows, n_children,
        n_families, d, scale, B, FAMILIES, ROWS, D_PAD, LEAF, CAUSAL, PRECISION,
    )  # fmt: skip
    v = _load_rows(v_ptr, g, child, n_rows, dv, row_ok, DV_PAD)
    d_carried, d_mass = _output_grads(
        grad_ptr, d_carried_ptr, d_mass_ptr, v, g, child, n_rows, n_children, dv, row_ok, DV_PAD,
        LEAF,
    )  # fmt: skip
    t = tl.load(t_ptr + g * n_children + child, mask=row_ok, other=0.0)
    parent_node = g * n_families + family
    mass = tl.load(parent_mass_ptr + parent_node, mask=row_ok, other=0.0)
    parent_count = tl.load(parent_count_ptr + parent_node, mask=row_ok, other=0.0)
    parent_d_self = tl.load(parent_d_self_ptr + parent_node, mask=row_ok, other=0.0)

    d_weights = tl.dot(d_carried, tl.trans(v), input_precision=PRECISION)
    d_weights = tl.where(diagonal, d_mass[:, None], d_weights)
    d_lse = tl.where(parent_count > 0, count / tl.maximum(parent_count, 1.0) * parent_d_self, 0.0)
    d_logits = weights * (mass[:, None] * (d_weights - t[:, None]) + d_lse[:, None])
    if LEAF:
        d_scores = d_logits
        mixing = mass[:, None] * weights
    else:
        d_scores = tl.where(diagonal, 0.0, d_logits)
        mixing = mass[:, None] * tl.where(diagonal, 0.0, weights)
        d_self = tl.sum(tl.where(diagonal, d_logits, 0.0), axis=1)
        tl.store(d_self_ptr + g * n_children + child, d_self, mask=row_ok)
    d_q_mean = scale * tl.dot(d_scores.to(k.dtype), k, input_precision=PRECISION)
    d_k_mean = scale * tl.dot(tl.trans(d_scores).to(q.dtype), q, input_precision=PRECISION)
    d_v_mean = tl.dot(tl.trans(mixing), d_carried, input_precision=PRECISION)

    parent_dq = _load_rows(parent_dq_ptr, g, family, n_families, d, row_ok, D_PAD)
    parent_dk = _load_rows(parent_dk_ptr, g, family, n_families, d, row_ok, D_PAD)
    parent_dv = _load_rows(parent_dv_ptr, g, family, n_families, dv, row_ok, DV_PAD)
    if LEAF:
        valid = (count > 0)[:, None]
        _store_rows(dq_ptr, d_q_mean + tl.where(valid, parent_dq, 0.0), g, child, n_rows, d,
                    row_ok, D_PAD)  # fmt: skip
        _store_rows(dk_ptr, d_k_mean + tl.where(valid, parent_dk, 0.0), g, child, n_rows, d,
                    row_ok, D_PAD)  # fmt: skip
        _store_rows(dv_ptr, d_v_mean + tl.where(valid, parent_dv, 0.0), g, child, n_rows, dv,
                    row_ok, DV_PAD)  # fmt: skip
    else:
        inverse = tl.where(count > 0, 1.0 / tl.maximum(count, 1.0), 0.0)[:, None]
        _store_rows(dq_ptr, parent_dq + d_q_mean * inverse, g, child, n_children, d, row_ok,
                    D_PAD)  # fmt: skip
        _store_rows(dk_ptr, parent_dk + d_k_mean * inverse, g, child, n_children, d, row_ok,
                    D_PAD)  # fmt: skip
        _store_rows(dv_ptr, parent_dv + d_v_mean * inverse, g, child, n_children, dv, row_ok,
                    DV_PAD)  # fmt: skip


def _tile(size: int) -> tuple[int, int, int]:
    """(families per program, rows of the tile, parents of the tile) for families of `size`."""
    families = max(1, _ROWS_TARGET // size)
    rows = triton.next_power_of_2(max(16, families * size))
    return families, rows, triton.next_power_of_2(max(16, families))


def _precision() -> str:
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


class _Tree:
    """The statistics of every level of one HSA call, computed by the bottom-up launches.

    levels[0] holds the tokens (q, k, v in their dtype, N rows; bias and count padded to the tree
    size); levels[t] for t ≥ 1 the fp32 node statistics; lse[t] the Z of level t's nodes.
    """

    def __init__(self, q, k, v, key_bias, valid, scale, branching, is_causal):
        *batch, n, d = q.shape
        if q.device.type == "cpu" and not triton.knobs.runtime.interpret:
            raise RuntimeError(
                "the HSA Triton kernels got CPU tensors without the Triton interpreter: set "
                "TRITON_INTERPRET=1 before triton is imported, or unset ATTNREWRITE_TRITON_CPU"
            )
        self.batch, self.n, self.d, self.dv = tuple(batch), n, d, v.shape[-1]
        self.groups = math.prod(batch)
        self.scale = scale if scale is not None else 1.0 / math.sqrt(d)
        self.sizes, self.is_causal = hierarchy(n, branching), is_causal
        if len(self.sizes) < 2:
            raise ValueError(f"the HSA kernels need a tree below the root, got {self.sizes}")
        self.d_pad = triton.next_power_of_2(max(16, d))
        self.dv_pad = triton.next_power_of_2(max(16, self.dv))
        padded = math.prod(self.sizes)
        bias, count = token_terms(key_bias, valid, self.groups, n, torch.float32, q.device)

        def flat(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(self.groups, n, x.shape[-1]).contiguous()

        def pad(x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(x, (0, padded - n)).contiguous()

        self.levels = [LevelNodes(flat(q), flat(k), flat(v), pad(bias), pad(count))]
        self.lse: list[torch.Tensor] = []
        for size in self.sizes[:-1]:
            self._up(size)

    def _meta(self, level: int) -> dict:
        size = self.sizes[level]
        families, rows, parents = _tile(size)
        return dict(
            B=size, FAMILIES=families, ROWS=rows, PARENTS=parents, D_PAD=self.d_pad,
            DV_PAD=self.dv_pad, LEAF=level == 0, CAUSAL=self.is_causal, PRECISION=_precision(),
        )  # fmt: skip

    def launch(self, kernel, level: int, *pointers: torch.Tensor) -> None:
        """Run `kernel` over family level `level` (children: levels[level]) with the children's
        statistics first and `pointers` after them."""
        children = self.levels[level]
        meta = self._meta(level)
        if "PARENTS" not in kernel.arg_names:  # the top-down kernels write no parents
            del meta["PARENTS"]
        n_children = children.count.shape[1]
        n_families = n_children // self.sizes[level]
        self_logit = children.self_logit if children.self_logit is not None else children.count
        grid = (self.groups, triton.cdiv(n_families, meta["FAMILIES"]))
        kernel[grid](
            children.q_mean, children.k_mean, children.v_mean, children.bias_mean,
            children.count, self_logit, self.lse[level], *pointers,
            children.q_mean.shape[1], n_children, n_families, self.d, self.dv, self.scale,
            **meta,
        )  # fmt: skip

    def new(self, nodes: int, width: int | None = None) -> torch.Tensor:
        shape = (self.groups, nodes) if width is None else (self.groups, nodes, width)
        return torch.empty(shape, dtype=torch.float32, device=self.levels[0].count.device)

    def _up(self, size: int) -> None:
        level = len(self.lse)
        families = self.levels[level].count.shape[1] // size
        self.lse.append(self.new(self.levels[level].count.shape[1]))
        parents = LevelNodes(
            self.new(families, self.d), self.new(families, self.d),
            self.new(families, self.dv), self.new(families), self.new(families),
            self.new(families),
        )  # fmt: skip
        self.launch(
            _up_kernel, level, parents.q_mean, parents.k_mean, parents.v_mean,
            parents.bias_mean, parents.count, parents.self_logit,
        )  # fmt: skip
        self.levels.append(parents)

    def root(self, nodes: LevelNodes) -> tuple[torch.Tensor, torch.Tensor]:
        """P, U of the root's children: the reference's step (PyTorch, differentiable)."""
        logits = family_logits(nodes, self.sizes[-1], self.scale, self.is_causal)
        weights, _ = softmax_and_lse(logits)
        mass = torch.ones(self.groups, 1, dtype=torch.float32, device=logits.device)
        carried = torch.zeros(self.groups, 1, self.dv, dtype=torch.float32, device=logits.device)
        mass, carried = descend(weights, nodes.v_mean, mass, carried, leaf=False)
        return mass.contiguous(), carried.contiguous()

    def down(
        self, mass: torch.Tensor, carried: torch.Tensor, out: torch.Tensor | None
    ) -> list[torch.Tensor]:
        """P of the nodes of every level ≥ 1 (the list's item t for level t + 1), from the
        root's children's (mass, carried) down; the leaf step writes the output into `out`
        (skipped when None)."""
        masses = [mass]
        for level in range(len(self.sizes) - 2, -1, -1):
            if level == 0:
                if out is not None:
                    self.launch(_down_kernel, 0, mass, carried, mass, out)
                break
            nodes = self.levels[level].count.shape[1]
            mass_child, carried_child = self.new(nodes), self.new(nodes, self.dv)
            self.launch(_down_kernel, level, mass, carried, mass_child, carried_child)
            mass, carried = mass_child, carried_child
            masses.append(mass)
        return masses[::-1]


def hsa_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_bias: torch.Tensor | None,
    valid: torch.Tensor | None,
    scale: float | None,
    branching: Sequence[int],
    is_causal: bool,
) -> torch.Tensor:
    """HSA of q, k (..., N, d), v (..., N, dv) with the arguments of `hsa_attention_reference`
    (key_bias and valid of shape (..., N)); the tree needs a level below the root."""
    tree = _Tree(q, k, v, key_bias, valid, scale, branching, is_causal)
    out = torch.empty(tree.groups, tree.n, tree.dv, dtype=q.dtype, device=q.device)
    mass, carried = tree.root(tree.levels[-1])
    tree.down(mass, carried, out)
    return out.reshape(*tree.batch, tree.n, tree.dv)


def hsa_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_bias: torch.Tensor | None,
    valid: torch.Tensor | None,
    scale: float | None,
    branching: Sequence[int],
    is_causal: bool,
    grad_out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `hsa_forward` for the output gradient `grad_out`; the forward statistics
    are recomputed."""
    tree = _Tree(q, k, v, key_bias, valid, scale, branching, is_causal)
    grad = grad_out.reshape(tree.groups, tree.n, tree.dv).contiguous()
    top = tree.levels[-1]
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_() for x in (top.q_mean, top.k_mean, top.v_mean,
                                                         top.self_logit)]  # fmt: skip
        root_nodes = LevelNodes(*leaves[:3], top.bias_mean, top.count, leaves[3])
        mass, carried = tree.root(root_nodes)
    masses = tree.down(mass.detach(), carried.detach(), None)

    # Bottom-up: t of every level's children; dU and dP of every level's nodes (the leaves'
    # come from grad inside the kernels, the grad tensor only fills their pointer slots).
    t_values, node_grads = [], [(grad, grad)]
    for level in range(len(tree.sizes) - 1):
        nodes = tree.levels[level + 1].count.shape[1]
        t = tree.new(tree.levels[level].count.shape[1])
        parent_grads = (tree.new(nodes, tree.dv), tree.new(nodes))
        tree.launch(_backward_up_kernel, level, grad, *node_grads[level], t, *parent_grads)
        t_values.append(t)
        node_grads.append(parent_grads)

    d_carried, d_mass = node_grads[-1]
    d_q_mean, d_k_mean, d_v_mean, d_self = torch.autograd.grad(
        (mass, carried), leaves, (d_mass, d_carried)
    )
    d_self = d_self.contiguous()
    inverse = torch.where(top.count > 0, 1.0 / top.count.clamp_min(1.0), 0.0)[..., None]
    accumulated = [(x * inverse).contiguous() for x in (d_q_mean, d_k_mean, d_v_mean)]

    # Top-down: ∂a and the accumulated mean gradients D of every level, then the tokens'.
    for level in range(len(tree.sizes) - 2, -1, -1):
        rows = tree.n if level == 0 else tree.levels[level].count.shape[1]
        outputs = [tree.new(rows, width) for width in (tree.d, tree.d, tree.dv)]
        child_d_self = tree.new(tree.levels[level].count.shape[1])
        tree.launch(
            _backward_down_kernel, level, grad, *node_grads[level], t_values[level],
            masses[level], tree.levels[level + 1].count, d_self, *accumulated, child_d_self,
            *outputs,
        )  # fmt: skip
        accumulated, d_self = outputs, child_d_self
    dq, dk, dv = accumulated
    return (
        dq.reshape(q.shape).to(q.dtype),
        dk.reshape(k.shape).to(k.dtype),
        dv.reshape(v.shape).to(v.dtype),
    )
