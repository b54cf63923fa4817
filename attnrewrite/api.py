"""`rewrite`: capture a model, canonicalize its attention, substitute a method, report."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.fx

from .errors import AttnRewriteError
from .methods import get_method
from .passes.canonicalize import canonicalize
from .passes.graph_utils import has_values, unchanged_state
from .passes.substitute import Policy, substitute
from .policy import check_policy
from .report import Report

#: The model each graph `capture` returned was captured from, kept as long as the graph lives:
#: ErrorBudget and distill capture it again at calibration shapes the graph does not accept.
captured_from: weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module] = (
    weakref.WeakKeyDictionary()
)


@dataclasses.dataclass
class RewriteResult:
    """`module` is called like the original model; `report` lists every attention site."""

    module: torch.nn.Module
    report: Report

    def __iter__(self):
        return iter((self.module, self.report))


def rewrite_graph(
    gm: torch.fx.GraphModule,
    method: str,
    options: Mapping[str, Any] | None = None,
    policy: Policy | None = None,
    example_calls: list[tuple[tuple, dict]] | None = None,
) -> Report:
    """Run canonicalize and substitute on `gm` in place (its nodes must carry fake values).

    A policy with a `plan` method (ErrorBudget) measures the canonical graph first, on its own
    calibration calls or on `example_calls`.
    """
    attention_method = get_method(method)
    parsed = attention_method.parse_options(options or {})
    check_policy(policy)
    sites = canonicalize(gm)
    probe_masks(gm, sites, example_calls or [])
    if hasattr(policy, "plan"):
        policy.plan(gm, sites, attention_method, parsed, example_calls or [])
    substitute(gm, sites, attention_method, parsed, policy)
    return Report(method=method, sites=sites)


def probe_masks(gm: torch.fx.GraphModule, sites: list, calls: list[tuple[tuple, dict]]) -> None:
    """Classify full masks by their values on the example inputs: "causal_key" where rows differ
    as a causal mask combined with key padding does (decoders), "general" where they differ
    otherwise (position biases, windows).

    A (…, N, N) mask cannot be proven a key-padding mask from the graph; running the graph once
    on the example inputs can prove it is not one, so methods that honor key masks only keep
    "general" sites at rewrite time instead of falling back at run time. One mask node often
    feeds every layer's site.
    """
    targets: dict[torch.fx.Node, list] = {}
    for site in sites:
        if site.mask == "full" and site.sdpa is not None:
            targets.setdefault(site.sdpa.attn_mask, []).append(site)
    if not targets or not calls or not hasattr(gm, "_in_spec"):
        return
    import torch.fx._pytree as fx_pytree

    from .methods.masks import site_mask_terms

    rank = {"full": 0, "causal_key": 1, "general": 2}

    class Probe(torch.fx.Interpreter):
        def run_node(self, node: torch.fx.Node) -> Any:
            value = super().run_node(node)
            if node in targets and isinstance(value, torch.Tensor) and value.dim() >= 2:
                # the decision the methods' ops make at run time, on the example's mask
                *batch, n_queries, n_keys = value.shape
                terms = site_mask_terms(value, tuple(batch), n_queries, n_keys, torch.float32)
                kind = "general" if terms is None else "causal_key" if terms[2] else "full"
                for site in targets[node]:
                    site.mask = max(site.mask, kind, key=rank.__getitem__)
            return value

    # the run leaves no trace: buffers, the random stream and the example inputs stay
    with torch.no_grad(), unchanged_state(gm):
        for args, kwargs in calls:
            inputs = fx_pytree.tree_flatten_spec((args, kwargs), gm._in_spec)
            Probe(gm).run(*(x.clone() if isinstance(x, torch.Tensor) else x for x in inputs))


WITHOUT_KV_CACHE_NOTE = (
    "captured with use_cache=False: torch.export cannot return a Hugging Face KV cache, so the "
    "rewritten module returns no past_key_values (pass example_kwargs={'use_cache': False} to "
    "say so yourself)"
)


@contextlib.contextmanager
def without_kv_cache(model: torch.nn.Module) -> Iterator[None]:
    """Turn off `config.use_cache` of every submodule for the capture, then restore it."""
    configs = []
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "use_cache", None) is True and config not in configs:
            configs.append(config)
    for config in configs:
        config.use_cache = False
    try:
        yield
    finally:
        for config in configs:
            config.use_cache = True


def _returns_kv_cache(error: Exception) -> bool:
    """Whether torch.export failed on a Hugging Face KV cache in the model's output."""
    return "Cache" in str(error) and "in output" in str(error)


