"""Triton kernels for MonarchAttention (attnrewrite/methods/monarch/stages.py has the math).

Every Monarch update is a *stage*: softmax attention inside independent groups (b×b for the
R-update, M×M for the L-update) with a per-key bias, optionally causal and with a per-row sink
logit. Two kernels run every stage, forward and backward, through stride arithmetic: the L-update
reads token-ordered tensors by slot (row stride b·d), so nothing is ever transposed in memory.

- `_attend_rows_kernel`, one program per tile of rows: online softmax over key tiles (so b and M
  may exceed a tile; N = 64K is M = b = 256), out = P·values and the lse; in GRAD mode
  dq = s·dS·keys with P recomputed from the lse.
- `_attend_cols_kernel`, one program per tile of keys, looping over row tiles with P recomputed
  from the rows' lse: Pᵀ·X (the next R-update's [aR | cR], or dvalues), and in GRAD mode
  dkeys = s·dSᵀ·q and dbias = Σ_rows dS.
- `_fused_forward_kernel`, one program per sequence for short ones: every stage of every step in
  registers with batched (3-D) `tl.dot`, a single launch and no intermediate in memory.

Matrix products take fp16/bf16 (tensor cores) or fp32 (tf32 when torch allows it) operands and
accumulate in fp32; softmax statistics are fp32 in log2 units (`exp2`). Ragged tiles are masked;
a row that sees no key gets lse −inf, zero output and zero gradient (never NaN).
On CPU tensors the kernels run only under the Triton interpreter (TRITON_INTERPRET=1 set before
this module is imported); tests use that on small shapes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from attnrewrite.methods.monarch.stages import MonarchConfig

Tensor = torch.Tensor

LOG2E: tl.constexpr = tl.constexpr(math.log2(math.e))  # softmax runs in log2 units (exp2)
LN2: tl.constexpr = tl.constexpr(math.log(2.0))
INTERPRETED = bool(triton.knobs.runtime.interpret)

# The fused kernel keeps ~10 tensors of N'·max(d, dv) elements in registers: up to 256 × 64.
FUSED_MAX_ELEMENTS = 256 * 64


def _stage_configs() -> list[triton.Config]:
    """GPU autotuning space; one 16×16 config under the interpreter (which cannot benchmark,
    and where small tiles make small test shapes span several tiles)."""
    if INTERPRETED:
        return [triton.Config({"BLOCK_R": 16, "BLOCK_C": 16}, num_warps=4)]
    return [
        triton.Config({"BLOCK_R": rows, "BLOCK_C": cols}, num_warps=warps, num_stages=stages)
        for rows in (16, 32, 64, 128)
        for cols in (16, 32, 64)
        for warps in (4, 8)
        for stages in (1, 2, 3)
        if not (rows == 128 and warps == 4)
    ]


def _prune_to_shape(configs: list[triton.Config], named_args: dict, **_: object) -> list:
    """Drop tiles far larger than the groups (b or M rows), which only add masked work."""
    rows = triton.next_power_of_2(max(16, named_args["n_rows"]))
    cols = triton.next_power_of_2(max(16, named_args["n_cols"]))
    kept = [c for c in configs if c.kwargs["BLOCK_R"] <= rows and c.kwargs["BLOCK_C"] <= cols]
    return kept or configs[:1]


_TUNING_KEY = ["n_rows", "n_cols", "head_dim", "width", "HAS_BIAS", "CAUSAL", "GRAD"]


@triton.jit
def _group_base(ptr, strides, g, grp):
    return ptr + g * strides[0] + grp * strides[1]


@triton.jit
def _load_tile(ptr, strides, g, grp, index, n_index, features, n_features):
    """A [len(index), len(features)] tile of a [g, group, n, feature] view; zeros outside."""
    base = _group_base(ptr, strides, g, grp)
    mask = (index[:, None] < n_index) & (features[None, :] < n_features)
    return tl.load(base + index[:, None] * strides[2] + features[None, :], mask=mask, other=0.0)


@triton.jit
def _store_tile(ptr, strides, g, grp, index, n_index, features, n_features, value):
    base = _group_base(ptr, strides, g, grp)
    mask = (index[:, None] < n_index) & (features[None, :] < n_features)
    tl.store(
        base + index[:, None] * strides[2] + features[None, :],
        value.to(ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _load_vector(ptr, strides, g, grp, index, n_index, other):
    base = _group_base(ptr, strides, g, grp)
    return tl.load(base + index * strides[2], mask=index < n_index, other=other).to(tl.float32)


@triton.jit
def _store_vector(ptr, strides, g, grp, index, n_index, value):
    base = _group_base(ptr, strides, g, grp)
    tl.store(base + index * strides[2], value.to(ptr.dtype.element_ty), mask=index < n_index)


@triton.jit
def _visible(rows, cols, n_rows, n_cols, causal, CAUSAL: tl.constexpr):
    """Which (row, key) pairs take part: in range, and key ≤ row + causal when CAUSAL."""
    visible = (rows < n_rows) & (cols < n_cols)
    if CAUSAL:
        visible = visible & (cols <= rows + causal)
    return visible


@triton.jit
def _row_lse2(ptr, strides, g, grp, rows, n_rows):
    """The rows' lse in log2 units, +inf for rows that see nothing (so their P is 0)."""
    lse = _load_vector(ptr, strides, g, grp, rows, n_rows, float("inf")) * LOG2E
    return tl.where(lse == float("-inf"), float("inf"), lse)


