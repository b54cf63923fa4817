"""ONNX → ONNX: find softmax attention in an existing .onnx file and put a method's function in
its place, with onnxscript's pattern rewriter: one rule class per source pattern (alternatives as
OrValue patterns, preconditions in `check`, as onnxruntime's transformer fusions do), sharing how
a found site is judged and its function built.

Recognized:
- `SoftmaxAttention`, the decomposed form (torch.onnx below opset 23, most exporters):
  MatMul(Q, Kᵀ) with Kᵀ a Transpose of K (BHSd or BSHd) or a 3-D reshape round trip; optional
  Mul/Div scales on Q, Kᵀ or the scores; an optional additive mask; Softmax over the last axis,
  optionally with the Where(IsNaN) guard torch's exporter adds; MatMul with V.
- `AttentionOp`, the standard `Attention` op (opset 23+; torch.onnx emits it for SDPA from
  opset 23): 4-D or 3-D (with q_num_heads/kv_num_heads) inputs, grouped heads, bool or float
  masks, is_causal, scale. A KV cache, softcap, or any output but Y keeps the site.
What does not match, or fails a precondition, is kept and reported, as is every Softmax or
Attention node no rule took. A mask computed from shapes alone (torch.onnx's causal mask below
opset 23) is evaluated and classified as `rewrite()` classifies masks on the example inputs, so a
method keeps the sites it keeps there (HSA: causal ones).
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.inliner
import onnx.reference
import onnx_ir as ir
import onnx_ir.traversal
import torch
from onnx import version_converter
from onnx_ir.passes.common import RemoveUnusedNodesPass
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchFailureError

from ..errors import OptionError, UnsupportedInputError
from ..methods import get_method
from ..methods.masks import site_mask_terms
from ..passes.graph_utils import layer_index
from ..passes.substitute import Policy
from ..report import Report
from ..site import AttentionSite, MaskKind
from .export import _add_functions
from .files import check_input, check_output, staged
from .functions import DOMAIN, MIN_OPSET, FunctionSpec, TensorLayout
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


def _dim(d: Any) -> int | str | None:
    """A static size, or the name of a symbolic one (equal names are equal sizes)."""
    return d if isinstance(d, int) else getattr(d, "value", None)


def _shape(value: ir.Value) -> tuple[int | str | None, ...]:
    return tuple(_dim(d) for d in value.shape)


def _describe_mask(site: AttentionSite, mask: ir.Value | None) -> None:
    """The site's mask kind and shape, from its mask input (None: no mask, or causal)."""
    if mask is None:
        site.mask = "causal" if site.is_causal else "none"
        return
    site.mask = "full"
    if mask.shape is not None:
        site.mask_shape = _shape(mask)
        site.mask = "key" if len(mask.shape) < 2 or mask.shape[-2] == 1 else "full"


#: The size every dynamic dim takes when a mask computed from shapes alone is evaluated.
PROBE_LENGTH = 24


class _ShapeOnlyMasks:
    """The kind of each (…, N, N) mask that depends on no input's values (torch.onnx's causal
    mask: Shape → Expand → Trilu → Where, or a folded constant): evaluated with every dynamic dim
    PROBE_LENGTH long and classified as `api.probe_masks` classifies a mask on the example
    inputs. None for a mask computed from values (e.g. from a padding mask input; the functions
    decide it at run time) or one that cannot be evaluated."""

    def __init__(self, opset_imports: dict[str, int]) -> None:
        self.opset_imports = opset_imports
        self.kinds: dict[ir.Value, MaskKind | None] = {}

    def __call__(self, mask: ir.Value) -> MaskKind | None:
        if mask not in self.kinds:
            value = self._evaluate(mask)
            self.kinds[mask] = None if value is None else _mask_kind(value)
        return self.kinds[mask]

    def _evaluate(self, mask: ir.Value) -> np.ndarray | None:
        leaves: dict[str, np.ndarray] = {}
        nodes: dict[ir.Node, None] = {}  # in post-order: each after the nodes of its inputs
        visited: set[ir.Value] = set()
        stack: list[tuple[ir.Value, bool]] = [(mask, False)]
        while stack:
            value, inputs_done = stack.pop()
            node = value.producer()
            if inputs_done:
                nodes.setdefault(node)
                continue
            if value in visited:
                continue
            visited.add(value)
            if value.const_value is not None:
                leaves[value.name] = np.asarray(value.const_value.numpy())
            elif node is None:  # a graph input whose values the mask uses
                return None
            elif node.domain == "" and node.op_type == "Shape":
                dims = _sample_shape(node)
                if dims is None:
                    return None
                leaves[value.name] = np.asarray(dims, dtype=np.int64)
            elif any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                     for a in node.attributes.values()):  # fmt: skip
                return None
            else:
                stack.append((value, True))
                stack.extend((x, False) for x in node.inputs if x is not None)
        imports = [onnx.helper.make_opsetid(d, v) for d, v in self.opset_imports.items()]
        try:
            graph = onnx.helper.make_graph(
                [ir.serde.serialize_node(node) for node in nodes],
                "mask",
                [],
                [onnx.helper.make_empty_tensor_value_info(mask.name)],
                [onnx.numpy_helper.from_array(array, name) for name, array in leaves.items()],
            )
            model = onnx.helper.make_model(graph, opset_imports=imports)
            (value,) = onnx.reference.ReferenceEvaluator(model).run(None, {})
        except Exception:  # an op or dtype the evaluator lacks: the function decides at run time
            return None
        return np.array(value)


