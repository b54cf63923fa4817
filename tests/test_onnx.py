"""ONNX for deployment: torch → ONNX export with each method as a local function, ONNX → ONNX
rewriting of plain exported models, dynamic shapes, and look-alikes kept."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import load_minilm
from hf_zoo import ZOO

import attnrewrite
from attnrewrite.errors import OptionError
from attnrewrite.methods.monarch import monarch_attention_op
from attnrewrite.onnx import DOMAIN, export_onnx, rewrite_onnx
from attnrewrite.onnx.lowerings import monarch_spec

pytestmark = pytest.mark.slow
STANDARD_DOMAINS = {"", "ai.onnx", DOMAIN}


def run(path, feed):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in feed.items()})


def domains_outside_functions(path) -> set[str]:
    return {node.domain for node in onnx.load(str(path)).graph.node}


@pytest.fixture(scope="module")
def minilm(minilm_path):
    return load_minilm(minilm_path, "eager")


def op_types(nodes) -> set[str]:
    """The op types of `nodes` and of the If/Loop/Scan branches inside them."""
    found = set()
    for node in nodes:
        found.add(node.op_type)
        for attribute in node.attribute:
            for graph in [attribute.g] if attribute.HasField("g") else attribute.graphs:
                found |= op_types(graph.node)
    return found


def test_minilm_monarch_export_with_dynamic_batch_and_length(minilm, minilm_batch, tmp_path):
    ids, mask = minilm_batch
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=512)
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: seq})
    path = tmp_path / "minilm_monarch.onnx"
    out = export_onnx(
        minilm, (ids, mask), path, method="monarch", block_size=8, dynamic_shapes=dynamic
    )
    assert out.max_error <= 1e-4
    assert len(out.report.replaced) == 6
    model = onnx.load(str(path))
    # one function for the six sites; its pieces (the mask checks' If branches) carry its name
    names = [f.name for f in model.functions if f.domain == DOMAIN]
    assert len(out.functions) == 1 and out.functions[0] in names
    assert all(name.startswith(out.functions[0]) for name in names)
    assert sum(n.domain == DOMAIN for n in model.graph.node) == 6
    assert domains_outside_functions(path) <= STANDARD_DOMAINS
    # the op's own stages (batched MatMuls), not the reference's einsums over L and R
    ops = {op for function in model.functions for op in op_types(function.node)}
    assert "MatMul" in ops and "Einsum" not in ops
    for b, n in ((1, 17), (3, 40)):  # one file, other batch sizes and lengths
        ids_n = torch.randint(1000, 2000, (b, n))
        mask_n = torch.ones(b, n, dtype=torch.long)
        mask_n[-1, n // 2 :] = 0
        got = run(path, {"input_ids": ids_n, "attention_mask": mask_n})[0]
        expected = attnrewrite.rewrite(minilm, (ids_n, mask_n), method="monarch", block_size=8)
        with torch.no_grad():
            reference = expected.module(ids_n, mask_n).last_hidden_state.numpy()
        np.testing.assert_allclose(got, reference, atol=1e-4)


def test_sdpa_export_of_a_causal_decoder(tmp_path):
    entry = next(e for e in ZOO if e.name == "gpt2")
    model, inputs = entry.build("eager"), entry.inputs()
    causal = {k: v for k, v in inputs.items() if k != "attention_mask"}  # is_causal sites
    # An earlier rewrite is exported as it is, with its report; its "auto" block size is
    # resolved in a copy, so the caller's module still picks it per length.
    rewritten = attnrewrite.rewrite(model, (), example_kwargs=causal, method="monarch")
    with pytest.raises(OptionError, match="already rewritten"):
        export_onnx(rewritten, (), tmp_path / "x.onnx", method="monarch", example_kwargs=causal)
    with pytest.raises(OptionError, match="needs method"):
        export_onnx(model, (), tmp_path / "x.onnx", example_kwargs=causal)
    out = export_onnx(rewritten, (), tmp_path / "gpt2_causal.onnx", example_kwargs=causal)
    # a copy of its report (the block sizes the functions are fixed at; static here: the same)
    assert out.max_error <= 1e-4 and out.report == rewritten.report
    assert out.report is not rewritten.report
    assert len(out.report.replaced) == entry.causal_layers
    monarch = torch.ops.attnrewrite.monarch_attention.default
    calls = [n for n in rewritten.module.graph.nodes if n.target is monarch]
    assert calls and all(n.kwargs.get("block_size") is None for n in calls)
    out = export_onnx(model, (), tmp_path / "gpt2_sdpa.onnx", method="sdpa", example_kwargs=inputs)
    assert out.max_error <= 1e-4
    assert domains_outside_functions(out.path) <= STANDARD_DOMAINS


def test_monarch_export_of_a_decoder_with_causal_padding_masks(tmp_path):
    """Causal + padding masks (B, 1, N, N) run causal Monarch in onnxruntime as in PyTorch, at
    other batch sizes, lengths and padding sides than the example's."""
    entry = next(e for e in ZOO if e.name == "gpt2")
    model, inputs = entry.build("sdpa"), entry.inputs()
    batch, seq = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("seq", min=2, max=64)
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    path = tmp_path / "gpt2_monarch.onnx"
    out = export_onnx(
        model,
        (),
        path,
        method="monarch",
        block_size=4,
        example_kwargs=inputs,
        dynamic_shapes={**dynamic, "use_cache": None},
    )
    assert out.max_error <= 1e-4
    assert [(s.status, s.mask) for s in out.report.sites] == [("replaced", "causal_key")] * 2
    assert domains_outside_functions(path) <= STANDARD_DOMAINS
    for b, n, left in ((1, 9, False), (3, 21, True)):
        ids = torch.randint(3, 99, (b, n))
        mask = torch.ones(b, n, dtype=torch.long)
        mask[-1, n // 2 :] = 0
        mask = mask.flip(-1) if left else mask
        got = run(path, {"input_ids": ids, "attention_mask": mask})[0]
        kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
        res = attnrewrite.rewrite(model, (), example_kwargs=kwargs, method="monarch", block_size=4)
        with torch.no_grad():
            expected = res.module(**kwargs)[0].numpy()
        np.testing.assert_allclose(got, expected, atol=1e-4)


def test_onnx_to_onnx_rewrite_matches_the_torch_rewrite(minilm, minilm_batch, tmp_path):
    ids, mask = minilm_batch
    plain = tmp_path / "plain.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(minilm, (ids, mask), plain, dynamo=True, verbose=False)
    rewritten = tmp_path / "rewritten.onnx"
    report = rewrite_onnx(plain, rewritten, method="monarch", block_size=8)
    assert [s.status for s in report.sites] == ["replaced"] * 6
    got = run(rewritten, {"input_ids": ids, "attention_mask": mask})[0]
    torch_rewrite = attnrewrite.rewrite(minilm, (ids, mask), method="monarch", block_size=8)
    with torch.no_grad():
        expected = torch_rewrite.module(ids, mask).last_hidden_state.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert domains_outside_functions(rewritten) <= STANDARD_DOMAINS


class LookAlike(torch.nn.Module):
    """Softmax over the query axis: not attention, must be kept."""

    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.3, dim=-2) @ v


