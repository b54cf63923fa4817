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
SOFTMAX = spelling(
    [F.softmax, torch.softmax, torch._softmax, aten.softmax, aten._softmax], ["softmax"]
)
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
SDPA = spelling([F.scaled_dot_product_attention, aten.scaled_dot_product_attention])
# Graph-only checks that read a value without using it; they go when the value goes.
ASSERTION = spelling([aten._assert_tensor_metadata, aten._assert_scalar])


def argument(node: torch.fx.Node, position: int, name: str, default: Any = None) -> Any:
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


def matmul_operands(node: torch.fx.Node) -> tuple[Any, Any] | None:
    if not MATMUL.matches(node):
        return None
    return argument(node, 0, "input"), argument(node, 1, "other")


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
    """`x` when `node` is x.transpose of the last two dims (any spelling of the dims)."""
    if not isinstance(node, torch.fx.Node) or not TRANSPOSE.matches(node):
        return None
    dims = {argument(node, 1, "dim0") % rank, argument(node, 2, "dim1") % rank}
    return argument(node, 0, "input") if dims == {rank - 2, rank - 1} else None


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
