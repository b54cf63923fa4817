"""Canonicalize: find softmax attention however it is spelled and make it one SDPA node.

Matching is semantic: from every softmax, walk the dataflow back to the score product
(through scales, masks and casts) and forward to the value product (through casts and inactive
dropout). The region is rewritten only when every intermediate value is used inside it alone, the
softmax runs over the key axis, the value product has the probabilities on its left, and shapes and
dtypes say the result is exactly SDPA's. Anything else is kept and reported with the reason.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..site import AttentionSite
from . import spellings as sp
from .graph_utils import (
    constant_value,
    infer_value,
    is_impure,
    layer_index,
    module_path,
    node_value,
    shape_of,
    tensor_meta,
    value_key,
)
from .unfuse import unfuse_attention_calls

aten = torch.ops.aten


class NotAttention(Exception):
    """A softmax that is not (provably) attention; the message is the report's reason."""


@dataclasses.dataclass
class ScoreStep:
    """One operation between the score product and the softmax, in application order."""

    kind: str  # "scale", "add", "sub", "fill"
    operand: Any  # scale factor / mask tensor / fill condition
    fill_value: float | None = None
    divide: bool = False


@dataclasses.dataclass
class AttentionMatch:
    softmax: torch.fx.Node
    scores: sp.Product  # Q ⋅ Kᵀ
    values: sp.Product  # P ⋅ V
    steps: list[ScoreStep]
    region: list[torch.fx.Node]  # every node the rewrite removes (the output included)

    @property
    def output(self) -> torch.fx.Node:
        return self.values.node


def _permuted_shape(x: Any, perm: tuple[int, ...] | None) -> tuple[int, ...] | None:
    shape = shape_of(x)
    return shape if shape is None or perm is None else tuple(shape[i] for i in perm)


def _describe(node: Any) -> str:
    if not isinstance(node, torch.fx.Node):
        return repr(node)
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return f"{node.name} ({target})"


def _walk_to_value_product(softmax: torch.fx.Node, gm: torch.fx.GraphModule, region: list):
    """Follow the probabilities through casts and inactive dropout to P @ V."""
    current = softmax
    while True:
        users = [u for u in current.users if not sp.ASSERTION.matches(u)]
        region.extend(u for u in current.users if sp.ASSERTION.matches(u))
        if not users:
            raise NotAttention("the softmax result is not used")
        if len(users) > 1:
            others = ", ".join(_describe(u) for u in users)
            raise NotAttention(
                f"the probabilities have {len(users)} users ({others}); attention needs exactly "
                "one value product"
            )
        (user,) = users
        dropout = sp.dropout_state(user, gm)
        if dropout is not None:
            if dropout[2]:
                raise NotAttention(f"attention dropout p={dropout[1]} is active (training mode)")
            region.append(user)
            current = user
            continue
        if sp.VALUE_PRESERVING.matches(user) and sp.argument(user, 0, "input") is current:
            region.append(user)
            current = user
            continue
        values = sp.product(user)
        if values is None:
            raise NotAttention(
                f"the probabilities feed {_describe(user)}, not a product with values"
            )
        if values.left is not current or values.right is current:
            raise NotAttention(
                f"the probabilities are the right operand of {_describe(user)}; attention "
                "multiplies them on the left of the values"
            )
        if values.left_perm is not None:
            raise NotAttention(f"{_describe(user)} permutes the probabilities")
        if values.bias is not None or values.alpha != 1:
            raise NotAttention(f"{_describe(user)} scales or offsets the attention output")
        region.append(user)
        return values


