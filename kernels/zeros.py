"""Triton kernels for ZeroS attention (`attnrewrite::zeros_attention`): forward and backward,
chunked causal and non-causal, following flash-linear-attention's `chunk` strategy.

Per (batch·head) g, with the notation of attnrewrite/methods/zeros/linear.py: the output is
o_t = Σ_{i∈S_t} W_{t,i}·A_{t,i}·v_i with A = q̂·k̂ᵀ and W_{t,i} = a_t e^{s_i − m_t} + b_t s_i + c_t.

Forward (two kernels):
  1. `_states_kernel`: one program per (g, dv-block) walks the key chunks in order and keeps the
     d×dv states F (relative to the running max m), G, H and the scalars m, E, P, n. Causal, it
     stores the state *before* every chunk; non-causal, the total once.
  2. `_output_kernel`: one program per (g, query chunk, dv-block): row statistics (causal: the
     state before the chunk plus the chunk's own keys i ≤ t, with the row's prefix max m_t),
     then o = a·r·(q̂F) + b·(q̂G) + c·(q̂H) + (W∘A)·V for the intra-chunk pairs.
Backward (three kernels), with D_{t,i} = A_{t,i}·(dO_t·v_i):
  3. `_query_grad_kernel`: per query chunk, Q^F_t = Σ e^{s_i − m_t}(dO_t·v_i) k̂_i (and Q^G with
     s_i, Q^H with 1); dq̂ = a Q^F + b Q^G + c Q^H; the row sums R1 = q̂·Q^F = Σ e^{s_i−m_t} D,
     Rs = q̂·Q^G, R0 = q̂·Q^H give the gate gradients
       dσ¹_t = (Rs − s̄ R0)/n,   dσʰ_t = R1/E − (Rs − s̄ R0)/n − R0/n,
     and x_t = a R1/E, z_t = b R0/n for the logit gradient. Row coefficients go to a workspace.
  4. `_reverse_states_kernel`: walks the query chunks backwards and keeps dF = Σ a_t e^{m_ref−m_t}
     q̂_t dO_tᵀ, dG = Σ b_t q̂_t dO_tᵀ, dH = Σ c_t q̂_t dO_tᵀ, X = Σ x_t e^{m_ref−m_t}, Z = Σ z_t over
     the rows after each chunk, relative to m_ref = the prefix max at the chunk's last row; every
     factor is e^{(smaller) − (larger)} because the prefix max never decreases.
  5. `_key_grad_kernel`: per key chunk, with f_j = e^{s_j − m_ref}:
       dv_j = f_j k̂_j dF + s_j k̂_j dG + k̂_j dH + Σ_intra W A dO,
       dk̂_j = f_j dF v_j + s_j dG v_j + dH v_j + Σ_intra W (dO·v_j) q̂,
       ds_j = f_j k̂_j·dF v_j + k̂_j·dG v_j − f_j X − Z + Σ_intra [(a e + b) D − e x − z].
The L2 normalization of q and k and its backward happen inside the kernels, so q̂ and k̂ are
never written to memory. All arithmetic is fp32 (tl.dot with fp32 operands, "ieee" precision):
the zero-sum weights cancel (the output is a small difference of O(1) terms), so the states and
the products with them must not be rounded to 16 bits. Inputs and outputs keep their dtype.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

NORM_EPS = tl.constexpr(1e-12)  # F.normalize's floor, as in the reference
NEG_INF = tl.constexpr(float("-inf"))
MAX_CHUNK = 64
MAX_HEAD_DIM = 256


def _configs() -> list[triton.Config]:
    """GPU configs to autotune over; the interpreter (TRITON_INTERPRET=1, CPU) gets one."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2, 3)]


_TUNE_KEY = ["BLOCK_D", "BLOCK_DV", "CHUNK", "IS_CAUSAL"]


@triton.jit
def _finite(m):
    """The stabilizer with −inf (no key yet) replaced by 0, so s − m is never inf − inf."""
    return tl.where(m == NEG_INF, 0.0, m)


@triton.jit
def _rescale(m_old, m_new):
    """e^{m_old − m_new} for m_old ≤ m_new; 1 when both are −inf (the sums are still empty)."""
    return tl.where(m_new == NEG_INF, 1.0, tl.exp(m_old - _finite(m_new)))


