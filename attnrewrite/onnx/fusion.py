"""ONNX → ONNX: find softmax attention in an existing .onnx file and put a method's function in
its place, with onnxscript's pattern rewriter (one rule class; alternatives as OrValue patterns,
preconditions in `check`, as onnxruntime's transformer fusions do).

Recognized: MatMul(Q, Kᵀ) with Kᵀ a Transpose of K (BHSd or BSHd) or a 3-D reshape round trip;
optional Mul/Div scales on Q, Kᵀ or the scores; an optional additive mask; Softmax over the last
axis, optionally with the Where(IsNaN) guard torch's exporter adds; MatMul with V. What does not
match, or fails a precondition, is kept and reported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchFailureError

from ..methods import get_method
from ..report import Report
from ..site import AttentionSite
from .export import _add_functions
from .functions import DOMAIN, FunctionSpec, TensorLayout
from .lowerings import METHOD_SPECS


def _scalar(value: ir.Value | None) -> float | None:
    tensor = None if value is None else value.const_value
    if tensor is None:
        return None
    array = np.asarray(tensor.numpy())
    return float(array.reshape(-1)[0]) if array.size == 1 else None


def _scaled(op, x, factor, tag: str):
    return pattern.OrValue(
        [op.Mul(x, factor), op.Div(x, factor), x], tag_var=tag, tag_values=["Mul", "Div", "None"]
    )


class SoftmaxAttention(pattern.RewriteRuleClassBase):
    """softmax(scale · Q Kᵀ + mask) V → one call of the method's ONNX function."""

    def __init__(self, method: str, options: dict[str, Any], report: Report) -> None:
        super().__init__(name=f"SoftmaxAttentionTo_{method}")
        self.method, self.options, self.report = method, options, report
        self.specs: dict[str, FunctionSpec] = {}
        self._spec: FunctionSpec | None = None
        self._site: AttentionSite | None = None

    def pattern(self, op, query, key, value, mask, query_scale, key_scale, qk_scale):
        key_bhsd = op.Transpose(key, perm=[0, 1, 3, 2])
        key_3d = op.Reshape(
            op.Transpose(op.Reshape(key, pattern.ANY_VALUE), perm=[0, 2, 1]), pattern.ANY_VALUE
        )
        key_bshd = op.Transpose(key, perm=[0, 2, 3, 1])
        key_transposed = pattern.OrValue(
            [key_bhsd, key_3d, key_bshd], tag_var="key_format", tag_values=["BHSd", "BHSd", "BSHd"]
        )
        scores = op.MatMul(
            _scaled(op, query, query_scale, "query_scaling"),
            _scaled(op, key_transposed, key_scale, "key_scaling"),
        )
        scores = _scaled(op, scores, qk_scale, "qk_scaling")
        scores = pattern.OrValue(
            [op.Add(scores, mask), scores], tag_var="has_mask", tag_values=[True, False]
        )
        probabilities = op.Softmax(scores, axis=-1)
        guarded = op.Where(op.IsNaN(probabilities), 0.0, probabilities)
        return op.MatMul(pattern.OrValue([guarded, probabilities]), value)

    def check(self, context, query, key, value, mask, key_format, **bindings):
        result = pattern.MatchResult()
        scale = 1.0
        for tag, name in (
            ("query_scaling", "query_scale"),
            ("key_scaling", "key_scale"),
            ("qk_scaling", "qk_scale"),
        ):
            kind = bindings.get(tag, "None")
            if kind == "None":
                continue
            factor = _scalar(bindings.get(name))
            if factor is None:
                return result.fail(f"{name} is not a constant scalar")
            scale = scale * factor if kind == "Mul" else scale / factor
        shapes = [v.shape for v in (query, key, value)]
        if any(s is None or len(s) != 4 for s in shapes):
            return result.fail("query, key and value must be rank-4 with known ranks")
        site = AttentionSite(
            name=value.name or "attention",
            node=value.name or "",
            layer=None,
            spelling="onnx",
            q_shape=tuple(_dim(d) for d in query.shape),
            k_shape=_bhsd(tuple(_dim(d) for d in key.shape), key_format),
            v_shape=tuple(_dim(d) for d in value.shape),
            scale=scale,
        )
        site.mask = "none" if mask is None else "full"
        if mask is not None and mask.shape is not None and len(mask.shape) >= 2:
            site.mask_shape = tuple(_dim(d) for d in mask.shape)
            site.mask = "key" if mask.shape[-2] == 1 else "full"
        method = get_method(self.method)
        parsed = method.parse_options(self.options)
        reason = (
            method.unsupported_reason(site, parsed)
            if site.q_len == site.k_len
            else (f"cross-attention (Nq={site.q_len} ≠ Nk={site.k_len})")
        )
        if site.q_len is None or site.k_len is None:
            reason = "dynamic sequence lengths whose equality cannot be proven from the graph"
        if reason:
            site.keep(reason)
            self.report.sites.append(site)
            return result.fail(reason)
        try:
            key_layout = TensorLayout.of(key)
            if key_format == "BSHd":  # the function takes K as (B, H, S, d)
                key_layout = key_layout.permuted((0, 2, 1, 3))
            self._spec = METHOD_SPECS[self.method](
                query, key_layout, value, mask, scale, site.q_len, parsed
            )
        except Exception as error:
            site.keep(f"cannot build the {self.method} function: {error}")
            self.report.sites.append(site)
            raise MatchFailureError(str(error)) from error
        site.status, site.method = "replaced", self.method
        site.options = method.site_options(site, parsed)
        self._site = site
        return result

    def rewrite(self, op, query, key, value, mask, key_format, **_):
        spec = self._spec
        self.specs.setdefault(spec.name, spec)
        self.report.sites.append(self._site)
        if key_format == "BSHd":
            key = op.Transpose(key, perm=[0, 2, 1, 3])
        inputs = [x for x in (query, key, value, mask) if x is not None]
        return getattr(op, spec.name)(*inputs, _domain=DOMAIN)


