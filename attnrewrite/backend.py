"""The `torch.compile` backend "attnrewrite", registered through the `torch_dynamo_backends`
entry point: `torch.compile(model, backend="attnrewrite", options={"method": "monarch", ...})`.

It rewrites the Dynamo graph with the same passes as `rewrite()` and hands it to Inductor (or runs
it eagerly with `"inner": "eager"`). Nothing here registers at import time: Dynamo loads the entry
point by name, and registering twice would trip its duplicate-name assertion.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx

from .api import rewrite_graph
from .errors import OptionError
from .methods import get_method
from .report import Report

log = logging.getLogger("attnrewrite")

BACKEND_OPTIONS = ("method", "policy", "inner")
INNER_COMPILERS = ("inductor", "eager")

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
    """Dynamo backend: rewrite attention, then compile with Inductor (or run eagerly)."""
    method, method_options, policy, inner = parse_backend_options(options)
    if getattr(policy, "calibration", None) is not None:
        raise OptionError(
            "in torch.compile, ErrorBudget measures on the compiled call's own inputs: pass "
            "calibration=None (or use attnrewrite.rewrite to calibrate on other inputs)"
        )
    calls = [(tuple(example_inputs), {})]
    report = rewrite_graph(gm, method, method_options, policy, example_calls=calls)
    # Methods with per-site parameters (ZeroS adapters) add parameters Dynamo did not trace;
    # AOTAutograd looks each one up in this map unless it is absent.
    known = getattr(gm, "_param_name_to_source", None)
    if known is not None and any(name not in known for name, _ in gm.named_parameters()):
        del gm._param_name_to_source
    reports.append(report)
    log.info("attnrewrite backend: %s", report.summary())
    if inner == "eager":
        return gm.forward
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=list_mode_options(mode) if mode else None)
