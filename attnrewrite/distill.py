"""`attnrewrite.distill`: fit the ZeroS adapters of a rewritten model to the original attention.

ZeroS is not zero-shot, so a model rewritten with method="zeros" has a trainable adapter at each
replaced site (attnrewrite/methods/zeros/adapter.py). Distillation is attention transfer in the
manner of LoLCATs: each adapter is trained to reproduce its site's original attention output
(MSE over the non-padding queries); nothing else in the model changes. The original outputs come
from the rewritten module itself: an adapter can compute the exact SDPA of its own q, k, v, mask,
which is the original site's output, so no copy of the original model is needed.

  1. Initialization from data (adapter.py documents it): one pass for the mean queries (key logits
     w_h = scale · q̄_h), one for the least-squares output gain and bias.
  2. Training with Adam on the adapters' parameters only:
     - all at once (layerwise=False): every site returns its exact output (teacher forcing), so
       each site sees the original model's activations, and one forward pass gives every site's
       loss; `steps` optimizer steps in all.
     - layer by layer (layerwise=True): the original outputs are captured first; then site ℓ
       is trained on the activations of the model whose earlier sites already run ZeroS, so it
       also learns to correct their errors (later sites return their exact output). `steps` per
       site. Memory: the captured outputs of every site for every calibration batch.
The batch order is a permutation per epoch drawn from `seed`: the same call gives the same
result. The module is run in eval mode (dropout off); its training flags and every parameter's
requires_grad are restored afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from . import transfer
from .api import RewriteResult, captured_from
from .budget import Call, ChosenSites, capture_for, split_by_fit
from .errors import AttnRewriteError
from .methods.zeros import ZeroSMethod
from .methods.zeros.adapter import ZeroSAdapter, normalize_output
from .passes.canonicalize import canonicalize
from .passes.graph_utils import module_path
from .passes.substitute import substitute

Batch = Any  # a tuple of positional arguments, a dict of keyword arguments, or one tensor


@dataclasses.dataclass
class DistillLog:
    """What distillation did. losses: per site, the training loss at every step (measured before
    that step's update). initial / final: per site, the MSE on the original model's activations
    over all calibration batches, after the data initialization and after training."""

    layerwise: bool
    steps: int
    lr: float
    seed: int
    seconds: float
    losses: dict[str, list[float]]
    initial: dict[str, float]
    final: dict[str, float]
    end_to_end_steps: int = 0
    end_to_end_lr: float | None = None
    output_losses: list[float] = dataclasses.field(default_factory=list)
    """End to end: the relative squared error of the model's output at every step."""
    output_initial: float | None = None
    output_final: float | None = None

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(dataclasses.asdict(self), indent=indent)

    def __str__(self) -> str:
        mode = "layer by layer" if self.layerwise else "all sites at once"
        lines = [f"distilled {len(self.final)} site(s), {mode}, {self.steps} steps, "
                 f"lr={self.lr}, seed={self.seed}, {self.seconds:.1f} s"]  # fmt: skip
        width = max((len(name) for name in self.final), default=4)
        lines.append(f"{'site'.ljust(width)}  initial MSE  final MSE")
        for name, final in self.final.items():
            lines.append(f"{name.ljust(width)}  {self.initial[name]:11.4g}  {final:9.4g}")
        if self.output_initial is not None and self.output_final is not None:
            lines.append(
                f"end to end: {self.end_to_end_steps} steps, lr={self.end_to_end_lr}; relative "
                f"output error {self.output_initial:.4g} → {self.output_final:.4g}"
            )
        return "\n".join(lines)


def _row_weights(adapter: ZeroSAdapter, q: torch.Tensor, attn_mask: torch.Tensor | None):
    """(B, H, Nq, 1) weights: 0 on padding queries, 1 elsewhere."""
    weights = adapter.query_weights(q, attn_mask)
    if weights is None:
        return q.new_ones(q.shape[:-1], dtype=torch.float32)[..., None]
    return weights.expand(q.shape[:-1])[..., None]


def _mse(output: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    squared = (output.float() - target.float()).square() * weights
    return squared.sum() / (weights.sum() * output.shape[-1]).clamp_min(1.0)


class _MeanQuery:
    """Tap: the site's exact output; accumulates the mean query per head."""

    def __init__(self) -> None:
        self.total: torch.Tensor | float = 0.0
        self.count: torch.Tensor | float = 0.0

    def __call__(self, adapter, q, k, v, attn_mask):
        weights = _row_weights(adapter, q, attn_mask)
        self.total = self.total + (q.float() * weights).sum(dim=(0, 2))
        self.count = self.count + weights.sum(dim=(0, 2))
        return adapter.exact(q, k, v, attn_mask)

    def finite(self) -> bool:
        return _finite(self.total)

    def apply(self, adapter: ZeroSAdapter) -> None:
        adapter.init_key_logits(self.total / torch.as_tensor(self.count).clamp_min(1.0))


class _OutputFit:
    """Tap: the site's exact output; accumulates the moments for the per-channel least-squares
    fit of the exact output y on z = LayerNorm(ZeroS output): gain = cov(z, y)/var(z)."""

    def __init__(self) -> None:
        self.moments: list[torch.Tensor | float] = [0.0] * 5  # Σw, Σwz, Σwy, Σwz², Σwzy

    def __call__(self, adapter, q, k, v, attn_mask):
        exact = adapter.exact(q, k, v, attn_mask)
        raw, fell_back = adapter.zeros_output(q, k, v, attn_mask)
        if not bool(fell_back):
            z, y = normalize_output(raw), exact.float()
            w = _row_weights(adapter, q, attn_mask).expand_as(z)
            terms = (w, w * z, w * y, w * z * z, w * z * y)
            self.moments = [m + t.sum(dim=(0, 2)) for m, t in zip(self.moments, terms, strict=True)]
        return exact

    def finite(self) -> bool:
        return all(_finite(m) for m in self.moments)

    def apply(self, adapter: ZeroSAdapter) -> None:
        if not isinstance(self.moments[0], torch.Tensor):
            return  # every call fell back to exact attention: nothing to fit
        count, sum_z, sum_y, sum_zz, sum_zy = self.moments
        count = count.clamp_min(1.0)
        mean_z, mean_y = sum_z / count, sum_y / count
        var_z = sum_zz / count - mean_z.square()
        cov = sum_zy / count - mean_z * mean_y
        gain = torch.where(var_z > 1e-8, cov / var_z.clamp_min(1e-8), 0.0)
        adapter.init_output_affine(gain, mean_y - gain * mean_z)


class _TeacherForcing:
    """Tap: records the loss of the ZeroS output against the exact one and returns the exact
    output, so the sites after it see the original model's activations."""

    def __init__(self) -> None:
        self.loss: torch.Tensor | None = None

    def __call__(self, adapter, q, k, v, attn_mask):
        exact = adapter.exact(q, k, v, attn_mask).detach()
        student = adapter.student(q, k, v, attn_mask)
        self.loss = _mse(student, exact, _row_weights(adapter, q, attn_mask))
        return exact


class _Capture:
    """Tap: returns the exact output and keeps it (a training target)."""

    def __init__(self) -> None:
        self.outputs: list[torch.Tensor] = []

    def __call__(self, adapter, q, k, v, attn_mask):
        exact = adapter.exact(q, k, v, attn_mask)
        self.outputs.append(exact.detach())
        return exact

    def finite(self) -> bool:
        return not self.outputs or _finite(self.outputs[-1])


def _exact(adapter, q, k, v, attn_mask):
    """Tap: the site's exact output."""
    return adapter.exact(q, k, v, attn_mask)


class _AgainstTarget:
    """Tap: records the loss of the ZeroS output against the captured original output of the
    current batch, and returns the ZeroS output."""

    def __init__(self, targets: list[torch.Tensor]) -> None:
        self.targets = targets
        self.batch_index = 0
        self.loss: torch.Tensor | None = None

    def __call__(self, adapter, q, k, v, attn_mask):
        student = adapter.student(q, k, v, attn_mask)
        target = self.targets[self.batch_index]
        self.loss = _mse(student, target, _row_weights(adapter, q, attn_mask))
        return student


def _finite(value: torch.Tensor | float) -> bool:
    return bool(torch.isfinite(torch.as_tensor(value)).all())


def _non_finite(
    what: str, site: str, batch: int, step: int | None = None, trained: bool = False
) -> AttnRewriteError:
    """The error for a NaN or inf: which batch, site and step, and what to do about it."""
    if step is not None:
        where, left = f" at step {step}", "as they were before that step"
    elif trained:
        where, left = " after training", "as trained (lower lr if the last steps diverged)"
    else:
        where, left = "", "as they were before this call"
    return AttnRewriteError(
        f"distill: calibration batch {batch} gives a non-finite {what} (NaN or inf) at the "
        f"site {site!r}{where}; what trains is left {left}: drop or fix that batch if "
        "its inputs or the model's activations on it hold NaN or inf"
    )


def _as_call(batch: Batch) -> Call:
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


class _Runs:
    """Runs calibration batch i on a module that takes its shapes: the rewritten module where it
    does, else the original model captured again at them with the same adapters."""

    def __init__(self, module: torch.nn.Module, calls: list[Call]) -> None:
        self.calls = calls
        self.modules = [module] * len(calls)
        _, refused = split_by_fit(module, calls)
        if not refused:
            return
        model = captured_from.get(module)
        if model is None:
            raise AttnRewriteError(
                f"calibration batch {refused[0]} does not fit the shapes the module was captured "
                "at, and the model it was captured from is unknown here: pass the module (or "
                "RewriteResult) attnrewrite.rewrite returned, distill at the rewrite's example "
                "shapes, or rewrite with dynamic_shapes=..."
            )
        for graph, indices in capture_for(model, calls, refused):
            _share_adapters(graph, module, indices[0])
            for index in indices:
                self.modules[index] = graph

    def __call__(self, index: int) -> None:
        args, kwargs = self.calls[index]
        self.modules[index](*args, **kwargs)

    def all_modules(self) -> list[torch.nn.Module]:
        """The modules of every graph the batches run on (the rewritten module's first)."""
        graphs = list({id(m): m for m in self.modules}.values())
        return list({id(m): m for g in graphs for m in g.modules()}.values())


def _attention_nodes(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, str | None]]:
    """The graph's attention in order: each canonical SDPA node (None) or ZeroS adapter call (the
    adapter's name)."""
    nodes = []
    for node in gm.graph.nodes:
        if node.target is torch.ops.aten.scaled_dot_product_attention.default:
            nodes.append((node, None))
        elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), ZeroSAdapter):
            nodes.append((node, node.target))
    return nodes


