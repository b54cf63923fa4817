"""How each method's custom op becomes an ONNX function: its configuration and PyTorch body.

A body must be exportable with dynamic shapes: no data-dependent Python branches. The run-time
check of a (…, N, N) mask (a key-padding mask, a causal + key-padding mask, or neither: exact
attention) becomes a `Choice`, i.e. ONNX `If` nodes, as the PyTorch op decides it. ZeroS is
lowered in its linear form (O(N)): the causal recurrence over tokens becomes an ONNX `Scan`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UnsupportedInputError
from ..methods.gqa import expand_gqa
from ..methods.hsa.reference import hsa_attention_reference, with_masked_rows
from ..methods.masks import is_causal_padding_mask, key_mask_terms, per_token, with_causal
from ..methods.monarch.reference import default_block_size
from ..methods.monarch.stages import MonarchConfig, monarch_forward
from ..methods.monarch.torch_stages import TorchStageOps
from ..methods.zeros.adapter import with_key_bias
from ..methods.zeros.op import zeros_attention_linear
from .functions import Choice, FunctionSpec, TensorLayout


def _rows_equal(mask: torch.Tensor) -> torch.Tensor:
    """Whether every query row of a (…, Nq, Nk) mask is the same (a key-padding mask), as a 0-d
    tensor the exported graph decides at run time."""
    return (mask == mask[..., :1, :]).all()


def _is_key_mask(*inputs: torch.Tensor) -> torch.Tensor:
    """Whether a function's mask (its last input) is a key-padding mask."""
    return _rows_equal(inputs[-1])


def _is_honored_mask(*inputs: torch.Tensor) -> torch.Tensor:
    """Whether a function's mask (its last input) is one the approximations honor."""
    return _rows_equal(inputs[-1]) | is_causal_padding_mask(inputs[-1])


def _key_masked(
    approximate: Callable[..., torch.Tensor],
    mask: Any,
    *,
    scale: float | None,
    enable_gqa: bool,
    is_causal: bool,
    causal_form: bool = True,
) -> Callable[..., torch.Tensor] | Choice:
    """The body of a function running `approximate(q, k, v, key_bias, query_weight,
    is_causal=...)` on the masks the PyTorch op honors (`masks.site_mask_terms`), deciding in
    the graph as the op decides at run time: a key-padding mask → the approximation; a causal +
    key-padding mask → its causal form with the last row's key terms; any other mask → exact
    attention. `mask`: the mask input's layout (None: no mask); one with a query axis makes the
    body a `Choice` (ONNX Ifs). causal_form False: causal attention runs exact, as the op does
    where its causal form is not causal (HSA in a rewritten graph)."""

    def exact(q, k, v, mask=None):
        k, v = expand_gqa(q, k, enable_gqa), expand_gqa(q, v, enable_gqa)
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)
        n = q.shape[-2]
        causal_mask = with_causal(mask, n, n) if is_causal else mask
        return F.scaled_dot_product_attention(q, k, v, causal_mask, scale=scale)

    def approximation(causal: bool) -> Callable[..., torch.Tensor]:
        if causal and not causal_form:
            return exact

        def body(q, k, v, mask=None):
            k, v = expand_gqa(q, k, enable_gqa), expand_gqa(q, v, enable_gqa)
            if mask is None:
                return approximate(q, k, v, None, None, is_causal=causal)
            row = mask if mask.dim() < 2 else mask[..., -1:, :]  # the full row of a causal one
            stats = torch.promote_types(q.dtype, torch.float32)
            terms = key_mask_terms(row, tuple(q.shape[:-2]), q.shape[-2], stats)
            return approximate(q, k, v, *terms, is_causal=causal)

        return body

    layout = None if mask is None else TensorLayout.of(mask)
    if layout is None or len(layout.shape) < 2 or layout.shape[-2] == 1:
        return approximation(is_causal)

    honored = (
        approximation(True)
        if is_causal
        else Choice(_is_key_mask, approximation(False), approximation(True))
    )
    return Choice(_is_honored_mask, honored, exact)


