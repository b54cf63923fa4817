"""torch → ONNX: rewrite, export with each method's op as an ONNX local function, validate."""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxscript
import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import optimization_hint

from ..api import RewriteResult, rewrite
from ..errors import AttnRewriteError, OptionError
from ..methods.monarch.reference import default_block_size
from ..passes.graph_utils import shape_of
from ..passes.substitute import Policy
from ..report import Report
from .files import check_output, staged
from .functions import DOMAIN, MIN_OPSET, FunctionSpec, quiet_exporter
from .lowerings import LOWERINGS

log = logging.getLogger("attnrewrite")


class OnnxValidationError(AttnRewriteError):
    """onnxruntime's output differs from the rewritten PyTorch module's beyond the tolerance."""


@dataclasses.dataclass
class OnnxExport:
    """The written file, the rewrite report, and onnxruntime's max abs error vs PyTorch."""

    path: Path
    report: Report
    max_error: float
    functions: list[str]


def _auto_block_sizes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    target = torch.ops.attnrewrite.monarch_attention.default
    return [n for n in gm.graph.nodes if n.target is target and n.kwargs.get("block_size") is None]


def _static_block_size(length: Any) -> int:
    """The block size an ONNX function is fixed at for a site `length` long (symbolic: the
    example's length)."""
    return default_block_size(optimization_hint(length))


def _with_static_block_sizes(gm: torch.fx.GraphModule, in_place: bool) -> torch.fx.GraphModule:
    """ONNX functions need a static Monarch block size: "auto" resolved from the example length,
    in `gm` or, when it is the caller's module (in_place False), in a copy."""
    if not _auto_block_sizes(gm):
        return gm
    if not in_place:
        gm = copy.deepcopy(gm)
    for node in _auto_block_sizes(gm):
        node.update_kwarg("block_size", _static_block_size(shape_of(node.args[0])[-2]))
    gm.recompile()
    return gm


def _report_as_exported(report: Report) -> Report:
    """A copy of `report` (the caller's stays as it is) whose Monarch sites show the block size
    their functions are fixed at where the rewrite left it to the run-time length."""
    sites = []
    for site in report.sites:
        options = dict(site.options)
        if site.method == "monarch" and site.status == "replaced" and options["block_size"] is None:
            options["block_size"] = _static_block_size(site.q_len)
        sites.append(dataclasses.replace(site, options=options))
    return Report(report.method, sites)


def _tensors(values: Any) -> list[torch.Tensor]:
    return [x for x in torch.utils._pytree.tree_leaves(values) if isinstance(x, torch.Tensor)]