def test_onnx_look_alike_is_kept(tmp_path):
    q = torch.randn(1, 2, 8, 4)
    plain = tmp_path / "look_alike.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(LookAlike(), (q, q, q), plain, dynamo=True, verbose=False)
    out = tmp_path / "out.onnx"
    report = rewrite_onnx(plain, out, method="monarch", block_size=4)
    assert [s.status for s in report.sites] == ["kept"]
    assert "no attention pattern" in report.sites[0].reason
    feed = {"q": q, "k": q, "v": q}
    np.testing.assert_array_equal(run(out, feed)[0], run(plain, feed)[0])


class ThreeDimensionalKeys(torch.nn.Module):
    """Kᵀ through a 3-D round trip: Reshape, Transpose(0, 2, 1), Reshape. Per head when k is
    (B, H, S, d) (attention); across heads and tokens when k is (B, S, H, d) and H = S
    (a look-alike whose shapes agree)."""

    def __init__(self, per_head: bool):
        super().__init__()
        self.per_head = per_head

    def forward(self, q, k, v):
        b, h, s, d = q.shape
        if self.per_head:
            keys_t = k.reshape(b * h, s, d).transpose(1, 2).reshape(b, h, d, s)
        else:
            keys_t = k.reshape(b, s, h * d).transpose(1, 2).reshape(b, h, d, s)
        return torch.softmax(q @ keys_t * d**-0.5, -1) @ v


@pytest.mark.parametrize("per_head", [True, False])
def test_onnx_keys_transposed_through_3d_reshapes(per_head, tmp_path):
    q, k, v = (torch.randn(2, 4, 4, 8) for _ in range(3))
    plain = tmp_path / "keys.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ThreeDimensionalKeys(per_head), (q, k, v), plain, dynamo=True)
    out = tmp_path / "out.onnx"
    report = rewrite_onnx(plain, out, method="monarch", block_size=4)  # b = N: exact
    assert [s.status for s in report.sites] == ["replaced" if per_head else "kept"]
    got = run(out, {"q": q, "k": k, "v": v})[0]
    np.testing.assert_allclose(got, ThreeDimensionalKeys(per_head)(q, k, v), atol=1e-5)


