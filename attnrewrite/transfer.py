"""Distillation of the sites that call a method's op (Monarch, HSA), in two stages, as LoLCATs
does for linear attention.

1. Attention transfer: each site is trained to reproduce its exact attention output on the
   original model's activations (teacher forcing: every site hands on the exact output, so each
   sees what it would in the original model), MSE over the non-padding queries. What trains: a
   gain on every q feature (a per-channel temperature), a gain and shift on every v feature (an
   output gain and bias) and LoRA updates of the q and k projections.
2. End to end: LoRA on the q, k, v and output projections of every replaced site, trained on
   the relative squared error between the rewritten model's output and the original's (its first
   floating-point output, e.g. the last hidden state; padding tokens do not count), plus the
   mean relative error of the sites' outputs against the original model's.

Everything trained is an update of the linear projections around a site (lora.py), found from
the graph, and merged into their weights at the end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
import torch.utils._pytree as pytree
from tqdm.auto import tqdm

from . import lora
from .errors import AttnRewriteError
from .methods import METHODS
from .methods.base import CustomOpMethod
from .methods.masks import site_mask_terms
from .passes.graph_utils import module_path


def method_ops() -> set[Any]:
    """The graph targets of every registered method that calls one op at its sites."""
    return {m.graph_target() for m in METHODS.values() if isinstance(m, CustomOpMethod)}


def query_weights(q: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, H, Nq, 1) loss weights: 0 on padding queries (self-attention whose key-padding mask
    marks its own queries), 1 elsewhere."""
    ones = q.new_ones(q.shape[:-1], dtype=torch.float32)[..., None]
    if attn_mask is None or attn_mask.shape[-1] != q.shape[-2]:
        return ones
    n = q.shape[-2]
    terms = site_mask_terms(attn_mask, tuple(q.shape[:-2]), n, n, torch.float32)
    if terms is None:
        return ones
    return terms[1].float().expand(q.shape[:-1])[..., None]


def weighted_mse(output: torch.Tensor, target: torch.Tensor, weights: torch.Tensor):
    squared = (output.float() - target.float()).square() * weights
    return squared.sum() / (weights.sum() * output.shape[-1]).clamp_min(1.0)


class SiteHook(torch.nn.Module):
    """Stands in for a site's op call while distilling. mode "method": the op; "exact": exact
    attention (the teacher); "record": exact attention, kept in `recorded`; "transfer": the op,
    scored against `target` into `loss`, handing on `target`; "compare": the op, its relative
    error against `target` in `loss`."""

    def __init__(self, op: Any) -> None:
        super().__init__()
        self.op = op
        self.names = [argument.name for argument in op._schema.arguments]
        self.mode = "method"
        self.target: torch.Tensor | None = None
        self.recorded: torch.Tensor | None = None
        self.loss: torch.Tensor | None = None
        self.weights: torch.Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        bound = {**dict(zip(self.names, args, strict=False)), **kwargs}
        q, attn_mask = bound["q"], bound.get("attn_mask")
        self.weights = query_weights(q, attn_mask)
        if self.mode in ("exact", "record"):
            exact = F.scaled_dot_product_attention(
                q,
                bound["k"],
                bound["v"],
                attn_mask=attn_mask,
                is_causal=bound.get("is_causal", False),
                scale=bound.get("scale"),
                enable_gqa=bound.get("enable_gqa", False),
            )
            if self.mode == "record":
                self.recorded = exact.detach()
            return exact
        output = self.op(*args, **kwargs)
        if self.mode == "transfer":
            assert self.target is not None
            self.loss = weighted_mse(output, self.target, self.weights)
            return self.target
        if self.mode == "compare":
            assert self.target is not None
            own = weighted_mse(self.target, torch.zeros_like(self.target), self.weights)
            self.loss = weighted_mse(output, self.target, self.weights) / own.clamp_min(1e-12)
        return output


@dataclasses.dataclass
class Site:
    """A replaced site while distilling: its hook and the updates of its projections."""

    name: str
    hook_name: str
    updates: dict[str, lora.ProjectionUpdate]
    projections: dict[str, lora.Projection]