@triton.jit
def _load_tile(ptr, rows, n_rows, cols, width):
    """A (rows × cols) fp32 tile of a row-major (n_rows, width) matrix; zeros outside."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < width)
    return tl.load(ptr + rows[:, None] * width + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_tile(ptr, value, rows, n_rows, cols, width):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < width)
    tl.store(ptr + rows[:, None] * width + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _normalize(x):
    """Rows of x scaled to unit L2 norm (norm floored at NORM_EPS); also returns the norms."""
    norm = tl.sqrt(tl.sum(x * x, axis=1))
    return x / tl.maximum(norm, NORM_EPS)[:, None], norm


@triton.jit
def _normalize_backward(x_hat, grad_hat, norm):
    """d/dx of x / max(‖x‖, eps) applied to grad_hat."""
    along = tl.where(norm > NORM_EPS, tl.sum(x_hat * grad_hat, axis=1), 0.0)
    return (grad_hat - x_hat * along[:, None]) / tl.maximum(norm, NORM_EPS)[:, None]


@triton.jit
def _keys(S, VALID, rows, n_keys, HAS_MASK: tl.constexpr):
    """(s, valid) for a chunk of keys; masked and out-of-range keys get s = 0, valid = False."""
    valid = rows < n_keys
    if HAS_MASK:
        valid = valid & (tl.load(VALID + rows, mask=rows < n_keys, other=0) != 0)
    s = tl.load(S + rows, mask=valid, other=0.0)
    return tl.where(valid, s, 0.0), valid


@triton.jit
def _state_offsets(d, dv, offs_d, offs_v):
    return offs_d[:, None] * dv + offs_v[None, :], (offs_d[:, None] < d) & (offs_v[None, :] < dv)


@triton.jit
def _causal_rows(s, valid, m0, e0, p0, n0, CHUNK: tl.constexpr):
    """Row statistics of a causal chunk: its rows see the state (m0, e0, p0, n0) of the keys
    before the chunk and the chunk's own keys i ≤ t. Returns allowed (C×C), m_t, r_t =
    e^{m0 − m_t}, e^{s_i − m_t} (C×C), E_t, P_t, n_t."""
    offs = tl.arange(0, CHUNK)
    allowed = (offs[:, None] >= offs[None, :]) & valid[None, :]
    m_t = tl.maximum(m0, tl.max(tl.where(allowed, s[None, :], NEG_INF), axis=1))
    r_t = _rescale(m0, m_t)
    e_intra = tl.exp(tl.where(allowed, s[None, :] - _finite(m_t)[:, None], NEG_INF))
    exp_sum = e0 * r_t + tl.sum(e_intra, axis=1)
    logit_sum = p0 + tl.sum(tl.where(allowed, s[None, :], 0.0), axis=1)
    count = n0 + tl.sum(allowed.to(tl.float32), axis=1)
    return allowed, m_t, r_t, e_intra, exp_sum, logit_sum, count


@triton.jit
def _coefficients(g1, gh, exp_sum, logit_sum, count):
    """(a, b, c) per row; all 0 for a query with no key."""
    has_keys = count > 0
    count_safe = tl.where(has_keys, count, 1.0)
    a = tl.where(has_keys, gh / tl.where(has_keys, exp_sum, 1.0), 0.0)
    b = tl.where(has_keys, (g1 - gh) / count_safe, 0.0)
    c = tl.where(has_keys, -(b * logit_sum + gh) / count_safe, 0.0)
    return a, b, c


@triton.autotune(configs=_configs(), key=_TUNE_KEY)
@triton.jit
def _states_kernel(
    K, V, S, VALID, STATES, STATS, n_keys, d, dv,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
):  # fmt: skip
    g = tl.program_id(0).to(tl.int64)  # base offsets can pass 2³¹
    pid_v = tl.program_id(1)
    n_chunks = tl.cdiv(n_keys, CHUNK)
    n_slots = n_chunks if IS_CAUSAL else 1
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    K += g * n_keys * d
    V += g * n_keys * dv
    S += g * n_keys
    VALID += g * n_keys
    STATES += g * n_slots * 3 * d * dv
    STATS += g * n_slots * 4
    state_offs, state_mask = _state_offsets(d, dv, offs_d, offs_v)
    first_block = pid_v == 0

    f_state = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
    g_state = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
    h_state = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
    zero = tl.sum(tl.zeros([CHUNK], dtype=tl.float32), axis=0)
    m, exp_sum, logit_sum, count = zero + NEG_INF, zero, zero, zero
    for c in range(0, n_chunks):
        if IS_CAUSAL:  # the state before chunk c
            base = STATES + c * 3 * d * dv
            tl.store(base + state_offs, f_state, mask=state_mask)
            tl.store(base + d * dv + state_offs, g_state, mask=state_mask)
            tl.store(base + 2 * d * dv + state_offs, h_state, mask=state_mask)
            tl.store(STATS + c * 4, m, mask=first_block)
            tl.store(STATS + c * 4 + 1, exp_sum, mask=first_block)
            tl.store(STATS + c * 4 + 2, logit_sum, mask=first_block)
            tl.store(STATS + c * 4 + 3, count, mask=first_block)
        rows = c * CHUNK + offs_c
        k_hat, _ = _normalize(_load_tile(K, rows, n_keys, offs_d, d))
        v = _load_tile(V, rows, n_keys, offs_v, dv)
        s, valid = _keys(S, VALID, rows, n_keys, HAS_MASK)
        m_new = tl.maximum(m, tl.max(tl.where(valid, s, NEG_INF), axis=0))
        r = _rescale(m, m_new)
        e = tl.exp(tl.where(valid, s - _finite(m_new), NEG_INF))
        valid_f = valid.to(tl.float32)
        f_state = f_state * r + tl.dot(tl.trans(k_hat * e[:, None]), v, input_precision="ieee")
        g_state += tl.dot(tl.trans(k_hat * s[:, None]), v, input_precision="ieee")
        h_state += tl.dot(tl.trans(k_hat * valid_f[:, None]), v, input_precision="ieee")
        exp_sum = exp_sum * r + tl.sum(e, axis=0)
        logit_sum += tl.sum(s, axis=0)
        count += tl.sum(valid_f, axis=0)
        m = m_new
    if not IS_CAUSAL:  # the total
        tl.store(STATES + state_offs, f_state, mask=state_mask)
        tl.store(STATES + d * dv + state_offs, g_state, mask=state_mask)
        tl.store(STATES + 2 * d * dv + state_offs, h_state, mask=state_mask)
        tl.store(STATS, m, mask=first_block)
        tl.store(STATS + 1, exp_sum, mask=first_block)
        tl.store(STATS + 2, logit_sum, mask=first_block)
        tl.store(STATS + 3, count, mask=first_block)


@triton.jit
def _chunk_rows(
    Q, K, S, VALID, G1, GH, STATS, g, c, n_queries, n_keys, d,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
):  # fmt: skip
    """Everything about query chunk c that does not depend on v: q̂ and its norms, the keys
    of the same chunk (causal), the row statistics and coefficients."""
    n_slots = tl.cdiv(n_keys, CHUNK) if IS_CAUSAL else 1
    slot = c if IS_CAUSAL else 0
    rows = c * CHUNK + tl.arange(0, CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    q_hat, q_norm = _normalize(_load_tile(Q + g * n_queries * d, rows, n_queries, offs_d, d))
    row_ok = rows < n_queries
    g1 = tl.load(G1 + g * n_queries + rows, mask=row_ok, other=0.0)
    gh = tl.load(GH + g * n_queries + rows, mask=row_ok, other=0.0)
    stats = STATS + (g * n_slots + slot) * 4
    m0 = tl.load(stats)
    e0 = tl.load(stats + 1)
    p0 = tl.load(stats + 2)
    n0 = tl.load(stats + 3)
    if IS_CAUSAL:  # queries and keys share positions (Nq = Nk)
        k_hat, _ = _normalize(_load_tile(K + g * n_keys * d, rows, n_keys, offs_d, d))
        s, valid = _keys(S + g * n_keys, VALID + g * n_keys, rows, n_keys, HAS_MASK)
        allowed, m_t, r_t, e_intra, exp_sum, logit_sum, count = _causal_rows(
            s, valid, m0, e0, p0, n0, CHUNK
        )
    else:  # every row sees the total; the intra-chunk terms are absent
        k_hat = tl.zeros([CHUNK, BLOCK_D], dtype=tl.float32)
        s = tl.zeros([CHUNK], dtype=tl.float32)
        allowed = (rows[:, None] < 0) & (rows[None, :] < 0)
        e_intra = tl.zeros([CHUNK, CHUNK], dtype=tl.float32)
        m_t = tl.zeros([CHUNK], dtype=tl.float32) + m0
        r_t = tl.zeros([CHUNK], dtype=tl.float32) + 1.0
        exp_sum = tl.zeros([CHUNK], dtype=tl.float32) + e0
        logit_sum = tl.zeros([CHUNK], dtype=tl.float32) + p0
        count = tl.zeros([CHUNK], dtype=tl.float32) + n0
    a, b, cc = _coefficients(g1, gh, exp_sum, logit_sum, count)
    return (rows, q_hat, q_norm, k_hat, s, allowed, e_intra, m_t, r_t, exp_sum, logit_sum,
            count, a, b, cc)  # fmt: skip


@triton.autotune(configs=_configs(), key=_TUNE_KEY)
@triton.jit
def _output_kernel(
    Q, K, V, S, VALID, G1, GH, STATES, STATS, OUT, n_queries, n_keys, d, dv,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
):  # fmt: skip
    g = tl.program_id(0).to(tl.int64)  # base offsets can pass 2³¹
    c = tl.program_id(1)
    pid_v = tl.program_id(2)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    (rows, q_hat, _, k_hat, s, allowed, e_intra, _, r_t, _, _, _, a, b, cc) = _chunk_rows(
        Q, K, S, VALID, G1, GH, STATS, g, c, n_queries, n_keys, d,
        CHUNK, BLOCK_D, IS_CAUSAL, HAS_MASK,
    )  # fmt: skip
    n_slots = tl.cdiv(n_keys, CHUNK) if IS_CAUSAL else 1
    slot = c if IS_CAUSAL else 0
    base = STATES + (g * n_slots + slot) * 3 * d * dv
    state_offs, state_mask = _state_offsets(d, dv, offs_d, offs_v)
    f_state = tl.load(base + state_offs, mask=state_mask, other=0.0)
    g_state = tl.load(base + d * dv + state_offs, mask=state_mask, other=0.0)
    h_state = tl.load(base + 2 * d * dv + state_offs, mask=state_mask, other=0.0)
    out = (a * r_t)[:, None] * tl.dot(q_hat, f_state, input_precision="ieee")
    out += b[:, None] * tl.dot(q_hat, g_state, input_precision="ieee")
    out += cc[:, None] * tl.dot(q_hat, h_state, input_precision="ieee")
    if IS_CAUSAL:
        v = _load_tile(V + g * n_keys * dv, rows, n_keys, offs_v, dv)
        weights = a[:, None] * e_intra + tl.where(
            allowed, b[:, None] * s[None, :] + cc[:, None], 0.0
        )
        cos_theta = tl.dot(q_hat, tl.trans(k_hat), input_precision="ieee")
        out += tl.dot(weights * cos_theta, v, input_precision="ieee")
    _store_tile(OUT + g * n_queries * dv, out, rows, n_queries, offs_v, dv)


@triton.autotune(configs=_configs(), key=_TUNE_KEY)
@triton.jit
def _query_grad_kernel(
    Q, K, V, S, VALID, G1, GH, STATES, STATS, DO, DQ, DG1, DGH, ROWCOEF,
    n_queries, n_keys, d, dv,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
):  # fmt: skip
    g = tl.program_id(0).to(tl.int64)  # base offsets can pass 2³¹
    c = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = tl.arange(0, BLOCK_DV)
    (rows, q_hat, q_norm, k_hat, s, allowed, e_intra, m_t, r_t, exp_sum, logit_sum, count,
     a, b, cc) = _chunk_rows(
        Q, K, S, VALID, G1, GH, STATS, g, c, n_queries, n_keys, d,
        CHUNK, BLOCK_D, IS_CAUSAL, HAS_MASK,
    )  # fmt: skip
    n_slots = tl.cdiv(n_keys, CHUNK) if IS_CAUSAL else 1
    slot = c if IS_CAUSAL else 0
    base = STATES + (g * n_slots + slot) * 3 * d * dv
    state_offs, state_mask = _state_offsets(d, dv, offs_d, offs_v)
    f_state = tl.load(base + state_offs, mask=state_mask, other=0.0)
    g_state = tl.load(base + d * dv + state_offs, mask=state_mask, other=0.0)
    h_state = tl.load(base + 2 * d * dv + state_offs, mask=state_mask, other=0.0)
    d_out = _load_tile(DO + g * n_queries * dv, rows, n_queries, offs_v, dv)
    # Q^X_t = Σ_i (feature_X of key i)·(dO_t·v_i)·k̂_i, split into the state part and the chunk.
    q_f = r_t[:, None] * tl.dot(d_out, tl.trans(f_state), input_precision="ieee")
    q_g = tl.dot(d_out, tl.trans(g_state), input_precision="ieee")
    q_h = tl.dot(d_out, tl.trans(h_state), input_precision="ieee")
    if IS_CAUSAL:
        v = _load_tile(V + g * n_keys * dv, rows, n_keys, offs_v, dv)
        grad_pairs = tl.dot(d_out, tl.trans(v), input_precision="ieee")
        q_f += tl.dot(e_intra * grad_pairs, k_hat, input_precision="ieee")
        q_g += tl.dot(
            tl.where(allowed, s[None, :] * grad_pairs, 0.0), k_hat, input_precision="ieee"
        )
        q_h += tl.dot(tl.where(allowed, grad_pairs, 0.0), k_hat, input_precision="ieee")
    dq_hat = a[:, None] * q_f + b[:, None] * q_g + cc[:, None] * q_h
    r1 = tl.sum(q_hat * q_f, axis=1)
    rs = tl.sum(q_hat * q_g, axis=1)
    r0 = tl.sum(q_hat * q_h, axis=1)
    has_keys = count > 0
    count_safe = tl.where(has_keys, count, 1.0)
    exp_safe = tl.where(has_keys, exp_sum, 1.0)
    first_order = tl.where(has_keys, (rs - logit_sum / count_safe * r0) / count_safe, 0.0)
    d_gh = tl.where(has_keys, r1 / exp_safe - first_order - r0 / count_safe, 0.0)
    row_ok = rows < n_queries
    dq = _normalize_backward(q_hat, dq_hat, q_norm)
    _store_tile(DQ + g * n_queries * d, dq, rows, n_queries, offs_d, d)
    tl.store(DG1 + g * n_queries + rows, first_order, mask=row_ok)
    tl.store(DGH + g * n_queries + rows, d_gh, mask=row_ok)
    coef = ROWCOEF + (g * n_queries + rows) * 6
    tl.store(coef, a, mask=row_ok)
    tl.store(coef + 1, b, mask=row_ok)
    tl.store(coef + 2, cc, mask=row_ok)
    tl.store(coef + 3, m_t, mask=row_ok)
    tl.store(coef + 4, a * r1 / exp_safe, mask=row_ok)
    tl.store(coef + 5, b * r0 / count_safe, mask=row_ok)


@triton.jit
def _row_coefficients(ROWCOEF, rows, n_queries):
    """(a, b, c, m_t, x, z) of a chunk of rows; rows out of range have zero coefficients."""
    row_ok = rows < n_queries
    coef = ROWCOEF + rows * 6
    a = tl.load(coef, mask=row_ok, other=0.0)
    b = tl.load(coef + 1, mask=row_ok, other=0.0)
    cc = tl.load(coef + 2, mask=row_ok, other=0.0)
    m_t = tl.load(coef + 3, mask=row_ok, other=float("-inf"))
    x = tl.load(coef + 4, mask=row_ok, other=0.0)
    z = tl.load(coef + 5, mask=row_ok, other=0.0)
    return a, b, cc, m_t, x, z


@triton.autotune(configs=_configs(), key=_TUNE_KEY)
@triton.jit
def _reverse_states_kernel(
    Q, DO, ROWCOEF, DSTATES, DSTATS, n_queries, d, dv,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
):  # fmt: skip
    g = tl.program_id(0).to(tl.int64)  # base offsets can pass 2³¹
    pid_v = tl.program_id(1)
    n_chunks = tl.cdiv(n_queries, CHUNK)
    n_slots = n_chunks if IS_CAUSAL else 1
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    Q += g * n_queries * d
    DO += g * n_queries * dv
    ROWCOEF += g * n_queries * 6
    DSTATES += g * n_slots * 3 * d * dv
    DSTATS += g * n_slots * 3
    state_offs, state_mask = _state_offsets(d, dv, offs_d, offs_v)
    first_block = pid_v == 0

    df_state = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
    dg_state = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
    dh_state = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
    zero = tl.sum(tl.zeros([CHUNK], dtype=tl.float32), axis=0)
    x_sum, z_sum = zero, zero
    # Causal: m_ref of chunk c is the prefix max at its last row; non-causal: the global max.
    m_ref = tl.load(ROWCOEF + (n_queries - 1) * 6 + 3)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        if IS_CAUSAL:  # the rows after chunk c, relative to m_ref of chunk c
            base = DSTATES + c * 3 * d * dv
            tl.store(base + state_offs, df_state, mask=state_mask)
            tl.store(base + d * dv + state_offs, dg_state, mask=state_mask)
            tl.store(base + 2 * d * dv + state_offs, dh_state, mask=state_mask)
            tl.store(DSTATS + c * 3, x_sum, mask=first_block)
            tl.store(DSTATS + c * 3 + 1, z_sum, mask=first_block)
            tl.store(DSTATS + c * 3 + 2, m_ref, mask=first_block)
            m_prev = tl.load(ROWCOEF + tl.maximum(c * CHUNK - 1, 0) * 6 + 3)
        else:
            m_prev = m_ref
        rows = c * CHUNK + offs_c
        q_hat, _ = _normalize(_load_tile(Q, rows, n_queries, offs_d, d))
        d_out = _load_tile(DO, rows, n_queries, offs_v, dv)
        a, b, cc, m_t, x, z = _row_coefficients(ROWCOEF, rows, n_queries)
        to_prev = _rescale(m_prev, m_t)  # ≤ 1: m_t ≥ m_prev for rows after chunk c − 1
        state_to_prev = _rescale(m_prev, m_ref)
        df_state = df_state * state_to_prev + tl.dot(
            tl.trans(q_hat * (a * to_prev)[:, None]), d_out, input_precision="ieee"
        )
        dg_state += tl.dot(tl.trans(q_hat * b[:, None]), d_out, input_precision="ieee")
        dh_state += tl.dot(tl.trans(q_hat * cc[:, None]), d_out, input_precision="ieee")
        x_sum = x_sum * state_to_prev + tl.sum(x * to_prev, axis=0)
        z_sum += tl.sum(z, axis=0)
        m_ref = m_prev
    if not IS_CAUSAL:
        tl.store(DSTATES + state_offs, df_state, mask=state_mask)
        tl.store(DSTATES + d * dv + state_offs, dg_state, mask=state_mask)
        tl.store(DSTATES + 2 * d * dv + state_offs, dh_state, mask=state_mask)
        tl.store(DSTATS, x_sum, mask=first_block)
        tl.store(DSTATS + 1, z_sum, mask=first_block)
        tl.store(DSTATS + 2, m_ref, mask=first_block)


@triton.autotune(configs=_configs(), key=_TUNE_KEY)
@triton.jit
def _key_grad_kernel(
    Q, K, V, S, VALID, DO, ROWCOEF, DSTATES, DSTATS, DK, DV, DS, n_queries, n_keys, d, dv,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
):  # fmt: skip
    g = tl.program_id(0).to(tl.int64)  # base offsets can pass 2³¹
    c = tl.program_id(1)
    n_slots = tl.cdiv(n_queries, CHUNK) if IS_CAUSAL else 1
    slot = c if IS_CAUSAL else 0
    rows = c * CHUNK + tl.arange(0, CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = tl.arange(0, BLOCK_DV)
    k_hat, k_norm = _normalize(_load_tile(K + g * n_keys * d, rows, n_keys, offs_d, d))
    v = _load_tile(V + g * n_keys * dv, rows, n_keys, offs_v, dv)
    s, valid = _keys(S + g * n_keys, VALID + g * n_keys, rows, n_keys, HAS_MASK)
    base = DSTATES + (g * n_slots + slot) * 3 * d * dv
    state_offs, state_mask = _state_offsets(d, dv, offs_d, offs_v)
    df_state = tl.load(base + state_offs, mask=state_mask, other=0.0)
    dg_state = tl.load(base + d * dv + state_offs, mask=state_mask, other=0.0)
    dh_state = tl.load(base + 2 * d * dv + state_offs, mask=state_mask, other=0.0)
    stats = DSTATS + (g * n_slots + slot) * 3
    x_sum = tl.load(stats)
    z_sum = tl.load(stats + 1)
    m_ref = tl.load(stats + 2)
    f = tl.exp(tl.where(valid, s - _finite(m_ref), NEG_INF))
    d_v = f[:, None] * tl.dot(k_hat, df_state, input_precision="ieee")
    d_v += s[:, None] * tl.dot(k_hat, dg_state, input_precision="ieee")
    d_v += tl.dot(k_hat, dh_state, input_precision="ieee")
    v_f = tl.dot(v, tl.trans(df_state), input_precision="ieee")
    v_g = tl.dot(v, tl.trans(dg_state), input_precision="ieee")
    v_h = tl.dot(v, tl.trans(dh_state), input_precision="ieee")
    dk_hat = f[:, None] * v_f + s[:, None] * v_g + v_h
    d_s = f * tl.sum(k_hat * v_f, axis=1) + tl.sum(k_hat * v_g, axis=1) - f * x_sum - z_sum
    if IS_CAUSAL:  # pairs (t ≥ j) inside the chunk; queries and keys share positions
        q_hat, _ = _normalize(_load_tile(Q + g * n_queries * d, rows, n_queries, offs_d, d))
        d_out = _load_tile(DO + g * n_queries * dv, rows, n_queries, offs_v, dv)
        a, b, cc, m_t, x, z = _row_coefficients(ROWCOEF + g * n_queries * 6, rows, n_queries)
        offs = tl.arange(0, CHUNK)
        allowed = (offs[:, None] >= offs[None, :]) & valid[None, :] & (rows < n_queries)[:, None]
        e = tl.exp(tl.where(allowed, s[None, :] - _finite(m_t)[:, None], NEG_INF))
        weights = a[:, None] * e + tl.where(allowed, b[:, None] * s[None, :] + cc[:, None], 0.0)
        cos_theta = tl.dot(q_hat, tl.trans(k_hat), input_precision="ieee")
        grad_pairs = tl.dot(d_out, tl.trans(v), input_precision="ieee")
        d_v += tl.dot(tl.trans(weights * cos_theta), d_out, input_precision="ieee")
        dk_hat += tl.dot(tl.trans(weights * grad_pairs), q_hat, input_precision="ieee")
        d_pairs = cos_theta * grad_pairs
        d_s += tl.sum(
            (a[:, None] * e + tl.where(allowed, b[:, None], 0.0)) * d_pairs
            - e * x[:, None]
            - tl.where(allowed, z[:, None], 0.0),
            axis=0,
        )
    d_v = tl.where(valid[:, None], d_v, 0.0)
    dk = tl.where(valid[:, None], _normalize_backward(k_hat, dk_hat, k_norm), 0.0)
    _store_tile(DK + g * n_keys * d, dk, rows, n_keys, offs_d, d)
    _store_tile(DV + g * n_keys * dv, d_v, rows, n_keys, offs_v, dv)
    tl.store(DS + g * n_keys + rows, tl.where(valid, d_s, 0.0), mask=rows < n_keys)


def _block(width: int) -> int:
    """A power-of-two tile width ≥ 16 (tl.dot's minimum) covering `width`."""
    return max(16, triton.next_power_of_2(width))


def _chunk(n: int, chunk_size: int | None) -> int:
    """Tokens per chunk: a power of two ≥ 16 (tl.dot's minimum), at most MAX_CHUNK."""
    if chunk_size is None:
        return min(MAX_CHUNK, _block(n))
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two ≥ 16, got {chunk_size}")
    return chunk_size


def _check(q: torch.Tensor, v: torch.Tensor) -> None:
    if q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "the ZeroS Triton kernels run on CPU tensors only in the Triton interpreter: set "
            "TRITON_INTERPRET=1 before attnrewrite's kernels are imported, or use CUDA tensors"
        )
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        raise ValueError(f"the ZeroS kernels take head dims up to {MAX_HEAD_DIM}")


