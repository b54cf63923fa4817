"""ErrorBudget: replace the sites that save the most attention FLOPs per unit of measured error,
while the whole model's error on calibration inputs stays within a budget.

The error of a rewrite is the relative L2 error of the model's outputs, ‖y′ − y‖ / ‖y‖, over all
floating outputs of all calibration calls, against the exact (canonical SDPA) model.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx

from .errors import OptionError
from .flops import METHOD_FLOPS, flops_saved
from .methods import AttentionMethod, MethodOptions
from .methods.base import CustomOpMethod
from .passes.canonicalize import canonicalize
from .passes.graph_utils import unchanged_state
from .passes.head_split import head_count
from .site import AttentionSite, SDPAArgs

Call = tuple[tuple, dict]  # positional and keyword arguments of one model call


def _calls(calibration: Any) -> list[Call]:
    """Calibration as (args, kwargs) calls: a tuple of args, a dict of kwargs, or a list of them."""
    forms = (
        "a tuple of one call's positional arguments, a dict of its keyword arguments, or a list "
        "of them, e.g. calibration=[(ids, mask), ...]"
    )
    if isinstance(calibration, torch.Tensor):
        raise OptionError(f"ErrorBudget calibration is one tensor; it takes {forms}")
    if isinstance(calibration, (tuple, dict)):
        calibration = [calibration]
    try:
        listed = list(calibration)
    except TypeError:
        raise OptionError(f"ErrorBudget calibration={calibration!r}: it takes {forms}") from None
    if not listed:
        raise OptionError(
            f"ErrorBudget calibration is empty: pass {forms}, or calibration=None to measure on "
            "the example inputs"
        )
    calls = []
    for index, call in enumerate(listed):
        if not isinstance(call, (tuple, dict)):
            raise OptionError(
                f"ErrorBudget calibration must be {forms}; call {index} is a {type(call).__name__}"
            )
        if not call:
            raise OptionError(
                f"ErrorBudget calibration call {index} is {call!r}, a call without inputs: "
                f"pass {forms}"
            )
        calls.append(((), dict(call)) if isinstance(call, dict) else (call, {}))
    return calls


def _outputs(module: torch.nn.Module, call: Call, seed: int) -> list[torch.Tensor]:
    """The floating outputs of one call. Each call starts from its own seed, so a model in train
    mode draws the same dropout masks in the exact run and in each candidate's (the methods
    draw none), and leaves its buffers as they were."""
    args, kwargs = call
    with torch.no_grad(), unchanged_state(module):
        torch.manual_seed(seed)
        outputs = module(*args, **kwargs)
    leaves = torch.utils._pytree.tree_leaves(outputs)
    return [x.double() for x in leaves if isinstance(x, torch.Tensor) and x.is_floating_point()]


def relative_error(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """‖y′ − y‖ / ‖y‖ over all outputs together; infinite where y′ is not finite."""
    num = sum(float((g - e).square().sum()) for g, e in zip(got, expected, strict=True))
    den = sum(float(e.square().sum()) for e in expected)
    if not math.isfinite(num):
        return math.inf
    return (num / den) ** 0.5 if den > 0 else float(num > 0)


def accepts(module: torch.nn.Module, call: Call) -> bool:
    """Whether `module` takes this call. A graph from torch.export checks the call's input
    structure and its shape guards before it computes anything, and raises if they fail."""
    args, kwargs = call
    try:
        with torch.no_grad(), unchanged_state(module):
            module(*args, **kwargs)
    except AssertionError as error:
        if "Guard failed" in str(error):
            return False
        raise
    except ValueError as error:
        if "exported input tree spec" in str(error):
            return False
        raise
    return True


def _shape_key(call: Call, sizes: bool = True) -> tuple:
    """What a static capture specializes on: the input structure, every tensor's shape (or with
    sizes=False only its rank), dtype and device, and the other inputs' values."""
    leaves, spec = torch.utils._pytree.tree_flatten(call)
    return (
        str(spec),
        tuple(
            (tuple(x.shape) if sizes else x.dim(), x.dtype, x.device)
            if isinstance(x, torch.Tensor)
            else repr(x)
            for x in leaves
        ),
    )


