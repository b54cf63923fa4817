"""`attnrewrite::zeros_attention`: the ZeroS custom op, and its public wrapper `zeros_attention`.

A `torch.library.custom_op` keeps compiled graphs whole and gives `torch.export` one named node;
`register_fake` gives the shape, `register_autograd` the backward. Dispatch: CUDA tensors run the
Triton kernels (kernels/zeros.py); CPU tensors run the linear PyTorch form (linear.py), forward
and backward. `force_triton_kernels()` sends CPU tensors through the Triton kernels too: tests
use it with the Triton interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ...errors import UnsupportedInputError, warn_once
from ..op_context import autocast_off
from ..shapes import has_no_output
from .linear import PreparedInputs, prepare_inputs, zeros_linear, zeros_linear_backward

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_MAX_HEAD_DIM = 256
_force_triton = False


@contextlib.contextmanager
def force_triton_kernels() -> Iterator[None]:
    """Run the Triton kernels for CPU tensors too (they need TRITON_INTERPRET=1 on CPU)."""
    global _force_triton
    previous, _force_triton = _force_triton, True
    try:
        yield
    finally:
        _force_triton = previous


def use_triton_kernels(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the op runs the Triton kernels for these inputs: CUDA (or forced, see
    `force_triton_kernels`) tensors of a dtype and head dims the kernels take."""
    if not (q.is_cuda or _force_triton) or q.dtype not in _TRITON_DTYPES:
        return False
    if max(q.shape[-1], v.shape[-1]) > _TRITON_MAX_HEAD_DIM:
        warn_once(
            "zeros-head-dim",
            f"the ZeroS Triton kernels take head dims up to {_TRITON_MAX_HEAD_DIM}, got "
            f"{q.shape[-1]} (q) and {v.shape[-1]} (v); ZeroS ran its PyTorch form instead (the "
            "same result, slower).",
        )
        return False
    return True


def _triton_tensors(inputs: PreparedInputs) -> tuple[torch.Tensor, ...]:
    """The kernels' arguments: q, k, v as they are; logits and gates in fp32."""
    return (inputs.q, inputs.k, inputs.v, inputs.key_logits.float(), inputs.gate_first.float(),
            inputs.gate_residual.float(), inputs.key_valid)  # fmt: skip


def zeros_attention_linear(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_logits: torch.Tensor,
    gate_first: torch.Tensor,
    gate_residual: torch.Tensor,
    is_causal: bool,
    key_padding_mask: torch.Tensor | None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The op's linear PyTorch form, unchecked: its CPU path, and the body of its ONNX function
    (chunk_size: see `zeros_linear`)."""
    inputs = prepare_inputs(q, k, v, key_logits, gate_first, gate_residual, key_padding_mask)
    return inputs.unflatten(zeros_linear(inputs, is_causal, chunk_size)).to(q.dtype)


def _all_zero(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether every output is 0 without computing: there is none (`has_no_output`), no key (the
    empty sum), or d = 0 (q̂·k̂ of empty vectors is 0); the chunked forms need all three."""
    return has_no_output(q, v) or k.shape[-2] == 0 or q.shape[-1] == 0


def _forward(q, k, v, key_logits, gate_first, gate_residual, is_causal, key_padding_mask):
    if not use_triton_kernels(q, v):
        return zeros_attention_linear(q, k, v, key_logits, gate_first, gate_residual, is_causal,
                                      key_padding_mask).contiguous()  # fmt: skip
    from ...kernels.zeros import zeros_forward

    inputs = prepare_inputs(q, k, v, key_logits, gate_first, gate_residual, key_padding_mask)
    out = zeros_forward(*_triton_tensors(inputs), is_causal)
    return inputs.unflatten(out).to(q.dtype).contiguous()


@torch.library.custom_op("attnrewrite::zeros_attention", mutates_args=())
@autocast_off
def zeros_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_logits: torch.Tensor,
    gate_first: torch.Tensor,
    gate_residual: torch.Tensor,
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """ZeroS attention; shapes as checked by `zeros_attention` (logits and gates unbroadcast)."""
    if _all_zero(q, k, v):
        return q.new_zeros((*q.shape[:-1], v.shape[-1]))
    return _forward(q, k, v, key_logits, gate_first, gate_residual, is_causal, key_padding_mask)


@zeros_attention_op.register_fake
def _(q, k, v, key_logits, gate_first, gate_residual, is_causal=False, key_padding_mask=None):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _setup_context(ctx, inputs, output):
    q, k, v, key_logits, gate_first, gate_residual, is_causal, key_padding_mask = inputs
    ctx.is_causal = is_causal
    ctx.has_mask = key_padding_mask is not None
    ctx.use_triton = use_triton_kernels(q, v)
    mask = [key_padding_mask] if ctx.has_mask else []
    ctx.save_for_backward(q, k, v, key_logits, gate_first, gate_residual, *mask)


@torch.library.custom_op("attnrewrite::zeros_attention_backward", mutates_args=())
@autocast_off
def zeros_attention_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_logits: torch.Tensor,
    gate_first: torch.Tensor,
    gate_residual: torch.Tensor,
    is_causal: bool,
    key_padding_mask: torch.Tensor | None,
    use_triton: bool,
) -> list[torch.Tensor]:
    """[dq, dk, dv, d_logits, d_gate_first, d_gate_residual] of `zeros_attention_op`, by the
    backend that ran the forward. An op of its own, so that a backward graph traced by
    torch.compile holds one opaque call (no kernel launch on fake tensors)."""
    differentiable = (q, k, v, key_logits, gate_first, gate_residual)
    if _all_zero(q, k, v):
        return [torch.zeros_like(x) for x in differentiable]
    inputs = prepare_inputs(q, k, v, key_logits, gate_first, gate_residual, key_padding_mask)
    flat_grad = grad_out.reshape(-1, *grad_out.shape[-2:])
    if use_triton:
        from ...kernels.zeros import zeros_backward

        flat = zeros_backward(flat_grad, *_triton_tensors(inputs), is_causal)
    else:
        flat = zeros_linear_backward(inputs, flat_grad, is_causal)
    return [
        g.reshape(x.shape).to(x.dtype).contiguous()
        for g, x in zip(flat, differentiable, strict=True)
    ]