def onnxruntime_error(
    path: str | Path, module: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any]
) -> float:
    """Max abs difference between onnxruntime on `path` and `module` on the same inputs."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = _tensors((args, dict(kwargs)))
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise AttnRewriteError(f"the ONNX model takes {len(names)} inputs, got {len(inputs)}")
    feed = {name: x.detach().cpu().numpy() for name, x in zip(names, inputs, strict=True)}
    got = session.run(None, feed)
    with torch.no_grad():
        expected = _tensors(module(*args, **kwargs))
    return max(
        float(np.abs(g.astype(np.float64) - e.double().cpu().numpy()).max(initial=0.0))
        for g, e in zip(got, expected, strict=False)
    )


def export_onnx(
    model: torch.nn.Module | RewriteResult,
    example_inputs: tuple[Any, ...],
    path: str | Path,
    *,
    method: str | None = None,
    example_kwargs: Mapping[str, Any] | None = None,
    dynamic_shapes: Any = None,
    opset: int | None = None,
    policy: Policy | None = None,
    tolerance: float = 1e-4,
    **options: Any,
) -> OnnxExport:
    """Rewrite `model` with `method`, export it to ONNX in standard ops, check it, run it.

    Each replaced site is one node calling an ONNX local function of domain "attnrewrite"
    (onnxruntime inlines it; no custom op library). Afterwards the file passes
    `onnx.checker.check_model(full_check=True)` and onnxruntime's outputs on the example inputs
    are compared with the rewritten PyTorch module's: past `tolerance` it raises
    OnnxValidationError, and `path` is written only once both checks pass. `dynamic_shapes`
    follows torch.export (e.g. batch and sequence dims). The report shows the options the
    functions run with (e.g. the Monarch block size resolved from the example length).

    `model` may be a `RewriteResult` (e.g. distilled with `attnrewrite.distill`): its module is
    exported as it is, unchanged, and a copy of its report returned; method, policy and options
    belong to the rewrite() that made it. Rewrite it with the dynamic shapes you export with.
    """
    if opset is not None and opset < MIN_OPSET:
        raise OptionError(
            f"opset must be at least {MIN_OPSET} (the methods' ONNX functions are exported by "
            f"torch.onnx, which writes opset {MIN_OPSET} and later), got {opset}"
        )
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    kwargs = dict(example_kwargs or {})
    if isinstance(model, RewriteResult):
        if method is not None or policy is not None or options:
            raise OptionError(
                "export_onnx got a RewriteResult, which is already rewritten: pass method, "
                "policy and options to attnrewrite.rewrite(), not to export_onnx"
            )
        result = RewriteResult(_with_static_block_sizes(model.module, in_place=False), model.report)
    elif method is None:
        raise OptionError(
            "export_onnx needs method=... (e.g. 'monarch'), or a RewriteResult from "
            "attnrewrite.rewrite() to export as it is"
        )
    else:
        result = rewrite(
            model,
            example_inputs,
            method=method,
            example_kwargs=kwargs,
            policy=policy,
            dynamic_shapes=dynamic_shapes,
            **options,
        )
        result.module = _with_static_block_sizes(result.module, in_place=True)
    module = result.module
    specs: dict[str, FunctionSpec] = {}

    def translation(lower):
        def translate(*args, **call_options):
            spec = lower(*args, **call_options)
            specs.setdefault(spec.name, spec)
            # The function's inputs: the call's tensors in order (options and None left out).
            values = (*args, *call_options.values())
            return spec.call(*(x for x in values if isinstance(x, onnxscript.ir.Value)))

        return translate

    table = {target: translation(lower) for target, lower in LOWERINGS.items()}
    with quiet_exporter():
        program = torch.onnx.export(
            module,
            example_inputs,
            kwargs=kwargs,
            dynamo=True,
            custom_translation_table=table,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            verbose=False,
        )
    proto = program.model_proto
    _add_functions(proto, specs.values())
    path = Path(path)
    with staged(path) as written:
        onnx.save(proto, written)
        check_output(written)
        error = onnxruntime_error(written, module, example_inputs, kwargs)
        if not error <= tolerance:
            raise OnnxValidationError(
                f"onnxruntime differs from the rewritten PyTorch model by {error:.3g} > "
                f"{tolerance} on the example inputs (nothing written to {path})"
            )
    log.info("exported %s: onnxruntime max abs error %.3g", path, error)
    return OnnxExport(path, _report_as_exported(result.report), error, sorted(specs))


def _add_functions(model: onnx.ModelProto, specs: Iterable[FunctionSpec]) -> None:
    """Attach the specs' functions (once each) and the opset imports their bodies need. Bodies
    are exported at the model's standard opset: ONNX requires a function's imports to agree with
    the model's (and a model from opset 23 on may keep sites as standard Attention nodes)."""
    present = {(f.domain, f.name) for f in model.functions}
    imports = {o.domain: o.version for o in model.opset_import}
    functions = [f for spec in specs for f in spec.build(imports.get(""))]
    for function in functions:
        if (function.domain, function.name) in present:
            continue
        present.add((function.domain, function.name))
        model.functions.append(function)
        for opset in function.opset_import:
            imports.setdefault(opset.domain, opset.version)
    imports.setdefault(DOMAIN, 1)
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in imports.items())