#: what each projection's update holds: (gain per output feature, shift per output feature)
ROLES = {"q": (True, False), "k": (False, False), "v": (True, True), "out": (False, False)}
#: what trains in attention transfer, per role (end to end trains every parameter)
TRANSFER = {"q": ("lora_a", "lora_b", "log_gain"), "k": ("lora_a", "lora_b"),
            "v": ("log_gain", "shift"), "out": ()}  # fmt: skip


def install(
    gm: torch.fx.GraphModule, rank: int, alpha: float, seed: int, shared: list[Site] | None = None
) -> list[Site]:
    """Replace each method op call of `gm` by a SiteHook and give its projections updates:
    new ones, or the updates of `shared` (the sites of the same model captured at other
    shapes), site by site."""
    generator = torch.Generator().manual_seed(seed)
    ops, sites = method_ops(), []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in ops:
            continue
        hook_name = f"_distill_site_{len(sites)}"
        gm.add_submodule(hook_name, SiteHook(node.target))
        with gm.graph.inserting_before(node):
            hook = gm.graph.call_module(hook_name, node.args, node.kwargs)
        hook.meta = dict(node.meta)
        node.replace_all_uses_with(hook)
        gm.graph.erase_node(node)
        q, k, v = hook.args[:3]
        found = {
            "q": lora.projection_into(gm, q),
            "k": lora.projection_into(gm, k),
            "v": lora.projection_into(gm, v),
            "out": lora.projection_from(gm, hook),
        }
        projections = {role: p for role, p in found.items() if p is not None}
        if shared is not None:
            updates = shared[len(sites)].updates
            if projections.keys() != updates.keys():
                raise AttnRewriteError(
                    f"the model captured at other shapes feeds {module_path(hook)!r} through other "
                    "projections than the rewritten module: distill at the rewrite's shapes"
                )
            for role, projection in projections.items():
                lora.share(gm, projection, updates[role])
        else:
            updates = {
                role: lora.attach(gm, p, rank, alpha, *ROLES[role], generator)
                for role, p in projections.items()
            }
        sites.append(Site(module_path(hook) or hook_name, hook_name, updates, projections))
    gm.recompile()
    return sites


def replace_as(graph: torch.fx.GraphModule, rewritten: torch.fx.GraphModule, batch: int) -> None:
    """Replace in `graph` (the model captured again, at a calibration batch's shapes) the sites
    the rewritten module replaced, with the same method and options, in the same order."""
    from .budget import ChosenSites
    from .passes.canonicalize import canonicalize
    from .passes.substitute import substitute

    ops = [n for n in rewritten.graph.nodes if n.op == "call_function" and n.target in method_ops()]
    sites = [site for site in canonicalize(graph) if site.sdpa_node is not None]
    paths = [module_path(site.sdpa_node) for site in sites]
    chosen, start = [], 0
    for op in ops:
        if module_path(op) not in paths[start:]:
            raise AttnRewriteError(
                f"the model captured at calibration batch {batch}'s shapes has no attention site "
                f"at {module_path(op)!r}, where the rewritten module has one: distill at the "
                "rewrite's example shapes"
            )
        start = paths.index(module_path(op), start) + 1
        chosen.append((sites[start - 1], op))
    for site, op in chosen:
        method = next(
            m
            for m in METHODS.values()
            if isinstance(m, CustomOpMethod) and m.graph_target() == op.target
        )
        defaults = method.parse_options({})
        names = {f.name for f in dataclasses.fields(defaults)}
        options = {k: tuple(v) if isinstance(v, list) else v
                   for k, v in op.kwargs.items() if k in names}  # fmt: skip
        substitute(graph, [site], method, defaults, ChosenSites({id(site): options}))
        if site.status != "replaced":
            raise AttnRewriteError(
                f"at calibration batch {batch}'s shapes {site.name!r} cannot be replaced "
                f"({site.reason}): distill at the rewrite's example shapes"
            )


