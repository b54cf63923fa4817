"""Open the fused attention calls that Dynamo leaves whole, so canonicalize can see inside them.

Dynamo does not trace into nn.MultiheadAttention's forward (its graphs keep
F.multi_head_attention_forward as one call), nor into the eval-mode fast paths of
nn.MultiheadAttention and nn.TransformerEncoderLayer, which call fused native ops
(torch._native_multi_head_attention, torch._transformer_encoder_layer_fwd). Each such call is
re-traced here with make_fx on the call's own fake values (symbolic lengths included), through
the Python composition it stands for, in pre-dispatch form so SDPA and linear stay whole, and
the traced graph is spliced in place of the call. torch.export already traces through these
modules' slow paths, so `rewrite()` graphs never contain the calls.

A call is left as it is, with the reason, when its composition would not be the same function
(a fast path's attention weights, when they are used: only its output is reproduced) or when the
trace fails (e.g. nested-tensor inputs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor
from torch.func import functional_call
from torch.fx.experimental.proxy_tensor import get_proxy_mode, make_fx
from torch.utils import _pytree as pytree

from . import spellings as sp
from .graph_utils import node_value, value_key

aten = torch.ops.aten


def _native_multi_head_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    embed_dim: int,
    num_head: int,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    mask: torch.Tensor | None = None,
    need_weights: bool = True,
    average_attn_weights: bool = True,
    mask_type: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """nn.MultiheadAttention's fast path (batch-first, masks merged by `merge_masks`: type 0 an
    (L, S) mask, 1 a (B, S) key-padding mask, 2 a (B, H, L, S) mask; True or −inf = masked) as
    its slow path computes it. Only the attention output is the native op's."""
    batch, length = query.shape[0], query.shape[1]
    key_padding_mask = mask if mask_type == 1 else None
    attn_mask = None
    if mask is not None and mask_type == 0:
        attn_mask = mask
    elif mask is not None and mask_type == 2:
        attn_mask = mask.expand(batch, num_head, length, key.shape[1]).reshape(
            batch * num_head, length, key.shape[1]
        )
    out, weights = F.multi_head_attention_forward(
        query.transpose(0, 1),
        key.transpose(0, 1),
        value.transpose(0, 1),
        embed_dim,
        num_head,
        qkv_weight,
        qkv_bias,
        None,
        None,
        False,
        0.0,
        proj_weight,
        proj_bias,
        training=False,
        key_padding_mask=key_padding_mask,
        need_weights=need_weights,
        attn_mask=attn_mask,
        average_attn_weights=average_attn_weights,
    )
    return out.transpose(0, 1), weights


def _transformer_encoder_layer(
    src: torch.Tensor,
    embed_dim: int,
    num_heads: int,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    use_gelu: bool,
    norm_first: bool,
    eps: float,
    norm_weight_1: torch.Tensor,
    norm_bias_1: torch.Tensor,
    norm_weight_2: torch.Tensor,
    norm_bias_2: torch.Tensor,
    ffn_weight_1: torch.Tensor,
    ffn_bias_1: torch.Tensor,
    ffn_weight_2: torch.Tensor,
    ffn_bias_2: torch.Tensor,
    mask: torch.Tensor | None = None,
    mask_type: int | None = None,
) -> torch.Tensor:
    """nn.TransformerEncoderLayer's fast path (eval, batch-first) as its slow path computes it."""

    def self_attention(x: torch.Tensor) -> torch.Tensor:
        weights = (qkv_weight, qkv_bias, proj_weight, proj_bias)
        return _native_multi_head_attention(
            x, x, x, embed_dim, num_heads, *weights, mask, False, True, mask_type
        )[0]

    def norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (embed_dim,), weight, bias, eps)

    def feed_forward(x: torch.Tensor) -> torch.Tensor:
        hidden = F.linear(x, ffn_weight_1, ffn_bias_1)
        hidden = F.gelu(hidden) if use_gelu else F.relu(hidden)
        return F.linear(hidden, ffn_weight_2, ffn_bias_2)

    if norm_first:
        x = src + self_attention(norm(src, norm_weight_1, norm_bias_1))
        return x + feed_forward(norm(x, norm_weight_2, norm_bias_2))
    x = norm(src + self_attention(src), norm_weight_1, norm_bias_1)
    return norm(x + feed_forward(x), norm_weight_2, norm_bias_2)