def _refuse_unknown(op: str, spec: str, unknown: dict[str, Any]) -> None:
    """An argument a lowering does not know could change the function: refuse it."""
    if unknown:
        raise UnsupportedInputError(
            f"no ONNX lowering for {op} arguments {unknown}: extend {spec} in "
            "attnrewrite/onnx/lowerings.py (the op's signature has changed)"
        )


def monarch_spec(
    q: Any,
    k: Any,
    v: Any,
    attn_mask: Any = None,
    scale: float | None = None,
    block_size: int | None = None,
    num_steps: int = 2,
    pad: str = "post",
    enable_gqa: bool = False,
    fallback: bool = False,
    is_causal: bool = False,
    **unknown: Any,
) -> FunctionSpec:
    """The ONNX function of one `attnrewrite::monarch_attention` call."""
    _refuse_unknown("monarch_attention", "monarch_spec", unknown)
    if block_size is None:
        raise UnsupportedInputError(
            "ONNX export needs a fixed Monarch block_size; export_onnx resolves it from the "
            "example length, or pass block_size=..."
        )
    approximate = functools.partial(
        _monarch_approximation,
        scale=scale,
        block_size=block_size,
        num_steps=num_steps,
        pad=pad,
    )
    return _sdpa_like_spec(
        "MonarchAttention",
        approximate,
        (("b", block_size), ("T", num_steps), ("pad", pad)),
        q,
        k,
        v,
        attn_mask,
        scale=scale,
        is_causal=is_causal,
        enable_gqa=enable_gqa,
        # More than one block, and a ragged last one: the export then keeps padding and block
        # count symbolic instead of specializing them.
        example_length=2 * block_size + (3 if block_size > 3 else 1),
    )


def _sdpa_like_spec(
    name: str,
    approximate: Callable[..., Any],
    method_options: tuple[tuple[str, Any], ...],
    q: Any,
    k: Any,
    v: Any,
    attn_mask: Any,
    *,
    scale: float | None,
    is_causal: bool,
    enable_gqa: bool,
    example_length: int,
    causal_form: bool = True,
) -> FunctionSpec:
    """The function of an op with SDPA's arguments: inputs q, k, v (and the mask), options the
    method's then causal, scale and gqa, and `approximate` behind the op's mask dispatch."""
    inputs = [("q", TensorLayout.of(q)), ("k", TensorLayout.of(k)), ("v", TensorLayout.of(v))]
    if attn_mask is not None:
        inputs.append(("mask", TensorLayout.of(attn_mask)))
    options = (*method_options, ("causal", is_causal), ("scale", scale), ("gqa", enable_gqa))
    body = _key_masked(
        approximate,
        attn_mask,
        scale=scale,
        enable_gqa=enable_gqa,
        is_causal=is_causal,
        causal_form=causal_form,
    )
    return FunctionSpec(name, options, tuple(inputs), body, example_length=example_length)


def _monarch_approximation(q, k, v, key_bias, query_weight, *, scale, block_size, num_steps, pad,
                           is_causal):  # fmt: skip
    """The op's own stages (`monarch_forward`), each computed in one piece: batched MatMuls and
    one softmax per stage, where the reference's einsums over L and R cost far more in
    onnxruntime."""
    *batch, n, d = q.shape
    batch = tuple(batch)
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    config = MonarchConfig(scale, block_size, num_steps, pad, is_causal)
    valid = None if query_weight is None else per_token(query_weight, batch, n) > 0
    flat = (x.reshape(math.prod(batch), n, x.shape[-1]) for x in (q, k, v))
    ops = TorchStageOps(chunk_elements=None)
    out, _ = monarch_forward(*flat, per_token(key_bias, batch, n), valid, config, ops)
    return out.reshape(*batch, n, v.shape[-1])


