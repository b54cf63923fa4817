"""Causal attention stays causal on every ONNX route, for every registered method: in
`export_onnx` of a rewritten causal model and in ONNX → ONNX rewriting of a causal export
(`is_causal`, whose mask torch.onnx computes from shapes below opset 23, or a causal mask given at
run time), changing the tokens after t leaves every output at t and before as it was."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as F

from attnrewrite.methods import METHODS
from attnrewrite.onnx import export_onnx, rewrite_onnx
from attnrewrite.onnx.lowerings import METHOD_SPECS

pytestmark = pytest.mark.slow
LENGTH, WIDTH, HEADS = 80, 16, 2  # long enough for a three-level HSA tree at (16, 4)
#: every registered method exports (sdpa as standard ops, the others as functions)
EXPORT_METHODS = sorted(METHODS)
#: the registered methods ONNX → ONNX rewriting can put in place
ONNX_METHODS = sorted(name for name in METHODS if name in METHOD_SPECS)
CAUSAL_FORMS = ["is_causal", "mask input"]


class CausalSelfAttention(torch.nn.Module):
    """Self-attention, causal by `is_causal`, or by the mask it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(WIDTH, 3 * WIDTH)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, HEADS, WIDTH // HEADS)).permute(2, 0, 3, 1, 4)
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def inputs(form: str) -> tuple[torch.Tensor, ...]:
    x = torch.randn(1, LENGTH, WIDTH, generator=torch.Generator().manual_seed(0))
    if form == "is_causal":
        return (x,)
    return x, torch.ones(LENGTH, LENGTH, dtype=torch.bool).tril()


def leak(path, example: tuple[torch.Tensor, ...]) -> float:
    """The most that outputs at t and before change when every token after t changes, over
    several t, in onnxruntime."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feed = {name: x.numpy() for name, x in zip(names, example, strict=True)}
    (base,) = session.run(None, feed)
    rng = np.random.default_rng(1)
    worst = 0.0
    for t in (0, 17, 40, LENGTH - 2):
        changed = feed[names[0]].copy()
        changed[:, t + 1 :] = rng.standard_normal(changed[:, t + 1 :].shape)
        (out,) = session.run(None, {**feed, names[0]: changed})  # (B, H, N, d)
        worst = max(worst, float(np.abs(out[..., : t + 1, :] - base[..., : t + 1, :]).max()))
    return worst


@pytest.mark.parametrize("form", CAUSAL_FORMS)
@pytest.mark.parametrize("method", EXPORT_METHODS)
def test_export_onnx_of_a_causal_model_does_not_leak(method, form, tmp_path):
    example = inputs(form)
    path = tmp_path / f"{method}.onnx"
    out = export_onnx(CausalSelfAttention().eval(), example, path, method=method)
    assert len(out.report.sites) == 1
    assert leak(path, example) == 0.0


@pytest.fixture(scope="module")
def plain_exports(tmp_path_factory):
    """torch.onnx exports of the causal model: (form, opset) → path."""
    folder = tmp_path_factory.mktemp("causal")
    paths = {}
    for form, opset in (("is_causal", 18), ("mask input", 18), ("is_causal", 23)):
        path = folder / f"{form.replace(' ', '_')}_{opset}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                CausalSelfAttention().eval(),
                inputs(form),
                path,
                dynamo=True,
                opset_version=opset,
                verbose=False,
            )
        paths[form, opset] = path
    return paths


@pytest.mark.parametrize(
    ("form", "opset"), [("is_causal", 18), ("mask input", 18), ("is_causal", 23)]
)
@pytest.mark.parametrize("method", ONNX_METHODS)
def test_onnx_rewrite_of_a_causal_export_does_not_leak(
    method, form, opset, plain_exports, tmp_path
):
    path = tmp_path / f"{method}.onnx"
    report = rewrite_onnx(plain_exports[form, opset], path, method=method)
    assert len(report.sites) == 1
    assert leak(path, inputs(form)) == 0.0


def test_a_causal_mask_computed_from_shapes_is_found_causal(tmp_path):
    """As rewrite() judges it on the example inputs: the mask torch.onnx builds for a dynamic
    length (Shape → Expand → Trilu → Where) is evaluated and found causal, so HSA keeps the site
    with the reason, and Monarch's report shows the causal form's one step."""
    plain = tmp_path / "plain.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            CausalSelfAttention().eval(),
            inputs("is_causal"),
            plain,
            dynamo=True,
            opset_version=18,
            dynamic_shapes=({1: torch.export.Dim("seq", min=2, max=512)},),
            verbose=False,
        )
    (kept,) = rewrite_onnx(plain, tmp_path / "hsa.onnx", method="hsa").sites
    assert (kept.status, kept.mask) == ("kept", "causal_key")
    assert "causal attention" in kept.reason
    monarch = tmp_path / "monarch.onnx"
    (replaced,) = rewrite_onnx(plain, monarch, method="monarch", block_size=8).sites
    assert (replaced.status, replaced.mask) == ("replaced", "causal_key")
    assert replaced.options["num_steps"] == 1
    assert leak(monarch, inputs("is_causal")) == 0.0


def hand_written_model(path, window: int | None) -> None:
    """softmax(Q Kᵀ + mask) V as another exporter might write it, with a mask built from
    Shape(q, start=2, end=3): causal, or a band of `window` keys (j in (i - window, i])."""
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node
    ones = numpy_helper.from_array(np.ones(1, np.float32))
    nodes = [
        node("Shape", ["q"], ["n"], start=2, end=3),
        node("Concat", ["n", "n"], ["square"], axis=0),
        node("ConstantOfShape", ["square"], ["ones"], value=ones),
        node("Trilu", ["ones"], ["lower"], upper=0),
        node("Trilu", ["lower", "offset"], ["band"], upper=1),
        node("Equal", ["lower" if window is None else "band", "zero"], ["hidden"]),
        node("Where", ["hidden", "minus_inf", "zero"], ["mask"]),
        node("Transpose", ["k"], ["k_t"], perm=[0, 1, 3, 2]),
        node("MatMul", ["q", "k_t"], ["scores"]),
        node("Add", ["scores", "mask"], ["masked"]),
        node("Softmax", ["masked"], ["weights"], axis=-1),
        node("MatMul", ["weights", "v"], ["out"]),
    ]
    constants = {"zero": 0.0, "minus_inf": -np.inf, "offset": 1 - (window or 1)}
    graph = helper.make_graph(
        nodes,
        "attention",
        *(
            [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 2, "n", 8]) for x in names]
            for names in (("q", "k", "v"), ("out",))
        ),
        [
            numpy_helper.from_array(np.array(x, np.int64 if name == "offset" else np.float32), name)
            for name, x in constants.items()
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


@pytest.mark.parametrize(
    ("window", "mask", "reason"),
    [(None, "causal_key", "causal attention"), (4, "general", "varies between queries")],
)
def test_masks_computed_from_shapes_are_judged_as_rewrite_judges_them(
    window, mask, reason, tmp_path
):
    plain = tmp_path / "plain.onnx"
    hand_written_model(plain, window)
    (site,) = rewrite_onnx(plain, tmp_path / "hsa.onnx", method="hsa").sites
    assert (site.status, site.mask) == ("kept", mask)
    assert reason in site.reason