@triton.autotune(
    configs=_stage_configs(),
    key=_TUNING_KEY,
    prune_configs_by={"early_config_prune": _prune_to_shape},
)
@triton.jit
def _attend_rows_kernel(
    Q,
    q_str,
    K,
    k_str,
    V,
    v_str,
    BIAS,
    bias_str,
    SINK_LOGIT,
    sink_logit_str,
    SINK_VALUE,
    sink_value_str,
    OUT,
    out_str,
    LSE,
    lse_str,
    KEYS_OUT,
    keys_out_str,
    KEYS_DOT,
    keys_dot_str,
    D_OUT,
    d_out_str,
    DELTA,
    delta_str,
    DQ,
    dq_str,
    n_groups,
    n_rows,
    n_cols,
    head_dim,
    width,
    scale,
    causal,
    HAS_BIAS: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_SINK: tl.constexpr,
    HAS_SINK_VALUE: tl.constexpr,
    HAS_VALUES: tl.constexpr,
    HAS_KEYS_OUT: tl.constexpr,
    GRAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_W: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Forward: out = P·V, keys_out = P·K, keys_dot = rowdot(q, keys_out) and the lse of a
    row tile (online softmax).
    GRAD: dq = s·(P ⊙ (d_out·Vᵀ − Δ))·K with P from the lse."""
    pid_rows = tl.program_id(0)
    g = tl.program_id(1) // n_groups
    grp = tl.program_id(1) % n_groups
    rows = pid_rows * BLOCK_R + tl.arange(0, BLOCK_R)
    features = tl.arange(0, BLOCK_D)
    widths = tl.arange(0, BLOCK_W)
    q = _load_tile(Q, q_str, g, grp, rows, n_rows, features, head_dim)
    qk_scale = scale * LOG2E
    end = n_cols
    if CAUSAL:  # the last row of the tile sees keys < (pid + 1)·BLOCK_R + causal
        end = tl.minimum(n_cols, (pid_rows + 1) * BLOCK_R + causal)
    if GRAD:
        lse2 = _row_lse2(LSE, lse_str, g, grp, rows, n_rows)
        d_out = _load_tile(D_OUT, d_out_str, g, grp, rows, n_rows, widths, width)
        delta = _load_vector(DELTA, delta_str, g, grp, rows, n_rows, 0.0)
        dq = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    else:
        top = tl.full([BLOCK_R], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.float32)
        acc_keys = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        if HAS_SINK:  # the sink is one more logit (and value) per row
            top = _load_vector(SINK_LOGIT, sink_logit_str, g, grp, rows, n_rows, float("-inf"))
            top = top * LOG2E
            total = tl.where(top > float("-inf"), 1.0, 0.0)
            if HAS_SINK_VALUE:
                sink_value = _load_tile(
                    SINK_VALUE, sink_value_str, g, grp, rows, n_rows, widths, width
                )
                acc = sink_value.to(tl.float32) * total[:, None]
    for start in range(0, end, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        keys = _load_tile(K, k_str, g, grp, cols, n_cols, features, head_dim)
        scores = tl.dot(q, tl.trans(keys), input_precision=PRECISION) * qk_scale
        if HAS_BIAS:
            bias = _load_vector(BIAS, bias_str, g, grp, cols, n_cols, float("-inf"))
            scores += bias[None, :] * LOG2E
        visible = _visible(rows[:, None], cols[None, :], n_rows, n_cols, causal, CAUSAL)
        scores = tl.where(visible, scores, float("-inf"))
        if GRAD:
            probs = tl.exp2(scores - lse2[:, None])
            values = _load_tile(V, v_str, g, grp, cols, n_cols, widths, width)
            d_probs = tl.dot(d_out, tl.trans(values), input_precision=PRECISION)
            d_scores = probs * (d_probs - delta[:, None])
            dq += tl.dot(d_scores.to(keys.dtype), keys, input_precision=PRECISION)
        else:
            new_top = tl.maximum(top, tl.max(scores, 1))
            safe_top = tl.where(new_top == float("-inf"), 0.0, new_top)
            probs = tl.exp2(scores - safe_top[:, None])
            rescale = tl.exp2(top - safe_top)
            total = total * rescale + tl.sum(probs, 1)
            if HAS_VALUES:
                values = _load_tile(V, v_str, g, grp, cols, n_cols, widths, width)
                acc = acc * rescale[:, None] + tl.dot(
                    probs.to(values.dtype), values, input_precision=PRECISION
                )
            if HAS_KEYS_OUT:  # the key tile is loaded already
                acc_keys = acc_keys * rescale[:, None] + tl.dot(
                    probs.to(keys.dtype), keys, input_precision=PRECISION
                )
            top = new_top
    if GRAD:
        _store_tile(DQ, dq_str, g, grp, rows, n_rows, features, head_dim, dq * scale)
    else:
        seen = total > 0
        safe_top = tl.where(top == float("-inf"), 0.0, top)
        lse = tl.where(seen, (safe_top + tl.log2(tl.where(seen, total, 1.0))) * LN2, float("-inf"))
        _store_vector(LSE, lse_str, g, grp, rows, n_rows, lse)
        inverse = 1.0 / tl.where(seen, total, 1.0)
        if HAS_VALUES:
            _store_tile(OUT, out_str, g, grp, rows, n_rows, widths, width, acc * inverse[:, None])
        if HAS_KEYS_OUT:
            keys_out = acc_keys * inverse[:, None]
            _store_tile(KEYS_OUT, keys_out_str, g, grp, rows, n_rows, features, head_dim, keys_out)
            keys_dot = tl.sum(q.to(tl.float32) * keys_out, 1)
            _store_vector(KEYS_DOT, keys_dot_str, g, grp, rows, n_rows, keys_dot)


@triton.autotune(
    configs=_stage_configs(),
    key=[*_TUNING_KEY, "x_width"],
    prune_configs_by={"early_config_prune": _prune_to_shape},
)
@triton.jit
def _attend_cols_kernel(
    Q,
    q_str,
    K,
    k_str,
    V,
    v_str,
    BIAS,
    bias_str,
    LSE,
    lse_str,
    X,
    x_str,
    X_OUT,
    x_out_str,
    D_OUT,
    d_out_str,
    DELTA,
    delta_str,
    DK,
    dk_str,
    DBIAS,
    dbias_str,
    n_groups,
    n_rows,
    n_cols,
    head_dim,
    width,
    x_width,
    scale,
    causal,
    HAS_BIAS: tl.constexpr,
    CAUSAL: tl.constexpr,
    TRANSPOSED: tl.constexpr,
    GRAD: tl.constexpr,
    HAS_DBIAS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_X: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Per key tile, P from the rows' lse: Pᵀ·X; GRAD: s·dSᵀ·q and Σ_rows dS (dS as above)."""
    pid_cols = tl.program_id(0)
    g = tl.program_id(1) // n_groups
    grp = tl.program_id(1) % n_groups
    cols = pid_cols * BLOCK_C + tl.arange(0, BLOCK_C)
    features = tl.arange(0, BLOCK_D)
    keys = _load_tile(K, k_str, g, grp, cols, n_cols, features, head_dim)
    qk_scale = scale * LOG2E
    bias = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        bias = _load_vector(BIAS, bias_str, g, grp, cols, n_cols, float("-inf")) * LOG2E
    if TRANSPOSED:
        x_widths = tl.arange(0, BLOCK_X)
        summed = tl.zeros([BLOCK_C, BLOCK_X], dtype=tl.float32)
    if GRAD:
        widths = tl.arange(0, BLOCK_W)
        values = _load_tile(V, v_str, g, grp, cols, n_cols, widths, width)
        dk = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
        dbias = tl.zeros([BLOCK_C], dtype=tl.float32)
    start = 0
    if CAUSAL:  # rows before (first key − causal) see none of this tile
        start = tl.maximum(0, pid_cols * BLOCK_C - causal) // BLOCK_R * BLOCK_R
    for row_start in range(start, n_rows, BLOCK_R):
        rows = row_start + tl.arange(0, BLOCK_R)
        q = _load_tile(Q, q_str, g, grp, rows, n_rows, features, head_dim)
        lse2 = _row_lse2(LSE, lse_str, g, grp, rows, n_rows)
        scores = tl.dot(keys, tl.trans(q), input_precision=PRECISION) * qk_scale + bias[:, None]
        visible = _visible(rows[None, :], cols[:, None], n_rows, n_cols, causal, CAUSAL)
        probs = tl.exp2(tl.where(visible, scores, float("-inf")) - lse2[None, :])  # Pᵀ
        if TRANSPOSED:
            x = _load_tile(X, x_str, g, grp, rows, n_rows, x_widths, x_width)
            summed += tl.dot(probs.to(x.dtype), x, input_precision=PRECISION)
        if GRAD:
            d_out = _load_tile(D_OUT, d_out_str, g, grp, rows, n_rows, widths, width)
            delta = _load_vector(DELTA, delta_str, g, grp, rows, n_rows, 0.0)
            d_probs = tl.dot(values, tl.trans(d_out), input_precision=PRECISION)
            d_scores = probs * (d_probs - delta[None, :])
            dk += tl.dot(d_scores.to(q.dtype), q, input_precision=PRECISION)
            dbias += tl.sum(d_scores, 1)
    if TRANSPOSED:
        _store_tile(X_OUT, x_out_str, g, grp, cols, n_cols, x_widths, x_width, summed)
    if GRAD:
        _store_tile(DK, dk_str, g, grp, cols, n_cols, features, head_dim, dk * scale)
        if HAS_DBIAS:
            _store_vector(DBIAS, dbias_str, g, grp, cols, n_cols, dbias)


@triton.jit
def _softmax_last(scores, sink):
    """Softmax over the last axis of log2-unit scores with one extra per-row logit `sink`:
    (P, sink weight, lse₂); a row with nothing visible gets zeros and lse₂ = −inf."""
    top = tl.maximum(tl.max(scores, axis=2), sink)
    safe_top = tl.where(top == float("-inf"), 0.0, top)
    probs = tl.exp2(scores - safe_top[:, :, None])
    sink_weight = tl.exp2(sink - safe_top)
    total = tl.sum(probs, axis=2) + sink_weight
    seen = total > 0
    inverse = 1.0 / tl.where(seen, total, 1.0)
    lse2 = tl.where(seen, safe_top + tl.log2(tl.where(seen, total, 1.0)), float("-inf"))
    return probs * inverse[:, :, None], sink_weight * inverse, lse2


@triton.jit
def _load_tokens(ptr, g, token, present, n, features, n_features):
    """x[g, token, feature] for a [blocks, slots] grid of token indices; zeros where absent."""
    mask = present[:, :, None] & (features[None, None, :] < n_features)
    offsets = (g * n + token[:, :, None]) * n_features + features[None, None, :]
    return tl.load(ptr + offsets, mask=mask, other=0.0)


@triton.jit
def _fused_forward_kernel(
    Q,
    K,
    V,
    KEY_BIAS,
    QUERY_VALID,
    OUT,
    n,
    head_dim,
    width,
    n_blocks,
    block,
    front,
    scale,
    HAS_BIAS: tl.constexpr,
    HAS_VALID: tl.constexpr,
    CAUSAL: tl.constexpr,
    NUM_STEPS: tl.constexpr,
    BM: tl.constexpr,
    BB: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_W: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The whole forward of one sequence (g) in registers. By-block tensors are [k, j, ·]
    (block, slot), by-slot ones [j, l, ·]; `tl.permute` switches between them."""
    g = tl.program_id(0)
    blocks = tl.arange(0, BM)
    slots = tl.arange(0, BB)
    features = tl.arange(0, BLOCK_D)
    widths = tl.arange(0, BLOCK_W)
    token = blocks[:, None] * block + slots[None, :] - front  # [k, j] → index into the n tokens
    present = (blocks[:, None] < n_blocks) & (slots[None, :] < block) & (token >= 0) & (token < n)
    q = _load_tokens(Q, g, token, present, n, features, head_dim)
    keys = _load_tokens(K, g, token, present, n, features, head_dim)
    values = _load_tokens(V, g, token, present, n, widths, width)
    dtype = q.dtype
    bias = tl.where(present, 0.0, float("-inf"))  # β in log2 units, per key [k, i]
    if HAS_BIAS:
        bias = tl.load(KEY_BIAS + g * n + token, mask=present, other=float("-inf")) * LOG2E
    valid = present  # ω (stages._taking_part): in a slot with no valid query, every present one
    if HAS_VALID:
        valid = present & (tl.load(QUERY_VALID + g * n + token, mask=present, other=0) != 0)
        unread = tl.max(valid.to(tl.int32), axis=0) == 0  # [j]
        valid = valid | (present & unread[None, :])
    qk_scale = scale * LOG2E
    keys_t = tl.permute(keys, (0, 2, 1))
    no_sink = tl.full([BM, BB], float("-inf"), tl.float32)
    q_eff = q * valid[:, :, None].to(dtype)
    diag_lse = tl.full([BB, BM], float("-inf"), tl.float32)  # by slot; −inf: no diagonal
    diag_out = tl.zeros([BB, BM, BLOCK_W], dtype=tl.float32)
    if CAUSAL:
        # D: exact causal softmax inside each block; q̃ starts from the next block's queries.
        scores = tl.dot(q, keys_t, input_precision=PRECISION) * qk_scale + bias[:, None, :]
        later = slots[None, None, :] > slots[None, :, None]
        probs, _, lse2 = _softmax_last(tl.where(later, float("-inf"), scores), no_sink)
        out = tl.dot(probs.to(dtype), values, input_precision=PRECISION)
        diag_lse = tl.permute(lse2, (1, 0))
        diag_out = tl.permute(out, (1, 0, 2))
        following = (blocks[:, None] < n_blocks - 1) & (slots[None, :] < block)
        following = following & (token + block >= 0) & (token + block < n)
        if HAS_VALID:
            following = following & (
                (tl.load(QUERY_VALID + g * n + token + block, mask=following, other=0) != 0)
                | unread[None, :]
            )
        q_eff = _load_tokens(Q, g, token + block, following, n, features, head_dim)
    q_slot = tl.permute(q, (1, 0, 2))
    weight_slot = tl.permute(valid, (1, 0)).to(tl.float32)
    rows_x = q_slot * weight_slot[:, :, None].to(dtype)
    earlier = blocks[None, None, :] < blocks[None, :, None]  # [·, l, k]: k < l
    for step in tl.static_range(NUM_STEPS):
        # R-update, by block: rows q̃[k, j], keys k[k, i]; then βL = λR − s·q̃·aL.
        scores = tl.dot(q_eff, keys_t, input_precision=PRECISION) * qk_scale + bias[:, None, :]
        probs_r, _, lse_r = _softmax_last(scores, no_sink)
        probs_r = probs_r.to(dtype)
        a_l = tl.dot(probs_r, keys, input_precision=PRECISION)
        bias_l = lse_r - qk_scale * tl.sum(q_eff.to(tl.float32) * a_l, axis=2)
        # L-update, by slot: rows q[j, l], keys aL[j, k], bias βL[j, k], sink δ[j, l].
        keys_l = tl.permute(a_l.to(dtype), (1, 2, 0))  # [j, feature, k]
        scores = tl.dot(q_slot, keys_l, input_precision=PRECISION) * qk_scale
        scores += tl.permute(bias_l, (1, 0))[:, None, :]
        if CAUSAL:
            scores = tl.where(earlier, scores, float("-inf"))
        probs_l, sink_weight, _ = _softmax_last(scores, diag_lse)
        if step == NUM_STEPS - 1:
            y = tl.permute(tl.dot(probs_r, values, input_precision=PRECISION).to(dtype), (1, 0, 2))
            out = tl.dot(probs_l.to(dtype), y, input_precision=PRECISION)
            out += sink_weight[:, :, None] * diag_out
            token_slot = tl.permute(token, (1, 0))
            present_slot = tl.permute(present, (1, 0))
            mask = present_slot[:, :, None] & (widths[None, None, :] < width)
            offsets = (g * n + token_slot[:, :, None]) * width + widths[None, None, :]
            tl.store(OUT + offsets, out.to(OUT.dtype.element_ty), mask=mask)
        else:
            # [aR | cR] = Pᵀ·[ω q | ω] per key block, and q̃ = aR / cR (0 where cR = 0).
            probs_t = tl.permute(probs_l, (0, 2, 1))
            summed = tl.dot(probs_t.to(dtype), rows_x, input_precision=PRECISION)
            norm = tl.sum(probs_t * weight_slot[:, None, :], axis=2)
            inverse = tl.where(norm > 0, 1.0 / tl.where(norm > 0, norm, 1.0), 0.0)
            q_eff = tl.permute(summed * inverse[:, :, None], (1, 0, 2)).to(dtype)


def fused_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_bias: torch.Tensor | None,
    query_valid: torch.Tensor | None,
    config: MonarchConfig,
) -> torch.Tensor | None:
    """The single-launch forward of (g, N, ·) inputs, or None when the sequence is too long for
    it (N'·max(d, dv) > FUSED_MAX_ELEMENTS after rounding to powers of two)."""
    groups, n, head_dim = q.shape
    width = v.shape[-1]
    n_blocks = max(1, math.ceil(n / config.block_size))
    rows, slots = _block(n_blocks), _block(config.block_size)
    if rows * slots * max(_block(head_dim), _block(width)) > FUSED_MAX_ELEMENTS:
        return None
    front = n_blocks * config.block_size - n if config.pad == "pre" else 0
    out = torch.empty(groups, n, width, device=q.device, dtype=q.dtype)
    stats = torch.promote_types(q.dtype, torch.float32)
    q, k, v = (x.contiguous() for x in (q, k, v))
    _fused_forward_kernel[(groups,)](
        q,
        k,
        v,
        _or(None if key_bias is None else key_bias.to(stats).contiguous(), q),
        _or(None if query_valid is None else query_valid.contiguous(), q),
        out,
        n,
        head_dim,
        width,
        n_blocks,
        config.block_size,
        front,
        config.scale,
        HAS_BIAS=key_bias is not None,
        HAS_VALID=query_valid is not None,
        CAUSAL=config.is_causal,
        NUM_STEPS=config.steps,
        BM=rows,
        BB=slots,
        BLOCK_D=_block(head_dim),
        BLOCK_W=_block(width),
        PRECISION=_precision(q.dtype),
        num_warps=8 if rows * slots * _block(head_dim) >= 8192 else 4,
    )
    return out


def _strides(x: torch.Tensor | None) -> tuple[int, int, int]:
    """(group, subgroup, row) strides of a [g, group, n(, feature)] view; the feature stride
    must be 1."""
    if x is None:
        return (0, 0, 0)
    if x.dim() == 4 and x.stride(3) != 1:
        raise ValueError(f"stage tensors need a contiguous last dim, got strides {x.stride()}")
    return (x.stride(0), x.stride(1), x.stride(2))


def _block(width: int) -> int:
    return triton.next_power_of_2(max(16, width))


def _precision(dtype: torch.dtype) -> str:
    """fp32 products in tf32 only when torch allows it (fp16/bf16 use tensor cores anyway)."""
    if dtype == torch.float32 and (INTERPRETED or not torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


class TritonStageOps:
    """`StageOps` (attnrewrite/methods/monarch/stages.py) on the two stage kernels."""

    workspace = None  # CUDA's caching allocator already reuses intermediates
    folds_diagonal = False  # the R-update kernel computes keys_dot in registers

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"the Triton kernels take fp16, bf16 or fp32, got {dtype}")
        return dtype

    def attend(
        self,
        q: Tensor,
        keys: Tensor,
        values: Tensor | None,
        bias: Tensor | None,
        out: Tensor | None,
        lse: Tensor | None,
        *,
        scale: float,
        causal: int | None = None,
        sink_logit: Tensor | None = None,
        sink_value: Tensor | None = None,
        keys_out: Tensor | None = None,
        keys_dot: Tensor | None = None,
        transposed: Tensor | None = None,
        transposed_out: Tensor | None = None,
        bias_minus_diagonal: int | None = None,
        diagonal_weight: Tensor | None = None,
    ) -> None:
        assert bias_minus_diagonal is None, "folds_diagonal is False: pass keys_dot's bias"
        if lse is None:  # not needed by the caller; the kernel writes it regardless
            lse = q.new_empty(q.shape[:3], dtype=torch.float32)
        self._rows(
            q,
            keys,
            values,
            bias,
            lse,
            scale=scale,
            causal=causal,
            sink_logit=sink_logit,
            sink_value=sink_value,
            out=out,
            keys_out=keys_out,
            keys_dot=keys_dot,
        )
        if transposed is not None:
            self._cols(
                q,
                keys,
                None,
                bias,
                lse,
                None,
                None,
                None,
                None,
                scale=scale,
                causal=causal,
                transposed=transposed,
                transposed_out=transposed_out,
            )

    def attend_grads(
        self,
        q: Tensor,
        keys: Tensor,
        values: Tensor,
        bias: Tensor | None,
        lse: Tensor,
        d_out: Tensor,
        delta: Tensor,
        dq: Tensor,
        dkeys: Tensor,
        dbias: Tensor | None,
        *,
        scale: float,
        causal: int | None = None,
        transposed: Tensor | None = None,
        transposed_out: Tensor | None = None,
    ) -> None:
        self._cols(
            q,
            keys,
            values,
            bias,
            lse,
            d_out,
            delta,
            dkeys,
            dbias,
            scale=scale,
            causal=causal,
            transposed=transposed,
            transposed_out=transposed_out,
        )
        self._rows(
            q, keys, values, bias, lse, scale=scale, causal=causal, d_out=d_out, delta=delta, dq=dq
        )

    def _rows(
        self,
        q: Tensor,
        keys: Tensor,
        values: Tensor | None,
        bias: Tensor | None,
        lse: Tensor,
        *,
        scale: float,
        causal: int | None,
        sink_logit: Tensor | None = None,
        sink_value: Tensor | None = None,
        out: Tensor | None = None,
        keys_out: Tensor | None = None,
        keys_dot: Tensor | None = None,
        d_out: Tensor | None = None,
        delta: Tensor | None = None,
        dq: Tensor | None = None,
    ) -> None:
        """The row kernel: the forward outputs, or with d_out the GRAD output dq. An absent
        tensor passes a placeholder pointer (q for features, lse for scalars) its flag keeps
        unread."""
        assert keys_out is None or keys_dot is not None, "the kernel writes keys_dot with keys_out"
        groups, n_groups, n_rows, head_dim = q.shape
        n_cols = keys.shape[2]
        width = 0 if values is None else values.shape[3]
        grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_R"]), groups * n_groups)  # noqa: E731
        _attend_rows_kernel[grid](
            q,
            _strides(q),
            keys,
            _strides(keys),
            _or(values, q),
            _strides(values),
            _or(bias, lse),
            _strides(bias),
            _or(sink_logit, lse),
            _strides(sink_logit),
            _or(sink_value, q),
            _strides(sink_value),
            _or(out, q),
            _strides(out),
            lse,
            _strides(lse),
            _or(keys_out, q),
            _strides(keys_out),
            _or(keys_dot, lse),
            _strides(keys_dot),
            _or(d_out, q),
            _strides(d_out),
            _or(delta, lse),
            _strides(delta),
            _or(dq, q),
            _strides(dq),
            n_groups,
            n_rows,
            n_cols,
            head_dim,
            width,
            scale,
            causal or 0,
            HAS_BIAS=bias is not None,
            CAUSAL=causal is not None,
            HAS_SINK=sink_logit is not None,
            HAS_SINK_VALUE=sink_value is not None,
            HAS_VALUES=values is not None,
            HAS_KEYS_OUT=keys_out is not None,
            GRAD=d_out is not None,
            BLOCK_D=_block(head_dim),
            BLOCK_W=_block(width),
            PRECISION=_precision(q.dtype),
        )

    def _cols(
        self,
        q: Tensor,
        keys: Tensor,
        values: Tensor | None,
        bias: Tensor | None,
        lse: Tensor,
        d_out: Tensor | None,
        delta: Tensor | None,
        dkeys: Tensor | None,
        dbias: Tensor | None,
        *,
        scale: float,
        causal: int | None,
        transposed: Tensor | None,
        transposed_out: Tensor | None,
    ) -> None:
        """The column kernel: Pᵀ·transposed, and with values the GRAD outputs (dkeys, dbias)."""
        groups, n_groups, n_rows, head_dim = q.shape
        n_cols = keys.shape[2]
        width = 0 if values is None else values.shape[3]
        x_width = 0 if transposed is None else transposed.shape[3]
        grid = lambda meta: (triton.cdiv(n_cols, meta["BLOCK_C"]), groups * n_groups)  # noqa: E731
        _attend_cols_kernel[grid](
            q,
            _strides(q),
            keys,
            _strides(keys),
            _or(values, q),
            _strides(values),
            _or(bias, lse),
            _strides(bias),
            lse,
            _strides(lse),
            _or(transposed, q),
            _strides(transposed),
            _or(transposed_out, q),
            _strides(transposed_out),
            _or(d_out, q),
            _strides(d_out),
            _or(delta, lse),
            _strides(delta),
            _or(dkeys, q),
            _strides(dkeys),
            _or(dbias, lse),
            _strides(dbias),
            n_groups,
            n_rows,
            n_cols,
            head_dim,
            width,
            x_width,
            scale,
            causal or 0,
            HAS_BIAS=bias is not None,
            CAUSAL=causal is not None,
            TRANSPOSED=transposed is not None,
            GRAD=values is not None,
            HAS_DBIAS=dbias is not None,
            BLOCK_D=_block(head_dim),
            BLOCK_W=_block(width),
            BLOCK_X=_block(x_width),
            PRECISION=_precision(q.dtype),
        )


def _or(x: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """A pointer for an absent argument (its kernel flag keeps it unread)."""
    return placeholder if x is None else x