def split_by_fit(module: torch.nn.Module, calls: list[Call]) -> tuple[list[int], list[int]]:
    """The indices of the calls `module` takes and of those it refuses (one try per shape)."""
    fits: dict[tuple, bool] = {}
    taken: tuple[list[int], list[int]] = ([], [])
    for index, call in enumerate(calls):
        key = _shape_key(call)
        if key not in fits:
            fits[key] = accepts(module, call)
        taken[0 if fits[key] else 1].append(index)
    return taken


def capture_for(
    model: torch.nn.Module, calls: list[Call], indices: list[int]
) -> list[tuple[torch.fx.GraphModule, list[int]]]:
    """Graphs of `model` that take the calls `indices`, each with the calls it takes.

    Calls alike but for some sizes share one capture, dynamic in the dims where they differ
    (`Dim.AUTO`: the model may still specialize one); a call that capture refuses gets a static
    capture at its own shapes.
    """
    from .api import capture

    families: dict[tuple, list[int]] = {}
    for index in indices:
        families.setdefault(_shape_key(calls[index], sizes=False), []).append(index)
    graphs = []
    for members in families.values():
        shapes = [
            [tuple(x.shape) for x in torch.utils._pytree.tree_leaves(calls[i]) if _is_tensor(x)]
            for i in members
        ]
        varying = [
            {dim for dim in range(len(shape)) if len({s[pos][dim] for s in shapes}) > 1}
            for pos, shape in enumerate(shapes[0])
        ]
        rest = members
        if any(varying):
            # dims of size 0 or 1 are specialized: capture at a call without them, if any
            first = next(
                (i for i, s in zip(members, shapes, strict=True)
                 if all(s[p][d] > 1 for p, dims in enumerate(varying) for d in dims)),
                members[0],
            )  # fmt: skip
            gm = _dynamic_capture(model, calls[first], varying)
            if gm is not None:
                taken, rest = split_by_fit(gm, [calls[i] for i in members])
                graphs.append((gm, [members[i] for i in taken]))
                rest = [members[i] for i in rest]
        by_shape: dict[tuple, list[int]] = {}
        for index in rest:
            by_shape.setdefault(_shape_key(calls[index]), []).append(index)
        for same in by_shape.values():
            args, kwargs = calls[same[0]]
            graphs.append((capture(model, args, kwargs), same))
    return graphs


def _is_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def _dynamic_capture(
    model: torch.nn.Module, call: Call, varying: list[set[int]]
) -> torch.fx.GraphModule | None:
    """`model` captured at `call`, dynamic in the `varying` dims of its tensors (by position), or
    None where torch.export cannot capture it so (the calls are then captured one shape each)."""
    from .api import capture
    from .errors import AttnRewriteError

    args, kwargs = call
    shapes = torch.export.ShapesCollection()
    specs: dict[int, dict[int, Any]] = {}
    tensors = [x for x in torch.utils._pytree.tree_leaves(call) if _is_tensor(x)]
    for tensor, dims in zip(tensors, varying, strict=True):
        if dims:
            spec = {dim: torch.export.Dim.AUTO for dim in sorted(dims)}
            if specs.setdefault(id(tensor), spec) != spec:
                return None  # one tensor at two positions that vary differently
            shapes[tensor] = spec
    try:
        return capture(model, args, kwargs, shapes.dynamic_shapes(model, args, kwargs))
    except AttnRewriteError:
        return None