def _dim(d: Any) -> int | str | None:
    """A static size, or the name of a symbolic one (equal names are equal sizes)."""
    return d if isinstance(d, int) else getattr(d, "value", None)


def _bhsd(shape: tuple, key_format: str) -> tuple:
    return shape if key_format == "BHSd" else (shape[0], shape[2], shape[1], shape[3])


def rewrite_onnx(src: str | Path, dst: str | Path, *, method: str, **options: Any) -> Report:
    """Rewrite the softmax attention of the ONNX model `src` to `method`, write `dst`.

    Returns a report like `rewrite()`'s: every matched site replaced or kept with the reason.
    The result is checked with `onnx.checker.check_model(full_check=True)`.
    """
    get_method(method).parse_options(options)
    if method not in METHOD_SPECS:
        raise ValueError(
            f"method {method!r} has no ONNX function; ONNX rewriting supports "
            f"{', '.join(sorted(METHOD_SPECS))}"
        )
    model = ir.from_proto(onnx.load(str(src)))  # with its external data, if any
    report = Report(method=method)
    rule = SoftmaxAttention(method, options, report)
    pattern.RewriteRuleSet([_rule(rule)]).apply_to_model(model)
    RemoveUnusedNodesPass()(model)  # the scale constants of replaced sites
    reported = {site.node for site in report.sites}
    for node in model.graph:
        if node.op_type == "Softmax" and node.domain == "" and node.outputs[0].name not in reported:
            site = AttentionSite(
                name=node.name, node=node.outputs[0].name, layer=None, spelling="onnx"
            )
            site.keep(
                "not rewritten: no attention pattern around this Softmax (scores from "
                "MatMul(Q, Kᵀ), softmax over the last axis, only user a MatMul with V)"
            )
            report.sites.append(site)
    proto = ir.to_proto(model)
    _add_functions(proto, [f for spec in rule.specs.values() for f in spec.build()])
    onnx.save(proto, str(dst))
    onnx.checker.check_model(str(dst), full_check=True)
    return report


def _rule(instance: SoftmaxAttention) -> pattern.RewriteRule:
    return pattern.RewriteRule(
        instance.pattern, instance.rewrite, instance.check, name=instance.name
    )


__all__ = ["SoftmaxAttention", "rewrite_onnx"]
