"""The only module that knows how attention's building blocks are spelled in an FX graph.

Each primitive (matrix product, softmax, scaling, masking, casts, dropout, SDPA) is one small
named matcher that accepts every spelling we know of: torch functions and Tensor methods as Dynamo
and `symbolic_trace` record them, and ATen overloads as `torch.export` records them. The matchers
return the primitive's operands or None; the canonicalize pass reasons about dataflow only.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from ..site import SDPAArgs
from .graph_utils import shape_of

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class Spelling:
    """The callables (functions, ATen overload packets) and Tensor method names of one primitive."""

    functions: frozenset[Any] = frozenset()
    methods: frozenset[str] = frozenset()

    def matches(self, node: torch.fx.Node) -> bool:
        if node.op == "call_method":
            return node.target in self.methods
        if node.op != "call_function":
            return False
        target = node.target
        return target in self.functions or getattr(target, "overloadpacket", None) in self.functions


def spelling(functions: Iterable[Any] = (), methods: Iterable[str] = ()) -> Spelling:
    return Spelling(frozenset(functions), frozenset(methods))


MATMUL = spelling(
    [torch.matmul, operator.matmul, torch.bmm, aten.matmul, aten.bmm], ["matmul", "bmm"]
)
BADDBMM = spelling([torch.baddbmm, aten.baddbmm], ["baddbmm"])
EINSUM = spelling([torch.einsum, aten.einsum])
# aten._safe_softmax is SDPA's own math decomposition: a row of -inf gives zeros, as in SDPA.
SOFTMAX = spelling(
    [F.softmax, torch.softmax, torch._softmax, aten.softmax, aten._softmax, aten._safe_softmax],
    ["softmax"],
)
# Normalizations that look like attention's softmax but are not it (reported, never rewritten).
LOG_SOFTMAX = spelling(
    [F.log_softmax, torch.log_softmax, torch._log_softmax, aten.log_softmax, aten._log_softmax],
    ["log_softmax"],
)
SIGMOID = spelling([torch.sigmoid, F.sigmoid, aten.sigmoid], ["sigmoid"])
MUL = spelling([operator.mul, torch.mul, aten.mul], ["mul", "__mul__", "__rmul__"])
DIV = spelling([operator.truediv, torch.div, torch.true_divide, aten.div], ["div", "__truediv__"])
ADD = spelling([operator.add, torch.add, aten.add], ["add", "__add__", "__radd__"])
SUB = spelling([operator.sub, torch.sub, aten.sub], ["sub", "__sub__"])
MASKED_FILL = spelling([torch.masked_fill, aten.masked_fill], ["masked_fill"])
WHERE = spelling([torch.where, aten.where])
DROPOUT = spelling([F.dropout, torch.dropout, aten.dropout], ["dropout"])
# Ops that keep the value (up to a dtype change, which the pass checks through node metadata).
VALUE_PRESERVING = spelling(
    [aten._to_copy, aten.to, aten.type_as, aten.contiguous, aten.clone, aten.alias],
    ["float", "to", "type_as", "type", "contiguous", "clone", "half", "bfloat16", "double"],
)
TRANSPOSE = spelling([torch.transpose, aten.transpose], ["transpose"])
PERMUTE = spelling([torch.permute, aten.permute], ["permute"])
MATRIX_TRANSPOSE = spelling([aten.mT, aten.adjoint], ["adjoint"])
EXPAND = spelling([aten.expand], ["expand"])
RESHAPE = spelling([torch.reshape, aten.reshape, aten.view, aten._unsafe_view], ["reshape", "view"])
UNFLATTEN = spelling([torch.unflatten, aten.unflatten], ["unflatten"])
# Reshapes that may only regroup batch dims (the pass checks shapes): view, flatten, unflatten.
REGROUP = spelling(
    [*RESHAPE.functions, *UNFLATTEN.functions, torch.flatten, aten.flatten],
    [*RESHAPE.methods, *UNFLATTEN.methods, "flatten"],
)
REPEAT_INTERLEAVE = spelling(
    [torch.repeat_interleave, aten.repeat_interleave], ["repeat_interleave"]
)
SDPA = spelling([F.scaled_dot_product_attention, aten.scaled_dot_product_attention])
# Attention inside one opaque call: Dynamo keeps nn.MultiheadAttention's forward as
# F.multi_head_attention_forward, and the eval-mode fast paths of nn.MultiheadAttention and
# nn.TransformerEncoderLayer call fused native ops (unfuse.py opens them).
MULTI_HEAD_ATTENTION_FORWARD = spelling([F.multi_head_attention_forward])
NATIVE_MULTI_HEAD_ATTENTION = spelling(
    [torch._native_multi_head_attention, aten._native_multi_head_attention]
)
NATIVE_ENCODER_LAYER = spelling(
    [torch._transformer_encoder_layer_fwd, aten._transformer_encoder_layer_fwd]
)
# Graph-only checks that read a value without using it; they go when the value goes.
ASSERTION = spelling([aten._assert_tensor_metadata, aten._assert_scalar])


def argument(node: torch.fx.Node, position: int, name: str, default: Any = None) -> Any:
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


@dataclasses.dataclass(frozen=True)
class Product:
    """A batched matrix product out = alpha · (left ⋅ right) + beta · bias.

    `left_perm`/`right_perm` bring the operands to (batch…, M, K) and (batch…, K, N) (None: already
    there); `out_perm` takes the canonical (batch…, M, N) result to the node's layout (einsum).
    """

    node: torch.fx.Node
    left: Any
    right: Any
    left_perm: tuple[int, ...] | None = None
    right_perm: tuple[int, ...] | None = None
    out_perm: tuple[int, ...] | None = None
    bias: Any = None
    alpha: float = 1.0
    beta: float = 1.0


def product(node: Any) -> Product | None:
    """The matrix product a node computes, in any spelling, or None."""
    if not isinstance(node, torch.fx.Node):
        return None
    if MATMUL.matches(node):
        return Product(node, argument(node, 0, "input"), argument(node, 1, "other"))
    if BADDBMM.matches(node):
        return Product(
            node,
            argument(node, 1, "batch1"),
            argument(node, 2, "batch2"),
            bias=argument(node, 0, "input"),
            beta=node.kwargs.get("beta", 1),
            alpha=node.kwargs.get("alpha", 1),
        )
    if EINSUM.matches(node):
        return _einsum_product(node)
    return None


def matmul_operands(node: torch.fx.Node) -> tuple[Any, Any] | None:
    """(left, right) of a product in any spelling (for walks that only need the operands)."""
    found = product(node)
    return None if found is None else (found.left, found.right)


def _einsum_product(node: torch.fx.Node) -> Product | None:
    """An einsum "A,B->C" that is a batched matrix product, with the permutations around it."""
    equation = node.args[0]
    operands = node.args[1] if len(node.args) == 2 else node.args[1:]
    if not isinstance(equation, str) or len(operands) != 2 or "->" not in equation:
        return None
    lhs, out = equation.replace(" ", "").split("->")
    if lhs.count(",") != 1:
        return None
    left, right = lhs.split(",")
    if "." in equation:
        spelled = _without_ellipsis(left, right, out, [shape_of(x) for x in operands])
        if spelled is None:
            return None
        left, right, out = spelled
    if any(len(set(t)) != len(t) for t in (left, right, out)):
        return None  # repeated letters: traces and diagonals are not products
    contracted = (set(left) & set(right)) - set(out)
    batch = [c for c in out if c in left and c in right]
    rows = [c for c in out if c in left and c not in right]
    cols = [c for c in out if c in right and c not in left]
    if len(contracted) != 1 or len(rows) != 1 or len(cols) != 1:
        return None
    if set(left) != set(batch) | set(rows) | contracted:
        return None  # a letter summed out of one operand alone
    if set(right) != set(batch) | set(cols) | contracted or len(out) != len(batch) + 2:
        return None
    (k,) = contracted
    canonical_left, canonical_right = [*batch, *rows, k], [*batch, k, *cols]
    canonical_out = [*batch, *rows, *cols]

    def perm(src: str, dst: list[str]) -> tuple[int, ...] | None:
        order = tuple(src.index(c) for c in dst)
        return None if order == tuple(range(len(order))) else order

    return Product(
        node,
        operands[0],
        operands[1],
        left_perm=perm(left, canonical_left),
        right_perm=perm(right, canonical_right),
        out_perm=perm("".join(canonical_out), list(out)),
    )


def _without_ellipsis(
    left: str, right: str, out: str, shapes: list[tuple[Any, ...] | None]
) -> tuple[str, str, str] | None:
    """The einsum terms with each `...` spelled as letters: the dims it covers in each operand,
    right-aligned as einsum broadcasts them (the output's `...` covers the longer one)."""
    if any(shape is None for shape in shapes) or any(
        t.count("...") > 1 or t.count(".") != 3 * t.count("...") for t in (left, right, out)
    ):
        return None
    free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in left + right + out]
    covered = []
    for term, shape in zip((left, right), shapes, strict=True):
        explicit = len(term.replace("...", ""))
        covered.append(len(shape) - explicit if "..." in term else 0)
    width = max(covered)
    if min(covered) < 0 or width > len(free):
        return None
    letters = "".join(free[:width])
    left, right = (
        term.replace("...", letters[width - n :])
        for term, n in zip((left, right), covered, strict=True)
    )
    return left, right, out.replace("...", letters)