def _walk_to_score_product(softmax_input: Any, region: list) -> tuple[sp.Product, list]:
    """Follow the scores back through casts, scales and masks to Q @ Kᵀ."""
    steps: list[ScoreStep] = []
    current = softmax_input
    while True:
        if not isinstance(current, torch.fx.Node):
            raise NotAttention(f"the softmax input is a constant {current!r}")
        region.append(current)
        region.extend(u for u in current.users if sp.ASSERTION.matches(u))
        scores = sp.product(current)
        if scores is not None:
            if scores.out_perm is not None:
                raise NotAttention(
                    f"{_describe(current)} lays the scores out other than (batch…, queries, keys)"
                )
            if scores.bias is not None and scores.beta not in (0, 1):
                raise NotAttention(f"{_describe(current)} scales its bias by beta={scores.beta}")
            if scores.bias is not None and scores.beta == 1:
                steps.append(ScoreStep("add", scores.bias))  # baddbmm: alpha·(q⋅kᵀ) + bias
            if scores.alpha != 1:
                steps.append(ScoreStep("scale", scores.alpha))
            steps.reverse()
            return scores, steps
        if sp.VALUE_PRESERVING.matches(current):
            current = sp.argument(current, 0, "input")
            continue
        if sp.MUL.matches(current) or sp.DIV.matches(current):
            divide = sp.DIV.matches(current)
            if divide and current.kwargs.get("rounding_mode") is not None:
                raise NotAttention(f"{_describe(current)} rounds the scores")
            current, factor = _scores_and_operand(current, commutative=not divide)
            steps.append(ScoreStep("scale", factor, divide=divide))
            continue
        if sp.ADD.matches(current) or sp.SUB.matches(current):
            subtract = sp.SUB.matches(current)
            if not sp.is_unit_alpha(current):
                raise NotAttention(f"{_describe(current)} has an alpha factor")
            shift, (current, mask) = current, _scores_and_operand(current, commutative=not subtract)
            if isinstance(mask, torch.fx.Node):
                steps.append(ScoreStep("sub" if subtract else "add", mask))
            elif not (isinstance(mask, (int, float)) and math.isfinite(mask)):
                raise NotAttention(f"{_describe(shift)} adds {mask!r} to the scores")
            # else: one finite number added to every score; softmax is shift-invariant
            continue
        if sp.MASKED_FILL.matches(current):
            condition = sp.argument(current, 1, "mask")
            fill = sp.argument(current, 2, "value")
            steps.append(ScoreStep("fill", condition, fill_value=_constant(fill, current)))
            current = sp.argument(current, 0, "input")
            continue
        if sp.WHERE.matches(current):
            current, step = _where_step(current)
            steps.append(step)
            continue
        raise NotAttention(
            f"the scores come from {_describe(current)}: not a product, scale, mask or cast"
        )


def _scores_and_operand(node: torch.fx.Node, *, commutative: bool) -> tuple[Any, Any]:
    """For a binary op on the scores: (the scores side, the other operand).

    The scores side is the operand that is itself computed from a product, followed back through
    the ops this pass knows; the other operand must not depend on the scores.
    """
    a, b = sp.argument(node, 0, "input"), sp.argument(node, 1, "other")
    if _reaches_product(a):
        return a, b
    if commutative and _reaches_product(b):
        return b, a
    raise NotAttention(
        f"neither operand of {_describe(node)} ({_describe(a)}, {_describe(b)}) is Q·Kᵀ "
        "through casts, scales and masks"
    )


def _reaches_product(x: Any) -> bool:
    while isinstance(x, torch.fx.Node):
        if sp.matmul_operands(x) is not None:
            return True
        if sp.VALUE_PRESERVING.matches(x) or sp.MASKED_FILL.matches(x):
            x = sp.argument(x, 0, "input")
        elif sp.MUL.matches(x) or sp.DIV.matches(x) or sp.ADD.matches(x) or sp.SUB.matches(x):
            a, b = sp.argument(x, 0, "input"), sp.argument(x, 1, "other")
            return _reaches_product(a) or _reaches_product(b)
        elif sp.WHERE.matches(x):
            return any(_reaches_product(sp.argument(x, i, "")) for i in (1, 2))
        else:
            return False
    return False


def _where_step(node: torch.fx.Node) -> tuple[Any, ScoreStep]:
    condition, a, b = (
        sp.argument(node, i, n) for i, n in enumerate(("condition", "input", "other"))
    )
    if _reaches_product(a) and not _reaches_product(b):
        # where(keep, scores, fill): fill where the condition is False.
        negated = ("not", condition)
        return a, ScoreStep("fill", negated, fill_value=_constant(b, node))
    if _reaches_product(b) and not _reaches_product(a):
        return b, ScoreStep("fill", condition, fill_value=_constant(a, node))
    raise NotAttention(f"cannot tell which branch of {_describe(node)} holds the scores")


def _constant(value: Any, node: torch.fx.Node) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise NotAttention(
        f"{_describe(node)} fills with {_describe(value)}, not a Python number; cannot prove it "
        "masks exactly"
    )


