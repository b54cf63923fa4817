"""What the custom ops' implementations run under: their own precision whatever autocast says,
and autograd where an implementation differentiates a PyTorch computation."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

from ..errors import UnsupportedInputError

F = TypeVar("F", bound=Callable)

_AUTOGRAD_KEYS = [
    getattr(torch._C.DispatchKey, name)
    for name in dir(torch._C.DispatchKey)
    if name.startswith("Autograd") or name == "ADInplaceOrView"
]


def autocast_off(fn: F) -> F:
    """Run an op implementation with autocast disabled on its inputs' device.

    An op without an autocast rule runs inside the caller's autocast region, where every matmul
    of its fp32 statistics would be cast down to bf16/fp16. Inputs are taken in the dtypes they
    come in (under autocast, the dtypes of the layers that produced them); the statistics stay
    fp32 and the output has q's dtype, as outside autocast. The first argument must be a tensor.
    """

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with torch.autocast(args[0].device.type, enabled=False):
            return fn(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


@contextlib.contextmanager
def autograd_inside_op() -> Iterator[None]:
    """Autograd inside an op implementation, which runs with autograd's dispatch keys excluded.

    A backward op that differentiates a PyTorch reference needs them back; restoring them (as
    torch's own higher-order ops do) keeps dispatch modes such as FlopCounterMode working, which
    `torch.func.vjp` inside an op does not.
    """
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        exclude = exclude.remove(key)
    include = torch._C._dispatch_tls_local_include_set()
    with torch._C._ForceDispatchKeyGuard(include, exclude), torch.enable_grad():
        yield


def refuse_trainable_mask(method: str, attn_mask: torch.Tensor | None) -> None:
    """Raise for a mask that needs a gradient (a trainable bias) in an op whose backward gives
    none for it, rather than leave it silently untrained."""
    if attn_mask is not None and attn_mask.requires_grad:
        raise UnsupportedInputError(
            f"{method} gives no gradient for attn_mask, and this mask requires one (a trainable "
            "bias?): detach it if it is not meant to train, or use method='sdpa' for this site"
        )


def save_sdpa_like_inputs(method: str, ctx, inputs: tuple) -> None:
    """`setup_context` of an op with SDPA's arguments (q, k, v, attn_mask, options…) whose
    backward gives gradients for q, k and v only: saves them (`refuse_trainable_mask` first)."""
    q, k, v, attn_mask, *options = inputs
    refuse_trainable_mask(method, attn_mask)
    ctx.has_mask = attn_mask is not None
    ctx.save_for_backward(q, k, v, *([attn_mask] if ctx.has_mask else []))
    ctx.options = tuple(options)
