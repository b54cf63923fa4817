"""ONNX opsets: the standard `Attention` op (opset 23+, which torch.onnx emits for SDPA from
opset 23) rewritten where it is plain attention and checked against the PyTorch op, every other
form kept with its reason and left as it was; functions exported at the model's opset; models
older than opset 18 upgraded."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

import attnrewrite
from attnrewrite.cli import EXIT_OK, main
from attnrewrite.errors import OptionError
from attnrewrite.methods.monarch import monarch_attention_op
from attnrewrite.onnx import DOMAIN, export_onnx, rewrite_onnx

pytestmark = pytest.mark.slow
OPSET = 23


def run(path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


class SelfAndCross(torch.nn.Module):
    """A causal self-attention with grouped heads, then a cross-attention over a memory."""

    def forward(self, q, k, v, memory):
        x = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return F.scaled_dot_product_attention(x, memory, memory, scale=0.3)


def self_and_cross_inputs() -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    shapes = ((2, 4, 11, 8), (2, 2, 11, 8), (2, 2, 11, 8), (2, 4, 5, 8))
    return tuple(torch.randn(s, generator=generator) for s in shapes)


def test_torch_exported_attention_ops_are_rewritten_as_in_pytorch(tmp_path):
    model, inputs = SelfAndCross(), self_and_cross_inputs()
    plain, rewritten = tmp_path / "plain.onnx", tmp_path / "monarch.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, plain, dynamo=True, opset_version=OPSET, verbose=False)
    assert [n.op_type for n in onnx.load(str(plain)).graph.node] == ["Attention"] * 2
    report = rewrite_onnx(plain, rewritten, method="monarch", block_size=4)
    assert [(s.status, s.mask) for s in report.sites] == [("replaced", "causal"), ("kept", "none")]
    assert report.sites[0].enable_gqa and "cross-attention" in report.sites[1].reason
    expected = attnrewrite.rewrite(model, inputs, method="monarch", block_size=4)
    assert [s.status for s in expected.report.sites] == ["replaced", "kept"]
    feed = {name: x.numpy() for name, x in zip(("q", "k", "v", "memory"), inputs, strict=True)}
    with torch.no_grad():
        np.testing.assert_allclose(run(rewritten, feed)[0], expected.module(*inputs), atol=1e-5)


def test_export_onnx_at_opset_23_keeps_sites_as_attention_ops(tmp_path):
    path = tmp_path / "model.onnx"
    out = export_onnx(
        SelfAndCross(), self_and_cross_inputs(), path, method="monarch", block_size=4, opset=OPSET
    )
    assert out.max_error <= 1e-5
    model = onnx.load(str(path))
    assert [n.op_type for n in model.graph.node if n.domain == ""] == ["Attention"]
    assert {(o.domain, o.version) for o in model.opset_import if o.domain == ""} == {("", OPSET)}
    assert all(o.version == OPSET for f in model.functions for o in f.opset_import if not o.domain)


def attention_model(
    inputs: dict[str, np.ndarray], outputs: int = 1, **attributes
) -> onnx.ModelProto:
    """One Attention node over graph inputs named as its formal inputs ("" leaves one out)."""
    formal = ("q", "k", "v", "mask", "past_key", "past_value")
    used = [name for name in formal if name in inputs]
    last = max(formal.index(name) for name in used)
    node_inputs = [name if name in inputs else "" for name in formal[: last + 1]]
    output_names = ["y", "present_key", "present_value", "qk"][:outputs]
    node = helper.make_node("Attention", node_inputs, output_names, **attributes)
    declared = [
        helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(x.dtype), x.shape)
        for name, x in inputs.items()
    ]
    rank = inputs["q"].ndim
    results = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, [f"{n}{i}" for i in range(rank)])
        for n in output_names
    ]
    graph = helper.make_graph([node], "attention", declared, results)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def test_three_dimensional_attention_op_with_a_key_mask(tmp_path):
    """(B, S, H·d) inputs with q_num_heads/kv_num_heads and a bool key-padding mask."""
    generator = torch.Generator().manual_seed(1)
    batch, n, heads, d = 2, 10, 3, 4
    q, k, v = (torch.randn(batch, n, heads * d, generator=generator) for _ in range(3))
    mask = torch.ones(batch, 1, 1, n, dtype=torch.bool)
    mask[1, ..., 7:] = False
    feed = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "mask": mask.numpy()}
    plain, rewritten = tmp_path / "plain.onnx", tmp_path / "monarch.onnx"
    onnx.save(attention_model(feed, q_num_heads=heads, kv_num_heads=heads, scale=0.4), plain)
    report = rewrite_onnx(plain, rewritten, method="monarch", block_size=4, num_steps=1)
    assert [(s.status, s.mask, s.q_shape) for s in report.sites] == [
        ("replaced", "key", (batch, heads, n, d))
    ]

    def heads_first(x):
        return x.view(batch, n, heads, d).transpose(1, 2)

    expected = monarch_attention_op(heads_first(q), heads_first(k), heads_first(v), mask, 0.4, 4, 1)
    expected = expected.transpose(1, 2).reshape(batch, n, heads * d)
    np.testing.assert_allclose(run(rewritten, feed)[0], expected, atol=1e-5)


def _feed(q_len: int = 6, k_len: int = 6, **extra: tuple[int, ...]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feed = {
        "q": rng.standard_normal((1, 2, q_len, 4), dtype=np.float32),
        "k": rng.standard_normal((1, 2, k_len, 4), dtype=np.float32),
        "v": rng.standard_normal((1, 2, k_len, 4), dtype=np.float32),
    }
    feed.update({name: rng.standard_normal(s, dtype=np.float32) for name, s in extra.items()})
    return feed


KEPT = {
    "kv cache": (_feed(past_key=(1, 2, 3, 4), past_value=(1, 2, 3, 4)), 3, {}, "KV cache"),
    "softcap": (_feed(), 1, {"softcap": 30.0}, "softcap=30.0"),
    "qk output used": (_feed(), 4, {"qk_matmul_output_mode": 0}, "outputs besides Y"),
    "cross-attention": (_feed(k_len=9), 1, {}, "cross-attention"),
    "short mask": (_feed(k_len=6, mask=(1, 1, 6, 4)), 1, {}, "mask's key length"),
}


@pytest.mark.parametrize("case", KEPT)
def test_attention_op_forms_the_methods_cannot_honor_are_kept(case, tmp_path):
    feed, outputs, attributes, reason = KEPT[case]
    plain, rewritten = tmp_path / "plain.onnx", tmp_path / "out.onnx"
    onnx.save(attention_model(feed, outputs, **attributes), plain)
    report = rewrite_onnx(plain, rewritten, method="hsa", branching=(2,))
    assert [(s.status, s.spelling) for s in report.sites] == [("kept", "onnx_attention")]
    assert reason in report.sites[0].reason
    model = onnx.load(str(rewritten))
    assert [n.op_type for n in model.graph.node] == ["Attention"]
    assert not model.functions and DOMAIN not in {f.domain for f in model.functions}


def test_a_model_older_than_opset_18_is_upgraded(tmp_path):
    """softmax(0.5·q·kᵀ)·v spelled out at opset 14: its functions need 18, so it is converted."""
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Mul", ["scores", "half"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["y"]),
    ]
    shape = [1, 2, 9, 4]
    graph = helper.make_graph(
        nodes,
        "attention",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "qkv"],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])],
    )
    plain, rewritten = tmp_path / "plain.onnx", tmp_path / "monarch.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), plain)
    report = rewrite_onnx(plain, rewritten, method="monarch", block_size=4)
    assert [s.status for s in report.sites] == ["replaced"]
    model = onnx.load(str(rewritten))
    assert {o.version for o in model.opset_import if o.domain == ""} == {18}
    q, k, v = (torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i in range(3))
    expected = monarch_attention_op(q, k, v, None, 0.5, 4)
    feed = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()}
    np.testing.assert_allclose(run(rewritten, feed)[0], expected, atol=1e-5)


def test_export_onnx_refuses_an_opset_older_than_18(tmp_path):
    with pytest.raises(OptionError, match="opset must be at least 18"):
        export_onnx(SelfAndCross(), self_and_cross_inputs(), tmp_path / "m.onnx", method="hsa",
                    opset=17)  # fmt: skip


def test_onnxruntime_fused_attention_is_reported_as_kept(tmp_path):
    """A model after onnxruntime's transformer optimizer: its com.microsoft attention is kept
    and reported, with the fix, never passed over silently."""
    node = helper.make_node(
        "MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft", num_heads=2
    )
    shape = [1, 6, 8]
    graph = helper.make_graph(
        [node],
        "fused",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "qkv"],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )
    imports = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
    plain, out = tmp_path / "fused.onnx", tmp_path / "out.onnx"
    onnx.save(helper.make_model(graph, opset_imports=imports), plain)
    report = rewrite_onnx(plain, out, method="monarch", block_size=4)
    assert [(s.status, s.spelling) for s in report.sites] == [("kept", "ort_MultiHeadAttention")]
    assert "before onnxruntime's transformer optimizer" in report.sites[0].reason
    rng = np.random.default_rng(0)
    feed = {n: rng.standard_normal(shape, dtype=np.float32) for n in "qkv"}
    np.testing.assert_array_equal(run(out, feed)[0], run(plain, feed)[0])


def _softmax_attention_nodes(q: str, k: str, v: str, out: str) -> list[onnx.NodeProto]:
    """softmax(q·kᵀ / 4)·v, spelled as exporters write it."""
    return [
        helper.make_node("Transpose", [k], [f"{out}_kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", [q, f"{out}_kt"], [f"{out}_s"]),
        helper.make_node("Constant", [], [f"{out}_c"], value=helper.make_tensor("c", 1, [], [4.0])),
        helper.make_node("Div", [f"{out}_s", f"{out}_c"], [f"{out}_sd"]),
        helper.make_node("Softmax", [f"{out}_sd"], [f"{out}_p"], axis=-1),
        helper.make_node("MatMul", [f"{out}_p", v], [out]),
    ]


SHAPE = [1, 2, 64, 16]


def _model(nodes, functions=(), inputs="qkv") -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT if n != "c" else TensorProto.BOOL,
                                       SHAPE if n != "c" else []) for n in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, SHAPE)],
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("local", 1)]
    return helper.make_model(graph, opset_imports=opsets, functions=list(functions))


def test_attention_inside_a_model_local_function_is_found(tmp_path):
    """Local functions are inlined first (there, attention has no shapes to check): before,
    the site was passed over with no report at all. An earlier rewrite's own functions stay."""
    function = helper.make_function(
        "local", "Attend", ["q", "k", "v"], ["y"], _softmax_attention_nodes("q", "k", "v", "y"),
        [helper.make_opsetid("", 18)],
    )  # fmt: skip
    call = helper.make_node("Attend", ["q", "k", "v"], ["y"], domain="local")
    plain, out, again = tmp_path / "plain.onnx", tmp_path / "out.onnx", tmp_path / "again.onnx"
    onnx.save(_model([call], [function]), plain)
    report = rewrite_onnx(plain, out, method="monarch", block_size=8)
    assert [s.status for s in report.sites] == ["replaced"]
    feed = {
        n: np.random.default_rng(i).standard_normal(SHAPE, np.float32) for i, n in enumerate("qkv")
    }
    q, k, v = (torch.from_numpy(feed[n]) for n in "qkv")
    expected = monarch_attention_op(q, k, v, None, 0.25, 8, 2)
    np.testing.assert_allclose(run(out, feed)[0], expected.numpy(), atol=1e-5)
    assert rewrite_onnx(out, again, method="monarch", block_size=8).sites == []
    assert [f.domain for f in onnx.load(again).functions] == [DOMAIN]
    np.testing.assert_allclose(run(again, feed)[0], expected.numpy(), atol=1e-5)