def _sample_shape(node: ir.Node) -> list[int] | None:
    """What a Shape node gives with every dynamic dim PROBE_LENGTH long (None: rank unknown, or
    a dim neither static nor named)."""
    shape = node.inputs[0].shape
    if shape is None:
        return None
    dims = [_dim(d) for d in shape]
    if None in dims:
        return None
    dims = [d if isinstance(d, int) else PROBE_LENGTH for d in dims]
    start, end = (node.attributes.get(name) for name in ("start", "end"))
    return dims[slice(*(None if a is None else a.value for a in (start, end)))]


def _mask_kind(value: np.ndarray) -> MaskKind | None:
    """The kind of an evaluated mask: "causal_key" (causal, with any key padding), "general"
    (rows differ otherwise), or None (rows equal: at one length that proves nothing, "full")."""
    if value.ndim < 2 or value.dtype.kind not in "bf":
        return None
    tensor = torch.from_numpy(value)
    *batch, n_queries, n_keys = tensor.shape
    terms = site_mask_terms(tensor, tuple(batch), n_queries, n_keys, torch.float32)
    if terms is None:
        return "general"
    return "causal_key" if terms[2] else None


class _MethodFunctionRule(pattern.RewriteRuleClassBase):
    """What every source pattern shares: judging a found site against the method, building the
    method's function for it, and reporting it, replaced or kept with the reason."""

    def __init__(
        self,
        method: str,
        options: dict[str, Any],
        report: Report,
        specs: dict[str, FunctionSpec],
        judged: set[ir.Node],
        policy: Policy | None,
        masks: _ShapeOnlyMasks,
    ) -> None:
        super().__init__(name=f"{type(self).__name__}To_{method}")
        self.method, self.options, self.report, self.specs = method, options, report, specs
        self.judged, self.policy, self.masks = judged, policy, masks
        self._spec: FunctionSpec | None = None
        self._site: AttentionSite | None = None

    def _judge(
        self,
        context: Any,
        site: AttentionSite,
        layouts: tuple[TensorLayout, TensorLayout, TensorLayout],
        mask: ir.Value | None,
    ) -> pattern.MatchResult:
        """Accept the site (its function built, reported at `rewrite`) or keep and report it.

        site: with (B, H, S, d) shapes; layouts: of q, k, v as the function takes them. The
        matched nodes are one site, whatever the outcome (`_report_untaken` passes over them)."""
        self.judged.update(context.nodes)
        result = pattern.MatchResult()
        method = get_method(self.method)
        parsed = method.parse_options(self.options)
        if site.mask == "full" and mask is not None:
            site.mask = self.masks(mask) or site.mask
        reason = self.policy(site) if self.policy is not None else None
        if not reason:
            _refuse_site_options(self.policy, site)
        reason = reason or method.keep_reason(site, parsed)
        if site.q_len is None or site.k_len is None:
            reason = "dynamic sequence lengths whose equality cannot be proven from the graph"
        if reason:
            return self._keep(result, site, reason)
        try:
            self._spec = METHOD_SPECS[self.method](
                *layouts,
                mask,
                site.scale,
                site.q_len,
                parsed,
                is_causal=site.is_causal,
                enable_gqa=site.enable_gqa,
            )
        except Exception as error:
            self._keep(result, site, f"cannot build the {self.method} function: {error}")
            raise MatchFailureError(str(error)) from error
        site.status, site.method = "replaced", self.method
        site.options = method.site_options(site, parsed)
        self._site = site
        return result

    def _keep(
        self, result: pattern.MatchResult, site: AttentionSite, reason: str
    ) -> pattern.MatchResult:
        site.keep(reason)
        self.report.sites.append(site)
        return result.fail(reason)

    def _call(self, op, *inputs: ir.Value | None) -> ir.Value:
        """The node calling the accepted site's function (reported now: the rewrite happens)."""
        spec, site = self._spec, self._site
        assert spec is not None and site is not None
        self.specs.setdefault(spec.name, spec)
        self.report.sites.append(site)
        return getattr(op, spec.name)(*(x for x in inputs if x is not None), _domain=DOMAIN)