def uninstall(gm: torch.fx.GraphModule, sites: list[Site]) -> None:
    """Put the op calls back and merge every update into its projection's weights."""
    names = {site.hook_name for site in sites}
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target in names:
            with gm.graph.inserting_before(node):
                call = gm.graph.call_function(gm.get_submodule(node.target).op, node.args,
                                              node.kwargs)  # fmt: skip
            call.meta = dict(node.meta)
            node.replace_all_uses_with(call)
            gm.graph.erase_node(node)
            delattr(gm, str(node.target))
    for site in sites:
        for projection in site.projections.values():
            lora.merge(gm, projection)
    gm.recompile()


@dataclasses.dataclass
class Graphs:
    """The graph each calibration batch runs on (the rewritten module, or the model captured
    again at the batch's shapes) and the distilled sites of each; all share one set of updates
    (those of the rewritten module's sites, `sites[0]`)."""

    per_batch: list[torch.fx.GraphModule]
    sites: list[list[Site]]

    def hooks(self, index: int) -> list[SiteHook]:
        """The hooks of the graph batch `index` runs on, in site order."""
        graph = self.per_batch[index]
        own = next(s for g, s in zip(self._distinct(), self.sites, strict=True) if g is graph)
        return [graph.get_submodule(site.hook_name) for site in own]

    def set_mode(self, mode: str, enabled: bool) -> None:
        """Every hook's mode, and whether the updates apply (off: the original projections)."""
        for graph, sites in zip(self._distinct(), self.sites, strict=True):
            for site in sites:
                graph.get_submodule(site.hook_name).mode = mode
        for site in self.sites[0]:
            for update in site.updates.values():
                update.enabled = enabled

    def _distinct(self) -> list[torch.fx.GraphModule]:
        return list({id(g): g for g in self.per_batch}.values())


def first_output(output: Any) -> torch.Tensor:
    """The model output distillation matches: its first floating-point tensor."""
    for leaf in pytree.tree_leaves(output):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf
    raise AttnRewriteError("the model returns no floating-point tensor to distill against")


def output_error(student: torch.Tensor, teacher: torch.Tensor, token_weights) -> torch.Tensor:
    """Relative squared error ‖s − t‖² / ‖t‖² over the tokens that count."""
    weights = 1.0
    if token_weights is not None and student.shape[:2] == token_weights.shape:
        weights = token_weights.reshape(*token_weights.shape, *[1] * (student.dim() - 2))
    difference = ((student.float() - teacher.float()).square() * weights).sum()
    return difference / (teacher.float().square() * weights).sum().clamp_min(1e-12)


def token_weights(hooks: list[SiteHook]) -> torch.Tensor | None:
    """(B, N) weights of the model's tokens, from the first site's padding queries."""
    weights = hooks[0].weights
    return None if weights is None else weights[:, 0, :, 0]


@dataclasses.dataclass
class StageLog:
    """Per-site losses of attention transfer, and the output error end to end."""

    losses: dict[str, list[float]]
    initial: dict[str, float]
    final: dict[str, float]
    output_losses: list[float]
    output_initial: float | None
    output_final: float | None


def trainable(sites: list[Site], stage: str) -> list[torch.nn.Parameter]:
    params = []
    for site in sites:
        for role, update in site.updates.items():
            for name, param in update.named_parameters():
                if stage == "end_to_end" or name in TRANSFER[role]:
                    params.append(param)
    return params