def _share_adapters(graph: torch.fx.GraphModule, rewritten: torch.nn.Module, batch: int) -> None:
    """Rewrite `graph` (the model captured again) to call the rewritten module's adapters where
    the rewritten module does: its attention runs in the same order from the same modules."""
    _check_same_state(graph, rewritten, batch)
    sites = {site.sdpa_node: site for site in canonicalize(graph) if site.sdpa_node is not None}
    ours, theirs = _attention_nodes(rewritten), _attention_nodes(graph)
    if [module_path(n) for n, _ in ours] != [module_path(n) for n, _ in theirs]:
        raise AttnRewriteError(
            f"the model captured at calibration batch {batch}'s shapes attends in other places "
            f"({[module_path(n) for n, _ in theirs]}) than the rewritten module "
            f"({[module_path(n) for n, _ in ours]}): distill at the rewrite's example shapes"
        )
    chosen = {}
    for (_, name), (node, _) in zip(ours, theirs, strict=True):
        if name is not None and node in sites:
            chosen[id(sites[node])] = (sites[node], name)
    if len(chosen) != sum(name is not None for _, name in ours):
        raise AttnRewriteError(
            f"the model captured at calibration batch {batch}'s shapes has no attention site "
            "for some of the rewritten module's ZeroS adapters: distill at the rewrite's "
            "example shapes"
        )
    method = ZeroSMethod()
    options = {key: {"qk_rank": rewritten.get_submodule(name).qk_rank}
               for key, (_, name) in chosen.items()}  # fmt: skip
    substitute(graph, list(sites.values()), method, method.parse_options({}), ChosenSites(options))
    for site, name in chosen.values():
        shared = rewritten.get_submodule(name)
        if site.status != "replaced":
            raise AttnRewriteError(
                f"at calibration batch {batch}'s shapes ZeroS cannot replace {site.name!r} "
                f"({site.reason}): distill at the rewrite's example shapes"
            )
        fresh = graph.get_submodule(site.options["adapter"])
        if fresh.extra_repr() != shared.extra_repr():
            raise AttnRewriteError(
                f"at calibration batch {batch}'s shapes the site {site.name!r} needs a ZeroS "
                f"adapter ({fresh.extra_repr()}) unlike the rewritten module's "
                f"({shared.extra_repr()}): distill at the rewrite's example shapes"
            )
        setattr(graph, site.options["adapter"], shared)