def test_attention_inside_a_subgraph_is_reported(tmp_path):
    """An If branch's attention is kept, with the reason, never passed over silently."""
    branch = helper.make_graph(
        _softmax_attention_nodes("q", "k", "v", "inner"), "then", [],
        [helper.make_tensor_value_info("inner", TensorProto.FLOAT, SHAPE)],
    )  # fmt: skip
    other = helper.make_graph(
        [helper.make_node("Identity", ["v"], ["other"])], "else", [],
        [helper.make_tensor_value_info("other", TensorProto.FLOAT, SHAPE)],
    )  # fmt: skip
    branching = helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other)
    plain, out = tmp_path / "plain.onnx", tmp_path / "out.onnx"
    onnx.save(_model([branching], inputs="qkvc"), plain)
    report = rewrite_onnx(plain, out, method="monarch", block_size=8)
    (site,) = report.sites
    assert site.status == "kept" and "control-flow node" in site.reason


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        return x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class Stack(torch.nn.Module):
    """Two attention layers, as exported models name them (layers.0, layers.1)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(Block(), Block())

    def forward(self, x):
        return self.layers(x)


def test_sites_are_named_by_module_path_and_a_policy_chooses_among_them(tmp_path):
    torch.manual_seed(0)
    model, inputs = Stack().eval(), (torch.randn(2, 16, 16),)
    plain, out = tmp_path / "plain.onnx", tmp_path / "out.onnx"
    export_onnx(model, inputs, plain, method="sdpa")
    report = rewrite_onnx(
        plain, out, method="monarch", block_size=4, policy=attnrewrite.Select(layers=[1])
    )
    assert [(s.name, s.layer, s.status) for s in report.sites] == [
        ("layers.0", 0, "kept"),
        ("layers.1", 1, "replaced"),
    ]
    assert report.sites[0].reason.startswith("policy: layer 0")
    expected = attnrewrite.rewrite(
        model, inputs, method="monarch", block_size=4, policy=attnrewrite.Select(layers=[1])
    )
    with torch.no_grad():
        want = expected.module(*inputs).numpy()
    np.testing.assert_allclose(run(out, {"x": inputs[0].numpy()})[0], want, atol=1e-5)


def test_onnx_rewriting_refuses_policies_that_need_the_pytorch_model(tmp_path):
    plain = tmp_path / "plain.onnx"
    export_onnx(Stack().eval(), (torch.randn(1, 8, 16),), plain, method="sdpa")
    for policy, message in (
        (attnrewrite.ErrorBudget(0.1), "ErrorBudget measures a PyTorch model"),
        (attnrewrite.Select(heads=[0]), "per-head replacement needs the PyTorch model"),
    ):
        with pytest.raises(OptionError, match=message):
            rewrite_onnx(plain, tmp_path / "out.onnx", method="monarch", policy=policy)


def spelled_out_attention(path, k_len: int, name: str = "") -> None:
    """softmax(q·kᵀ)·v in four nodes, the last one named `name`, saved to `path`."""
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["y"], name=name),
    ]
    shapes = {"q": [1, 2, 9, 4], "k": [1, 2, k_len, 4], "v": [1, 2, k_len, 4]}
    graph = helper.make_graph(
        nodes,
        "attention",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in shapes.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 9, 4])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


def test_a_softmax_site_the_method_keeps_is_reported_once_with_its_reason(tmp_path):
    """Cross-attention spelled out: one kept site, not a second 'no attention pattern' entry."""
    spelled_out_attention(tmp_path / "plain.onnx", k_len=7)
    report = rewrite_onnx(tmp_path / "plain.onnx", tmp_path / "out.onnx", method="monarch")
    (site,) = report.sites
    assert site.status == "kept" and "cross-attention" in site.reason


def test_torchscript_style_node_names_give_the_module_path(tmp_path):
    name = "/encoder/layer.3/attention/self/MatMul_1"
    spelled_out_attention(tmp_path / "plain.onnx", k_len=9, name=name)
    report = rewrite_onnx(tmp_path / "plain.onnx", tmp_path / "out.onnx", method="monarch")
    (site,) = report.sites
    assert (site.name, site.layer, site.status) == ("encoder.layer.3.attention.self", 3, "replaced")


def test_the_command_line_selects_layers(tmp_path):
    plain, out, report = tmp_path / "plain.onnx", tmp_path / "out.onnx", tmp_path / "report.json"
    export_onnx(Stack().eval(), (torch.randn(1, 8, 16),), plain, method="sdpa")
    argv = ["onnx", str(plain), str(out), "--block-size", "4", "--layers", "0", "--json"]
    assert main([*argv, str(report)]) == EXIT_OK
    sites = json.loads(report.read_text())["sites"]
    assert [(s["name"], s["status"]) for s in sites] == [
        ("layers.0", "replaced"),
        ("layers.1", "kept"),
    ]
