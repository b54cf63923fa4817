"""ErrorBudget: replace the sites that save the most attention FLOPs per unit of measured error,
while the whole model's error on calibration inputs stays within a budget.

The error of a rewrite is the relative L2 error of the model's outputs, ‖y′ − y‖ / ‖y‖, over all
floating outputs of all calibration calls, against the exact (canonical SDPA) model.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx

from .errors import OptionError
from .flops import METHOD_FLOPS, flops_saved
from .methods import AttentionMethod, MethodOptions
from .methods.base import CustomOpMethod
from .passes.graph_utils import unchanged_state
from .passes.head_split import head_count
from .site import AttentionSite, SDPAArgs


def _calls(calibration: Any) -> list[tuple[tuple, dict]]:
    """Calibration as (args, kwargs) calls: a tuple of args, a dict of kwargs, or a list of them."""
    if isinstance(calibration, (tuple, dict)):
        calibration = [calibration]
    calls = []
    for call in calibration:
        if isinstance(call, dict):
            calls.append(((), call))
        elif isinstance(call, tuple):
            calls.append((call, {}))
        else:
            raise OptionError(
                "ErrorBudget calibration must be a tuple of positional arguments, a dict of "
                f"keyword arguments, or a list of them; got {type(call).__name__}"
            )
    return calls


def _outputs(module: torch.nn.Module, calls: list[tuple[tuple, dict]]) -> list[torch.Tensor]:
    """The floating outputs of the calibration calls. Every measurement starts from one seed,
    so a model in train mode draws the same dropout masks in the exact run and in each
    candidate's (the methods draw none), and leaves its buffers as they were."""
    try:
        with torch.no_grad(), unchanged_state(module):
            torch.manual_seed(0)
            outputs = [module(*args, **kwargs) for args, kwargs in calls]
    except AssertionError as error:
        if "Guard failed" not in str(error):
            raise
        raise OptionError(
            f"ErrorBudget calibration does not fit the captured graph ({error}): calibrate at "
            "the example inputs' shapes, or capture with dynamic_shapes=..."
        ) from None
    leaves = torch.utils._pytree.tree_leaves(outputs)
    return [x.double() for x in leaves if isinstance(x, torch.Tensor) and x.is_floating_point()]


def relative_error(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """‖y′ − y‖ / ‖y‖ over all outputs together."""
    num = sum(float((g - e).square().sum()) for g, e in zip(got, expected, strict=True))
    den = sum(float(e.square().sum()) for e in expected)
    return (num / den) ** 0.5 if den > 0 else float(num > 0)


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

    calibration: the calls to measure on (a tuple of args, a dict of kwargs, or a list of them);
    None uses the rewrite's example inputs. Keep calibration and evaluation data disjoint.
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
    _reasons: dict[int, str] = dataclasses.field(default_factory=dict, init=False, repr=False)
    _chosen: dict[int, dict[str, Any]] = dataclasses.field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        if not self.max_error >= 0:
            raise OptionError(f"ErrorBudget max_error must be ≥ 0, got {self.max_error}")
        if not self.candidates:
            raise OptionError("ErrorBudget candidates must list at least one option set ({})")

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
        example_calls: list[tuple[tuple, dict]],
    ) -> None:
        """Measure every candidate site alone, then add sites greedily under the budget (and,
        with per_head, heads of the sites that did not fit)."""
        from .passes.substitute import substitute

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
        calls = example_calls if self.calibration is None else _calls(self.calibration)
        exact = _outputs(gm, calls)

        def error_with(choice: dict[int, dict[str, Any]]) -> float:
            clone, copies = clone_with_sites(gm, sites)
            chosen = {id(copies[i]): overrides for i, overrides in choice.items()}
            selected = _Selected(chosen)
            substitute(clone, [copies[i] for i in choice], method, options, selected)
            return relative_error(_outputs(clone, calls), exact)

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
class _Selected:
    """Internal policy for measuring: replace exactly these sites, with these overrides."""

    chosen: dict[int, dict[str, Any]]

    def __call__(self, site: AttentionSite) -> str | None:
        return None if id(site) in self.chosen else "not selected"

    def site_options(self, site: AttentionSite) -> dict[str, Any]:
        return self.chosen.get(id(site), {})
