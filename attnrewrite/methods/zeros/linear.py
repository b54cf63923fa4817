"""ZeroS in its linear form, O(N·d·dv), in PyTorch: the CPU path of the op, forward and backward.

Expanding w_{t,i} (reference.py) gives w_{t,i} = a_t·e^{s_i − m_t} + b_t·s_i + c_t with, over S_t,

  m_t = max s_i (the stabilizer),  E_t = Σ e^{s_i − m_t},  P_t = Σ s_i,  n_t = |S_t|,
  a_t = σʰ_t / E_t,  b_t = (σ¹_t − σʰ_t) / n_t,  c_t = −(b_t·P_t + σʰ_t) / n_t,

so o_t = q̂_t·(a_t·F_t + b_t·G_t + c_t·H_t) with the d×dv sums F_t = Σ e^{s_i − m_t} k̂_iᵀv_i,
G_t = Σ s_i k̂_iᵀv_i, H_t = Σ k̂_iᵀv_i: one linear attention with key dimension 3d. Non-causal,
the sums run over all keys. Causal, they are prefix sums, computed by chunks as in
flash-linear-attention's `chunk` strategy: inside a chunk of C tokens the pairs (t, i ≤ t) are a
C×C product; across chunks a d×dv state carries F, G, H. The stabilizer is a running (prefix) max:
the state before a chunk is kept relative to the max of the keys before it and rescaled by
e^{m_old − m_new} as the max grows, so no exponent is ever positive and no global max is needed.

The backward pass (`zeros_linear_backward`) is written out rather than left to autograd: it is the
same algorithm as the Triton kernels (kernels/zeros.py documents the formulas): per-row gradients
from the forward states, a reverse scan over chunks for the key-side states, then per-key
gradients. Autograd through the chunk recurrence would be much slower and larger.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from .reference import NORM_EPS

MAX_CHUNK_SIZE = 64  # longer sequences are cut into chunks of this many tokens
NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class PreparedInputs:
    """The op's inputs with batch dims flattened to G: q (G, Nq, d), k (G, Nk, d), v (G, Nk, dv)
    in the input dtype; logits (G, Nk) and gates (G, Nq) in the statistics dtype (fp32, or fp64
    for fp64 inputs); key_valid (G, Nk) bool or None.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_logits: torch.Tensor
    gate_first: torch.Tensor
    gate_residual: torch.Tensor
    key_valid: torch.Tensor | None
    batch: tuple[int, ...]

    def unflatten(self, out: torch.Tensor) -> torch.Tensor:
        """(G, N, ·) → (*batch, N, ·)."""
        return out.reshape(*self.batch, *out.shape[1:])


def prepare_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_logits: torch.Tensor,
    gate_first: torch.Tensor,
    gate_residual: torch.Tensor,
    key_valid: torch.Tensor | None,
) -> PreparedInputs:
    """Flatten batch dims and fix dtypes (shapes were checked by the public wrapper)."""
    batch = tuple(q.shape[:-2])
    stats = torch.promote_types(q.dtype, torch.float32)
    groups = math.prod(batch)
    n_q, n_k = q.shape[-2], k.shape[-2]

    def flat(x: torch.Tensor, *tail: int) -> torch.Tensor:
        return x.reshape(groups, *tail).contiguous()

    return PreparedInputs(
        q=flat(q, n_q, q.shape[-1]),
        k=flat(k, n_k, k.shape[-1]),
        v=flat(v, n_k, v.shape[-1]),
        key_logits=flat(key_logits.to(stats), n_k),
        gate_first=flat(gate_first.to(stats), n_q),
        gate_residual=flat(gate_residual.to(stats), n_q),
        key_valid=None if key_valid is None else flat(key_valid.broadcast_to(*batch, n_k), n_k),
        batch=batch,
    )


