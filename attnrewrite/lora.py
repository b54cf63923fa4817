"""Trainable updates of the linear projections around a replaced attention site, found from the
graph, and their merge back into plain weights.

Distillation trains each replaced site through the linear layers that feed it: low-rank (LoRA)
updates of the q, k, v and output projections, plus a gain on every q feature (a per-channel
temperature on the scores) and a gain and shift on every v feature (an output gain and bias:
Monarch's and HSA's rows sum to one, so A·(g⊙v + b) = g⊙(A·v) + b). All of them are
parametrizations of the projections' own weight and bias (torch.nn.utils.parametrize), so the
graph is unchanged while training and `merge` leaves plain weights: the distilled model runs,
compiles and exports exactly as the rewritten one, with no extra op.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.fx
from torch import nn
from torch.nn.utils import parametrize

aten = torch.ops.aten

#: ops that only lay a tensor out (split heads, move dims): a feature of their output is a
#: feature of their input, so a per-feature gain on a projection is one on the site's q or v
LAYOUT_OPS = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.transpose.int,
    aten.permute.default,
    aten.contiguous.default,
    aten.clone.default,
    aten.unflatten.int,
    aten.flatten.using_ints,
}


@dataclasses.dataclass(frozen=True)
class Projection:
    """A linear layer of the graph: the owner module and names of its weight (and bias)."""

    owner: str
    weight: str
    bias: str | None

    def module(self, gm: torch.nn.Module) -> torch.nn.Module:
        return gm.get_submodule(self.owner)


def _attribute(gm: torch.fx.GraphModule, node: object) -> tuple[str, str] | None:
    """(owner module path, attribute name) of a get_attr node holding a parameter."""
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return None
    owner, _, name = str(node.target).rpartition(".")
    value = getattr(gm.get_submodule(owner), name, None)
    return (owner, name) if isinstance(value, nn.Parameter) else None


def _linear(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Projection | None:
    """The Projection computed by `node`, if it is a linear layer over parameters."""
    if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), nn.Linear):
        has_bias = gm.get_submodule(str(node.target)).bias is not None
        return Projection(str(node.target), "weight", "bias" if has_bias else None)
    if node.op != "call_function" or node.target not in (aten.linear.default, nn.functional.linear):
        return None
    weight = _attribute(gm, node.args[1])
    bias_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    bias = _attribute(gm, bias_node) if bias_node is not None else None
    if weight is None or (bias_node is not None and (bias is None or bias[0] != weight[0])):
        return None
    return Projection(weight[0], weight[1], bias[1] if bias else None)


def _uses_of(gm: torch.fx.GraphModule, projection: Projection) -> int:
    """How many graph nodes read the projection's weight (a tied weight has several)."""
    target = f"{projection.owner}.{projection.weight}".lstrip(".")
    reads = sum(1 for n in gm.graph.nodes if n.op == "get_attr" and n.target == target)
    calls = sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == projection.owner)
    return reads + calls


def projection_into(gm: torch.fx.GraphModule, node: object) -> Projection | None:
    """The linear layer whose output, only laid out anew, is `node` (a site's q, k or v), when
    nothing else reads that output or the layer's weight; else None."""
    while isinstance(node, torch.fx.Node):
        if len(node.users) != 1:
            return None
        projection = _linear(gm, node)
        if projection is not None:
            return projection if _uses_of(gm, projection) == 1 else None
        if node.op != "call_function" or node.target not in LAYOUT_OPS:
            return None
        node = node.args[0]
    return None


