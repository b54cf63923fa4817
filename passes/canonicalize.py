"""Canonicalize: find softmax attention however it is spelled and make it one SDPA node.

Matching is semantic: from every softmax, walk the dataflow back to the score product
(through scales, masks, casts and reshapes that only regroup batch dims) and forward to the value
product (through casts, regroups and inactive dropout). The region is rewritten only when every
intermediate value is used inside it alone, the softmax runs over the key axis, the value product
has the probabilities on its left, and shapes and dtypes say the result is exactly SDPA's: every
cast on the way must be to a floating dtype that holds every value of the inputs' dtype. Anything
else is kept and reported with the reason.

A float mask wider than the attention's dtype (a float32 mask in a float16 model) is clamped to
that dtype's finite range before the cast, as a large negative value stays large and negative
instead of becoming -inf. Rows with some key unmasked match the model either way; a row whose keys
are all masked matches it where the mask does not swamp the scores in the model's wider dtype
(e.g. -1e5): a mask as large as float32's finfo.min makes such a row uniform in the model (the
mean of the values), which no float16 mask can reproduce inside one SDPA call.
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
    at: torch.fx.Node  # the region node that applies it: its batch layout and dtype
    fill_value: float | None = None
    divide: bool = False


@dataclasses.dataclass(frozen=True)
class Layout:
    """The batch dims of a tensor in the region, and where the graph holds their sizes.

    Scores may be reshaped between the product, the masks, the softmax and the value product
    (BLOOM, MBart) as long as only their batch dims are regrouped: every layout then indexes the
    same flat batch in the same row-major order. Each entry of `sizes` is an int, a node that
    computes the size, a (node, dim) pair read with sym_size, or None where the graph holds no
    such node (a symbolic size made by a flatten).
    """

    dims: tuple[Any, ...]
    sizes: tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class Operand:
    """A tensor the canonical form takes: `node` permuted by `perm`, in `layout`, with the
    number `factor` it was multiplied by before the product peeled off (it joins SDPA's scale)."""

    node: Any
    layout: Layout
    perm: tuple[int, ...] | None = None
    factor: float = 1.0


@dataclasses.dataclass(frozen=True)
class Plan:
    """The canonical SDPA node's operands, all in one batch `layout`; `output` is the value
    product's layout, which the result is reshaped back to."""

    layout: Layout
    query: Operand
    key: Operand
    key_transposed: bool  # `key` holds Kᵀ: swap its last two dims
    value: Operand
    output: Layout


@dataclasses.dataclass
class AttentionMatch:
    softmax: torch.fx.Node
    scores: sp.Product  # Q ⋅ Kᵀ
    values: sp.Product  # P ⋅ V
    steps: list[ScoreStep]
    region: list[torch.fx.Node]  # every node the rewrite removes (the output included)
    layouts: dict[torch.fx.Node, Layout]  # the batch layout of each node on the scores path
    plan: Plan | None = None

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


def _same_dims(a: tuple, b: tuple) -> bool:
    """Sizes known equal for every input (never guards on a symbolic size)."""
    return len(a) == len(b) and all(
        statically_known_true(x == y) for x, y in zip(a, b, strict=False)
    )


def _regroups(before: tuple | None, after: tuple | None) -> bool:
    """Whether a reshape from `before` to `after` only merges or splits batch dims: the last two
    dims stay, so each (queries, keys) matrix stays whole and in place in the flat batch."""
    if before is None or after is None or len(before) < 2 or len(after) < 2:
        return False
    return _same_dims(before[-2:], after[-2:]) and statically_known_true(
        math.prod(before[:-2]) == math.prod(after[:-2])
    )


def _passes_through(node: torch.fx.Node) -> Any:
    """The input of a node that moves the scores or probabilities without changing them: a
    cast (the dtype is checked later), a batch regroup or an expand to the same shape; None
    when `node` is none of these."""
    source = sp.argument(node, 0, "input")
    if sp.VALUE_PRESERVING.matches(node):
        return source
    if sp.REGROUP.matches(node) and _regroups(shape_of(source), shape_of(node)):
        return source
    if sp.EXPAND.matches(node) and shape_of(source) is not None:
        return source if _same_dims(shape_of(source), shape_of(node)) else None
    return None


def _walk_to_value_product(softmax: torch.fx.Node, gm: torch.fx.GraphModule, region: list):
    """Follow the probabilities through casts, regroups and inactive dropout to P @ V."""
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
        if sp.argument(user, 0, "input") is current and _passes_through(user) is current:
            _check_keeps_shape(user, current)
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


def _check_keeps_shape(node: torch.fx.Node, source: Any) -> None:
    """An op on the scores or probabilities may regroup their batch dims, never broadcast them
    to more values (each added value would be a copy SDPA does not make)."""
    before, after = shape_of(source), shape_of(node)
    if before is None or after is None:
        return
    if sp.REGROUP.matches(node):
        if not _regroups(before, after):
            raise NotAttention(
                f"{_describe(node)} reshapes {before} to {after}: more than a regroup of the "
                "batch dims"
            )
    elif not _same_dims(before, after):
        raise NotAttention(f"{_describe(node)} changes the score shape {before} to {after}")


def _walk_to_score_product(
    softmax_input: Any, gm: torch.fx.GraphModule, region: list
) -> tuple[sp.Product, list[ScoreStep], list[torch.fx.Node]]:
    """Follow the scores back through casts, regroups, scales and masks to Q @ Kᵀ; returns the
    product, the steps in application order and the nodes on the way (softmax input first)."""
    steps: list[ScoreStep] = []
    path: list[torch.fx.Node] = []
    current = softmax_input
    while True:
        if not isinstance(current, torch.fx.Node):
            raise NotAttention(f"the softmax input is a constant {current!r}")
        region.append(current)
        path.append(current)
        region.extend(u for u in current.users if sp.ASSERTION.matches(u))
        node = current
        scores = sp.product(current)
        if scores is not None:
            if scores.out_perm is not None:
                raise NotAttention(
                    f"{_describe(current)} lays the scores out other than (batch…, queries, keys)"
                )
            if scores.bias is not None and scores.beta not in (0, 1):
                raise NotAttention(f"{_describe(current)} scales its bias by beta={scores.beta}")
            if scores.bias is not None and scores.beta == 1:
                steps.append(ScoreStep("add", scores.bias, current))  # baddbmm: α·(q⋅kᵀ) + bias
            if scores.alpha != 1:
                steps.append(ScoreStep("scale", scores.alpha, current))
            steps.reverse()
            return scores, steps, path
        if _passes_through(current) is not None:
            current = _passes_through(current)
        elif sp.MUL.matches(current) or sp.DIV.matches(current):
            divide = sp.DIV.matches(current)
            if divide and current.kwargs.get("rounding_mode") is not None:
                raise NotAttention(f"{_describe(current)} rounds the scores")
            current, factor = _scores_and_operand(current, commutative=not divide)
            steps.append(ScoreStep("scale", factor, node, divide=divide))
        elif sp.ADD.matches(current) or sp.SUB.matches(current):
            subtract = sp.SUB.matches(current)
            if not sp.is_unit_alpha(current):
                raise NotAttention(f"{_describe(current)} has an alpha factor")
            current, mask = _scores_and_operand(current, commutative=not subtract)
            if isinstance(mask, torch.fx.Node):
                steps.append(ScoreStep("sub" if subtract else "add", mask, node))
            elif not (isinstance(mask, (int, float)) and math.isfinite(mask)):
                raise NotAttention(f"{_describe(node)} adds {mask!r} to the scores")
            # else: one finite number added to every score; softmax is shift-invariant
        elif sp.MASKED_FILL.matches(current):
            condition = sp.argument(current, 1, "mask")
            fill = _constant(sp.argument(current, 2, "value"), current, gm)
            steps.append(ScoreStep("fill", condition, node, fill_value=fill))
            current = sp.argument(current, 0, "input")
        elif sp.WHERE.matches(current):
            current, step = _where_step(current, gm)
            steps.append(step)
        else:
            raise NotAttention(
                f"the scores come from {_describe(current)}: not a product, scale, mask, cast "
                "or batch regroup"
            )
        _check_keeps_shape(node, current)


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
        if _passes_through(x) is not None or sp.MASKED_FILL.matches(x):
            x = sp.argument(x, 0, "input")
        elif sp.MUL.matches(x) or sp.DIV.matches(x) or sp.ADD.matches(x) or sp.SUB.matches(x):
            a, b = sp.argument(x, 0, "input"), sp.argument(x, 1, "other")
            return _reaches_product(a) or _reaches_product(b)
        elif sp.WHERE.matches(x):
            return any(_reaches_product(sp.argument(x, i, "")) for i in (1, 2))
        else:
            return False
    return False


def _where_step(node: torch.fx.Node, gm: torch.fx.GraphModule) -> tuple[Any, ScoreStep]:
    condition, a, b = (
        sp.argument(node, i, n) for i, n in enumerate(("condition", "input", "other"))
    )
    if _reaches_product(a) and not _reaches_product(b):
        # where(keep, scores, fill): fill where the condition is False.
        negated = ("not", condition)
        return a, ScoreStep("fill", negated, node, fill_value=_constant(b, node, gm))
    if _reaches_product(b) and not _reaches_product(a):
        return b, ScoreStep("fill", condition, node, fill_value=_constant(a, node, gm))
    raise NotAttention(f"cannot tell which branch of {_describe(node)} holds the scores")


def _constant(value: Any, node: torch.fx.Node, gm: torch.fx.GraphModule) -> float:
    """A fill value: a Python number, or a one-element tensor computed from constants alone
    (torch.full((), -inf), a tensor constant or buffer; not a trainable parameter)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, torch.fx.Node):
        tensor = constant_value(value, gm)
        if (
            isinstance(tensor, torch.Tensor)
            and tensor.numel() == 1
            and not tensor.requires_grad
            and not tensor.is_complex()
            and tensor.dtype != torch.bool
        ):
            return float(tensor.item())
    raise NotAttention(
        f"{_describe(node)} fills with {_describe(value)}, not a number or a one-element "
        "constant tensor; cannot prove it masks exactly"
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
    product, steps, path = _walk_to_score_product(scores, gm, region)
    match = AttentionMatch(softmax, product, values, steps, region, _path_layouts(product, path))
    _check_region_is_private(match)
    _check_shapes_and_dtypes(match)
    match.plan = _plan(match)
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


def _holds_every_value(dtype: torch.dtype, of: torch.dtype) -> bool:
    """Whether `dtype` is floating and holds every value of `of` (float32 holds float16 and
    bfloat16; neither 16-bit float holds the other; no integer or bool dtype holds a float)."""
    return dtype.is_floating_point and torch.promote_types(dtype, of) == dtype


def _check_shapes_and_dtypes(match: AttentionMatch) -> None:
    q_shape = _permuted_shape(match.scores.left, match.scores.left_perm)
    kt_shape = _permuted_shape(match.scores.right, match.scores.right_perm)
    v_shape = _permuted_shape(match.values.right, match.values.right_perm)
    q, kt, v = (tensor_meta(x) for x in (match.scores.left, match.scores.right, match.values.right))
    scores, out = tensor_meta(match.scores.node), tensor_meta(match.output)
    probabilities = shape_of(match.values.left)
    if any(t is None for t in (q, kt, v, scores, out, probabilities)):
        raise NotAttention("no shape information for the query, key, value or output")
    if len(q_shape) < 2 or not (len(q_shape) == len(kt_shape)) or len(v_shape) < 2:
        raise NotAttention(
            f"operand ranks q={len(q_shape)}, kᵀ={len(kt_shape)}, v={len(v_shape)}: need equal "
            "ranks ≥ 2"
        )
    if not _same_dims(kt_shape[:-2], q_shape[:-2]) or not _same_dims(
        v_shape[:-2], probabilities[:-2]
    ):
        raise NotAttention(
            f"batch dims differ (q {q_shape}, kᵀ {kt_shape}, v {v_shape}); broadcast products "
            "are not SDPA"
        )
    if not statically_known_true(kt_shape[-1] == v_shape[-2]):
        raise NotAttention("keys and values have different lengths")
    if not q.is_floating_point():
        raise NotAttention(f"the query is {q.dtype}; SDPA needs a floating dtype")
    for node in match.region:
        value = tensor_meta(node)
        if value is not None and not _holds_every_value(value.dtype, q.dtype):
            raise NotAttention(
                f"{_describe(node)} computes in {value.dtype}, which does not hold every "
                f"{q.dtype} value of the inputs; SDPA would compute in {q.dtype}"
            )
    if not (q.dtype == kt.dtype == v.dtype == out.dtype):
        raise NotAttention(
            f"dtypes q={q.dtype}, k={kt.dtype}, v={v.dtype}, out={out.dtype}: SDPA needs one "
            "floating dtype"
        )
    for step in match.steps:
        dtype = tensor_meta(step.at).dtype
        if step.kind == "fill" and not _is_exact_fill(_landed(step.fill_value, dtype), dtype):
            raise NotAttention(
                f"masked fill with {step.fill_value} in {dtype} is not an exact mask "
                "(only -inf, or at most finfo.min/2 in float32/float64, masks exactly)"
            )


def _landed(value: float, dtype: torch.dtype) -> float:
    """A fill value as the scores hold it: float32's finfo.min in float16 scores is -inf."""
    return torch.tensor(value, dtype=torch.float64).to(dtype).item()


def _is_exact_fill(value: float, dtype: torch.dtype) -> bool:
    if value == -math.inf:
        return True
    return dtype in (torch.float32, torch.float64) and value <= torch.finfo(dtype).min / 2


def _own_layout(x: torch.fx.Node, perm: tuple[int, ...] | None = None) -> Layout:
    """The layout of a tensor outside the region (its sizes are read from it)."""
    dims = _permuted_shape(x, perm)[:-2]
    sizes = tuple(
        d if isinstance(d, int) else (x, i if perm is None else perm[i]) for i, d in enumerate(dims)
    )
    return Layout(tuple(dims), sizes)


def _regroup_layout(node: torch.fx.Node, before: Layout) -> Layout:
    """The layout a regroup in the region makes (`before`: its input's): static sizes, or the
    size nodes a view, reshape or unflatten was given; a flattened symbolic size has none."""
    dims = shape_of(node)[:-2]
    given: dict[int, Any] = {}
    if sp.RESHAPE.matches(node):
        if node.op == "call_method" and len(node.args) > 2:
            sizes = list(node.args[1:])
        else:
            sizes = sp.argument(node, 1, "shape")
            sizes = node.kwargs.get("size") if sizes is None else sizes
        given = dict(enumerate(sizes)) if isinstance(sizes, (list, tuple)) else {}
    elif sp.UNFLATTEN.matches(node):
        dim, sizes = sp.argument(node, 1, "dim"), sp.argument(node, 2, "sizes")
        if isinstance(dim, int) and isinstance(sizes, (list, tuple)):
            dim %= len(before.dims) + 2
            given = {i: before.sizes[i] for i in range(dim)}
            given.update({dim + i: size for i, size in enumerate(sizes)})
    sizes = []
    for i, d in enumerate(dims):
        size = given.get(i)
        if isinstance(d, int):
            sizes.append(d)
        else:
            sizes.append(size if isinstance(size, (torch.fx.Node, tuple)) else None)
    return Layout(tuple(dims), tuple(sizes))


def _path_layouts(product: sp.Product, path: list[torch.fx.Node]) -> dict[torch.fx.Node, Layout]:
    """The layout of every node from the score product to the softmax input."""
    layout = _own_layout(product.left, product.left_perm)
    layouts = {}
    for node in reversed(path):
        if node is not product.node and sp.REGROUP.matches(node):
            layout = _regroup_layout(node, layout)
        layouts[node] = layout
    return layouts


def _peeled(x: torch.fx.Node, scales: bool) -> tuple[Any, float] | None:
    """(input, factor) when `x` is its input unchanged but for a regroup, a same-shape expand or
    copy, or (with `scales`) a product with a finite nonzero number; None otherwise."""
    value = tensor_meta(x)
    source = _passes_through(x)
    factor = 1.0
    if source is None and scales and (sp.MUL.matches(x) or sp.DIV.matches(x)):
        a, b = sp.argument(x, 0, "input"), sp.argument(x, 1, "other")
        if sp.MUL.matches(x) and isinstance(b, torch.fx.Node):
            a, b = b, a
        number = isinstance(b, (int, float)) and not isinstance(b, bool)
        if number and math.isfinite(b) and b != 0 and x.kwargs.get("rounding_mode") is None:
            source, factor = a, (1 / b if sp.DIV.matches(x) else float(b))
    before = tensor_meta(source)
    if before is None or value is None or before.dtype != value.dtype:
        return None
    if not (
        _same_dims(tuple(before.shape), tuple(value.shape))
        or _regroups(tuple(before.shape), tuple(value.shape))
    ):
        return None
    return source, factor


def _chain(x: Any, perm: tuple[int, ...] | None, *, scales: bool, factor: float = 1.0):
    """`x` and the tensors it is computed from by `_peeled` steps, outermost first, each with
    the factor peeled so far; a permuted operand (einsum) is taken as it is."""
    found = [Operand(x, _own_layout(x, perm), perm, factor)]
    while perm is None:
        peeled = _peeled(x, scales)
        if peeled is None:
            break
        x, by = peeled
        factor *= by
        found.append(Operand(x, _own_layout(x), None, factor))
    return found


def _pick(chain: list[Operand], layout: Layout) -> Operand:
    """The innermost tensor of a chain already in `layout`, else the innermost (reshaped)."""
    return next((o for o in reversed(chain) if _same_dims(o.layout.dims, layout.dims)), chain[-1])


def _plan(match: AttentionMatch) -> Plan:
    """Choose the canonical layout and operands: the layout with the most batch dims among the
    masks' and the query's (so (batch, heads) wins over batch·heads), ties to the first mask."""
    scores, values = match.scores, match.values
    masks = [match.layouts[step.at] for step in match.steps if step.kind != "scale"]
    queries = _chain(scores.left, scores.left_perm, scales=True)
    candidates = [*masks, queries[-1].layout]
    layout = max(candidates, key=lambda x: len(x.dims))
    # the same dims may be known with sizes in one candidate and not in another (a flatten)
    layout = next(
        (c for c in candidates if _same_dims(c.dims, layout.dims) and None not in c.sizes), layout
    )
    query = _pick(queries, layout)
    perm = list(scores.right_perm or ())
    if perm:  # K = Kᵀ permuted back: the swap composed into the product's permutation
        perm[-2], perm[-1] = perm[-1], perm[-2]
    key_transposed = False
    if perm == list(range(len(perm))) and perm:  # the product reads K itself (einsum)
        key = _pick(_chain(scores.right, None, scales=True), layout)
    elif perm:
        key = _chain(scores.right, tuple(perm), scales=False)[0]
    else:
        transposed = _chain(scores.right, None, scales=True)
        source = sp.transpose_source(transposed[-1].node, len(shape_of(transposed[-1].node)))
        key_transposed = source is None
        if key_transposed:
            key = _pick(transposed, layout)
        else:
            key = _pick(_chain(source, None, scales=True, factor=transposed[-1].factor), layout)
    value = _pick(_chain(values.right, values.right_perm, scales=False), layout)
    output = _own_layout(values.right, values.right_perm)
    for step in match.steps:
        at = match.layouts[step.at]
        if step.kind == "scale" and isinstance(step.operand, torch.fx.Node):
            _fold_target(step.operand, len(at.dims) + 2)
            padded = _padded_shape(step.operand, len(at.dims) + 2)
            if not _same_dims(at.dims, layout.dims) and any(d != 1 for d in padded[:-2]):
                raise NotAttention(
                    f"the scale {_describe(step.operand)} varies over batch dims that a reshape "
                    "regroups"
                )
        elif step.kind != "scale" and not _same_dims(at.dims, layout.dims):
            _require_sizes(at)
    if any(not _same_dims(o.layout.dims, layout.dims) for o in (query, key, value)):
        _require_sizes(layout)
    return Plan(layout, query, key, key_transposed, value, output)


def _require_sizes(layout: Layout) -> None:
    if any(size is None for size in layout.sizes):
        raise NotAttention(
            f"a reshape regroups batch dims of symbolic sizes {layout.dims} that no node in the "
            "graph holds (a flatten under dynamic shapes); spell it with view or reshape"
        )


def _padded_shape(factor: torch.fx.Node, rank: int) -> tuple[Any, ...]:
    shape = shape_of(factor)
    return (1,) * (rank - len(shape)) + tuple(shape)


def _fold_target(factor: torch.fx.Node, rank: int) -> str:
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
    padded = _padded_shape(factor, rank)
    if len(padded) != rank:
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

    def sizes(self, layout: Layout) -> list[Any]:
        """A layout's sizes as reshape and expand take them (sym_size nodes where symbolic)."""
        return [self(aten.sym_size.int, *s) if isinstance(s, tuple) else s for s in layout.sizes]

    def last_two(self, x: torch.fx.Node) -> list[Any]:
        """The sizes of the last two dims of `x`, a node outside the region."""
        shape = shape_of(x)[-2:]
        return [d if isinstance(d, int) else self(aten.sym_size.int, x, i - 2) for i, d in
                enumerate(shape)]  # fmt: skip

    def regrouped(self, x: torch.fx.Node, to: Layout) -> torch.fx.Node:
        return self(aten.reshape.default, x, [*self.sizes(to), *self.last_two(x)])


def _place(operand: Operand, layout: Layout, emit: _Emitter) -> torch.fx.Node:
    """An operand permuted as its product reads it and regrouped into `layout`."""
    x = operand.node
    if operand.perm is not None:
        x = emit(aten.permute.default, x, list(operand.perm))
    if not _same_dims(operand.layout.dims, layout.dims):
        x = emit.regrouped(x, layout)
    return x


def _in_layout(term: torch.fx.Node, at: Layout, layout: Layout, emit: _Emitter) -> torch.fx.Node:
    """A mask term that broadcasts against scores in layout `at`, regrouped into `layout`: its
    batch dims are expanded first (its query and key dims stay as they are)."""
    if _same_dims(at.dims, layout.dims):
        return term
    while tensor_meta(term).dim() < 2:
        term = emit(aten.unsqueeze.default, term, 0)
    term = emit(aten.expand.default, term, [*emit.sizes(at), -1, -1])
    return emit.regrouped(term, layout)


def _as_dtype(mask: torch.fx.Node, dtype: torch.dtype, emit: _Emitter) -> torch.fx.Node:
    """The mask in SDPA's dtype; a wider float mask is clamped to the dtype's finite range first,
    so a large negative value stays a large negative number instead of overflowing to -inf."""
    current = tensor_meta(mask).dtype
    if current == dtype:
        return mask
    if current.is_floating_point and torch.finfo(current).max > torch.finfo(dtype).max:
        info = torch.finfo(dtype)
        mask = emit(aten.clamp.default, mask, info.min, info.max)
    return emit(aten._to_copy.default, mask, dtype=dtype)


def _emit_sdpa(
    match: AttentionMatch, gm: torch.fx.GraphModule
) -> tuple[torch.fx.Node, torch.fx.Node]:
    """Insert the canonical SDPA node; returns it and the node that replaces the region's output."""
    plan = match.plan
    emit = _Emitter(gm.graph, match.output)
    dtype = tensor_meta(match.scores.left).dtype
    layout = plan.layout
    rank = len(layout.dims) + 2
    query = _place(plan.query, layout, emit)
    key = _place(plan.key, layout, emit)
    if plan.key_transposed:
        key = emit(aten.transpose.int, key, -2, -1)
    value = _place(plan.value, layout, emit)
    scale = plan.query.factor * plan.key.factor
    mask: torch.fx.Node | None = None

    for step in match.steps:
        at = match.layouts[step.at]
        if step.kind == "scale":
            factor = step.operand
            op = aten.div.Tensor if step.divide else aten.mul.Tensor
            if isinstance(factor, torch.fx.Node):
                target = _fold_target(factor, len(at.dims) + 2)
                if not _same_dims(at.dims, layout.dims) and tensor_meta(factor).dim() > 2:
                    factor = emit(
                        aten.squeeze.dims, factor, list(range(tensor_meta(factor).dim() - 2))
                    )
                if target == "query":
                    query = emit(op, query, factor)
                else:
                    key = emit(
                        op, key, emit(aten.reshape.default, factor, _key_axis_shape(factor, rank))
                    )
            else:
                scale = scale / factor if step.divide else scale * factor
            if mask is not None:
                mask = emit(op, mask, factor)
            continue
        step_dtype = tensor_meta(step.at).dtype
        if step.kind in ("add", "sub"):
            term = step.operand
            if not tensor_meta(term).is_floating_point():
                term = emit(aten._to_copy.default, term, dtype=step_dtype)
            if step.kind == "sub":
                term = emit(aten.neg.default, term)
        else:  # fill
            condition = step.operand
            if isinstance(condition, tuple):  # ("not", c) from where(c, scores, fill)
                condition = emit(aten.logical_not.default, condition[1])
            zeros = emit(aten.zeros_like.default, condition, dtype=step_dtype)
            fill = _landed(step.fill_value, step_dtype)
            term = emit(aten.masked_fill.Scalar, zeros, condition, fill)
        term = _in_layout(term, at, layout, emit)
        mask = term if mask is None else emit(aten.add.Tensor, mask, term)
    if mask is not None:
        mask = _as_dtype(mask, dtype, emit)
    while mask is not None and tensor_meta(mask).dim() < 2:  # SDPA wants (…, Nq, Nk) masks
        mask = emit(aten.unsqueeze.default, mask, 0)
    attention = emit(
        aten.scaled_dot_product_attention.default, query, key, value, mask, scale=scale
    )
    result = attention
    if not _same_dims(plan.output.dims, layout.dims):
        result = emit.regrouped(attention, plan.output)
    if match.values.out_perm is not None:
        result = emit(aten.permute.default, result, list(match.values.out_perm))
    return attention, result


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


# Weightings of Q·Kᵀ that are not softmax attention: reported (kept) so users see why.
_NOT_ATTENTION = (
    (
        sp.LOG_SOFTMAX,
        "log_softmax",
        "log_softmax gives log-probabilities, and attention weights the values by the "
        "probabilities themselves",
    ),
    (
        sp.SIGMOID,
        "sigmoid",
        "sigmoid attention weights are not normalized over the keys as softmax attention's "
        "are, and no method here computes them",
    ),
)


def _not_attention(node: torch.fx.Node, gm: torch.fx.GraphModule) -> tuple[str, str] | None:
    """(spelling, reason) when `node` weights Q·Kᵀ as attention would but with another function
    than softmax: its input comes from a product and its result is the left operand of one."""
    for spelling, name, reason in _NOT_ATTENTION:
        if (
            spelling.matches(node)
            and _reaches_product(sp.argument(node, 0, "input"))
            and _feeds_value_product(node, gm)
        ):
            return name, reason
    return None


def _feeds_value_product(node: torch.fx.Node, gm: torch.fx.GraphModule) -> bool:
    """Whether `node` (through casts, regroups and dropout) is the left operand of a product."""
    pending = [node]
    while pending:
        current = pending.pop()
        for user in current.users:
            found = sp.product(user)
            if found is not None and found.left is current:
                return True
            moves = _passes_through(user) is current or sp.dropout_state(user, gm) is not None
            if moves and sp.argument(user, 0, "input") is current:
                pending.append(user)
    return False


def _method_op(node: torch.fx.Node, gm: torch.fx.GraphModule) -> str | None:
    """The name of the attnrewrite op or module `node` calls (a site rewritten before), or None."""
    root = __name__.split(".")[0]
    if node.op == "call_function":
        packet = getattr(node.target, "overloadpacket", node.target)
        name = getattr(packet, "_qualified_op_name", "")
        return name if name.startswith(f"{root}::") else None
    if node.op == "call_module":
        module = type(gm.get_submodule(str(node.target)))
        if module.__module__.split(".")[0] == root:
            return f"{module.__module__}.{module.__qualname__}"
    return None


ALREADY_REWRITTEN_REASON = (
    "already rewritten: {op} is an attnrewrite method op (a site rewritten before, or an "
    "attnrewrite layer), left as it is; to choose another method, rewrite the original model"
)


def canonicalize(gm: torch.fx.GraphModule) -> list[AttentionSite]:
    """Rewrite every provable attention region of `gm` into SDPA; report every candidate site.

    Candidates are every softmax (attention or not) and every SDPA call already in the graph;
    fused attention calls (nn.MultiheadAttention and its kin, unfuse.py) are opened first, and
    those that stay whole are reported as kept. Also reported as kept: log_softmax and sigmoid
    weightings of Q·Kᵀ (not attention) and attnrewrite's own method ops (already rewritten).
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
        if node in erased:
            continue
        op = _method_op(node, gm)
        if op is not None:
            site = _site_for(node, op)
            site.q_shape = shape_of(node.args[0]) if node.args else None
            site.keep(ALREADY_REWRITTEN_REASON.format(op=op))
            sites.append(site)
            continue
        if node.op not in ("call_function", "call_method"):
            continue
        if sp.sdpa_arguments(node) is not None:
            site = _site_for(node, "sdpa")
            refined = _refine_sdpa(node, gm)
            changed |= refined is not node
            describe_sdpa_site(site, refined)
            sites.append(site)
            continue
        if sp.softmax_operands(node) is None:
            other = _not_attention(node, gm)
            if other is not None:
                site = _site_for(node, other[0])
                site.keep(f"not attention: {other[1]}")
                sites.append(site)
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