def row_coefficients(
    gate_first: torch.Tensor,
    gate_residual: torch.Tensor,
    exp_sum: torch.Tensor,
    logit_sum: torch.Tensor,
    count: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a_t, b_t, c_t) from σ¹, σʰ, E_t, P_t, n_t; all three are 0 for a query with no key."""
    has_keys = count > 0
    count_safe = torch.where(has_keys, count, 1.0)
    a = torch.where(has_keys, gate_residual / torch.where(has_keys, exp_sum, 1.0), 0.0)
    b = torch.where(has_keys, (gate_first - gate_residual) / count_safe, 0.0)
    c = torch.where(has_keys, -(b * logit_sum + gate_residual) / count_safe, 0.0)
    return a, b, c


def finite_max(m: torch.Tensor) -> torch.Tensor:
    """The stabilizer with −inf (no key yet) replaced by 0, so that s − m is never inf − inf."""
    return torch.where(torch.isneginf(m), 0.0, m)


def rescale(m_old: torch.Tensor, m_new: torch.Tensor) -> torch.Tensor:
    """e^{m_old − m_new} for m_old ≤ m_new; 1 when both are −inf (the sums are still empty)."""
    return torch.where(torch.isneginf(m_new), 1.0, torch.exp(m_old - finite_max(m_new)))


def _normalized(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / max(‖x‖, eps), ‖x‖) along the last dim, as F.normalize."""
    x = x.to(dtype)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / norm.clamp_min(NORM_EPS), norm


def _normalize_backward(x_hat: torch.Tensor, grad_hat: torch.Tensor, norm: torch.Tensor):
    along = torch.where(norm > NORM_EPS, (x_hat * grad_hat).sum(-1, keepdim=True), 0.0)
    return (grad_hat - x_hat * along) / norm.clamp_min(NORM_EPS)