def projection_from(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Projection | None:
    """The linear layer that `node` (a site's output) feeds after a new layout only."""
    while len(node.users) == 1:
        (user,) = node.users
        projection = _linear(gm, user)
        if projection is not None:
            if user.args[0] is not node or _uses_of(gm, projection) != 1:
                return None
            return projection
        if user.op != "call_function" or user.target not in LAYOUT_OPS:
            return None
        node = user
    return None


class ProjectionUpdate(nn.Module):
    """The trainable update of one projection y = x·Wᵀ + b:
    W' = g ⊙ (W + (α/r)·B·A),  b' = g ⊙ b + s,  with g = exp(log_gain) per output feature.

    B starts at zero, g at one and s at zero, so the update starts as the identity. `enabled`
    off gives the original projection (the teacher)."""

    def __init__(
        self,
        weight: torch.Tensor,
        rank: int,
        alpha: float,
        gain: bool,
        shift: bool,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        options = {"dtype": torch.float32, "device": weight.device}
        self.rank, self.scaling = rank, alpha / max(rank, 1)
        self.enabled = True
        a = torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features)
        self.lora_a = nn.Parameter(a.to(**options)) if rank else None
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, **options)) if rank else None
        self.log_gain = nn.Parameter(torch.zeros(out_features, **options)) if gain else None
        self.shift = nn.Parameter(torch.zeros(out_features, **options)) if shift else None

    def weight(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        updated = weight.float()
        if self.lora_a is not None:
            updated = updated + self.scaling * (self.lora_b @ self.lora_a)
        if self.log_gain is not None:
            updated = updated * self.log_gain.exp()[:, None]
        return updated.to(weight.dtype)

    def bias(self, bias: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return bias
        updated = bias.float()
        if self.log_gain is not None:
            updated = updated * self.log_gain.exp()
        if self.shift is not None:
            updated = updated + self.shift
        return updated.to(bias.dtype)


class _Weight(nn.Module):
    def __init__(self, update: ProjectionUpdate) -> None:
        super().__init__()
        self.update = update

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.update.weight(weight)


class _Bias(nn.Module):
    def __init__(self, update: ProjectionUpdate) -> None:
        super().__init__()
        self.update = update

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        return self.update.bias(bias)


def attach(
    gm: torch.nn.Module,
    projection: Projection,
    rank: int,
    alpha: float,
    gain: bool,
    shift: bool,
    generator: torch.Generator,
) -> ProjectionUpdate:
    """Parametrize the projection's weight (and bias) with a new ProjectionUpdate.

    The projection first gets its own copy of its parameters: a captured graph shares them with
    the model it came from, which training and merging must leave as it was."""
    owner = projection.module(gm)
    for name in (projection.weight, projection.bias):
        if name is not None:
            value = getattr(owner, name)
            setattr(owner, name, nn.Parameter(value.detach().clone(), value.requires_grad))
    weight = getattr(owner, projection.weight)
    update = ProjectionUpdate(weight, rank, alpha, gain, shift and projection.bias is not None,
                              generator)  # fmt: skip
    share(gm, projection, update)
    return update


def share(gm: torch.nn.Module, projection: Projection, update: ProjectionUpdate) -> None:
    """Parametrize the projection with an existing update (of the same projection in another
    capture of the model: the graph is dropped after use, so its parameters stay as they are)."""
    owner = projection.module(gm)
    parametrize.register_parametrization(owner, projection.weight, _Weight(update), unsafe=True)
    if projection.bias is not None and (update.log_gain is not None or update.shift is not None):
        parametrize.register_parametrization(owner, projection.bias, _Bias(update), unsafe=True)


def merge(gm: torch.nn.Module, projection: Projection) -> None:
    """Write the updated weight (and bias) into the projection as plain parameters."""
    owner = projection.module(gm)
    for name in (projection.weight, projection.bias):
        if name is not None and parametrize.is_parametrized(owner, name):
            parametrize.remove_parametrizations(owner, name, leave_parametrized=True)


def detach(gm: torch.nn.Module, projection: Projection) -> None:
    """Drop the update and restore the projection's original parameters."""
    owner = projection.module(gm)
    for name in (projection.weight, projection.bias):
        if name is not None and parametrize.is_parametrized(owner, name):
            parametrize.remove_parametrizations(owner, name, leave_parametrized=False)