def _check_same_state(graph: torch.nn.Module, rewritten: torch.nn.Module, batch: int) -> None:
    """The model captured again computes with the rewritten module's parameters and buffers
    (captures share them with the model); else the model or the module changed since."""
    own = {**dict(rewritten.named_parameters()), **dict(rewritten.named_buffers())}
    for name, value in [*graph.named_parameters(), *graph.named_buffers()]:
        mine = own.get(name)
        same = mine is value or (
            mine is not None
            and (mine.shape, mine.dtype, mine.device) == (value.shape, value.dtype, value.device)
            and torch.equal(mine, value)
        )
        if not same:
            raise AttnRewriteError(
                f"the model captured again at calibration batch {batch}'s shapes has other "
                f"weights than the rewritten module ({name!r} differs: the model or the module "
                "changed since the rewrite): distill at the rewrite's example shapes"
            )


def _run_with_taps(runs: _Runs, adapters, taps) -> None:
    """Run every batch with `taps` installed (no gradients); stop at a non-finite value."""
    for (_, adapter), tap in zip(adapters, taps, strict=True):
        adapter.tap = tap
    with torch.no_grad():
        for index in range(len(runs.calls)):
            runs(index)
            for (name, _), tap in zip(adapters, taps, strict=True):
                if not tap.finite():
                    raise _non_finite("activation", name, index)


