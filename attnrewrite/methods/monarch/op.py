"""`attnrewrite::monarch_attention`: the custom op the rewritten graphs call.

A `torch.library.custom_op` keeps compiled graphs whole (no graph break), gives `torch.export` and
the ONNX exporter one named node per site, and carries a backward so a rewritten model can be
fine-tuned. The backward is a second custom op (`attnrewrite::monarch_attention_backward`): an op
implementation runs below autograd, so the gradients are computed explicitly (stages.py), never
by autograd through a recomputation, and compiled training graphs see one opaque node.

Dispatch: CUDA tensors run the Triton kernels (kernels/monarch.py; a single fused launch for short
sequences; fp64 takes the PyTorch stages), CPU tensors the PyTorch stages (torch_stages.py).
`kernel_backend("triton")` forces the kernels on CPU tensors, which needs the Triton interpreter
(TRITON_INTERPRET=1 before `attnrewrite.kernels.monarch` is imported); `kernel_backend("torch")`
forces the PyTorch stages.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ...errors import UnsupportedInputError
from ..gqa import expand_gqa, reduce_gqa
from ..masks import self_attention_mask_terms, with_causal
from ..op_context import autocast_off, save_sdpa_like_inputs
from ..shapes import has_no_output, softmax_scale
from .reference import default_block_size
from .stages import MonarchConfig, StageOps, monarch_backward, monarch_forward
from .torch_stages import TorchStageOps, by_sequence, parallel_stage_ops

BACKENDS = ("auto", "torch", "triton")
_backend = "auto"


@contextlib.contextmanager
def kernel_backend(name: str) -> Iterator[None]:
    """Run Monarch ops on `name` ("auto": Triton for CUDA tensors, PyTorch otherwise)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown Monarch backend {name!r}; choose one of {BACKENDS}")
    previous, _backend = _backend, name
    try:
        yield
    finally:
        _backend = previous


def _kernels():  # imported on first use: importing decides interpreted vs compiled kernels
    from ...kernels import monarch

    return monarch


@contextlib.contextmanager
def _stage_ops(x: torch.Tensor) -> Iterator[StageOps]:
    """The backend for x's device (and `kernel_backend`), for the length of the block."""
    use_triton = _backend == "triton" or (
        _backend == "auto" and x.is_cuda and x.dtype != torch.float64
    )
    if not use_triton:
        with parallel_stage_ops() as ops:
            yield ops
        return
    kernels = _kernels()
    if not x.is_cuda and not kernels.INTERPRETED:
        raise UnsupportedInputError(
            "the Monarch Triton kernels run on CPU tensors only under the Triton interpreter: set "
            "TRITON_INTERPRET=1 before attnrewrite.kernels.monarch is imported, or use CUDA tensors"
        )
    yield kernels.TritonStageOps()


def _check_arguments(
    q: torch.Tensor, k: torch.Tensor, block_size: int | None, num_steps: int, pad: str
) -> None:
    if q.shape[-2] != k.shape[-2]:
        raise UnsupportedInputError(
            f"MonarchAttention needs as many queries as keys (got {q.shape[-2]} and "
            f"{k.shape[-2]}); use method='sdpa' for cross-attention"
        )
    if block_size is not None and block_size < 1:
        raise UnsupportedInputError(f"block_size must be ≥ 1 or None (≈ √N), got {block_size}")
    if num_steps < 1:
        raise UnsupportedInputError(f"num_steps must be ≥ 1, got {num_steps}")
    if pad not in ("post", "pre"):
        raise UnsupportedInputError(f"pad must be 'post' or 'pre', got {pad!r}")