class SoftmaxAttention(_MethodFunctionRule):
    """softmax(scale · Q Kᵀ + mask) V, spelled out in MatMul, Softmax and MatMul."""

    def pattern(self, op, query, key, value, mask, query_scale, key_scale, qk_scale):
        key_bhsd = op.Transpose(key, perm=[0, 1, 3, 2])
        key_3d = op.Reshape(
            op.Transpose(op.Reshape(key, pattern.ANY_VALUE, _outputs=["key_3d"]), perm=[0, 2, 1]),
            pattern.ANY_VALUE,
            _outputs=["key_3d_transposed"],
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
        if any(v.shape is None or len(v.shape) != 4 for v in (query, key, value)):
            return result.fail("query, key and value must be rank-4 with known ranks")
        round_trip = bindings.get("key_3d"), bindings.get("key_3d_transposed")
        if round_trip[0] is not None and not _is_per_head_transpose(key, *round_trip):
            return result.fail("the key's reshapes do not transpose each head's (S, d) matrix")
        key_layout, key_shape = TensorLayout.of(key), _shape(key)
        if key_format == "BSHd":  # the function takes K as (B, H, S, d)
            key_layout = key_layout.permuted((0, 2, 1, 3))
            key_shape = tuple(key_shape[i] for i in (0, 2, 1, 3))
        site = _site_at(
            context.root,
            "onnx",
            q_shape=_shape(query),
            k_shape=key_shape,
            v_shape=_shape(value),
            scale=scale,
        )
        _describe_mask(site, mask)
        layouts = (TensorLayout.of(query), key_layout, TensorLayout.of(value))
        return self._judge(context, site, layouts, mask)

    def rewrite(self, op, query, key, value, mask, key_format, **_):
        if key_format == "BSHd":
            key = op.Transpose(key, perm=[0, 2, 1, 3])
        return self._call(op, query, key, value, mask)


def _is_per_head_transpose(key: ir.Value, flat: ir.Value, transposed: ir.Value) -> bool:
    """Whether Reshape → Transpose(0, 2, 1) → Reshape turns key (B, H, S, d) into Kᵀ
    (B, H, d, S): the 3-D form must keep each head's (S, d) rows, and the result must read
    (B, H, d, S). Any other pair of reshapes (e.g. of a (B, S, H, d) key) mixes heads and
    tokens; unknown shapes prove nothing."""
    if flat.shape is None or transposed.shape is None or len(flat.shape) != 3:
        return False
    batch, heads, length, width = _shape(key)
    dims = (*_shape(flat), *_shape(transposed))
    if None in dims or None in (batch, heads, length, width):
        return False
    per_head = _shape(flat)[1:] == (length, width)
    return per_head and _shape(transposed) == (batch, heads, width, length)


def _heads_first(value: ir.Value, heads: int | None) -> tuple[tuple, TensorLayout]:
    """Shape and layout of an Attention input as (B, H, S, d): 4-D as it is, 3-D (B, S, H·d)
    split into `heads`."""
    shape, layout = _shape(value), TensorLayout.of(value)
    if len(shape) == 4:
        return shape, layout
    batch, length, hidden = shape
    head_dim = hidden // heads if isinstance(hidden, int) and heads else None
    static = tuple(d if isinstance(d, int) else None for d in (batch, heads, length, head_dim))
    return (batch, heads, length, head_dim), TensorLayout(layout.dtype, static)


def _split_heads(op, x: ir.Value, heads: int) -> ir.Value:
    """(B, S, H·d) → (B, H, S, d)."""
    shape = op.Constant(value_ints=[0, 0, heads, -1])
    return op.Transpose(op.Reshape(x, shape), perm=[0, 2, 1, 3])


@dataclasses.dataclass
class _AttentionNode:
    """An `Attention` node read as a site: q, k, v as (B, H, S, d), and why it is more than
    plain softmax attention (None when it is not)."""

    site: AttentionSite
    layouts: tuple[TensorLayout, TensorLayout, TensorLayout] | None
    mask: ir.Value | None
    heads: tuple[int, int] | None  # (q_num_heads, kv_num_heads) of 3-D inputs
    reason: str | None

    @classmethod
    def of(cls, node: ir.Node) -> _AttentionNode:
        attributes = {name: attr.value for name, attr in node.attributes.items()}
        query, key, value = node.inputs[:3]
        mask = node.inputs[3] if len(node.inputs) > 3 else None
        site = _site_at(
            node,
            "onnx_attention",
            is_causal=bool(attributes.get("is_causal", 0)),
            scale=attributes.get("scale"),
        )
        _describe_mask(site, mask)
        ranks = {None if v is None or v.shape is None else len(v.shape) for v in node.inputs[:3]}
        heads = (attributes.get("q_num_heads"), attributes.get("kv_num_heads"))
        if ranks == {4}:
            heads = None
        elif ranks != {3} or not all(heads):
            reason = "inputs are neither 4-D nor 3-D with q_num_heads and kv_num_heads"
            return cls(site, None, mask, None, reason)
        q_heads, kv_heads = heads or (None, None)
        site.q_shape, q_layout = _heads_first(query, q_heads)
        site.k_shape, k_layout = _heads_first(key, kv_heads)
        site.v_shape, v_layout = _heads_first(value, kv_heads)
        site.enable_gqa = site.q_shape[1] != site.k_shape[1]
        reason = cls._unsupported_form(node, attributes, mask, site)
        return cls(site, (q_layout, k_layout, v_layout), mask, heads, reason)

    @staticmethod
    def _unsupported_form(
        node: ir.Node, attributes: dict[str, Any], mask: ir.Value | None, site: AttentionSite
    ) -> str | None:
        if any(x is not None for x in node.inputs[4:]):
            return (
                "a KV cache (past_key/past_value or nonpad_kv_seqlen inputs): decoding with a "
                "cache is not rewritten; export the model without the cache"
            )
        used = [v.name for v in node.outputs[1:] if v.uses() or v.is_graph_output()]
        if used:
            return f"outputs besides Y are used ({', '.join(map(str, used))}): the method has none"
        if attributes.get("softcap", 0.0):
            return f"softcap={attributes['softcap']}: the method has no logit soft-capping"
        if site.q_shape[1] is None or site.k_shape[1] is None:
            return "unknown head counts"
        if mask is not None and (mask.shape is None or _dim(mask.shape[-1]) != site.k_len):
            return "the mask's key length is not the keys' (a mask shorter than K, or unknown)"
        return None


class AttentionOp(_MethodFunctionRule):
    """The standard `Attention` op (opset 23+) when it is plain softmax attention: no KV cache
    (past_key/past_value, nonpad_kv_seqlen), no softcap, and Y its only used output. (The
    matcher itself passes over a node whose other outputs are used; `rewrite_onnx` reports it.)"""

    _node: _AttentionNode | None = None

    def pattern(self, op, query, key, value):
        return op.Attention(
            query,
            key,
            value,
            _allow_other_inputs=True,
            _allow_other_attributes=True,
            _outputs=["out"],
        )

    def check(self, context, out, **_):
        self._node = found = _AttentionNode.of(out.producer())
        if found.reason or found.layouts is None:
            self.judged.update(context.nodes)
            return self._keep(pattern.MatchResult(), found.site, found.reason or "")
        return self._judge(context, found.site, found.layouts, found.mask)

    def rewrite(self, op, query, key, value, **_):
        found = self._node
        assert found is not None
        if found.heads is None:
            return self._call(op, query, key, value, found.mask)
        q_heads, kv_heads = found.heads
        heads_first = self._call(
            op,
            _split_heads(op, query, q_heads),
            _split_heads(op, key, kv_heads),
            _split_heads(op, value, kv_heads),
            found.mask,
        )
        merged = op.Constant(value_ints=[0, 0, -1])
        return op.Reshape(op.Transpose(heads_first, perm=[0, 2, 1, 3]), merged)


def _with_inferred_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with onnx's shape inference filled in (sizes computed by Shape → Reshape chains
    included); as it was where inference fails (e.g. a model past protobuf's 2 GB)."""
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except (onnx.shape_inference.InferenceError, ValueError):
        return model


def rewrite_onnx(
    src: str | Path,
    dst: str | Path,
    *,
    method: str,
    policy: Policy | None = None,
    **options: Any,
) -> Report:
    """Rewrite the softmax attention of the ONNX model `src` to `method`, write `dst`.

    Returns a report like `rewrite()`'s: every matched site replaced or kept with the reason.
    Sites are named by the module path the exporter recorded (torch.onnx's name scopes, or
    TorchScript-style /module/path/Op node names), so `policy` (e.g. `Select(layers=[1, 3])`)
    chooses among them as it does in `rewrite()`; per-site options and heads need the PyTorch
    model (rewrite it, then `export_onnx`).
    Shapes the file does not record (the TorchScript exporter records only the graph's inputs
    and outputs) are inferred first: the rules read q, k, v shapes.
    A model older than opset 18 is converted up to it first (onnx's version converter), as the
    functions need, and its model-local functions are inlined (but those of earlier rewrites),
    so attention inside them is found. The result is checked with
    `onnx.checker.check_model(full_check=True)`; `dst` is written only once it passes (a file
    onnx.checker refuses as `src` raises UnsupportedInputError, and nothing is written).
    """
    get_method(method).parse_options(options)
    if method not in METHOD_SPECS:
        raise ValueError(
            f"method {method!r} has no ONNX function; ONNX rewriting supports "
            f"{', '.join(sorted(METHOD_SPECS))}"
        )
    check_input(src)
    loaded = _inline_local_functions(_at_least_min_opset(onnx.load(str(src))))  # external data too
    model = ir.from_proto(_with_inferred_shapes(loaded))
    _check_onnx_policy(policy)
    report = Report(method=method)
    specs: dict[str, FunctionSpec] = {}
    judged: set[ir.Node] = set()
    masks = _ShapeOnlyMasks(dict(model.opset_imports))
    rules = [
        kind(method, options, report, specs, judged, policy, masks)
        for kind in (SoftmaxAttention, AttentionOp)
    ]
    pattern.RewriteRuleSet([_rule(rule) for rule in rules]).apply_to_model(model)
    RemoveUnusedNodesPass()(model)  # the scale constants of replaced sites
    _report_untaken(model, report, judged)
    proto = ir.to_proto(model)
    _add_functions(proto, specs.values())
    with staged(dst) as written:
        onnx.save(proto, str(written))
        check_output(written)
    return report


def _inline_local_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its local functions inlined, as onnxruntime inlines them, except this
    package's own (an earlier rewrite's methods): inside a function, attention has no shapes to
    check, and would be passed over."""
    if all(function.domain == DOMAIN for function in model.functions):
        return model
    ours = [(f.domain, f.name) for f in model.functions if f.domain == DOMAIN]
    return onnx.inliner.inline_selected_functions(model, ours, exclude=True)


def _at_least_min_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model, converted up to MIN_OPSET when it imports an older standard opset (its
    functions' imports must agree with it); the conversion keeps what the model computes."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset >= MIN_OPSET:
        return model
    try:
        return version_converter.convert_version(model, MIN_OPSET)
    except Exception as error:
        raise UnsupportedInputError(
            f"the model imports opset {opset}, older than {MIN_OPSET}, the lowest the methods' "
            f"functions are built at, and onnx's version converter could not upgrade it "
            f"({error}); export the model at opset {MIN_OPSET} or later"
        ) from error


#: onnxruntime's fused attention ops (its transformer optimizer writes them), whose inputs are
#: packed projections and caches, not a Q, K, V a method could take.
_FUSED_ATTENTION_OPS = {
    "Attention",
    "DecoderMaskedMultiHeadAttention",
    "GroupQueryAttention",
    "MultiHeadAttention",
    "PackedAttention",
    "PackedMultiHeadAttention",
    "SparseAttention",
}


def _site_at(node: ir.Node, spelling: str, **fields: Any) -> AttentionSite:
    """A site at `node` (the op whose output is attention's), named by its module path."""
    path = _module_path(node)
    return AttentionSite(
        name=path or node.name or node.outputs[0].name or "attention",
        node=node.outputs[0].name or "",
        layer=layer_index(path),
        spelling=spelling,
        **fields,
    )


def _module_path(node: ir.Node) -> str:
    """The module path an exporter recorded for `node`: torch.onnx's name scopes (the innermost
    module's path, before the op's own name), or a TorchScript-style node name /a/b.0/Op;
    "" when there is neither."""
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if scopes:
        try:
            names = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            names = []
        return names[-2] if len(names) >= 2 and isinstance(names[-2], str) else ""
    if node.name and node.name.startswith("/"):
        return ".".join(node.name.strip("/").split("/")[:-1])
    return ""


def _check_onnx_policy(policy: Policy | None) -> None:
    """A policy ONNX rewriting can honor: a site → reason callable, without measurements."""
    if policy is None:
        return
    if hasattr(policy, "plan"):
        raise OptionError(
            "ErrorBudget measures a PyTorch model: rewrite the model with it, then export the "
            "result (attnrewrite.onnx.export_onnx); ONNX rewriting takes a Select-like policy"
        )


def _refuse_site_options(policy: Policy | None, site: AttentionSite) -> None:
    """Per-site options (`site_options`, heads among them) change the op a site calls, which
    the ONNX functions are not built for: raise with the fix."""
    chosen = getattr(policy, "site_options", lambda _: {})(site)
    if "heads" in chosen:
        raise OptionError(
            "per-head replacement needs the PyTorch model: rewrite it with Select(heads=...), "
            "then export the result (attnrewrite.onnx.export_onnx)"
        )
    if chosen:
        raise OptionError(
            f"per-site options {chosen} need the PyTorch model: rewrite it with the policy, then "
            "export the result (attnrewrite.onnx.export_onnx)"
        )


def _untaken_site(node: ir.Node) -> AttentionSite | None:
    """The kept site of an attention op no rule took, or None for another op."""
    site = _site_at(node, "onnx")
    if node.domain == "" and node.op_type == "Attention":
        found = _AttentionNode.of(node)
        site = found.site
        site.keep(found.reason or "not rewritten: the Attention rule did not match it")
    elif node.domain == "" and node.op_type == "Softmax":
        site.keep(
            "not rewritten: no attention pattern around this Softmax (scores from "
            "MatMul(Q, Kᵀ), softmax over the last axis, only user a MatMul with V)"
        )
    elif node.domain == "com.microsoft" and node.op_type in _FUSED_ATTENTION_OPS:
        site.spelling = f"ort_{node.op_type}"
        site.keep(
            f"onnxruntime's fused com.microsoft.{node.op_type}: rewrite the model before "
            "onnxruntime's transformer optimizer fuses its attention (or export it again)"
        )
    else:
        return None
    return site


def _report_untaken(model: ir.Model, report: Report, judged: set[ir.Node]) -> None:
    """Report as kept every attention op that no rule matched (a rule reports what it judged),
    so that nothing is passed over silently."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):  # If/Loop/Scan bodies too
        site = None if node in judged else _untaken_site(node)
        if site is not None and node.graph is not model.graph:
            site.keep(
                f"not rewritten: inside the body {node.graph.name!r} of a control-flow node "
                "(If, Loop, Scan), which the rules do not enter"
            )
        if site is not None:
            report.sites.append(site)


def _rule(instance: _MethodFunctionRule) -> pattern.RewriteRule:
    return pattern.RewriteRule(
        instance.pattern, instance.rewrite, instance.check, name=instance.name
    )


__all__ = ["AttentionOp", "SoftmaxAttention", "rewrite_onnx"]
