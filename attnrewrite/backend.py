"""The `torch.compile` backend "attnrewrite", registered through the `torch_dynamo_backends`
entry point: `torch.compile(model, backend="attnrewrite", options={"method": "monarch", ...})`.

It rewrites the Dynamo graph with the same passes as `rewrite()` and hands it to Inductor (or runs
it eagerly with `"inner": "eager"`, or through AOTAutograd without code generation with
`"inner": "aot_eager"`: the custom ops' fake and backward registrations are traced, compiling in a
fraction of Inductor's time). Nothing here registers at import time: Dynamo loads the entry
point by name, and registering twice would trip its duplicate-name assertion.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx

from .api import rewrite_graph
from .errors import OptionError, warn_once
from .methods import get_method
from .report import Report

log = logging.getLogger("attnrewrite")

BACKEND_OPTIONS = ("method", "policy", "inner")
INNER_COMPILERS = ("inductor", "aot_eager", "eager")

#: Reports of the graphs this process compiled, newest last (for inspection and tests).
reports: list[Report] = []


def parse_backend_options(
    options: Mapping[str, Any] | None,
) -> tuple[str, dict[str, Any], Any, str]:
    """(method, method options, policy, inner) from torch.compile's `options` dict."""
    options = dict(options or {})
    method = options.pop("method", "monarch")
    policy = options.pop("policy", None)
    inner = options.pop("inner", "inductor")
    attention_method = get_method(method)
    if inner not in INNER_COMPILERS:
        raise OptionError(f"inner must be one of {INNER_COMPILERS}, got {inner!r}")
    try:
        attention_method.parse_options(options)
    except OptionError as error:
        raise OptionError(f"{error}; backend options: {', '.join(BACKEND_OPTIONS)}") from None
    return method, options, policy, inner


def attnrewrite_backend(
    gm: torch.fx.GraphModule,
    example_inputs: list[Any],
    options: Mapping[str, Any] | None = None,
    mode: str | None = None,
) -> Callable[..., Any]:
    """Dynamo backend: rewrite attention, then compile with Inductor (or `inner`)."""
    method, method_options, policy, inner = parse_backend_options(options)
    if getattr(policy, "calibration", None) is not None:
        raise OptionError(
            "in torch.compile, ErrorBudget measures on the compiled call's own inputs: pass "
            "calibration=None (or use attnrewrite.rewrite to calibrate on other inputs)"
        )
    calls = [(tuple(example_inputs), {})]
    before = {name for name, _ in gm.named_parameters()}
    report = rewrite_graph(gm, method, method_options, policy, example_calls=calls)
    added = [name for name, _ in gm.named_parameters() if name not in before]
    if added:
        warn_once(
            "compile-parameters",
            f"the {method} rewrite added parameters inside the compiled graph ({added[0]}, ...): "
            "they are not parameters of the model, so optimizers, DDP and state_dict do not see "
            "them and they keep their initial values (a ZeroS adapter outputs 0 until distilled). "
            "To train or distill them, rewrite first (res = attnrewrite.rewrite(model, inputs, "
            f"method={method!r}), then attnrewrite.distill(res.module, ...)) and compile "
            "res.module.",
        )
        # AOTAutograd looks every parameter up in this map (of those Dynamo traced) if present.
        if hasattr(gm, "_param_name_to_source"):
            del gm._param_name_to_source
    reports.append(report)
    log.info("attnrewrite backend: %s", report.summary())
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=list_mode_options(mode) if mode else None)