def run_stages(
    graphs: Graphs,
    run: Callable[[int], Any],
    n_batches: int,
    order: Callable[[int], list[int]],
    transfer_steps: int,
    transfer_lr: float,
    end_to_end_steps: int,
    end_to_end_lr: float,
    check: Callable[[list[tuple[str, torch.Tensor]], list, int, int], None],
    check_recorded: Callable[[list[tuple[str, torch.Tensor]], int], None],
    progress: bool,
) -> StageLog:
    """Record the teacher on every batch, then train both stages (see the module docstring)."""
    sites = graphs.sites[0]
    names = [site.name for site in sites]
    site_targets, output_targets, weights = [], [], []
    with torch.no_grad():
        graphs.set_mode("record", enabled=False)
        for index in range(n_batches):
            output_targets.append(first_output(run(index)).detach())
            site_targets.append([hook.recorded for hook in graphs.hooks(index)])
            weights.append(token_weights(graphs.hooks(index)))
            check_recorded(
                [*zip(names, site_targets[-1], strict=True), ("output", output_targets[-1])],
                index,
            )

    def site_losses() -> dict[str, float]:
        totals = dict.fromkeys(names, 0.0)
        with torch.no_grad():
            for index in range(n_batches):
                _transfer_pass(graphs, run, index, site_targets)
                for name, hook in zip(names, graphs.hooks(index), strict=True):
                    totals[name] += float(hook.loss) / n_batches
        return totals

    def output_loss() -> float:
        graphs.set_mode("method", enabled=True)
        with torch.no_grad():
            return (
                sum(
                    float(output_error(first_output(run(i)), output_targets[i], weights[i]))
                    for i in range(n_batches)
                )
                / n_batches
            )

    log = StageLog({n: [] for n in names}, site_losses(), {}, [], None, None)
    bar = tqdm(total=transfer_steps + end_to_end_steps, desc="distill", disable=not progress)
    params = _trainable_only(sites, "transfer")
    optimizer = torch.optim.Adam(params, lr=transfer_lr)
    for step, index in enumerate(order(transfer_steps), 1):
        _transfer_pass(graphs, run, index, site_targets)
        losses = [hook.loss for hook in graphs.hooks(index)]
        optimizer.zero_grad()
        torch.stack(losses).sum().backward()
        check(list(zip(names, losses, strict=True)), params, index, step)
        optimizer.step()
        for name, loss in zip(names, losses, strict=True):
            log.losses[name].append(loss.item())
        bar.set_postfix(stage="transfer", loss=f"{sum(x.item() for x in losses):.4g}")
        bar.update()
    log.final = site_losses()
    if end_to_end_steps:
        log.output_initial = output_loss()
        params = _trainable_only(sites, "end_to_end")
        optimizer = torch.optim.Adam(params, lr=end_to_end_lr)
        graphs.set_mode("compare", enabled=True)
        for step, index in enumerate(order(end_to_end_steps), transfer_steps + 1):
            for hook, target in zip(graphs.hooks(index), site_targets[index], strict=True):
                hook.target = target
            loss = output_error(first_output(run(index)), output_targets[index], weights[index])
            # every site's output against the original's: token-level signal at every layer,
            # which a pooled output (an embedder's) alone lacks
            loss = loss + torch.stack([h.loss for h in graphs.hooks(index)]).mean()
            optimizer.zero_grad()
            loss.backward()
            check([("output", loss)], params, index, step)
            optimizer.step()
            log.output_losses.append(loss.item())
            bar.set_postfix(stage="end to end", loss=f"{loss.item():.4g}")
            bar.update()
        log.output_final = output_loss()
    bar.close()
    return log


def _trainable_only(sites: list[Site], stage: str) -> list:
    """Turn gradients on for the stage's parameters only and return them."""
    chosen = trainable(sites, stage)
    ids = {id(p) for p in chosen}
    for site in sites:
        for p in (p for u in site.updates.values() for p in u.parameters()):
            p.requires_grad_(id(p) in ids)
    return chosen


def _transfer_pass(graphs: Graphs, run, index: int, site_targets) -> None:
    """One teacher-forced pass over batch `index`: each hook's loss against its exact output."""
    graphs.set_mode("transfer", enabled=True)
    for hook, target in zip(graphs.hooks(index), site_targets[index], strict=True):
        hook.target, hook.loss = target, None
    run(index)
    if any(hook.loss is None for hook in graphs.hooks(index)):
        raise AttnRewriteError(f"calibration batch {index} did not run every replaced site")