def capture(
    model: torch.nn.Module,
    example_inputs: tuple[Any, ...],
    example_kwargs: Mapping[str, Any] | None = None,
    dynamic_shapes: Any = None,
    notes: list[str] | None = None,
) -> torch.fx.GraphModule:
    """An FX graph of `model` with fake values on every node, called like `model`.

    A GraphModule is copied (parameters shared) and, if needed, fake-propagated; any other module
    is captured with `torch.export` (non-strict), whose graphs keep module paths for the report.
    What the capture changed about the call (a KV cache turned off) is appended to `notes`.
    """
    _check_call(model, example_inputs, example_kwargs)
    if isinstance(model, torch.fx.GraphModule):
        gm = torch.fx.GraphModule(model, copy.deepcopy(model.graph))
        if not has_values(gm.graph):
            from torch._subclasses.fake_tensor import FakeTensorMode
            from torch.fx.passes.fake_tensor_prop import FakeTensorProp

            mode = FakeTensorMode(allow_non_fake_inputs=True)  # buffers stay real tensors
            inputs = (*example_inputs, *(example_kwargs or {}).values())
            try:
                FakeTensorProp(gm, mode).propagate(*inputs)
            except Exception as error:
                raise AttnRewriteError(
                    f"the GraphModule does not run on fake tensors ({type(error).__name__}: "
                    f"{error}).{_data_dependence_hint(error)}"
                ) from error
        captured_from[gm] = model
        return gm

    def export() -> torch.export.ExportedProgram:
        return torch.export.export(
            model,
            tuple(example_inputs),
            dict(example_kwargs or {}),
            dynamic_shapes=dynamic_shapes,
            strict=False,
        )

    try:
        try:
            exported = export()
        except Exception as error:
            # A Hugging Face decoder returns a DynamicCache by default, which torch.export cannot
            # put in a graph's output; a captured prefill graph has no use for it.
            if not _returns_kv_cache(error) or "use_cache" in (example_kwargs or {}):
                raise
            with without_kv_cache(model):
                exported = export()
            if notes is not None:
                notes.append(WITHOUT_KV_CACHE_NOTE)
    except Exception as error:
        fix = (
            _data_dependence_hint(error)
            or _kv_cache_hint(error)
            or (
                " Pass a torch.fx.GraphModule (e.g. from torch.fx.symbolic_trace), or compile with "
                "torch.compile(model, backend='attnrewrite'), which tolerates graph breaks."
            )
        )
        raise AttnRewriteError(
            f"torch.export could not capture the model ({type(error).__name__}: {error}).{fix}"
        ) from error
    gm = exported.module()
    captured_from[gm] = model
    return gm


def _check_call(model: Any, example_inputs: Any, example_kwargs: Mapping[str, Any] | None) -> None:
    """Errors for the usual slips in calling `rewrite`/`capture`, before an expensive capture."""
    if isinstance(model, RewriteResult):
        raise AttnRewriteError(
            "rewrite() got a RewriteResult; pass its module (result.module) to rewrite it again"
        )
    if not isinstance(model, torch.nn.Module):
        raise AttnRewriteError(
            f"rewrite() needs a torch.nn.Module (or a torch.fx.GraphModule); got "
            f"{type(model).__name__}"
        )
    if isinstance(example_inputs, list):
        raise AttnRewriteError(
            "example_inputs must be a tuple of the model's positional arguments; got a list: "
            "pass tuple(example_inputs) (or (example_inputs,) if the model takes one list)"
        )
    if example_kwargs is not None and not isinstance(example_kwargs, Mapping):
        raise AttnRewriteError(
            f"example_kwargs must be a dict of keyword arguments; got "
            f"{type(example_kwargs).__name__}"
        )


def _kv_cache_hint(error: Exception) -> str:
    """The fix when a Hugging Face KV cache in the output stopped torch.export."""
    if not _returns_kv_cache(error):
        return ""
    return (
        " The model returns a KV cache, which torch.export cannot capture: leave use_cache out "
        "(rewrite() then captures without the cache) or pass example_kwargs={'use_cache': False}."
    )


def _data_dependence_hint(error: Exception) -> str:
    """The usual cause of a data-dependent capture failure, and its fix."""
    from torch._subclasses.fake_tensor import DataDependentOutputException
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    cause = error
    while cause is not None and not isinstance(
        cause, (DataDependentOutputException, GuardOnDataDependentSymNode)
    ):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return ""
    return (
        " The model branches on tensor values: nn.Transformer and its encoder and decoder do so "
        "to find out whether a mask is causal, unless told; pass is_causal= (nn.Transformer: "
        "src_is_causal= and tgt_is_causal=) with the mask. Under torch.compile, Dynamo skips "
        "such modules entirely, so no graph reaches the attnrewrite backend either."
    )


def rewrite(
    model: torch.nn.Module,
    example_inputs: tuple[Any, ...] = (),
    *,
    method: str,
    example_kwargs: Mapping[str, Any] | None = None,
    policy: Policy | None = None,
    dynamic_shapes: Any = None,
    **options: Any,
) -> RewriteResult:
    """Rewrite every attention site of `model` to `method` and report what was done.

    example_inputs: positional arguments of one representative call (shapes matter: Monarch's
    default block size is chosen from the run-time length; the report shows it for these shapes).
    options: the method's hyperparameters, e.g. block_size=16, num_steps=2 for "monarch".
    policy: a callable site → reason-to-keep or None, e.g. attnrewrite.Select(layers=[0, 2]).
    dynamic_shapes: as for torch.export, to keep e.g. batch and sequence dims symbolic.
    """
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    get_method(method).parse_options(options)  # fail before an expensive capture
    check_policy(policy)
    notes: list[str] = []
    gm = capture(model, example_inputs, example_kwargs, dynamic_shapes, notes)
    calls = [(tuple(example_inputs), dict(example_kwargs or {}))]
    report = rewrite_graph(gm, method, options, policy, example_calls=calls)
    report.notes.extend(notes)
    return RewriteResult(module=gm, report=report)