class SelfAttentionBlock(torch.nn.Module):
    """A BERT-style block: heads split from one projection, Hugging Face's additive mask."""

    def __init__(self, width: int = 16, heads: int = 2):
        super().__init__()
        self.heads, self.project = heads, torch.nn.Linear(width, 3 * width)
        self.scale = (width // heads) ** -0.5

    def forward(self, x, keep):
        b, n, width = x.shape
        q, k, v = self.project(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        mask = (1.0 - keep[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        scores = q @ k.transpose(-2, -1) * self.scale + mask
        return (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(b, n, width)


def block_inputs(batch: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    keep = torch.ones(batch, n, dtype=torch.long)
    keep[-1, n - n // 3 :] = 0
    return torch.randn(batch, n, 16), keep


def test_onnx_to_onnx_rewrite_of_a_torchscript_export(tmp_path):
    """The TorchScript exporter (dynamo=False) records no intermediate shapes: rewrite_onnx
    infers them, finds the site, and the result follows other shapes like the torch rewrite."""
    model, plain = SelfAttentionBlock().eval(), tmp_path / "legacy.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, block_inputs(2, 24), plain, dynamo=False, input_names=["x", "keep"],
            dynamic_axes={"x": {0: "batch", 1: "n"}, "keep": {0: "batch", 1: "n"}},
        )  # fmt: skip
    out = tmp_path / "out.onnx"
    assert [s.status for s in rewrite_onnx(plain, out, method="monarch", block_size=4).sites] == [
        "replaced"
    ]
    for batch, n in ((1, 7), (3, 33)):
        x, keep = block_inputs(batch, n)
        torch_rewrite = attnrewrite.rewrite(model, (x, keep), method="monarch", block_size=4)
        with torch.no_grad():
            expected = torch_rewrite.module(x, keep)
        np.testing.assert_allclose(run(out, {"x": x, "keep": keep})[0], expected, atol=1e-5)


def test_hsa_export_with_dynamic_length(tmp_path):
    entry = next(e for e in ZOO if e.name == "bert")
    model, inputs = entry.build("eager"), entry.inputs()
    seq = torch.export.Dim("seq", min=2, max=128)
    dynamic = {"input_ids": {1: seq}, "attention_mask": {1: seq}}
    path = tmp_path / "bert_hsa.onnx"
    out = export_onnx(
        model,
        (),
        path,
        method="hsa",
        branching=(4, 2),
        example_kwargs=inputs,
        dynamic_shapes=dynamic,
    )
    assert out.max_error <= 1e-4 and len(out.report.replaced) == entry.attention_layers
    assert out.functions and out.functions[0].startswith("HierarchicalSelfAttention")
    for n in (3, 23):  # 3: fewer tokens than one (4, 2) group, where the op's tree is shallower
        feed = {
            "input_ids": torch.randint(3, 99, (2, n)),
            "attention_mask": torch.ones(2, n).long(),
        }
        expected = attnrewrite.rewrite(
            model, (), example_kwargs=feed, method="hsa", branching=(4, 2)
        )
        with torch.no_grad():
            reference = expected.module(**feed).last_hidden_state.numpy()
        np.testing.assert_allclose(run(path, feed)[0], reference, atol=1e-4)


def monarch_masks(n: int = 11) -> dict[str, torch.Tensor]:
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[1, n - 4 :] = False
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    padding = keep[:, None, None, :].expand(2, 1, n, n)
    return {
        "key row": keep[:, None, None, :],
        "padding, every row": padding,
        "causal + padding": padding & causal,
        "sliding window": causal & causal.T.tril(3).T,  # neither: exact attention
    }


@pytest.mark.filterwarnings("ignore:attnrewrite. a monarch site received a mask")
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("mask_kind", list(monarch_masks()))
def test_function_body_decides_masks_as_the_op(mask_kind, is_causal):
    """The Monarch function's body (its If branches run eagerly) takes the op's branch for
    every kind of mask."""
    mask = monarch_masks()[mask_kind]
    q, k, v = (
        torch.randn(2, 3, 11, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)
    )
    spec = monarch_spec(q, k, v, mask, 0.4, 4, 2, is_causal=is_causal)
    expected = monarch_attention_op(q, k, v, mask, 0.4, 4, 2, fallback=True, is_causal=is_causal)
    torch.testing.assert_close(spec.body(q, k, v, mask), expected)