def clone_with_sites(
    gm: torch.fx.GraphModule, sites: list[AttentionSite]
) -> tuple[torch.fx.GraphModule, list[AttentionSite]]:
    """A copy of the graph (parameters shared) and of the sites, pointing at the copied nodes."""
    graph = torch.fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    mapping: dict[torch.fx.Node, torch.fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, mapping))
    clone = torch.fx.GraphModule(gm, graph)

    def remap(x: Any) -> Any:
        return mapping[x] if isinstance(x, torch.fx.Node) else x

    copies = [
        dataclasses.replace(
            site,
            sdpa_node=remap(site.sdpa_node),
            sdpa=SDPAArgs(
                **{f.name: remap(getattr(site.sdpa, f.name)) for f in dataclasses.fields(SDPAArgs)}
            )
            if site.sdpa is not None
            else None,
        )
        for site in sites
    ]
    return clone, copies


@dataclasses.dataclass
class ErrorBudget:
    """Replace sites greedily by FLOPs saved per unit of error while the model error ≤ max_error.

    calibration: the calls to measure on (a tuple of args, a dict of kwargs, or a list of them),
    at any batch sizes and lengths (a call the captured graph does not take is measured on the
    model captured again for it); None uses the rewrite's example inputs. Keep calibration and
    evaluation data disjoint.
    candidates: option overrides to try per site (e.g. [{"block_size": 8}, {"block_size": 16}]);
    each site gets the candidate with the best FLOPs saved per unit of error.
    per_head: where a whole site does not fit the budget, replace some of its heads (the others
    stay exact): each head is measured alone, and heads are added greedily as sites are. Costs a
    calibration run per head of every such site; for (batch, heads, N, d) sites of Monarch and
    HSA.
    """

    max_error: float
    calibration: Any = None
    candidates: Sequence[Mapping[str, Any]] = ({},)
    per_head: bool = False
    _calibration_calls: list[Call] | None = dataclasses.field(
        default=None, init=False, repr=False, compare=False
    )
    _reasons: dict[int, str] = dataclasses.field(default_factory=dict, init=False, repr=False)
    _chosen: dict[int, dict[str, Any]] = dataclasses.field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        number = isinstance(self.max_error, numbers.Real) and not isinstance(self.max_error, bool)
        if not number or not self.max_error >= 0:
            raise OptionError(
                f"ErrorBudget max_error must be a number ≥ 0 (the model's relative output "
                f"error, e.g. ErrorBudget(0.05)), got {self.max_error!r}"
            )
        if isinstance(self.candidates, (str, Mapping)) or not isinstance(self.candidates, Sequence):
            raise OptionError(
                f"ErrorBudget candidates={self.candidates!r}: pass a list of option sets, e.g. "
                'candidates=[{"block_size": 8}, {"block_size": 16}]'
            )
        if not self.candidates:
            raise OptionError("ErrorBudget candidates must list at least one option set ({})")
        for candidate in self.candidates:
            if not isinstance(candidate, Mapping):
                raise OptionError(
                    f"ErrorBudget candidates: {candidate!r} is not an option set; pass dicts, "
                    'e.g. candidates=[{"block_size": 8}, {"block_size": 16}]'
                )
        if self.calibration is not None:
            self._calibration_calls = _calls(self.calibration)

    def __call__(self, site: AttentionSite) -> str | None:
        return self._reasons.get(id(site))

    def site_options(self, site: AttentionSite) -> dict[str, Any]:
        return self._chosen.get(id(site), {})

    def plan(
        self,
        gm: torch.fx.GraphModule,
        sites: list[AttentionSite],
        method: AttentionMethod,
        options: MethodOptions,
        example_calls: list[Call],
    ) -> None:
        """Measure every candidate site alone, then add sites greedily under the budget (and,
        with per_head, heads of the sites that did not fit)."""
        if self.per_head and not isinstance(method, CustomOpMethod):
            raise OptionError(
                f"ErrorBudget(per_head=True) needs a stateless method (monarch, hsa), not "
                f"{method.name!r}"
            )
        if method.name not in METHOD_FLOPS:
            raise OptionError(
                f"ErrorBudget ranks sites by attention FLOPs saved, which it counts for "
                f"{', '.join(sorted(set(METHOD_FLOPS) - {'sdpa'}))}, not {method.name!r}"
            )
        calibrated = self._calibration_calls is not None
        calls = self._calibration_calls if calibrated else example_calls
        if not calls:
            raise OptionError("ErrorBudget has no calls to measure on: pass calibration=[...]")
        error_with = _Measurement(gm, sites, calls, method, options, calibrated).error_with

        scored = []
        for index, site in enumerate(sites):
            if site.status != "found":
                continue
            if method.keep_reason(site, options):
                continue  # substitute keeps it and reports why
            best = None
            for overrides in self.candidates:
                merged = method.parse_options({**options.as_dict(), **overrides})
                saved = flops_saved(site, method.name, method.site_options(site, merged))
                error = error_with({index: dict(overrides)})
                value = saved / max(error, 1e-12)
                if best is None or value > best[0]:
                    best = (value, error, saved, dict(overrides))
            _, error, saved, overrides = best
            site.measured_error, site.flops_saved = error, saved
            scored.append((best[0], index, overrides))
            self._reasons[id(site)] = "policy: not selected by the error budget"
        accepted: dict[int, dict[str, Any]] = {}
        for _, index, overrides in sorted(scored, reverse=True):
            site = sites[index]
            if site.flops_saved <= 0:
                self._reasons[id(site)] = "policy: the method saves no attention FLOPs here"
                continue
            trial = {**accepted, index: overrides}
            total = error_with(trial)
            if total <= self.max_error:
                accepted = trial
                self._reasons.pop(id(site))
                self._chosen[id(site)] = overrides
            else:
                self._reasons[id(site)] = (
                    f"policy: error budget {self.max_error:g} exceeded (model error with this "
                    f"site {total:.3g}; the site alone {site.measured_error:.3g})"
                )
        if self.per_head:
            rejected = {
                index: overrides
                for _, index, overrides in sorted(scored, reverse=True)
                if index not in accepted and sites[index].flops_saved > 0
            }
            self._add_heads(sites, rejected, accepted, error_with)

    def _add_heads(
        self,
        sites: list[AttentionSite],
        rejected: dict[int, dict[str, Any]],
        accepted: dict[int, dict[str, Any]],
        error_with: Callable[[dict[int, dict[str, Any]]], float],
    ) -> None:
        """Measure each head of the rejected sites alone, then add heads greedily, best FLOPs
        saved (the site's share per head) per unit of error first, while the budget holds."""

        def with_heads(index: int, heads: list[int]) -> dict[str, Any]:
            return {**rejected[index], "heads": heads}

        units = []
        for index in rejected:
            site = sites[index]
            n_heads = head_count(site)
            if n_heads is None or n_heads < 2 or site.flops_saved is None:
                continue
            for head in range(n_heads):
                error = error_with({index: with_heads(index, [head])})
                units.append((site.flops_saved / n_heads / max(error, 1e-12), index, head))
        chosen: dict[int, list[int]] = {}
        for _, index, head in sorted(units, reverse=True):
            trial_heads = {**chosen, index: sorted([*chosen.get(index, []), head])}
            trial = {**accepted, **{i: with_heads(i, h) for i, h in trial_heads.items()}}
            if error_with(trial) <= self.max_error:
                chosen = trial_heads
        for index, heads in chosen.items():
            site = sites[index]
            self._reasons.pop(id(site))
            self._chosen[id(site)] = with_heads(index, heads)
            # the report's "alone" figures: these heads', not the whole site's
            site.measured_error = error_with({index: self._chosen[id(site)]})
            site.flops_saved = site.flops_saved * len(heads) // head_count(site)