def hsa_spec(
    q: Any,
    k: Any,
    v: Any,
    attn_mask: Any = None,
    scale: float | None = None,
    branching: tuple[int, ...] = (16, 4),
    is_causal: bool = False,
    enable_gqa: bool = False,
    fallback: bool = False,
    **unknown: Any,
) -> FunctionSpec:
    """The ONNX function of one `attnrewrite::hsa_attention` call."""
    _refuse_unknown("hsa_attention", "hsa_spec", unknown)
    branching = tuple(branching)
    approximate = functools.partial(_hsa_approximation, scale=scale, branching=branching)
    return _sdpa_like_spec(
        "HierarchicalSelfAttention",
        approximate,
        (("branching", branching),),
        q,
        k,
        v,
        attn_mask,
        scale=scale,
        is_causal=is_causal,
        enable_gqa=enable_gqa,
        # Every level of the tree present, and ragged groups: nothing specializes in the export.
        example_length=2 * math.prod(branching) + 3,
        causal_form=not fallback,  # a rewritten graph's op runs causal attention exact
    )


def _hsa_approximation(q, k, v, key_bias, query_weight, **options):
    valid = None if query_weight is None else query_weight > 0
    out = hsa_attention_reference(q, k, v, key_bias, valid, **options)
    return with_masked_rows(out, v, key_bias, valid, options["is_causal"])


#: ZeroS functions run the causal form with chunks of one token: the recurrence over tokens is an
#: ONNX Scan (O(N), a d×dv state per step) and no padding to a chunk multiple is needed, whose
#: size arithmetic would make torch.export specialize the sequence length.
_ZEROS_CHUNK = 1


def _zeros_inputs(q, k, v, key_logits, gate_first, gate_residual) -> list[tuple[str, Any]]:
    names = ("q", "k", "v", "key_logits", "gate_first", "gate_residual")
    values = (q, k, v, key_logits, gate_first, gate_residual)
    return [(name, TensorLayout.of(x)) for name, x in zip(names, values, strict=True)]


def _may_differ(n_queries: Any, n_keys: Any) -> bool:
    """Whether the query and key lengths (ints, or ONNX symbolic dims, named) may differ."""
    return str(n_queries) != str(n_keys)


def zeros_spec(
    q: Any,
    k: Any,
    v: Any,
    key_logits: Any,
    gate_first: Any,
    gate_residual: Any,
    is_causal: bool = False,
    key_valid: Any = None,
    **unknown: Any,
) -> FunctionSpec:
    """The ONNX function of one `attnrewrite::zeros_attention` call (the functional op)."""
    _refuse_unknown("zeros_attention", "zeros_spec", unknown)
    inputs = _zeros_inputs(q, k, v, key_logits, gate_first, gate_residual)
    if key_valid is not None:
        inputs.append(("key_valid", TensorLayout.of(key_valid)))
    body = functools.partial(_zeros_body, is_causal=is_causal)
    return FunctionSpec("ZeroSAttention", (("causal", is_causal),), tuple(inputs), body,
                        cross=_may_differ(q.shape[-2], k.shape[-2]))  # fmt: skip


def _zeros_body(q, k, v, key_logits, gate_first, gate_residual, key_valid=None, *,
                is_causal):  # fmt: skip
    return zeros_attention_linear(q, k, v, key_logits, gate_first, gate_residual, is_causal,
                                  key_valid, _ZEROS_CHUNK)  # fmt: skip


def zeros_site_spec(
    q: Any,
    k: Any,
    v: Any,
    key_logits: Any,
    gate_first: Any,
    gate_residual: Any,
    attn_mask: Any = None,
    is_causal: bool = False,
    scale: float | None = None,
    **unknown: Any,
) -> FunctionSpec:
    """The ONNX function of one `attnrewrite::zeros_site_attention` call (a ZeroS adapter's site
    with its SDPA mask): outputs (out, exact) as the op; the adapter's parameters, LayerNorm and
    gain stay in the model graph."""
    _refuse_unknown("zeros_site_attention", "zeros_site_spec", unknown)
    inputs = _zeros_inputs(q, k, v, key_logits, gate_first, gate_residual)
    if attn_mask is not None:
        inputs.append(("mask", TensorLayout.of(attn_mask)))
    cross = _may_differ(q.shape[-2], k.shape[-2])
    body = _zeros_site_body(attn_mask, is_causal=is_causal, scale=scale, cross=cross)
    options = (("causal", is_causal), ("scale", scale))
    return FunctionSpec("ZeroSSiteAttention", options, tuple(inputs), body, cross=cross,
                        outputs=(("out", "T0"), ("exact", "tensor(bool)")))  # fmt: skip