def match_attention(softmax: torch.fx.Node, gm: torch.fx.GraphModule) -> AttentionMatch:
    """Match the attention region around `softmax`, or raise NotAttention with the reason."""
    scores, dim = sp.softmax_operands(softmax)
    scores_shape = shape_of(scores)
    if scores_shape is None:
        raise NotAttention("no shape information for the scores")
    rank = len(scores_shape)
    if dim is None or dim % rank != rank - 1:
        raise NotAttention(f"softmax over dim {dim} of rank-{rank} scores, not the key dim (-1)")
    region: list[torch.fx.Node] = [softmax]
    values = _walk_to_value_product(softmax, gm, region)
    product, steps = _walk_to_score_product(scores, region)
    match = AttentionMatch(softmax, product, values, steps, region)
    _check_region_is_private(match)
    _check_shapes_and_dtypes(match)
    return match


def _check_region_is_private(match: AttentionMatch) -> None:
    inside = set(match.region)
    for node in match.region:
        if node is match.output:
            continue
        outside = [u for u in node.users if u not in inside]
        if outside:
            names = ", ".join(_describe(u) for u in outside)
            raise NotAttention(
                f"{_describe(node)} has {len(outside)} user(s) outside the attention region "
                f"({names}); rewriting would change them"
            )
    operands = [match.scores.left, match.scores.right, match.values.right]
    for step in match.steps:
        operands.append(step.operand[1] if isinstance(step.operand, tuple) else step.operand)
    for operand in operands:
        if isinstance(operand, torch.fx.Node) and operand in inside:
            raise NotAttention(f"{_describe(operand)} is both inside the region and its operand")


def _check_shapes_and_dtypes(match: AttentionMatch) -> None:
    q_shape = _permuted_shape(match.scores.left, match.scores.left_perm)
    kt_shape = _permuted_shape(match.scores.right, match.scores.right_perm)
    v_shape = _permuted_shape(match.values.right, match.values.right_perm)
    q, kt, v = (tensor_meta(x) for x in (match.scores.left, match.scores.right, match.values.right))
    scores, out = tensor_meta(match.scores.node), tensor_meta(match.output)
    if any(t is None for t in (q, kt, v, scores, out)):
        raise NotAttention("no shape information for the query, key, value or output")
    if len(q_shape) < 2 or not (len(q_shape) == len(kt_shape) == len(v_shape)):
        raise NotAttention(
            f"operand ranks q={len(q_shape)}, kᵀ={len(kt_shape)}, v={len(v_shape)}: need equal "
            "ranks ≥ 2"
        )
    batch = q_shape[:-2]
    if kt_shape[:-2] != batch or v_shape[:-2] != batch:
        raise NotAttention(
            f"batch dims differ (q {q_shape}, kᵀ {kt_shape}, v {v_shape}); broadcast products "
            "are not SDPA"
        )
    if kt_shape[-1] != v_shape[-2]:
        raise NotAttention("keys and values have different lengths")
    for node in match.region:
        value = tensor_meta(node)
        if node is match.output or value is None or sp.ASSERTION.matches(node):
            continue
        if tuple(value.shape) != tuple(scores.shape):
            raise NotAttention(
                f"{_describe(node)} changes the score shape {tuple(scores.shape)} to "
                f"{tuple(value.shape)}"
            )
    for node in match.region:
        value = tensor_meta(node)
        floating = value is not None and value.is_floating_point() and q.is_floating_point()
        if floating and torch.finfo(value.dtype).bits < torch.finfo(q.dtype).bits:
            raise NotAttention(
                f"{_describe(node)} computes in {value.dtype}, narrower than the "
                f"{q.dtype} inputs; SDPA would compute in {q.dtype}"
            )
    if not (q.dtype == kt.dtype == v.dtype == out.dtype) or not q.is_floating_point():
        raise NotAttention(
            f"dtypes q={q.dtype}, k={kt.dtype}, v={v.dtype}, out={out.dtype}: SDPA needs one "
            "floating dtype"
        )
    for step in match.steps:
        if step.kind == "fill" and not _is_exact_fill(step.fill_value, scores.dtype):
            raise NotAttention(
                f"masked fill with {step.fill_value} in {scores.dtype} is not an exact mask "
                "(only -inf, or at most finfo.min/2 in float32/float64, masks exactly)"
            )
        if step.kind == "scale" and isinstance(step.operand, torch.fx.Node):
            _fold_target(step.operand, scores)