@dataclasses.dataclass(frozen=True)
class _Composition:
    """What a fused call stands for: the function, the attention module below the call's own
    (for site names), and the output index of attention weights it does not reproduce."""

    spelling: sp.Spelling
    function: Callable[..., Any]
    attention_module: str | None = None
    unreproduced_weights: int | None = None


_COMPOSITIONS = (
    _Composition(sp.MULTI_HEAD_ATTENTION_FORWARD, F.multi_head_attention_forward),
    _Composition(sp.NATIVE_MULTI_HEAD_ATTENTION, _native_multi_head_attention, None, 1),
    _Composition(sp.NATIVE_ENCODER_LAYER, _transformer_encoder_layer, "self_attn"),
)


class KeepFused(Exception):
    """A fused call that stays as it is; the message is the report's reason."""


# meta key of spliced nodes traced inside an attention submodule: its path below the call
_SUBMODULE = "attnrewrite_submodule"


def unfuse_attention_calls(gm: torch.fx.GraphModule) -> dict[str, str]:
    """Splice the composition of every fused attention call into `gm`, in place: the calls
    above, and (in `symbolic_trace` graphs, where torch.nn modules are leaves) every module call
    with an nn.MultiheadAttention inside. Outputs nobody uses (such as attention weights) are
    left for dead-code elimination.

    Returns the calls left whole: node name → why.
    """
    kept: dict[str, str] = {}
    changed = False
    for node in list(gm.graph.nodes):
        try:
            changed |= _open(gm, node)
        except KeepFused as reason:
            kept[node.name] = str(reason)
    if changed:
        gm.graph.lint()
        gm.recompile()
    return kept