class _Call:
    """One call's inputs in the stages' form: (g, N, d) tensors, key bias and query validity,
    or `exact` when the mask is not a key-padding mask and the site asked for the fallback, or
    when d = 0: no logits to approximate (every q·k is 0), SDPA's softmax of the mask alone."""

    def __init__(
        self, q, k, v, attn_mask, scale, block_size, num_steps, pad, enable_gqa, fallback, is_causal
    ) -> None:
        _check_arguments(q, k, block_size, num_steps, pad)
        self.k, self.v = expand_gqa(q, k, enable_gqa), expand_gqa(q, v, enable_gqa)
        *batch, n, d = q.shape
        self.batch, self.n = tuple(batch), n
        self.attn_mask, self.is_causal = attn_mask, is_causal
        self.scale = softmax_scale(scale, d)
        self.exact = d == 0
        self.key_bias = self.query_valid = None
        if attn_mask is not None:
            stats = torch.promote_types(q.dtype, torch.float32)
            terms = self_attention_mask_terms("Monarch", attn_mask, self.batch, n, stats, fallback)
            if terms is None:
                self.exact = True
            else:
                groups = math.prod(self.batch)
                key_bias, key_valid, causal_mask = terms
                self.key_bias = key_bias.reshape(groups, n)
                self.query_valid = key_valid.reshape(groups, n)
                self.is_causal = is_causal or causal_mask
        self.config = MonarchConfig(
            self.scale,
            block_size if block_size is not None else default_block_size(n),
            num_steps,
            pad,
            self.is_causal,
        )

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, self.n, x.shape[-1])

    def masks(self, sequences: slice) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The key bias and query validity of some of the (flattened) sequences."""
        bias, valid = self.key_bias, self.query_valid
        return (
            None if bias is None else bias[sequences],
            None if valid is None else valid[sequences],
        )

    def exact_mask(self) -> torch.Tensor | None:
        """The exact path's SDPA mask (the site's mask, causal when the site is)."""
        mask = self.attn_mask
        if self.is_causal:
            every_key = torch.ones((), dtype=torch.bool, device=self.k.device)
            mask = with_causal(every_key if mask is None else mask, self.n, self.n)
        return mask


def _exact_attention_grads(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of SDPA with `mask` (the fallback's forward), in closed form; a row that sees
    no key gets zero output and zero gradient, as SDPA gives it."""
    stats = torch.promote_types(q.dtype, torch.float32)
    q32, k32, v32, g32 = (x.to(stats) for x in (q, k, v, grad_out))
    scores = scale * q32 @ k32.transpose(-2, -1)
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, -math.inf)
    elif mask is not None:
        scores = scores + mask.to(stats)
    empty = torch.isneginf(scores).all(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    out = probs @ v32
    d_scores = probs * (g32 @ v32.transpose(-2, -1) - (g32 * out).sum(-1, keepdim=True))
    dq = scale * d_scores @ k32
    dk = scale * d_scores.transpose(-2, -1) @ q32
    dv = probs.transpose(-2, -1) @ g32
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@torch.library.custom_op("attnrewrite::monarch_attention", mutates_args=())
@autocast_off
def monarch_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    block_size: int | None = None,
    num_steps: int = 2,
    pad: str = "post",
    enable_gqa: bool = False,
    fallback: bool = False,
    is_causal: bool = False,
) -> torch.Tensor:
    """MonarchAttention with SDPA's argument conventions (see `attnrewrite.attention`).

    is_causal: the causal variant (reference.py); it composes with a key-padding mask.
    """
    call = _Call(
        q, k, v, attn_mask, scale, block_size, num_steps, pad, enable_gqa, fallback, is_causal
    )
    if has_no_output(q, v):  # SDPA's empty output
        return q.new_empty((*q.shape[:-1], v.shape[-1]))
    if call.exact:  # contiguous, as the fake implementation declares (SDPA's may not be)
        return F.scaled_dot_product_attention(
            q, call.k, call.v, attn_mask=call.exact_mask(), scale=call.scale
        ).contiguous()
    qf, kf, vf = call.flat(q), call.flat(call.k), call.flat(call.v)
    with _stage_ops(q) as ops:
        out = None
        if not isinstance(ops, TorchStageOps):  # short sequences: one fused launch
            out = _kernels().fused_forward(qf, kf, vf, call.key_bias, call.query_valid, call.config)
        if out is None:
            (out,) = by_sequence(
                ops,
                lambda s, part_ops: monarch_forward(
                    qf[s], kf[s], vf[s], *call.masks(s), call.config, part_ops
                )[:1],
                qf.shape[0],
                call.n,
                call.config.block_size,
            )
    return out.reshape(*call.batch, call.n, v.shape[-1])


@monarch_attention_op.register_fake
def _(
    q,
    k,
    v,
    attn_mask=None,
    scale=None,
    block_size=None,
    num_steps=2,
    pad="post",
    enable_gqa=False,
    fallback=False,
    is_causal=False,
):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("attnrewrite::monarch_attention_backward", mutates_args=())
@autocast_off
def monarch_attention_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    block_size: int | None,
    num_steps: int,
    pad: str,
    enable_gqa: bool,
    fallback: bool,
    is_causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `monarch_attention` for q, k, v (recomputing its forward)."""
    call = _Call(
        q, k, v, attn_mask, scale, block_size, num_steps, pad, enable_gqa, fallback, is_causal
    )
    if has_no_output(q, v):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if call.exact:
        dq, dk, dv = _exact_attention_grads(
            grad_out, q, call.k, call.v, call.exact_mask(), call.scale
        )
    else:
        flat = [call.flat(x) for x in (grad_out, q, call.k, call.v)]
        with _stage_ops(q) as ops:
            grads = by_sequence(
                ops,
                lambda s, part_ops: monarch_backward(
                    *(x[s] for x in flat), *call.masks(s), call.config, part_ops
                ),
                flat[0].shape[0],
                call.n,
                call.config.block_size,
            )
        dq, dk, dv = (g.reshape(x.shape) for g, x in zip(grads, (q, call.k, call.v), strict=True))
    return dq.contiguous(), reduce_gqa(dk, k).contiguous(), reduce_gqa(dv, v).contiguous()


@monarch_attention_backward_op.register_fake
def _(
    grad_out, q, k, v, attn_mask, scale, block_size, num_steps, pad, enable_gqa, fallback, is_causal
):
    """Contiguous gradients, as the implementation returns (empty_like would keep q's strides)."""
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    save_sdpa_like_inputs("MonarchAttention", ctx, inputs)


def _backward(ctx, grad_out):
    saved = ctx.saved_tensors
    attn_mask = saved[3] if ctx.has_mask else None
    dq, dk, dv = monarch_attention_backward_op(grad_out, *saved[:3], attn_mask, *ctx.options)
    return dq, dk, dv, None, None, None, None, None, None, None, None


monarch_attention_op.register_autograd(_backward, setup_context=_setup_context)