def _site_losses(runs: _Runs, adapters, trained: bool) -> dict[str, float]:
    """Mean teacher-forced MSE per site over all batches (before or after training)."""
    totals = dict.fromkeys((name for name, _ in adapters), 0.0)
    taps = [_TeacherForcing() for _ in adapters]
    for (_, adapter), tap in zip(adapters, taps, strict=True):
        adapter.tap = tap
    with torch.no_grad():
        for index in range(len(runs.calls)):
            runs(index)
            for (name, _), tap in zip(adapters, taps, strict=True):
                if not _finite(tap.loss):
                    raise _non_finite("loss", name, index, trained=trained)
                totals[name] += float(tap.loss) / len(runs.calls)
    return totals


def _batch_order(n_batches: int, total: int, seed: int) -> list[int]:
    """`total` batch indices: a fresh permutation of the batches per epoch, drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < total:
        order.extend(torch.randperm(n_batches, generator=generator).tolist())
    return order[:total]


def distill(
    module: torch.nn.Module | RewriteResult,
    calibration: Sequence[Batch],
    *,
    steps: int | None = None,
    lr: float | None = None,
    end_to_end_steps: int | None = None,
    end_to_end_lr: float = 1e-3,
    rank: int = 8,
    alpha: float = 16.0,
    seed: int = 0,
    layerwise: bool = False,
    progress: bool = True,
    initialize: bool = True,
) -> DistillLog:
    """Train the replaced sites of `module` (what `rewrite` returned, or its module) in place so
    that it reproduces the original model on `calibration`; the defaults need no tuning.

    Monarch and HSA sites (transfer.py): attention transfer for `steps` (default 100, Adam at
    `lr`, default 5e-3) trains a per-channel gain on q and on v, a shift on v and rank-`rank`
    LoRA updates of the q and k projections, each site against its exact attention output; then
    `end_to_end_steps` (default 100, at `end_to_end_lr`) train LoRA on the q, k, v and output
    projections against the original model's output. The updates are merged into the weights:
    the result runs, compiles and exports like the rewritten module.

    ZeroS sites: their adapters are fitted from data (`initialize`) then trained against each
    site's exact output for `steps` (default 200; all sites at once, or `steps` per site with
    `layerwise`) at `lr` (default 1e-2, for the adapters' few parameters); calibration batches
    of shapes the module does not take run on the original model captured again at theirs.

    calibration: batches of model inputs, each a tuple of positional arguments, a dict of
    keyword arguments, or a single tensor (keep evaluation data out of it). A NaN or inf (in a
    batch, or from a diverging step) stops it with an error naming the batch and step, what
    trains left as it was before that step. Deterministic for a given `seed`. Returns the log.
    """
    if isinstance(module, RewriteResult):
        module = module.module
    batches = list(calibration)
    if not batches:
        raise AttnRewriteError("calibration is empty: pass at least one batch of model inputs")
    adapters = [(name, m) for name, m in module.named_modules() if isinstance(m, ZeroSAdapter)]
    if not adapters:
        return _distill_sites(module, [_as_call(b) for b in batches],
                              _positive_int("steps", 100 if steps is None else steps,
                                            minimum=0),
                              _positive("lr", 5e-3 if lr is None else lr),
                              _positive_int("end_to_end_steps",
                                            100 if end_to_end_steps is None else end_to_end_steps,
                                            minimum=0),
                              _positive("end_to_end_lr", end_to_end_lr),
                              _positive_int("rank", rank, minimum=0), alpha, seed,
                              progress)  # fmt: skip
    steps = _positive_int("steps", 200 if steps is None else steps)
    lr = _positive("lr", 1e-2 if lr is None else lr)
    runs = _Runs(module, [_as_call(batch) for batch in batches])

    start = time.perf_counter()
    # Set the flags rather than call eval(): modules from torch.export refuse eval()/train().
    modules = runs.all_modules()
    training = {m: m.training for m in modules}
    requires_grad = {p: p.requires_grad for m in modules for p in m.parameters()}
    for m in training:
        m.training = False
    try:
        for p in requires_grad:
            p.requires_grad_(False)
        if initialize:
            _initialize(runs, adapters)
        initial = _site_losses(runs, adapters, trained=False)
        train = _train_layerwise if layerwise else _train_all
        losses = train(runs, adapters, steps, lr, seed, progress)
        final = _site_losses(runs, adapters, trained=True)
    finally:
        for _, adapter in adapters:
            adapter.tap = None
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        for m, flag in training.items():
            m.training = flag
    return DistillLog(layerwise=layerwise, steps=steps, lr=lr, seed=seed,
                      seconds=time.perf_counter() - start, losses=losses, initial=initial,
                      final=final)  # fmt: skip


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise AttnRewriteError(f"{name} must be an int ≥ {minimum}, got {value!r}")
    return value


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise AttnRewriteError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _distill_sites(
    module: torch.nn.Module,
    calls: list[Call],
    steps: int,
    lr: float,
    end_to_end_steps: int,
    end_to_end_lr: float,
    rank: int,
    alpha: float,
    seed: int,
    progress: bool,
) -> DistillLog:
    """Distill the method op calls of a rewritten graph (transfer.py)."""
    if not isinstance(module, torch.fx.GraphModule) or not any(
        node.op == "call_function" and node.target in transfer.method_ops()
        for node in module.graph.nodes
    ):
        raise AttnRewriteError(
            "the module has no replaced attention site to distill: pass what "
            "attnrewrite.rewrite(model, example_inputs, method=...) returned"
        )
    per_batch: list[torch.fx.GraphModule] = [module] * len(calls)
    _, refused = split_by_fit(module, calls)
    if refused:
        model = captured_from.get(module)
        if model is None:
            raise AttnRewriteError(
                f"calibration batch {refused[0]} does not fit the shapes the module was captured "
                "at, and the model it was captured from is unknown here: pass the module (or "
                "RewriteResult) attnrewrite.rewrite returned, distill at the rewrite's example "
                "shapes, or rewrite with dynamic_shapes=..."
            )
        for graph, indices in capture_for(model, calls, refused):
            _check_same_state(graph, module, indices[0])
            transfer.replace_as(graph, module, indices[0])
            for index in indices:
                per_batch[index] = graph

    def run(index: int) -> Any:
        args, kwargs = calls[index]
        return per_batch[index](*args, **kwargs)

    def check(losses, params, index: int, step: int) -> None:
        for name, loss in losses:
            if not _finite(loss):
                raise _non_finite("loss", name, index, step)
        if not all(p.grad is None or _finite(p.grad) for p in params):
            raise _non_finite("gradient", losses[0][0], index, step)

    def check_recorded(values, index: int) -> None:
        for name, value in values:
            if not _finite(value):
                raise _non_finite("activation", name, index)

    start = time.perf_counter()
    # Set the flags rather than call eval(): modules from torch.export refuse eval()/train().
    modules = list(module.modules())
    training = {m: m.training for m in modules}
    requires_grad = {name: p.requires_grad for name, p in module.named_parameters()}
    for m in modules:
        m.training = False
    for p in module.parameters():
        p.requires_grad_(False)
    sites = transfer.install(module, rank, alpha, seed)
    try:
        distinct = list({id(g): g for g in per_batch}.values())
        twins = [transfer.install(g, rank, alpha, seed, shared=sites) for g in distinct[1:]]
        graphs = transfer.Graphs(per_batch, [sites, *twins])
        log = transfer.run_stages(
            graphs, run, len(calls), lambda n: _batch_order(len(calls), n, seed),
            steps, lr, end_to_end_steps, end_to_end_lr, check, check_recorded, progress,
        )  # fmt: skip
    finally:
        transfer.uninstall(module, sites)  # merges the updates, as trained before any error
        for name, p in module.named_parameters():
            p.requires_grad_(requires_grad[name])
        for m, flag in training.items():
            m.training = flag
    return DistillLog(layerwise=False, steps=steps, lr=lr, seed=seed,
                      seconds=time.perf_counter() - start, losses=log.losses,
                      initial=log.initial, final=log.final, end_to_end_steps=end_to_end_steps,
                      end_to_end_lr=end_to_end_lr, output_losses=log.output_losses,
                      output_initial=log.output_initial,
                      output_final=log.output_final)  # fmt: skip


def _initialize(runs: _Runs, adapters) -> None:
    """Set the adapters from data; on an error they are left as they were."""
    saved = [p.detach().clone() for _, adapter in adapters for p in adapter.parameters()]
    try:
        mean_queries = [_MeanQuery() for _ in adapters]
        _run_with_taps(runs, adapters, mean_queries)
        for (name, adapter), tap in zip(adapters, mean_queries, strict=True):
            if not isinstance(tap.count, torch.Tensor):
                raise AttnRewriteError(
                    f"the calibration inputs never reach the ZeroS site {name!r}; pass inputs "
                    "that run every replaced attention site"
                )
            tap.apply(adapter)
        fits = [_OutputFit() for _ in adapters]
        _run_with_taps(runs, adapters, fits)
        for (_, adapter), tap in zip(adapters, fits, strict=True):
            tap.apply(adapter)
    except Exception:
        with torch.no_grad():
            params = (p for _, adapter in adapters for p in adapter.parameters())
            for p, value in zip(params, saved, strict=True):
                p.copy_(value)
        raise


def _check_step(adapters, losses, index: int, step: int) -> None:
    """Before an update: every site's loss and every adapter gradient is finite."""
    for (name, adapter), loss in zip(adapters, losses, strict=True):
        if not _finite(loss):
            raise _non_finite("loss", name, index, step)
        if not all(p.grad is None or _finite(p.grad) for p in adapter.parameters()):
            raise _non_finite("gradient", name, index, step)


def _train_all(runs: _Runs, adapters, steps, lr, seed, progress) -> dict[str, list[float]]:
    taps = [_TeacherForcing() for _ in adapters]
    params = []
    for (_, adapter), tap in zip(adapters, taps, strict=True):
        adapter.tap = tap
        params.extend(adapter.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    losses: dict[str, list[float]] = {name: [] for name, _ in adapters}
    order = _batch_order(len(runs.calls), steps, seed)
    bar = tqdm(order, desc="distill", disable=not progress)
    for step, index in enumerate(bar, 1):
        for tap in taps:
            tap.loss = None
        runs(index)
        site_losses = [tap.loss for tap in taps]
        if any(loss is None for loss in site_losses):
            raise AttnRewriteError("a calibration batch did not run every ZeroS site")
        total = torch.stack(site_losses).sum()
        optimizer.zero_grad()
        total.backward()
        _check_step(adapters, site_losses, index, step)
        optimizer.step()
        for (name, _), loss in zip(adapters, site_losses, strict=True):
            losses[name].append(loss.item())
        bar.set_postfix(loss=f"{total.item():.4g}")
    return losses


def _train_layerwise(runs: _Runs, adapters, steps, lr, seed, progress):
    captures = [_Capture() for _ in adapters]
    _run_with_taps(runs, adapters, captures)
    losses: dict[str, list[float]] = {name: [] for name, _ in adapters}
    bar = tqdm(total=steps * len(adapters), desc="distill", disable=not progress)
    for position, (name, adapter) in enumerate(adapters):
        for later, (_, other) in enumerate(adapters):
            other.tap = _exact if later > position else None  # earlier sites run ZeroS
        tap = _AgainstTarget(captures[position].outputs)
        adapter.tap = tap
        params = list(adapter.parameters())
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=lr)
        for step, index in enumerate(_batch_order(len(runs.calls), steps, seed), 1):
            tap.batch_index, tap.loss = index, None
            runs(index)
            if tap.loss is None:
                raise AttnRewriteError(f"a calibration batch did not run the ZeroS site {name!r}")
            optimizer.zero_grad()
            tap.loss.backward()
            _check_step([(name, adapter)], [tap.loss], index, step)
            optimizer.step()
            losses[name].append(tap.loss.item())
            bar.set_postfix(site=name, loss=f"{tap.loss.item():.4g}")
            bar.update()
        for p in params:
            p.requires_grad_(False)
    bar.close()
    return losses