def _open(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Splice `node`'s composition if it is a fused attention call; False if it is not one."""
    composition = next((c for c in _COMPOSITIONS if c.spelling.matches(node)), None)
    if composition is not None:
        weights = composition.unreproduced_weights
        if weights is not None and any(
            user.target is not operator.getitem or user.args[1] == weights for user in node.users
        ):
            raise KeepFused("its attention weights are used")
        _splice(gm, node, composition.function, {}, composition.attention_module)
        return True
    if node.op != "call_module":
        return False
    module = gm.get_submodule(node.target)
    attention = {
        m: name for name, m in module.named_modules() if isinstance(m, torch.nn.MultiheadAttention)
    }
    if not attention:
        return False
    state = {**dict(module.named_parameters()), **dict(module.named_buffers())}

    def call(*args: Any, **kwargs: Any) -> Any:
        inputs, tensors = args[: len(args) - len(state)], args[len(args) - len(state) :]
        return functional_call(module, dict(zip(state, tensors, strict=True)), inputs, kwargs)

    _splice(gm, node, call, state, None, attention)
    return True


def _splice(
    gm: torch.fx.GraphModule,
    node: torch.fx.Node,
    function: Callable[..., Any],
    state: dict[str, torch.Tensor],
    submodule: str | None,
    attention: dict[torch.nn.Module, str] | None = None,
) -> None:
    """Replace `node` by the traced graph of function(*node's args, *state, **node's kwargs);
    `state` (a called module's parameters and buffers) enters as get_attr nodes."""
    leaves, spec = pytree.tree_flatten((node.args, node.kwargs))
    inputs = [leaf for leaf in leaves if isinstance(leaf, torch.fx.Node)]
    values = [node_value(x) for x in inputs]
    # the values' own fake mode: inside a Dynamo backend the tracing context holds another one
    fake_mode = next((v.fake_mode for v in values if isinstance(v, FakeTensor)), None)
    state_values = [t if fake_mode is None else fake_mode.from_tensor(t) for t in state.values()]

    def call(*tensors: torch.Tensor) -> Any:
        supply = iter(tensors)
        filled = [next(supply) if isinstance(leaf, torch.fx.Node) else leaf for leaf in leaves]
        args, kwargs = pytree.tree_unflatten(filled, spec)
        return function(*args, *supply, **kwargs)

    try:
        with fake_mode or contextlib.nullcontext(), _tagging(attention or {}):
            traced = make_fx(call, pre_dispatch=True)(*values, *state_values)
    except Exception as error:  # any trace failure keeps the call as it was
        raise KeepFused(f"tracing its composition failed ({type(error).__name__})") from error
    (result,) = traced.graph.find_nodes(op="output")[0].args
    if not isinstance(result, torch.fx.Node) and any(
        user.target is not operator.getitem for user in node.users
    ):
        raise KeepFused("its tuple of outputs is used as a whole")
    key = value_key(gm.graph)
    before = set(gm.graph.nodes)
    with gm.graph.inserting_before(node):
        for name, value in zip(state, state_values, strict=True):
            inputs.append(gm.graph.get_attr(f"{node.target}.{name}"))
            inputs[-1].meta[key] = value
        placeholders = traced.graph.find_nodes(op="placeholder")
        outputs = gm.graph.graph_copy(traced.graph, dict(zip(placeholders, inputs, strict=True)))
    _adopt(gm, [x for x in gm.graph.nodes if x not in before], node, submodule, key)
    if isinstance(outputs, torch.fx.Node):
        node.replace_all_uses_with(outputs)
    else:
        for user in list(node.users):
            user.replace_all_uses_with(outputs[user.args[1]])
            gm.graph.erase_node(user)
    gm.graph.erase_node(node)


@contextlib.contextmanager
def _tagging(attention: dict[torch.nn.Module, str]) -> Iterator[None]:
    """While make_fx traces, mark the nodes each attention module's forward records with its
    path (make_fx keeps no module stack through functional_call)."""

    def graph() -> torch.fx.Graph:
        return get_proxy_mode().tracer.graph

    seen: dict[torch.nn.Module, set[torch.fx.Node]] = {}

    def before(module: torch.nn.Module, _args: Any) -> None:
        seen[module] = set(graph().nodes)

    def after(module: torch.nn.Module, _args: Any, _out: Any) -> None:
        for new in graph().nodes:
            if new not in seen[module]:
                new.meta.setdefault(_SUBMODULE, attention[module])

    handles = [m.register_forward_pre_hook(before) for m in attention]
    handles += [m.register_forward_hook(after) for m in attention]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _adopt(
    gm: torch.fx.GraphModule,
    nodes: list[torch.fx.Node],
    call: torch.fx.Node,
    submodule: str | None,
    key: str,
) -> None:
    """Give spliced nodes the call's module path, extended by the attention submodule they were
    traced in (so sites are named as `rewrite()` names them), and their values under the
    graph's key."""
    stack = dict(call.meta.get("nn_module_stack", {}))
    if not stack and call.op == "call_module":
        stack = {call.target: (call.target, type(gm.get_submodule(call.target)))}
    base = list(stack.values())[-1][0] if stack else ""
    for new in nodes:
        inner = new.meta.pop(_SUBMODULE, submodule)
        new.meta["nn_module_stack"] = stack
        if inner:
            path = f"{base}.{inner}" if base else inner
            new.meta["nn_module_stack"] = {**stack, path: (path, torch.nn.MultiheadAttention)}
        if key != "val" and "val" in new.meta:
            new.meta[key] = new.meta["val"]


__all__ = ["unfuse_attention_calls"]
