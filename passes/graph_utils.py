"""FX graph utilities shared by the passes: node values, shapes, fake-tensor metadata, names."""

from __future__ import annotations

import contextlib
import operator
import re
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensor

# Keys under which graph producers store a node's (fake) value: torch.export and FakeTensorProp
# use "val", Dynamo uses "example_value".
_VALUE_KEYS = ("val", "example_value")


def node_value(x: Any) -> Any:
    """The (fake) value of a node, or `x` itself for constants."""
    if not isinstance(x, torch.fx.Node):
        return x
    for key in _VALUE_KEYS:
        if key in x.meta:
            return x.meta[key]
    return None


def tensor_meta(x: Any) -> torch.Tensor | None:
    value = node_value(x)
    return value if isinstance(value, torch.Tensor) else None


def shape_of(x: Any) -> tuple[int, ...] | None:
    value = tensor_meta(x)
    return None if value is None else tuple(value.shape)


def value_key(graph: torch.fx.Graph) -> str:
    """The metadata key this graph's producer uses for node values."""
    for node in graph.nodes:
        for key in _VALUE_KEYS:
            if key in node.meta:
                return key
    return "val"


def has_values(graph: torch.fx.Graph) -> bool:
    return all(node_value(node) is not None for node in graph.nodes if node.op == "placeholder")


def infer_value(node: torch.fx.Node, key: str) -> None:
    """Compute a new node's fake value from its inputs' values, as the graph's producer would."""
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), node_value)
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    # The inputs' own fake mode: inside a Dynamo backend the tracing context holds another one.
    fake_mode = next((a.fake_mode for a in leaves if isinstance(a, FakeTensor)), None)
    if fake_mode is None:
        node.meta[key] = node.target(*args, **kwargs)
        return
    with fake_mode:
        node.meta[key] = node.target(*args, **kwargs)


# Python's augmented assignments: on a tensor, `x += y` writes x in place.
_IN_PLACE_OPERATORS = frozenset(
    getattr(operator, f"i{name}")
    for name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or",
                 "xor", "lshift", "rshift")
)  # fmt: skip


def mutates(node: torch.fx.Node) -> bool:
    """Whether a node writes one of its inputs: an op with a mutable schema, an in-place method
    or function (`x.add_(1)`, `torch.relu_`), or an augmented assignment (`x += 1`)."""
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return schema.is_mutable
    if node.target in _IN_PLACE_OPERATORS:
        return True
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.endswith("__")


def is_impure(node: torch.fx.Node) -> bool:
    """Whether dead-code elimination must keep `node` although nothing uses its result.

    FX's own test counts a dead `x.add_(1)`, `torch.relu_(x)` or `x += 1` as pure and would
    drop it, losing the write (a masked_fill_ on the scores, a buffer update); a module call is
    kept too, as a module may update its own state.
    """
    return node.op == "call_module" or mutates(node) or node.is_impure()


def constant_value(node: torch.fx.Node, gm: torch.fx.GraphModule, limit: int = 256) -> Any:
    """The value of `node` when it depends on no graph input (only constants and buffers),
    computed for real; None when it depends on an input, is too large a subgraph, or fails."""
    needed: list[torch.fx.Node] = []
    seen: set[torch.fx.Node] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        if current.op in ("placeholder", "output") or len(seen) >= limit or mutates(current):
            return None
        seen.add(current)
        needed.append(current)
        stack.extend(current.all_input_nodes)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    values: dict[torch.fx.Node, Any] = {}
    try:
        for current in sorted(needed, key=order.__getitem__):
            args, kwargs = torch.fx.node.map_arg((current.args, current.kwargs), values.__getitem__)
            if current.op == "get_attr":
                value: Any = gm
                for part in str(current.target).split("."):
                    value = getattr(value, part)
            elif current.op == "call_function":
                value = current.target(*args, **kwargs)
            elif current.op == "call_method":
                value = getattr(args[0], current.target)(*args[1:], **kwargs)
            else:
                return None
            values[current] = value
    except Exception:  # a subgraph we cannot evaluate is simply not constant
        return None
    return values[node]


@contextlib.contextmanager
def unchanged_state(module: torch.nn.Module) -> Iterator[None]:
    """Runs of `module` inside leave no trace: its buffers (often shared with the user's model:
    BatchNorm statistics, counters, caches) are restored after, and the random stream is forked."""
    saved = {name: buffer.clone() for name, buffer in module.named_buffers()}
    with torch.random.fork_rng():
        try:
            yield
        finally:
            with torch.no_grad():
                for name, buffer in module.named_buffers():
                    buffer.copy_(saved[name])


def module_path(node: torch.fx.Node) -> str:
    """The dotted module path a node was traced in (e.g. "encoder.layer.0.attention.self")."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return normalize_module_path(path)


def normalize_module_path(path: str) -> str:
    """Dynamo spells paths as L['self'].encoder.layer[0]; export as encoder.layer.0."""
    path = re.sub(r"^L\['[^']*'\]\.?", "", path)
    path = re.sub(r"\._modules\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path)
    return path.lstrip(".")


def layer_index(path: str) -> int | None:
    """The first integer component of a module path: the layer of a transformer stack."""
    for part in path.split("."):
        if part.isdigit():
            return int(part)
    return None
