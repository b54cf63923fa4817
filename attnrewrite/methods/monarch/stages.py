"""MonarchAttention as a chain of block-attention stages: the fast forward and its backward.

reference.py materializes L (b·M² per head) and R (M·b² per head) with einsums. Here every update
is a *stage*: softmax attention inside independent groups, each row against the keys of its
group, with a per-key bias. Tensors are blocked, x[g, k, j] = token k·b + j of sequence g
(N' = M·b after padding), and a stage sees them through one of two views:

  by_block(x) = x[g, k, j]                  R-update: groups = key blocks k, rows = slots j
  by_slot(x)  = x.transpose(1, 2)[g, j, l]  L-update: groups = slots j,      rows = blocks l

A backend that reads strides (the Triton kernels) never needs a transposed copy. (Storing what
the L-update reads slot-major was measured slower on the CPU: the R-update's scattered writes
cost more than the L-update's strided reads.)

R-update of step t: rows q̃ (the effective queries aR/cR of the reference), keys k, bias β:
aL = softmax(s·q̃kᵀ + β)·k and, at the last step only, y = softmax(s·q̃kᵀ + β)·v, lse λR.
The reference's cL = Σ_i R (log R − β) equals s·q̃·aL − λR, so the L-update's per-key bias is

  βL = λR − s·q̃·aL          (−inf for an empty key block, where λR = −inf)

L-update: rows q_(l,j), keys aL[j,k], bias βL, P = softmax(s·q·aLᵀ + βL). The last step's output
is z = P·y; an earlier step feeds the next R-update with [aR | cR] = Pᵀ·[ω q | ω] (per key block
k) and q̃ = aR / cR (0 where cR = 0). Step 1 starts from q̃ = ω q (L = [k = l]), or in the
causal variant from the next block's queries (L = [k = l − 1], see reference.py). There q̃ of
key block k is the L-update's own row k (k + 1 when causal) weighted by ω, so s·q̃·aL is the
L-update's score of that row for key k before bias: a backend may read it off the score tile
(`StageOps.folds_diagonal`) instead of computing the rowdot.
Causal: a diagonal stage (rows q, keys k, values v, causal inside each block) gives D's output
and lse δ once; every L-update masks k ≥ l and takes the diagonal as a per-row *sink*, one more
logit δ with value D·v.

The backward pass recomputes the forward, keeping the O(T·N·d) stage inputs and outputs (never a
b×b or M×M tile), and runs the stages' gradients in reverse; `monarch_backward` derives them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

from .reference import causal_steps

if TYPE_CHECKING:
    from .torch_stages import Workspace

Tensor = torch.Tensor


class StageOps(Protocol):
    """The two primitives a backend provides. Tensors are views [g, group, row|key, feature]
    (or [g, group, row|key] for per-row and per-key scalars); outputs are written into the
    given views. Within a group, with S = scale·q·keysᵀ + bias (key c hidden from row r when
    c > r + causal) and an optional per-row sink logit, P = softmax over keys ∪ {sink}.

    `workspace`: where intermediates that do not outlive the call live (torch_stages.Workspace),
    or None for fresh tensors. `folds_diagonal`: whether `attend` takes `bias_minus_diagonal`
    (else the first step's L-update bias is computed from `keys_dot`, as at later steps)."""

    workspace: Workspace | None
    folds_diagonal: bool

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype stage inputs are kept in (statistics are always at least fp32)."""

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
        """out = P·values + p_sink·sink_value; lse = log Σ exp (−inf for a row that sees
        nothing; None when not needed, which rules out a sink); keys_out = P·keys (the keys as
        values too: the R-update's aL) with keys_dot = rowdot(q, keys_out);
        transposed_out = Pᵀ·transposed (the sink is no key).
        bias_minus_diagonal = o (where `folds_diagonal`): key c's bias is first lowered by
        w·scale·q[c + o]·keys[c], row c + o's score for key c before bias, with w the row's
        `diagonal_weight` (or 1); nothing where row c + o does not exist."""

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
        """With P from lse and dS = P ⊙ (d_out·valuesᵀ − delta): dq = scale·dS·keys,
        dkeys = scale·dSᵀ·q, dbias = Σ_rows dS, transposed_out = Pᵀ·transposed."""


def intermediate(
    shape: tuple[int, ...],
    like: Tensor,
    workspace: Workspace | None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """An uninitialized tensor on like's device (like's dtype unless given), taken from the
    workspace when there is one."""
    dtype = dtype or like.dtype
    if workspace is None:
        return torch.empty(shape, dtype=dtype, device=like.device)
    return workspace.take(shape, dtype, like.device)


@dataclasses.dataclass(frozen=True)
class MonarchConfig:
    """One call's hyperparameters, resolved (scale and block size are numbers)."""

    scale: float
    block_size: int
    num_steps: int
    pad: str
    is_causal: bool

    @property
    def steps(self) -> int:
        """The alternating steps run: num_steps, but one in the causal variant (see
        `reference.causal_steps`)."""
        return causal_steps(self.num_steps, self.is_causal)


@dataclasses.dataclass(frozen=True)
class Layout:
    """g sequences of n tokens, padded ("pre" or "post") to N' = m·b and blocked [g, m, b, ·]."""

    groups: int
    n: int
    b: int
    m: int
    front: int

    @classmethod
    def of(cls, groups: int, n: int, block_size: int, pad: str) -> Layout:
        m = max(1, math.ceil(n / block_size))
        extra = m * block_size - n
        return cls(groups, n, block_size, m, extra if pad == "pre" else 0)

    @property
    def padded(self) -> int:
        return self.m * self.b

    def block(self, x: Tensor, value: float | bool = 0.0) -> Tensor:
        """A (g, n) or (g, n, w) tensor padded with `value` and blocked."""
        back = self.padded - self.n - self.front
        if self.front or back:
            widths = (self.front, back) if x.dim() == 2 else (0, 0, self.front, back)
            if x.dtype == torch.bool:
                x = F.pad(x.to(torch.uint8), widths, value=int(value)).bool()
            else:
                x = F.pad(x, widths, value=value)
        return x.contiguous().view(self.groups, self.m, self.b, *x.shape[2:])

    def unblock(self, x: Tensor) -> Tensor:
        """The n real tokens (g, n, w) of a blocked tensor, in storage of their own."""
        tokens = x.reshape(self.groups, self.padded, *x.shape[3:])
        if self.padded == self.n:
            return tokens
        return tokens[:, self.front : self.front + self.n].clone()

    def new(
        self,
        like: Tensor,
        width: int | None = None,
        dtype: torch.dtype | None = None,
        *,
        zero: bool = False,
        workspace: Workspace | None = None,
    ) -> Tensor:
        """A blocked tensor [g, m, b(, width)] on like's device (zeros, or an intermediate)."""
        if zero:
            return torch.zeros(self.shape(width), device=like.device, dtype=dtype or like.dtype)
        return intermediate(self.shape(width), like, workspace, dtype)

    def shape(self, width: int | None = None) -> tuple[int, ...]:
        tail = () if width is None else (width,)
        return (self.groups, self.m, self.b, *tail)

    @staticmethod
    def by_block(x: Tensor) -> Tensor:
        return x

    @staticmethod
    def by_slot(x: Tensor) -> Tensor:
        return x.transpose(1, 2)


@dataclasses.dataclass
class _Step:
    """What the backward pass needs of one forward step (blocked tensors)."""

    q_eff: Tensor  # q̃, the R-update's rows
    a_l: Tensor  # aL
    y: Tensor | None  # y (the last step only)
    lse_r: Tensor  # λR
    bias_l: Tensor  # βL
    lse_l: Tensor | None  # the L-update's row lse (with the sink, in the causal variant)
    norm: Tensor | None = None  # cR of the next R-update (earlier steps only)


@dataclasses.dataclass
class _Trace:
    layout: Layout
    q: Tensor
    k: Tensor
    v: Tensor
    bias: Tensor | None
    valid: Tensor | None
    steps: list[_Step]
    out: Tensor | None = None
    diag_out: Tensor | None = None
    diag_lse: Tensor | None = None


def _rowdot(x: Tensor, y: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.linalg.vecdot(x.to(dtype), y.to(dtype))


def _masked(x: Tensor, valid: Tensor | None) -> Tensor:
    return x if valid is None else x * valid[..., None]


def _initial_queries(q: Tensor, valid: Tensor | None, causal: bool) -> Tensor:
    """q̃ of the first R-update: ω q (L = [k = l]); causal: the next block's (L = [k = l − 1])."""
    q0 = _masked(q, valid)
    if not causal:
        return q0
    return F.pad(q0[:, 1:], (0, 0, 0, 0, 0, 1))


def _shift_back(grad_q_eff: Tensor, causal: bool) -> Tensor:
    """The adjoint of the causal shift in `_initial_queries` (identity without it)."""
    if not causal:
        return grad_q_eff
    return F.pad(grad_q_eff[:, :-1], (0, 0, 0, 0, 1, 0))


def _safe_div(x: Tensor, denominator: Tensor) -> Tensor:
    """x / denominator per row, 0 where the denominator is 0 (a block no query weighs, whose x
    is 0 too); a NaN denominator stays NaN (a NaN input must not turn into a made-up finite
    output). The reciprocal is taken per row, so the rows see one product."""
    reciprocal = torch.where(denominator == 0, 0, denominator.reciprocal())
    return x * reciprocal[..., None]


def _sink_weight(diag_lse: Tensor, lse_l: Tensor) -> Tensor:
    """Λ = exp(δ − lse_L), the diagonal's share; 0 where the diagonal sees no key."""
    return torch.where(torch.isneginf(diag_lse), 0.0, torch.exp(diag_lse - lse_l))


def _inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_bias: Tensor | None,
    query_valid: Tensor | None,
    config: MonarchConfig,
    compute: torch.dtype,
) -> tuple[Layout, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Blocked q, k, v in the compute dtype, and the blocked key bias and query validity
    (None when there is neither a mask nor padding)."""
    groups, n, _ = q.shape
    layout = Layout.of(groups, n, config.block_size, config.pad)
    stats = torch.promote_types(q.dtype, torch.float32)
    padded = layout.padded != n
    qp, kp, vp = (layout.block(x.to(compute)) for x in (q, k, v))
    bias = valid = None
    if key_bias is not None or padded:
        bias = key_bias if key_bias is not None else q.new_zeros(groups, n, dtype=stats)
        bias = layout.block(bias.to(stats), -math.inf)
    if query_valid is not None:
        present = layout.block(torch.ones_like(query_valid), False) if padded else None
        valid = _taking_part(layout.block(query_valid, False), present)
    elif padded:
        valid = layout.block(q.new_ones(groups, n, dtype=torch.bool), False)
    return layout, qp, kp, vp, bias, valid


def _taking_part(valid: Tensor, present: Tensor | None) -> Tensor:
    """ω, the queries that shape the R rows: the valid ones, but in a slot with no valid query
    every present one. R rows of slot j serve only the L-updates of slot j's queries, so a
    masked query must not shape them where a valid query reads them (outputs independent of
    padding), and may where none does: with one block (b ≥ N) every query then gets its exact
    attention, a masked one too (SDPA gives it attention over the unmasked keys, not padding)."""
    unread = ~valid.any(1, keepdim=True)
    return valid | (unread if present is None else unread & present)


def monarch_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_bias: Tensor | None,
    query_valid: Tensor | None,
    config: MonarchConfig,
    ops: StageOps,
    *,
    keep: bool = False,
) -> tuple[Tensor, _Trace | None]:
    """MonarchAttention of q, k (g, N, d) and v (g, N, dv) through `ops`; the output has q's dtype.

    key_bias: (g, N) additive, −inf for masked keys; query_valid: (g, N) bool, False for queries
    that leave the R-update. keep: also return what `monarch_backward` needs (else the
    intermediates come from the ops' workspace, if any).
    """
    d = q.shape[-1]
    compute = ops.compute_dtype(q.dtype)
    stats = torch.promote_types(q.dtype, torch.float32)
    layout, qp, kp, vp, bias, valid = _inputs(q, k, v, key_bias, query_valid, config, compute)
    by_slot = layout.by_slot
    workspace = None if keep else ops.workspace

    new = functools.partial(layout.new, workspace=workspace)
    scale, causal = config.scale, config.is_causal
    trace = _Trace(layout, qp, kp, vp, bias, valid, []) if keep else None
    width = vp.shape[-1]

    diag_out = diag_lse = None
    if causal:  # the D-update: exact causal softmax inside each block, once
        diag_out, diag_lse = new(qp, width), new(qp, dtype=stats)
        ops.attend(qp, kp, vp, bias, diag_out, diag_lse, scale=scale, causal=0)
        if trace is not None:
            trace.diag_out, trace.diag_lse = diag_out, diag_lse
    sink_logit = None if diag_lse is None else by_slot(diag_lse)
    block_causal = -1 if causal else None
    q_eff = _initial_queries(qp, valid, causal)
    rows_x = None  # [ω q | ω], the rows summed into the next R-update
    out = None
    for step in range(config.steps):
        last = step == config.steps - 1
        # At step 1 the R-update's rows q̃[k] = ω[k + o]·q[k + o] are the L-update's rows,
        # shifted by o = 1 in the causal variant: s·q̃·aL is then a diagonal of the L-update's
        # own scores, which a backend that folds it reads there (no rowdot, no bias pass).
        fold = step == 0 and ops.folds_diagonal and not keep
        minus_diagonal = int(causal) if fold else None
        diagonal_weight = by_slot(valid) if fold and valid is not None else None
        a_l = new(qp, d)
        y = new(qp, width) if last else None
        lse_r = new(qp, dtype=stats)
        keys_dot = None if fold else new(qp, dtype=stats)
        ops.attend(
            q_eff,
            kp,
            vp if last else None,
            bias,
            y,
            lse_r,
            scale=scale,
            keys_out=a_l,
            keys_dot=keys_dot,
        )
        # βL = λR − s·q̃·aL (folded: λR here, the L-update subtracts its diagonal)
        bias_l = lse_r if keys_dot is None else lse_r - scale * keys_dot
        # the last L-update's lse only serves the backward pass
        lse_l = new(qp, dtype=stats) if y is None or keep else None
        record = _Step(q_eff, a_l, y, lse_r, bias_l, lse_l)
        if y is not None:
            out = layout.new(qp, width)  # the result: never from the workspace
            ops.attend(
                by_slot(qp),
                by_slot(a_l),
                by_slot(y),
                by_slot(bias_l),
                by_slot(out),
                None if lse_l is None else by_slot(lse_l),
                scale=scale,
                causal=block_causal,
                sink_logit=sink_logit,
                sink_value=None if diag_out is None else by_slot(diag_out),
                bias_minus_diagonal=minus_diagonal,
                diagonal_weight=diagonal_weight,
            )
        else:
            assert lse_l is not None
            if rows_x is None:
                weight = torch.ones_like(qp[..., 0]) if valid is None else valid.to(compute)
                rows_x = torch.cat([_masked(qp, valid), weight[..., None]], dim=-1)
            summed = new(qp, d + 1)
            ops.attend(
                by_slot(qp),
                by_slot(a_l),
                None,
                by_slot(bias_l),
                None,
                by_slot(lse_l),
                scale=scale,
                causal=block_causal,
                sink_logit=sink_logit,
                transposed=by_slot(rows_x),
                transposed_out=by_slot(summed),
                bias_minus_diagonal=minus_diagonal,
                diagonal_weight=diagonal_weight,
            )
            record.norm = summed[..., d].to(stats)
            q_eff = _safe_div(summed[..., :d].to(stats), record.norm).to(compute).contiguous()
        if trace is not None:
            trace.steps.append(record)
    assert out is not None
    if trace is not None:
        trace.out = out
    return layout.unblock(out).to(q.dtype), trace


def monarch_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_bias: Tensor | None,
    query_valid: Tensor | None,
    config: MonarchConfig,
    ops: StageOps,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of `monarch_forward` for q, k, v (same shapes and dtypes), by recomputation.

    Each stage out = P·values with P = softmax(S), S = s·q·keysᵀ + bias, has the familiar
    adjoint: dvalues = Pᵀ·dout, dS = P ⊙ (dout·valuesᵀ − Δ) with Δ = rowdot(dout, out) − dlse,
    dq = s·dS·keys, dkeys = s·dSᵀ·q, dbias = Σ_rows dS. The glue between stages:
      βL = λR − s·q̃·aL:  dλR = dβL,  dq̃ −= s·dβL·aL,  daL −= s·dβL·q̃.
      q̃' = aR/cR with [aR | cR] = Pᵀ X, X = [ω q | ω]: with G = [dq̃'/cR | −q̃'·dq̃'/cR] per key,
        dP = X·Gᵀ, so Δ = rowdot(X, P·G) and dX = P·G (dq += ω·(P·G)[:d]).
      causal sink (logit δ, value D·v, weight Λ): dδ = Λ·(rowdot(dz, D·v) − Δ), d(D·v) = Λ·dz
        at the last step; an earlier step's sink has no value, so dδ = −Λ·Δ there.
    """
    _, trace = monarch_forward(q, k, v, key_bias, query_valid, config, ops, keep=True)
    assert trace is not None and trace.out is not None
    layout, scale, causal = trace.layout, config.scale, config.is_causal
    by_slot = layout.by_slot
    qp, kp, vp, valid = trace.q, trace.k, trace.v, trace.valid
    stats = torch.promote_types(q.dtype, torch.float32)
    d, width, compute = q.shape[-1], vp.shape[-1], qp.dtype

    def new(size: int | None = None, *, zero: bool = False) -> Tensor:
        return layout.new(qp, size, stats, zero=zero)

    dq, dk, dv = new(d, zero=True), new(d, zero=True), new(width, zero=True)
    d_diag_out = new(width, zero=True) if causal else None
    d_diag_lse = new(zero=True) if causal else None
    sink_logit = None if trace.diag_lse is None else by_slot(trace.diag_lse)
    block_causal = -1 if causal else None
    d_out = layout.block(grad_out.to(stats))
    grad_q_eff = None  # dq̃ of the step after the current one
    for index in reversed(range(config.steps)):
        step = trace.steps[index]
        a_l, lse_l = step.a_l, step.lse_l
        assert lse_l is not None
        dq_l, d_a_l, d_bias_l = (new(size) for size in (d, d, None))
        d_y = None
        if step.y is not None:  # the last L-update: z = P·y (+ Λ·D·v)
            delta = _rowdot(d_out, trace.out, stats)
            d_y = new(width)
            d_out_c = d_out.to(compute)
            ops.attend_grads(
                by_slot(qp),
                by_slot(a_l),
                by_slot(step.y),
                by_slot(step.bias_l),
                by_slot(lse_l),
                by_slot(d_out_c),
                by_slot(delta),
                by_slot(dq_l),
                by_slot(d_a_l),
                by_slot(d_bias_l),
                scale=scale,
                causal=block_causal,
                transposed=by_slot(d_out_c),
                transposed_out=by_slot(d_y),
            )
            if d_diag_out is not None and d_diag_lse is not None:
                sink = _sink_weight(trace.diag_lse, lse_l)
                d_diag_out += sink[..., None] * d_out
                d_diag_lse += sink * (_rowdot(d_out, trace.diag_out, stats) - delta)
        else:  # an earlier L-update: q̃' = aR / cR with [aR | cR] = Pᵀ·[ω q | ω]
            assert grad_q_eff is not None and step.norm is not None
            q_next = trace.steps[index + 1].q_eff
            per_key = torch.cat([grad_q_eff, -_rowdot(q_next, grad_q_eff, stats)[..., None]], -1)
            per_key = _safe_div(per_key, step.norm).to(compute)
            weight = torch.ones_like(step.norm) if valid is None else valid.to(stats)
            rows_x = torch.cat([_masked(qp.to(stats), valid), weight[..., None]], dim=-1)
            spread = new(d + 1)  # P·G
            ops.attend(
                by_slot(qp),
                by_slot(a_l),
                by_slot(per_key),
                by_slot(step.bias_l),
                by_slot(spread),
                by_slot(new()),
                scale=scale,
                causal=block_causal,
                sink_logit=sink_logit,
            )
            delta = _rowdot(rows_x, spread, stats)
            dq += _masked(spread[..., :d], valid)
            ops.attend_grads(
                by_slot(qp),
                by_slot(a_l),
                by_slot(per_key),
                by_slot(step.bias_l),
                by_slot(lse_l),
                by_slot(rows_x.to(compute)),
                by_slot(delta),
                by_slot(dq_l),
                by_slot(d_a_l),
                by_slot(d_bias_l),
                scale=scale,
                causal=block_causal,
            )
            if d_diag_lse is not None:
                d_diag_lse -= _sink_weight(trace.diag_lse, lse_l) * delta
        dq += dq_l
        # βL = λR − s·q̃·aL
        d_q_eff = -scale * d_bias_l[..., None] * a_l.to(stats)
        d_a_l -= scale * d_bias_l[..., None] * step.q_eff.to(stats)
        # R-update: [aL | y] = softmax(s·q̃kᵀ + β)·[k | v], lse λR (dλR = dβL)
        delta_r = _rowdot(d_a_l, a_l, stats) - d_bias_l
        if step.y is not None and d_y is not None:
            delta_r += _rowdot(d_y, step.y, stats)
            d_out_r, values = torch.cat([d_a_l, d_y], -1), torch.cat([kp, vp], -1)
        else:
            d_out_r, values = d_a_l.contiguous(), kp
        d_out_r = d_out_r.to(compute)
        dq_r, dk_r, d_values = new(d), new(d), new(values.shape[-1])
        ops.attend_grads(
            step.q_eff,
            kp,
            values,
            trace.bias,
            step.lse_r,
            d_out_r,
            delta_r,
            dq_r,
            dk_r,
            None,
            scale=scale,
            transposed=d_out_r,
            transposed_out=d_values,
        )
        dk += dk_r + d_values[..., :d]
        if step.y is not None:
            dv += d_values[..., d:]
        grad_q_eff = d_q_eff + dq_r
    assert grad_q_eff is not None
    dq += _masked(_shift_back(grad_q_eff, causal), valid)
    if d_diag_out is not None and d_diag_lse is not None and trace.diag_out is not None:
        assert trace.diag_lse is not None
        delta_d = _rowdot(d_diag_out, trace.diag_out, stats) - d_diag_lse
        d_diag_c = d_diag_out.to(compute)
        dq_d, dk_d, dv_d = new(d), new(d), new(width)
        ops.attend_grads(
            qp,
            kp,
            vp,
            trace.bias,
            trace.diag_lse,
            d_diag_c,
            delta_d,
            dq_d,
            dk_d,
            None,
            scale=scale,
            causal=0,
            transposed=d_diag_c,
            transposed_out=dv_d,
        )
        dq += dq_d
        dk += dk_d
        dv += dv_d
    grads = (
        layout.unblock(x).to(dtype) for x, dtype in ((dq, q.dtype), (dk, k.dtype), (dv, v.dtype))
    )
    return tuple(grads)  # type: ignore[return-value]