@dataclasses.dataclass
class ChosenSites:
    """Internal policy: replace exactly these sites (by id), with these overrides (for measuring,
    and for distill's captures at other shapes)."""

    chosen: dict[int, dict[str, Any]]

    def __call__(self, site: AttentionSite) -> str | None:
        return None if id(site) in self.chosen else "not selected"

    def site_options(self, site: AttentionSite) -> dict[str, Any]:
        return self.chosen.get(id(site), {})


class _Measurement:
    """The model error of a choice of sites and options on the calibration calls.

    A call the graph does not take (other batch sizes or lengths than a static capture's) runs on
    the model captured again for it (`capture_for`), whose sites are the graph's, in the same order
    and with the same names; each measurement replaces the chosen sites in copies of every graph.
    """

    def __init__(
        self,
        gm: torch.fx.GraphModule,
        sites: list[AttentionSite],
        calls: list[Call],
        method: AttentionMethod,
        options: MethodOptions,
        calibrated: bool,
    ) -> None:
        from .api import captured_from

        self.calls, self.method, self.options = calls, method, options
        self.label = "calibration call {}" if calibrated else "example call {}"
        taken, refused = split_by_fit(gm, calls)
        self.graphs = [(gm, sites, taken)] if taken else []
        if refused:
            model = captured_from.get(gm)
            if model is None:
                raise OptionError(
                    f"ErrorBudget: {self.label.format(refused[0])} does not fit the captured "
                    "graph's input shapes, and the model it was captured from is unknown here: "
                    "calibrate at the example inputs' shapes, or capture with dynamic_shapes=..."
                )
            for graph, indices in capture_for(model, calls, refused):
                graph_sites = canonicalize(graph)
                self.graphs.append((graph, self._matched(sites, graph_sites, indices[0]), indices))
        self.exact: list[list[torch.Tensor]] = [[] for _ in calls]
        for graph, _, indices in self.graphs:
            for index in indices:
                self.exact[index] = _outputs(graph, calls[index], index)
        for index, outputs in enumerate(self.exact):
            if not all(bool(torch.isfinite(x).all()) for x in outputs):
                raise OptionError(
                    f"ErrorBudget: {self.label.format(index)} gives non-finite outputs (NaN or "
                    "inf) on the exact model, so no error can be measured on it: drop or fix "
                    "that call"
                )

    def _matched(
        self, sites: list[AttentionSite], others: list[AttentionSite], index: int
    ) -> list[AttentionSite]:
        """`others` (a capture at other shapes) as the counterparts of `sites`, with the mask
        kinds the example inputs showed (the rewrite decides by them)."""
        same = [s.name for s in sites] == [o.name for o in others] and all(
            o.status == "found" for s, o in zip(sites, others, strict=True) if s.status == "found"
        )
        if not same:
            raise OptionError(
                f"ErrorBudget: the model captured at {self.label.format(index)}'s shapes has "
                f"other attention sites ({[o.name for o in others]}) than at the example "
                f"inputs' ({[s.name for s in sites]}): calibrate at shapes the model attends "
                "alike at"
            )
        for site, other in zip(sites, others, strict=True):
            if other.mask == "full" and site.mask in ("causal_key", "general"):
                other.mask = site.mask
        return others

    def error_with(self, choice: dict[int, dict[str, Any]]) -> float:
        """The model error with the sites `choice` names (by index) replaced, with its options."""
        from .passes.substitute import substitute

        got: list[list[torch.Tensor]] = [[] for _ in self.calls]
        for graph, sites, indices in self.graphs:
            clone, copies = clone_with_sites(graph, sites)
            chosen = {id(copies[i]): overrides for i, overrides in choice.items()}
            substitute(clone, [copies[i] for i in choice], self.method, self.options,
                       ChosenSites(chosen))  # fmt: skip
            for i in choice:
                if copies[i].status != "replaced":
                    raise OptionError(
                        f"ErrorBudget cannot measure {self.method.name} at site "
                        f"{copies[i].name!r} on {self.label.format(indices[0])}: at its shapes "
                        f"the site is kept ({copies[i].reason}); calibrate at shapes the method "
                        "runs at"
                    )
            for index in indices:
                got[index] = _outputs(clone, self.calls[index], index)
        return relative_error(
            [x for outputs in got for x in outputs], [x for outputs in self.exact for x in outputs]
        )