def _key_mask(key_valid: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The key mask as bytes (a dummy pointer when there is none; HAS_MASK skips it)."""
    if key_valid is None:
        return like.new_empty(1, dtype=torch.uint8)
    return key_valid.contiguous().view(torch.uint8)


def _forward_states(k, v, key_logits, mask, has_mask, is_causal, chunk_size, block_dv):
    groups, n_keys, d = k.shape
    dv = v.shape[-1]
    n_slots = triton.cdiv(n_keys, chunk_size) if is_causal else 1
    states = k.new_empty(groups, n_slots, 3, d, dv, dtype=torch.float32)
    stats = k.new_empty(groups, n_slots, 4, dtype=torch.float32)
    _states_kernel[(groups, triton.cdiv(dv, block_dv))](
        k, v, key_logits, mask, states, stats, n_keys, d, dv,
        CHUNK=chunk_size, BLOCK_D=_block(d), BLOCK_DV=block_dv,
        IS_CAUSAL=is_causal, HAS_MASK=has_mask,
    )  # fmt: skip
    return states, stats


def zeros_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_logits: torch.Tensor,
    gate_first: torch.Tensor,
    gate_residual: torch.Tensor,
    key_valid: torch.Tensor | None,
    is_causal: bool,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """ZeroS output (G, Nq, dv) in q's dtype. q (G, Nq, d), k (G, Nk, d), v (G, Nk, dv)
    contiguous; logits (G, Nk) and gates (G, Nq) fp32; key_valid (G, Nk) bool or None.
    chunk_size: tokens per chunk, a power of two ≥ 16 (None: up to 64, by the length)."""
    _check(q, v)
    groups, n_queries, d = q.shape
    n_keys, dv = v.shape[-2:]
    chunk_size = _chunk(max(n_queries, n_keys), chunk_size)
    mask = _key_mask(key_valid, q)
    block_dv = min(64, _block(dv))
    states, stats = _forward_states(
        k, v, key_logits, mask, key_valid is not None, is_causal, chunk_size, block_dv
    )
    out = q.new_empty(groups, n_queries, dv)
    grid = (groups, triton.cdiv(n_queries, chunk_size), triton.cdiv(dv, block_dv))
    _output_kernel[grid](
        q, k, v, key_logits, mask, gate_first, gate_residual, states, stats, out,
        n_queries, n_keys, d, dv,
        CHUNK=chunk_size, BLOCK_D=_block(d), BLOCK_DV=block_dv,
        IS_CAUSAL=is_causal, HAS_MASK=key_valid is not None,
    )  # fmt: skip
    return out


def zeros_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_logits: torch.Tensor,
    gate_first: torch.Tensor,
    gate_residual: torch.Tensor,
    key_valid: torch.Tensor | None,
    is_causal: bool,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """Gradients (dq, dk, dv, d_logits, d_gate_first, d_gate_residual) of zeros_forward."""
    _check(q, v)
    groups, n_queries, d = q.shape
    n_keys, dv = v.shape[-2:]
    chunk_size = _chunk(max(n_queries, n_keys), chunk_size)
    mask = _key_mask(key_valid, q)
    has_mask = key_valid is not None
    full_dv = _block(dv)
    grad_out = grad_out.contiguous()
    states, stats = _forward_states(
        k, v, key_logits, mask, has_mask, is_causal, chunk_size, full_dv
    )
    dq, dk, dvalue = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    d_logits = torch.empty_like(key_logits)
    d_gate_first, d_gate_residual = torch.empty_like(gate_first), torch.empty_like(gate_residual)
    row_coefficients = q.new_empty(groups, n_queries, 6, dtype=torch.float32)
    n_row_chunks = triton.cdiv(n_queries, chunk_size)
    _query_grad_kernel[(groups, n_row_chunks)](
        q, k, v, key_logits, mask, gate_first, gate_residual, states, stats, grad_out,
        dq, d_gate_first, d_gate_residual, row_coefficients, n_queries, n_keys, d, dv,
        CHUNK=chunk_size, BLOCK_D=_block(d), BLOCK_DV=full_dv,
        IS_CAUSAL=is_causal, HAS_MASK=has_mask,
    )  # fmt: skip
    n_slots = n_row_chunks if is_causal else 1
    d_states = q.new_empty(groups, n_slots, 3, d, dv, dtype=torch.float32)
    d_stats = q.new_empty(groups, n_slots, 3, dtype=torch.float32)
    block_dv = min(64, full_dv)
    _reverse_states_kernel[(groups, triton.cdiv(dv, block_dv))](
        q, grad_out, row_coefficients, d_states, d_stats, n_queries, d, dv,
        CHUNK=chunk_size, BLOCK_D=_block(d), BLOCK_DV=block_dv, IS_CAUSAL=is_causal,
    )  # fmt: skip
    _key_grad_kernel[(groups, triton.cdiv(n_keys, chunk_size))](
        q, k, v, key_logits, mask, grad_out, row_coefficients, d_states, d_stats,
        dk, dvalue, d_logits, n_queries, n_keys, d, dv,
        CHUNK=chunk_size, BLOCK_D=_block(d), BLOCK_DV=full_dv,
        IS_CAUSAL=is_causal, HAS_MASK=has_mask,
    )  # fmt: skip
    return dq, dk, dvalue, d_logits, d_gate_first, d_gate_residual