def _is_exact_fill(value: float | None, dtype: torch.dtype) -> bool:
    if value == -math.inf:
        return True
    return dtype in (torch.float32, torch.float64) and value <= torch.finfo(dtype).min / 2


def _fold_target(factor: torch.fx.Node, scores: torch.Tensor) -> str:
    """Where a tensor scale folds exactly: into q when constant along keys, into k along queries."""
    shape = shape_of(factor)
    if shape is None:
        if isinstance(node_value(factor), (torch.SymFloat, torch.SymInt)):
            raise NotAttention(
                f"the scale {_describe(factor)} is a symbolic number (torch.compile with "
                "dynamic=True makes the head size, and a scale computed from it, symbolic); "
                "leave dynamic unset: lengths become dynamic after a second length and the scale "
                "stays a constant"
            )
        raise NotAttention(f"no shape for the scale {_describe(factor)}")
    padded = (1,) * (scores.dim() - len(shape)) + shape
    if len(padded) != scores.dim():
        raise NotAttention(f"the scale {_describe(factor)} has more dims than the scores")
    if padded[-1] == 1:
        return "query"
    if padded[-2] == 1:
        return "key"
    raise NotAttention(
        f"the scale {_describe(factor)} of shape {shape} varies over queries and keys; it cannot "
        "be folded into q or k exactly"
    )


def _key_axis_shape(factor: torch.fx.Node, rank: int) -> list[int]:
    """The shape that puts a per-key scale (..., 1, S) on the key rows of K (..., S, 1)."""
    shape = list(shape_of(factor))
    shape = [1] * (rank - len(shape)) + shape
    shape[-2], shape[-1] = shape[-1], shape[-2]
    return shape


class _Emitter:
    """Inserts new nodes before an anchor and gives each its fake value."""

    def __init__(self, graph: torch.fx.Graph, anchor: torch.fx.Node):
        self.graph = graph
        self.anchor = anchor
        self.key = value_key(graph)

    def __call__(self, target: Any, *args: Any, **kwargs: Any) -> torch.fx.Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, args, kwargs)
        node.meta["nn_module_stack"] = self.anchor.meta.get("nn_module_stack", {})
        infer_value(node, self.key)
        return node


def _emit_sdpa(
    match: AttentionMatch, gm: torch.fx.GraphModule
) -> tuple[torch.fx.Node, torch.fx.Node]:
    """Insert the canonical SDPA node; returns it and the node that replaces the region's output."""
    emit = _Emitter(gm.graph, match.output)
    scores = tensor_meta(match.scores.node)
    dtype = tensor_meta(match.scores.left).dtype
    rank = scores.dim()

    def permuted(x: torch.fx.Node, perm: tuple[int, ...] | None) -> torch.fx.Node:
        return x if perm is None else emit(aten.permute.default, x, list(perm))

    query = permuted(match.scores.left, match.scores.left_perm)
    # K = Kᵀ with its last two dims swapped, composed with the product's own permutation.
    key_perm = list(match.scores.right_perm or range(rank))
    key_perm[-2], key_perm[-1] = key_perm[-1], key_perm[-2]
    key = sp.transpose_source(match.scores.right, rank) if key_perm != list(range(rank)) else None
    if key is None or match.scores.right_perm is not None:
        key = permuted(match.scores.right, None if key_perm == list(range(rank)) else key_perm)
    value = permuted(match.values.right, match.values.right_perm)
    scale = 1.0
    mask: torch.fx.Node | None = None

    def as_mask_dtype(x: torch.fx.Node) -> torch.fx.Node:
        if tensor_meta(x).dtype != dtype:
            return emit(aten._to_copy.default, x, dtype=dtype)
        return x

    for step in match.steps:
        if step.kind == "scale":
            factor = step.operand
            op = aten.div.Tensor if step.divide else aten.mul.Tensor
            if isinstance(factor, torch.fx.Node):
                if _fold_target(factor, scores) == "query":
                    query = emit(op, query, factor)
                else:
                    key = emit(
                        op, key, emit(aten.reshape.default, factor, _key_axis_shape(factor, rank))
                    )
            else:
                scale = scale / factor if step.divide else scale * factor
            if mask is not None:
                mask = emit(op, mask, factor)
        elif step.kind in ("add", "sub"):
            term = as_mask_dtype(step.operand)
            if step.kind == "sub":
                term = emit(aten.neg.default, term)
            mask = term if mask is None else emit(aten.add.Tensor, mask, term)
        else:  # fill
            condition = step.operand
            if isinstance(condition, tuple):  # ("not", c) from where(c, scores, fill)
                condition = emit(aten.logical_not.default, condition[1])
            zeros = emit(aten.zeros_like.default, condition, dtype=dtype)
            term = emit(aten.masked_fill.Scalar, zeros, condition, step.fill_value)
            mask = term if mask is None else emit(aten.add.Tensor, mask, term)
    while mask is not None and tensor_meta(mask).dim() < 2:  # SDPA wants (…, Nq, Nk) masks
        mask = emit(aten.unsqueeze.default, mask, 0)
    attention = emit(
        aten.scaled_dot_product_attention.default, query, key, value, mask, scale=scale
    )
    return attention, permuted(attention, match.values.out_perm)