def _key_features(
    k_hat: torch.Tensor, exp_logits: torch.Tensor, s: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """[e^{s−m}·k̂, s·k̂, k̂] over valid keys (…, 3d): the keys of the 3d linear attention."""
    return torch.cat((k_hat * exp_logits[..., None], k_hat * s[..., None],
                      k_hat * valid[..., None]), dim=-1)  # fmt: skip


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    """Σ over the chunks before each chunk (dim 1). Narrowed, not sliced to R − 1 chunks: under
    torch.export a dynamic size R − 1 would specialize R ≠ 2."""
    total = torch.cat((torch.zeros_like(x[:, :1]), x.cumsum(dim=1)), dim=1)
    return total.narrow(1, 0, x.shape[1])


def _outer_sum(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Σ_n left_nᵀ right_n over the row axis: (…, n, d), (…, n, e) → (…, d, e)."""
    return left.transpose(-2, -1) @ right


def _chunk_step(
    carry: tuple[torch.Tensor, ...], chunk: tuple[torch.Tensor, ...]
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """One chunk of the causal recurrence. carry: (F, E, m), the sums so far relative to their
    max m (−inf: none yet); chunk: its own (F, E, max). Returns the carry after the chunk and
    (F, E, m before it, m after it). Both rescales are e^{x − m_new} ≤ 1."""
    f, e, m = carry
    local_f, local_e, local_m = chunk
    m_new = torch.maximum(m, local_m)
    r_old, r_local = rescale(m, m_new), rescale(local_m, m_new)
    f_new = f * r_old[:, None, None] + local_f * r_local[:, None, None]
    e_new = e * r_old + local_e * r_local
    # scan's body may not return its inputs, nor one tensor twice: hence the clones.
    return (f_new, e_new, m_new), (f.clone(), e.clone(), m.clone(), m_new.clone())


def _states_before_chunks(
    local_f: torch.Tensor, local_e: torch.Tensor, local_m: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """(F, E, m) before each chunk and the max m after it, (G, R, ·), from each chunk's own
    (F, E, max) (G, R, ·). Under torch.export (the ONNX function body) the recurrence is a scan
    (ONNX Scan), so the number of chunks stays dynamic; eagerly a loop, which is faster."""
    init = (torch.zeros_like(local_f[:, 0]), torch.zeros_like(local_e[:, 0]),
            torch.full_like(local_m[:, 0], NEG_INF))  # fmt: skip
    chunks = (local_f, local_e, local_m)
    if torch.compiler.is_exporting():
        from torch._higher_order_ops.scan import scan

        _, stacked = scan(_chunk_step, init, tuple(x.movedim(1, 0) for x in chunks))
        return tuple(x.movedim(0, 1) for x in stacked)
    carry, steps = init, []
    for c in range(local_m.shape[1]):
        carry, out = _chunk_step(carry, tuple(x[:, c] for x in chunks))
        steps.append(out)
    return tuple(torch.stack(x, dim=1) for x in zip(*steps, strict=True))


@dataclasses.dataclass
class _Pieces:
    """Everything the output and the gradients are made of, per row chunk (causal: chunks of C
    rows and keys at the same positions; non-causal: one chunk of all Nq rows, all Nk keys).

    Rows (G, R, C, ·): q̂ and ‖q‖, the state [F; G; H] (G, R, 3d, dv) they see, the rescale r
    of its F part, the row max m, E, P, n, a, b, c, and the gates. Keys (G, R, C', ·): k̂, ‖k‖, v,
    s (0 where masked), valid, and m_ref (G, R): the max every later row is at least (the
    key-side reference). Causal only: allowed (i ≤ t and valid) and e^{s_i − m_t}, (G, R, C, C).
    """

    q_hat: torch.Tensor
    q_norm: torch.Tensor
    k_hat: torch.Tensor
    k_norm: torch.Tensor
    v: torch.Tensor
    s: torch.Tensor
    valid: torch.Tensor
    state: torch.Tensor
    r: torch.Tensor
    m: torch.Tensor
    m_ref: torch.Tensor
    exp_sum: torch.Tensor
    logit_sum: torch.Tensor
    count: torch.Tensor
    gate_first: torch.Tensor
    gate_residual: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor
    allowed: torch.Tensor | None = None
    e_intra: torch.Tensor | None = None

    def query_features(self) -> torch.Tensor:
        """[a·r·q̂, b·q̂, c·q̂] (G, R, C, 3d): o = features @ state is the inter-chunk output."""
        q_hat = self.q_hat
        return torch.cat(((self.a * self.r)[..., None] * q_hat, self.b[..., None] * q_hat,
                          self.c[..., None] * q_hat), dim=-1)  # fmt: skip

    def intra_weights(self) -> torch.Tensor:
        """W_{t,i} for the pairs inside a causal chunk (0 where not allowed)."""
        linear_part = self.b[..., None] * self.s[..., None, :] + self.c[..., None]
        return self.a[..., None] * self.e_intra + torch.where(self.allowed, linear_part, 0.0)


def _pieces(inputs: PreparedInputs, is_causal: bool, chunk_size: int | None) -> _Pieces:
    s = inputs.key_logits
    stats = s.dtype
    valid = torch.ones_like(s, dtype=torch.bool) if inputs.key_valid is None else inputs.key_valid
    s = torch.where(valid, s, 0.0)  # masked logits never enter a sum
    q_hat, q_norm = _normalized(inputs.q, stats)
    k_hat, k_norm = _normalized(inputs.k, stats)
    v = inputs.v.to(stats)
    if not is_causal:
        return _non_causal_pieces(q_hat, q_norm, k_hat, k_norm, v, s, valid, inputs)
    groups, n = s.shape
    chunk_size = chunk_size or max(1, min(MAX_CHUNK_SIZE, n))
    n_chunks = max(1, -(-n // chunk_size))  # ceil, as an integer: symbolic under export
    pad = n_chunks * chunk_size - n

    def chunks(x: torch.Tensor, fill: float | bool = 0.0) -> torch.Tensor:
        x = F.pad(x, (0, 0, 0, pad)) if x.dim() == 3 else F.pad(x, (0, pad), value=fill)
        return x.reshape(groups, n_chunks, chunk_size, *x.shape[2:])

    qc, q_norm, kc, k_norm, vc = (chunks(x) for x in (q_hat, q_norm, k_hat, k_norm, v))
    sc, validc = chunks(s), chunks(valid, fill=False)
    g1, gh = chunks(inputs.gate_first), chunks(inputs.gate_residual)

    # m_t, the prefix max of the valid logits: the max before the chunk (from the recurrence)
    # and the prefix max inside it (a C×C masked max: cummax has no ONNX lowering).
    allowed = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=s.device).tril()
    allowed = allowed & validc[..., None, :]
    pair_logits = torch.where(allowed, sc[..., None, :], NEG_INF)  # s_i for the pairs i ≤ t
    m_inside = pair_logits.amax(-1)
    chunk_max = m_inside[..., -1]

    # Each chunk's own sums relative to its own max, then the state before each chunk.
    e_local = torch.exp(torch.where(validc, sc - finite_max(chunk_max)[..., None], NEG_INF))
    local = _outer_sum(_key_features(kc, e_local, sc, validc), vc)  # [F; G; H] per chunk
    d = kc.shape[-1]
    state_f, e0, m0, m_end = _states_before_chunks(local[:, :, :d], e_local.sum(-1), chunk_max)
    state = torch.cat((state_f, _exclusive_cumsum(local[:, :, d:])), dim=2)  # G, H: no rescale
    p0, n0 = _exclusive_cumsum(sc.sum(-1)), _exclusive_cumsum(validc.sum(-1))

    m_row = torch.maximum(m0[..., None], m_inside)
    e_intra = torch.exp(pair_logits - finite_max(m_row)[..., None])
    r_row = rescale(m0[..., None], m_row)
    exp_sum = e0[..., None] * r_row + e_intra.sum(-1)
    logit_sum = p0[..., None] + sc.cumsum(-1)
    count = (n0[..., None] + validc.cumsum(-1)).to(stats)
    a, b, c = row_coefficients(g1, gh, exp_sum, logit_sum, count)
    return _Pieces(q_hat=qc, q_norm=q_norm, k_hat=kc, k_norm=k_norm, v=vc, s=sc, valid=validc,
                   state=state, r=r_row, m=m_row, m_ref=m_end, exp_sum=exp_sum,
                   logit_sum=logit_sum, count=count, gate_first=g1, gate_residual=gh, a=a, b=b,
                   c=c, allowed=allowed, e_intra=e_intra)  # fmt: skip


def _non_causal_pieces(q_hat, q_norm, k_hat, k_norm, v, s, valid, inputs) -> _Pieces:
    m = torch.where(valid, s, NEG_INF).amax(dim=-1)  # (G,)
    e = torch.exp(torch.where(valid, s - finite_max(m)[:, None], NEG_INF))

    def rows(x: torch.Tensor) -> torch.Tensor:  # per-sequence totals as (G, 1, 1)
        return x[:, None, None].expand(-1, 1, q_hat.shape[1])

    exp_sum, logit_sum = rows(e.sum(-1)), rows(s.sum(-1))
    count = rows(valid.sum(-1).to(s.dtype))
    g1, gh = inputs.gate_first[:, None], inputs.gate_residual[:, None]
    a, b, c = row_coefficients(g1, gh, exp_sum, logit_sum, count)
    return _Pieces(q_hat=q_hat[:, None], q_norm=q_norm[:, None], k_hat=k_hat[:, None],
                   k_norm=k_norm[:, None], v=v[:, None], s=s[:, None], valid=valid[:, None],
                   state=_outer_sum(_key_features(k_hat, e, s, valid), v)[:, None],
                   r=torch.ones_like(a),
                   m=rows(m), m_ref=m[:, None], exp_sum=exp_sum, logit_sum=logit_sum,
                   count=count, gate_first=g1, gate_residual=gh, a=a, b=b, c=c)  # fmt: skip


def _rows_out(x: torch.Tensor, n: int) -> torch.Tensor:
    """(G, R, C, ·) → (G, n, ·), dropping the padding of the last chunk."""
    return x.flatten(1, 2)[:, :n]


def zeros_linear(
    inputs: PreparedInputs, is_causal: bool, chunk_size: int | None = None
) -> torch.Tensor:
    """ZeroS output (G, Nq, dv) in the statistics dtype from prepared inputs, by the linear form.
    chunk_size: tokens per causal chunk (None: min(64, N))."""
    p = _pieces(inputs, is_causal, chunk_size)
    out = p.query_features() @ p.state
    if is_causal:
        out = out + (p.intra_weights() * (p.q_hat @ p.k_hat.transpose(-2, -1))) @ p.v
    return _rows_out(out, inputs.q.shape[1])


def zeros_linear_backward(
    inputs: PreparedInputs,
    grad_out: torch.Tensor,
    is_causal: bool,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """Gradients (dq, dk, dv, d_logits, d_gate_first, d_gate_residual) of `zeros_linear`, flat
    (G, N, ·) like `inputs`, in the statistics dtype; grad_out is (G, Nq, dv)."""
    p = _pieces(inputs, is_causal, chunk_size)
    n_q, n_k = inputs.q.shape[1], inputs.k.shape[1]
    rows_shape = p.q_hat.shape[:3]
    d_out = grad_out.to(p.s.dtype)
    if is_causal:
        d_out = F.pad(d_out, (0, 0, 0, rows_shape[1] * rows_shape[2] - n_q))
    d_out = d_out.reshape(*rows_shape, -1)

    # Query side: Q^X_t = Σ_i feature_X(i)·(dO_t·v_i)·k̂_i from the states and the chunk.
    d = p.q_hat.shape[-1]
    q_f, q_g, q_h = (d_out @ p.state.transpose(-2, -1)).split(d, dim=-1)
    q_f = p.r[..., None] * q_f
    if is_causal:
        grad_pairs = d_out @ p.v.transpose(-2, -1)
        q_f = q_f + (p.e_intra * grad_pairs) @ p.k_hat
        q_g = q_g + torch.where(p.allowed, p.s[..., None, :] * grad_pairs, 0.0) @ p.k_hat
        q_h = q_h + torch.where(p.allowed, grad_pairs, 0.0) @ p.k_hat
    dq_hat = p.a[..., None] * q_f + p.b[..., None] * q_g + p.c[..., None] * q_h
    r1, rs, r0 = ((p.q_hat * x).sum(-1) for x in (q_f, q_g, q_h))
    has_keys = p.count > 0
    count_safe = torch.where(has_keys, p.count, 1.0)
    exp_safe = torch.where(has_keys, p.exp_sum, 1.0)
    d_first = torch.where(has_keys, (rs - p.logit_sum / count_safe * r0) / count_safe, 0.0)
    d_residual = torch.where(has_keys, r1 / exp_safe - d_first - r0 / count_safe, 0.0)
    x_row, z_row = p.a * r1 / exp_safe, p.b * r0 / count_safe

    # Key side: the states of the rows after each chunk (all rows, non-causal), relative to
    # m_ref of the chunk, by a reverse scan; each later row enters with e^{m_ref − m_t} ≤ 1.
    if is_causal:
        m_before = torch.cat((p.m_ref[:, :1], p.m_ref[:, :-1]), dim=1)  # m_ref of chunk c − 1
        to_before = rescale(m_before[..., None], p.m)
    else:
        to_before = torch.ones_like(p.a)
    row_features = torch.cat((p.q_hat * (p.a * to_before)[..., None], p.q_hat * p.b[..., None],
                              p.q_hat * p.c[..., None]), dim=-1)  # fmt: skip
    local = _outer_sum(row_features, d_out)  # [dF; dG; dH] of each chunk's rows
    x_local, z_local = (x_row * to_before).sum(-1), z_row.sum(-1)
    if is_causal:
        after, x_after, z_after = (torch.empty_like(x) for x in (local, x_local, z_local))
        state = torch.zeros_like(local[:, 0])
        x_state, z_state = torch.zeros_like(x_local[:, 0]), torch.zeros_like(z_local[:, 0])
        for c in reversed(range(rows_shape[1])):
            after[:, c], x_after[:, c], z_after[:, c] = state, x_state, z_state
            if c:
                shift = rescale(p.m_ref[:, c - 1], p.m_ref[:, c])
                state = torch.cat((state[:, :d] * shift[:, None, None], state[:, d:]), dim=1)
                state = state + local[:, c]
                x_state, z_state = x_state * shift + x_local[:, c], z_state + z_local[:, c]
    else:
        after, x_after, z_after = local, x_local, z_local
    f_key = torch.exp(torch.where(p.valid, p.s - finite_max(p.m_ref)[..., None], NEG_INF))
    d_v = _key_features(p.k_hat, f_key, p.s, p.valid) @ after
    v_f, v_g, v_h = (p.v @ after.transpose(-2, -1)).split(d, dim=-1)
    dk_hat = f_key[..., None] * v_f + p.s[..., None] * v_g + v_h
    d_s = (f_key * (p.k_hat * v_f).sum(-1) + (p.k_hat * v_g).sum(-1)
           - f_key * x_after[..., None] - z_after[..., None])  # fmt: skip
    if is_causal:
        cos_theta = p.q_hat @ p.k_hat.transpose(-2, -1)
        weights = p.intra_weights()
        d_v = d_v + (weights * cos_theta).transpose(-2, -1) @ d_out
        dk_hat = dk_hat + (weights * grad_pairs).transpose(-2, -1) @ p.q_hat
        slope = p.a[..., None] * p.e_intra + torch.where(p.allowed, p.b[..., None], 0.0)
        d_s = d_s + (
            slope * cos_theta * grad_pairs
            - p.e_intra * x_row[..., None]
            - torch.where(p.allowed, z_row[..., None], 0.0)
        ).sum(-2)
    d_v = torch.where(p.valid[..., None], d_v, 0.0)
    d_k = torch.where(p.valid[..., None], _normalize_backward(p.k_hat, dk_hat, p.k_norm), 0.0)
    d_q = _normalize_backward(p.q_hat, dq_hat, p.q_norm)
    d_s = torch.where(p.valid, d_s, 0.0)
    return (_rows_out(d_q, n_q), _rows_out(d_k, n_k), _rows_out(d_v, n_k),
            _rows_out(d_s, n_k), _rows_out(d_first, n_q),
            _rows_out(d_residual, n_q))  # fmt: skip