def softmax_operands(node: torch.fx.Node) -> tuple[torch.fx.Node, int | None] | None:
    """(input, dim) of a softmax; dtype arguments are casts, which the pass checks by metadata."""
    if not SOFTMAX.matches(node):
        return None
    return argument(node, 0, "input"), argument(node, 1, "dim")


def binary_other(node: torch.fx.Node, x: torch.fx.Node, *, commutative: bool) -> Any:
    """The operand of a binary op that is not `x`; None when `x` is not where it must be."""
    a, b = argument(node, 0, "input"), argument(node, 1, "other")
    if a is x and b is not x:
        return b
    if commutative and b is x and a is not x:
        return a
    return None


def is_unit_alpha(node: torch.fx.Node) -> bool:
    return node.kwargs.get("alpha", 1) == 1 and len(node.args) <= 2


def dropout_state(node: torch.fx.Node, gm: torch.fx.GraphModule) -> tuple[Any, float, bool] | None:
    """(input, p, active) of a dropout call or an nn.Dropout module call."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if not isinstance(module, torch.nn.Dropout):
            return None
        return node.args[0], module.p, module.training and module.p > 0
    if not DROPOUT.matches(node):
        return None
    p = argument(node, 1, "p", 0.5)
    default_training = node.op == "call_method" or node.target is F.dropout
    training = argument(
        node, 2, "training" if node.target is F.dropout else "train", default_training
    )
    return argument(node, 0, "input"), p, bool(training) and p > 0


def transpose_source(node: Any, rank: int) -> torch.fx.Node | None:
    """`x` when `node` swaps the last two dims of x (transpose, permute, .mT; any dim spelling)."""
    if not isinstance(node, torch.fx.Node):
        return None
    if MATRIX_TRANSPOSE.matches(node) or (
        node.op == "call_function" and node.target is getattr and node.args[1] == "mT"
    ):
        return argument(node, 0, "input")
    if TRANSPOSE.matches(node):
        dims = {argument(node, 1, "dim0") % rank, argument(node, 2, "dim1") % rank}
        return argument(node, 0, "input") if dims == {rank - 2, rank - 1} else None
    if PERMUTE.matches(node):
        dims = argument(node, 1, "dims")
        dims = list(node.args[1:]) if node.op == "call_method" and len(node.args) > 2 else dims
        swapped = [*range(rank - 2), rank - 1, rank - 2]
        return argument(node, 0, "input") if [d % rank for d in dims] == swapped else None
    return None


def head_repeat(node: Any, shape_of: Any) -> tuple[Any, int, bool] | None:
    """How `node` repeats key/value heads (grouped-query attention): (source, repeats, unit_dim).

    Recognizes repeat_interleave over the head dim (-3), and Hugging Face's repeat_kv,
    x[:, :, None].expand(B, Hk, r, N, D).reshape(B, Hk·r, N, D), by shapes alone: then `source`
    is the 5-D tensor before the expand and `unit_dim` is True (squeeze dim -3 to get the heads).
    """
    if not isinstance(node, torch.fx.Node):
        return None
    shape = shape_of(node)
    if shape is None or len(shape) < 3:
        return None
    if REPEAT_INTERLEAVE.matches(node):
        repeats, dim = argument(node, 1, "repeats"), argument(node, 2, "dim")
        if isinstance(repeats, int) and isinstance(dim, int) and dim % len(shape) == len(shape) - 3:
            return argument(node, 0, "input"), repeats, False
        return None
    if not RESHAPE.matches(node):
        return None
    expanded = argument(node, 0, "input")
    while isinstance(expanded, torch.fx.Node) and VALUE_PRESERVING.matches(expanded):
        expanded = argument(expanded, 0, "input")
    if not isinstance(expanded, torch.fx.Node) or not EXPAND.matches(expanded):
        return None
    source = argument(expanded, 0, "input")
    before, after = shape_of(source), shape_of(expanded)
    if before is None or after is None or len(after) != len(shape) + 1 or before[-3] != 1:
        return None
    *batch, heads, repeats, n, d = after
    unit = (*batch, heads, 1, n, d)
    if tuple(before) != unit or tuple(shape) != (*batch, heads * repeats, n, d):
        return None
    return source, repeats, True


def sdpa_arguments(node: torch.fx.Node) -> SDPAArgs | None:
    if not SDPA.matches(node):
        return None
    return SDPAArgs(
        query=argument(node, 0, "query"),
        key=argument(node, 1, "key"),
        value=argument(node, 2, "value"),
        attn_mask=argument(node, 3, "attn_mask"),
        dropout_p=float(argument(node, 4, "dropout_p", 0.0)),
        is_causal=bool(argument(node, 5, "is_causal", False)),
        scale=node.kwargs.get("scale"),
        enable_gqa=bool(node.kwargs.get("enable_gqa", False)),
    )
