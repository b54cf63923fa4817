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
    key_valid: torch.Tensor | None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The op's linear PyTorch form, unchecked: its CPU path, and the body of its ONNX function
    (chunk_size: see `zeros_linear`)."""
    inputs = prepare_inputs(q, k, v, key_logits, gate_first, gate_residual, key_valid)
    return inputs.unflatten(zeros_linear(inputs, is_causal, chunk_size)).to(q.dtype)


def _all_zero(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether every output is 0 without computing: there is none (`has_no_output`), no key (the
    empty sum), or d = 0 (q̂·k̂ of empty vectors is 0); the chunked forms need all three."""
    return has_no_output(q, v) or k.shape[-2] == 0 or q.shape[-1] == 0


def _forward(q, k, v, key_logits, gate_first, gate_residual, is_causal, key_valid):
    if not use_triton_kernels(q, v):
        return zeros_attention_linear(q, k, v, key_logits, gate_first, gate_residual, is_causal,
                                      key_valid).contiguous()  # fmt: skip
    from ...kernels.zeros import zeros_forward

    inputs = prepare_inputs(q, k, v, key_logits, gate_first, gate_residual, key_valid)
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
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """ZeroS attention; shapes as checked by `zeros_attention` (logits and gates unbroadcast,
    key_valid bool (..., Nk), True at the keys queries may use)."""
    if _all_zero(q, k, v):
        return q.new_zeros((*q.shape[:-1], v.shape[-1]))
    return _forward(q, k, v, key_logits, gate_first, gate_residual, is_causal, key_valid)


@zeros_attention_op.register_fake
def _(q, k, v, key_logits, gate_first, gate_residual, is_causal=False, key_valid=None):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _setup_context(ctx, inputs, output):
    q, k, v, key_logits, gate_first, gate_residual, is_causal, key_valid = inputs
    ctx.is_causal = is_causal
    ctx.has_mask = key_valid is not None
    ctx.use_triton = use_triton_kernels(q, v)
    mask = [key_valid] if ctx.has_mask else []
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
    key_valid: torch.Tensor | None,
    use_triton: bool,
) -> list[torch.Tensor]:
    """[dq, dk, dv, d_logits, d_gate_first, d_gate_residual] of `zeros_attention_op`, by the
    backend that ran the forward. An op of its own, so that a backward graph traced by
    torch.compile holds one opaque call (no kernel launch on fake tensors)."""
    differentiable = (q, k, v, key_logits, gate_first, gate_residual)
    if _all_zero(q, k, v):
        return [torch.zeros_like(x) for x in differentiable]
    inputs = prepare_inputs(q, k, v, key_logits, gate_first, gate_residual, key_valid)
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
def _(grad_out, q, k, v, key_logits, gate_first, gate_residual, is_causal, key_valid,
      use_triton):  # fmt: skip
    """Contiguous gradients, as the implementation returns (empty_like would keep q's strides)."""
    return [x.new_empty(x.shape) for x in (q, k, v, key_logits, gate_first, gate_residual)]