def _zeros_site_body(
    mask: Any, *, is_causal: bool, scale: float | None, cross: bool
) -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | Choice:
    """`zeros_site_attention_op` with its mask checks (`site_mask_terms`) decided in the graph:
    a key-padding mask → ZeroS; a causal + key-padding mask → causal ZeroS; any other → exact
    attention and exact = True. `mask`: the mask input's layout (None: no mask); one with a
    query axis makes the body a `Choice` (ONNX Ifs)."""

    def zeros(causal: bool, row: slice) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        """ZeroS with the key terms of one mask row (…, 1, Nk)."""

        def body(q, k, v, key_logits, gate_first, gate_residual, mask=None):
            gates = (gate_first, gate_residual)
            no = torch.zeros((), dtype=torch.bool, device=q.device)
            if mask is None:
                return _zeros_body(q, k, v, key_logits, *gates, is_causal=causal), no
            stats = torch.promote_types(q.dtype, torch.float32)
            terms = mask if mask.dim() < 2 else mask[..., row, :]
            key_bias, query_weight = key_mask_terms(terms, tuple(q.shape[:-2]), k.shape[-2], stats)
            key_valid = query_weight > 0
            logits = with_key_bias(key_logits, key_bias, key_valid, stats)
            return _zeros_body(q, k, v, logits, *gates, key_valid, is_causal=causal), no

        return body

    first_row, last_row = slice(None, 1), slice(-1, None)
    layout = None if mask is None else TensorLayout.of(mask)
    if layout is None:
        return zeros(is_causal, first_row)
    if len(layout.shape) < 2 or layout.shape[-2] == 1:
        return zeros(False, first_row)

    def exact(q, k, v, key_logits, gate_first, gate_residual, mask):
        yes = torch.ones((), dtype=torch.bool, device=q.device)
        return F.scaled_dot_product_attention(q, k, v, mask, scale=scale), yes

    if cross:  # causal ZeroS needs Nq = Nk
        return Choice(_is_key_mask, zeros(False, first_row), exact)
    honored = Choice(_is_key_mask, zeros(False, first_row), zeros(True, last_row))
    return Choice(_is_honored_mask, honored, exact)


def _monarch_for_site(q, k, v, mask, scale, seq_len, options, *, is_causal, enable_gqa):
    if options.block_size is None and not isinstance(seq_len, int):
        raise UnsupportedInputError(
            f"the sequence length is dynamic ({seq_len}): pass an explicit block size "
            "(block_size=..., or --block-size on the command line)"
        )
    block_size = options.block_size or default_block_size(seq_len)
    return monarch_spec(q, k, v, mask, scale, block_size, options.num_steps, options.pad,
                        enable_gqa=enable_gqa, is_causal=is_causal)  # fmt: skip


def _hsa_for_site(q, k, v, mask, scale, seq_len, options, *, is_causal, enable_gqa):
    """As a rewritten graph's op (fallback): a mask found causal at run time runs exact causal
    attention, since HSA's causal form lets later tokens reach earlier rows."""
    return hsa_spec(q, k, v, mask, scale, options.branching, is_causal, enable_gqa, fallback=True)


#: method name → FunctionSpec from (q, k, v, mask, scale, sequence length, parsed options,
#: is_causal=, enable_gqa=), for sites found in ONNX graphs (q, k, v as (B, H, S, d))
METHOD_SPECS: dict[str, Callable[..., FunctionSpec]] = {
    "monarch": _monarch_for_site,
    "hsa": _hsa_for_site,
}

#: custom op → function that builds the FunctionSpec from the op's call arguments
LOWERINGS: dict[Any, Callable[..., FunctionSpec]] = {
    torch.ops.attnrewrite.monarch_attention.default: monarch_spec,
    torch.ops.attnrewrite.hsa_attention.default: hsa_spec,
    torch.ops.attnrewrite.zeros_attention.default: zeros_spec,
    torch.ops.attnrewrite.zeros_site_attention.default: zeros_site_spec,
}