@zeros_attention_backward_op.register_fake
def _(grad_out, q, k, v, key_logits, gate_first, gate_residual, is_causal, key_padding_mask,
      use_triton):  # fmt: skip
    """Contiguous gradients, as the implementation returns (empty_like would keep q's strides)."""
    return [x.new_empty(x.shape) for x in (q, k, v, key_logits, gate_first, gate_residual)]


def _backward(ctx, grad_out):
    saved = ctx.saved_tensors
    key_padding_mask = saved[6] if ctx.has_mask else None
    grads = zeros_attention_backward_op(
        grad_out, *saved[:6], ctx.is_causal, key_padding_mask, ctx.use_triton
    )
    return (*grads, None, None)


zeros_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _check_float(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise UnsupportedInputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise UnsupportedInputError(f"{name} must be floating point, got {x.dtype}")


def _broadcast(name: str, x: torch.Tensor, shape: tuple[int, ...], what: str) -> torch.Tensor:
    try:
        return x.broadcast_to(shape)
    except RuntimeError:
        raise UnsupportedInputError(
            f"{name} of shape {tuple(x.shape)} does not broadcast to {shape} ({what})"
        ) from None


def zeros_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_logits: torch.Tensor,
    gate_first: torch.Tensor,
    gate_residual: torch.Tensor,
    *,
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """ZeroS zero-sum linear attention (design.md §5.2), before the layer's LayerNorm.

    q (B, H, Nq, d), k (B, H, Nk, d), v (B, H, Nk, dv) (any leading dims, equal for all three);
    key_logits: s (B, H, Nk); gate_first σ¹ and gate_residual σʰ: (B, H, Nq), already in [0, 1]
    (each broadcast to its shape). q and k are L2-normalized inside. key_padding_mask: bool,
    True = attend (SDPA's convention), broadcastable to (B, H, Nk); masked keys leave every sum
    and the count n_t. is_causal: query t uses keys i ≤ t (needs Nq = Nk). Returns
    (B, H, Nq, dv) in q's dtype; a query with no key gets 0. O(N·d·dv) time, O(d·dv) state.
    """
    for name, x in (("q", q), ("k", k), ("v", v), ("key_logits", key_logits),
                    ("gate_first", gate_first), ("gate_residual", gate_residual)):  # fmt: skip
        _check_float(name, x)
        if x.device != q.device:
            raise UnsupportedInputError(f"{name} is on {x.device} but q is on {q.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise UnsupportedInputError(
            f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one dtype"
        )
    if q.dim() < 2 or k.dim() != q.dim() or v.dim() != q.dim():
        raise UnsupportedInputError(
            f"q, k, v must have shapes (..., N, d) with the same leading dims; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    batch, n_queries, n_keys = tuple(q.shape[:-2]), q.shape[-2], k.shape[-2]
    if k.shape[:-2] != batch or v.shape[:-2] != batch or v.shape[-2] != n_keys:
        raise UnsupportedInputError(
            f"k {tuple(k.shape)} and v {tuple(v.shape)} must be (..., Nk, ·) with q's leading "
            f"dims {batch} (repeat key/value heads for grouped-query attention)"
        )
    if q.shape[-1] != k.shape[-1]:
        raise UnsupportedInputError(f"q and k head dims differ ({q.shape[-1]} vs {k.shape[-1]})")
    if is_causal and n_queries != n_keys:
        raise UnsupportedInputError(
            f"is_causal needs as many queries as keys (got {n_queries} and {n_keys})"
        )
    key_logits = _broadcast("key_logits", key_logits, (*batch, n_keys), "one logit per key")
    gate_first = _broadcast("gate_first", gate_first, (*batch, n_queries), "one per query")
    gate_residual = _broadcast("gate_residual", gate_residual, (*batch, n_queries), "one per query")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise UnsupportedInputError(
                f"key_padding_mask must be a bool tensor or None, got "
                f"{type(key_padding_mask).__name__}"
            )
        if key_padding_mask.dtype != torch.bool:
            raise UnsupportedInputError(
                f"key_padding_mask must be bool (True = attend), got {key_padding_mask.dtype}; "
                "for an additive mask pass `mask > torch.finfo(mask.dtype).min`"
            )
        if key_padding_mask.device != q.device:
            raise UnsupportedInputError(
                f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}"
            )
        key_padding_mask = _broadcast(
            "key_padding_mask", key_padding_mask, (*batch, n_keys), "one per key"
        )
    return zeros_attention_op(
        q, k, v, key_logits, gate_first, gate_residual, is_causal, key_padding_mask
    )