def _backward(ctx, grad_out):
    saved = ctx.saved_tensors
    key_valid = saved[6] if ctx.has_mask else None
    grads = zeros_attention_backward_op(
        grad_out, *saved[:6], ctx.is_causal, key_valid, ctx.use_triton
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
    attn_mask: torch.Tensor | None = None,
    key_padding_mask: object = None,
) -> torch.Tensor:
    """ZeroS zero-sum linear attention (docs/methods.md#zeros), before the layer's LayerNorm.

    q (B, H, Nq, d), k (B, H, Nk, d), v (B, H, Nk, dv) (any leading dims, equal for all three);
    key_logits: s (B, H, Nk); gate_first σ¹ and gate_residual σʰ: (B, H, Nq), already in [0, 1]
    (each broadcast to its shape). q and k are L2-normalized inside. attn_mask: the keys each
    query may use, in SDPA's convention: bool, True = attend. ZeroS's weights depend on the key
    alone, so the mask is per key: (B, Nk) (the layout of nn.MultiheadAttention's and Hugging
    Face's padding masks), or a shape SDPA broadcasts to (B, H, Nq, Nk) with a query axis of 1:
    (B, 1, 1, Nk), (B, H, 1, Nk), (Nk,). Masked keys leave every sum and the count n_t.
    is_causal: query t uses keys i ≤ t (needs Nq = Nk). Returns (B, H, Nq, dv) in q's dtype; a
    query with no key gets 0. O(N·d·dv) time, O(d·dv) state.

    key_padding_mask is refused (`refuse_key_padding_mask`): torch reads that name with
    True = ignore.
    """
    refuse_key_padding_mask("zeros_attention", key_padding_mask)
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
    key_valid = None if attn_mask is None else _key_valid(attn_mask, q, batch, n_keys)
    return zeros_attention_op(q, k, v, key_logits, gate_first, gate_residual, is_causal, key_valid)


def refuse_key_padding_mask(function: str, key_padding_mask: object) -> None:
    """Raise for a `key_padding_mask=` argument: torch's nn.MultiheadAttention reads a mask of
    that name with True = ignore, the ZeroS functions take SDPA's attn_mask (True = attend),
    and an inverted mask would run without an error."""
    if key_padding_mask is None:
        return
    raise UnsupportedInputError(
        f"{function} takes attn_mask, in SDPA's convention (bool, True = attend; a (B, Nk) "
        "mask is per batch element and key), not key_padding_mask: nn.MultiheadAttention reads "
        "key_padding_mask with True = ignore. For such a mask pass attn_mask=~key_padding_mask; "
        "for one that is True at the keys to attend, attn_mask=key_padding_mask."
    )


def _key_valid(
    attn_mask: torch.Tensor, q: torch.Tensor, batch: tuple[int, ...], n_keys: int
) -> torch.Tensor:
    """`zeros_attention`'s attn_mask as the op's key_valid (*batch, Nk), or an error naming the
    problem and the fix. A 2-D mask is (B, Nk) where q has batch dims; any other is read as
    SDPA reads it, and must have a query axis of 1."""
    if not isinstance(attn_mask, torch.Tensor):
        raise UnsupportedInputError(
            f"attn_mask must be a bool tensor or None, got {type(attn_mask).__name__}"
        )
    if attn_mask.dtype != torch.bool:
        raise UnsupportedInputError(
            f"attn_mask must be bool (True = attend), got {attn_mask.dtype}; for an additive mask "
            "pass `mask > torch.finfo(mask.dtype).min` (and add a finite bias to key_logits)"
        )
    if attn_mask.device != q.device:
        raise UnsupportedInputError(f"attn_mask is on {attn_mask.device} but q is on {q.device}")
    shape = tuple(attn_mask.shape)
    target = (*batch, n_keys)
    if attn_mask.dim() == 2 and batch:  # (B, Nk): B against q's first dim
        keys = attn_mask.reshape(shape[0], *([1] * (len(batch) - 1)), shape[1])
    elif attn_mask.dim() >= 2 and shape[-2] != 1:
        raise UnsupportedInputError(
            f"attn_mask of shape {shape} has a query axis of {shape[-2]}: ZeroS's weights depend "
            "on the key alone, so it takes a mask per key, (B, Nk) or (B, 1, 1, Nk); for a "
            "causal mask pass is_causal=True"
        )
    else:
        keys = attn_mask.squeeze(-2) if attn_mask.dim() >= 2 else attn_mask
    try:
        return keys.broadcast_to(target)
    except RuntimeError:
        raise UnsupportedInputError(
            f"attn_mask of shape {shape} does not broadcast to one per key of {target}: pass "
            f"(B, Nk) = ({batch[0] if batch else 1}, {n_keys}) or (B, 1, 1, Nk)"
        ) from None