def _site_for(node: torch.fx.Node, spelling: str) -> AttentionSite:
    path = module_path(node)
    return AttentionSite(
        name=path or node.name, node=node.name, layer=layer_index(path), spelling=spelling
    )


def describe_sdpa_site(site: AttentionSite, node: torch.fx.Node) -> None:
    """Fill a site's shapes, mask kind and flags from its canonical SDPA node."""
    args = sp.sdpa_arguments(node)
    assert args is not None
    site.sdpa, site.sdpa_node = args, node
    site.q_shape, site.k_shape, site.v_shape = (
        shape_of(x) for x in (args.query, args.key, args.value)
    )
    query = tensor_meta(args.query)
    site.dtype = str(query.dtype).removeprefix("torch.") if query is not None else None
    site.is_causal, site.scale, site.dropout_p = args.is_causal, args.scale, args.dropout_p
    site.enable_gqa = args.enable_gqa
    mask_shape = shape_of(args.attn_mask)
    site.mask_shape = mask_shape
    if site.is_causal:
        site.mask = "causal"
    elif args.attn_mask is None:
        site.mask = "none"
    else:
        site.mask = "key" if len(mask_shape) < 2 or mask_shape[-2] == 1 else "full"


def _is_exactly_causal(mask: Any, q_len: int, k_len: int) -> bool:
    """True when an SDPA mask value equals is_causal=True: keep j ≤ i, mask the rest."""
    if not isinstance(mask, torch.Tensor) or q_len != k_len or mask.dim() < 2:
        return False
    if tuple(mask.shape[-2:]) != (q_len, k_len):
        return False
    keep = torch.ones(q_len, k_len, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        return bool((mask == keep).all())
    if not mask.is_floating_point():
        return False
    masked = mask <= torch.finfo(mask.dtype).min / 2
    return bool((mask.masked_fill(~keep, 0) == 0).all() and (masked == ~keep).all())


def _broadcasts_into(dims: tuple, target: tuple) -> bool:
    """Whether batch dims `dims` differ from `target` and broadcast to it (sizes 1 or known
    equal; never guards on a symbolic size)."""
    if len(dims) > len(target) or (
        len(dims) == len(target)
        and all(statically_known_true(a == b) for a, b in zip(dims, target, strict=True))
    ):
        return False
    aligned = zip(dims, target[len(target) - len(dims) :], strict=True)
    return all((isinstance(a, int) and a == 1) or statically_known_true(a == b) for a, b in aligned)


def _refine_sdpa(node: torch.fx.Node, gm: torch.fx.GraphModule) -> torch.fx.Node:
    """Make an SDPA node say what it computes: constant causal masks become is_causal=True,
    key/value heads repeated for grouped-query attention become enable_gqa=True, and keys and
    values that broadcast over q's batch dims are expanded to them."""
    args = sp.sdpa_arguments(node)
    query, key, value, mask = args.query, args.key, args.value, args.attn_mask
    is_causal, enable_gqa = args.is_causal, args.enable_gqa
    q_shape, k_shape = shape_of(query), shape_of(key)
    changed = False
    known_lengths = q_shape is not None and k_shape is not None
    if (
        mask is not None
        and known_lengths
        and _is_exactly_causal(constant_value(mask, gm), q_shape[-2], k_shape[-2])
    ):
        mask, is_causal, changed = None, True, True
    emit = _Emitter(gm.graph, node)
    repeated_key, repeated_value = sp.head_repeat(key, shape_of), sp.head_repeat(value, shape_of)
    if not enable_gqa and repeated_key and repeated_value and repeated_key[1] == repeated_value[1]:

        def heads(repeat: tuple[Any, int, bool]) -> torch.fx.Node:
            source, _, unit_dim = repeat
            return emit(aten.squeeze.dim, source, -3) if unit_dim else source

        key, value, enable_gqa, changed = heads(repeated_key), heads(repeated_value), True, True
    if not enable_gqa and known_lengths and _broadcasts_into(k_shape[:-2], q_shape[:-2]):
        # SDPA broadcasts k and v over q's batch dims (multi-query attention spelled so): the
        # canonical form has them expanded (views), so every method sees q's batch dims.
        lead = [
            size if isinstance(size, int) else emit(aten.sym_size.int, query, i)
            for i, size in enumerate(q_shape[:-2])
        ]
        key, value = (emit(aten.expand.default, x, [*lead, -1, -1]) for x in (key, value))
        changed = True
    if not changed:
        return node
    refined = emit(
        aten.scaled_dot_product_attention.default,
        query,
        key,
        value,
        mask,
        args.dropout_p,
        is_causal,
        scale=args.scale,
        enable_gqa=enable_gqa,
    )
    node.replace_all_uses_with(refined)
    gm.graph.erase_node(node)
    return refined


FUSED_MHA_REASON = (
    "not rewritten: a fused attention call ({why}) stays one opaque call in this graph; "
    "rewrite the model first with attnrewrite.rewrite(model, example_inputs, method=...), which "
    "traces the module's own forward, and compile result.module"
)


def _softmax_modules_as_calls(gm: torch.fx.GraphModule) -> bool:
    """nn.Softmax calls (leaves in symbolic_trace graphs) become torch.softmax calls, which the
    matcher reads; one with dim=None (PyTorch's legacy implicit dim) stays as it is."""
    changed = False
    for node in list(gm.graph.find_nodes(op="call_module")):
        module = gm.get_submodule(str(node.target))
        if type(module) is not torch.nn.Softmax or module.dim is None:
            continue
        with gm.graph.inserting_before(node):
            call = gm.graph.call_function(torch.softmax, (node.args[0], module.dim))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        changed = True
    return changed


def canonicalize(gm: torch.fx.GraphModule) -> list[AttentionSite]:
    """Rewrite every provable attention region of `gm` into SDPA; report every candidate site.

    Candidates are every softmax (attention or not) and every SDPA call already in the graph;
    fused attention calls (nn.MultiheadAttention and its kin, unfuse.py) are opened first, and
    those that stay whole are reported as kept.
    """
    kept_fused = unfuse_attention_calls(gm)
    changed = _softmax_modules_as_calls(gm)
    # a dead user is no user: nn.MultiheadAttention computes weights that callers often drop
    changed |= gm.graph.eliminate_dead_code(is_impure)
    sites: list[AttentionSite] = []
    erased: set[torch.fx.Node] = set()
    for node in list(gm.graph.nodes):
        if node.name in kept_fused:
            site = _site_for(node, "fused_mha")
            site.keep(FUSED_MHA_REASON.format(why=kept_fused[node.name]))
            sites.append(site)
            continue
        if node in erased or node.op not in ("call_function", "call_method"):
            continue
        if sp.sdpa_arguments(node) is not None:
            site = _site_for(node, "sdpa")
            refined = _refine_sdpa(node, gm)
            changed |= refined is not node
            describe_sdpa_site(site, refined)
            sites.append(site)
            continue
        if sp.softmax_operands(node) is None:
            continue
        site = _site_for(node, "eager")
        try:
            match = match_attention(node, gm)
        except NotAttention as reason:
            site.keep(f"not rewritten: {reason}")
            sites.append(site)
            continue
        sdpa, result = _emit_sdpa(match, gm)
        match.output.replace_all_uses_with(result)
        for dead in sorted(set(match.region), key=_position(gm.graph), reverse=True):
            gm.graph.erase_node(dead)
            erased.add(dead)
        describe_sdpa_site(site, _refine_sdpa(sdpa, gm))
        sites.append(site)
        changed = True
    if changed:
        gm.graph.eliminate_dead_code(is_impure)
        gm.graph.lint()
        gm.recompile()
    return sites


def _position(graph: torch.fx.Graph):
    order = {node: i for i, node in enumerate(graph.nodes)}
    return order.__getitem__


__all__ = ["NotAttention", "canonicalize", "describe_sdpa_site", "match_attention"]
