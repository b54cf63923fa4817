"""ZeroS to ONNX in standard ops: the functional op and the adapters' site op become ONNX functions
whose bodies are the linear form (causal: an ONNX Scan over tokens); onnxruntime (no custom ops)
must match PyTorch at lengths and batch sizes other than the example's."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from hf_zoo import ZOO

import attnrewrite
from attnrewrite.methods.zeros import ZeroSAdapter, zeros_site_attention_op
from attnrewrite.onnx import DOMAIN, export_onnx
from attnrewrite.onnx.lowerings import _zeros_site_body, zeros_site_spec

STANDARD_DOMAINS = {"", "ai.onnx", DOMAIN}


def run(path, feed: dict[str, torch.Tensor]) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in feed.items()})[0]


def dynamic(inputs: dict) -> dict[str, dict[int, torch.export.Dim] | None]:
    """Dynamic batch and sequence length for every (B, N) tensor input; None for the others."""
    batch = torch.export.Dim("batch", min=1, max=64)
    seq = torch.export.Dim("seq", min=2, max=512)
    return {k: {0: batch, 1: seq} if isinstance(v, torch.Tensor) else None
            for k, v in inputs.items()}  # fmt: skip


class FunctionalZeroS(torch.nn.Module):
    """A user model that calls attnrewrite.zeros_attention itself (logits and gates from x)."""

    def __init__(self, is_causal: bool) -> None:
        super().__init__()
        self.is_causal = is_causal
        self.proj = torch.nn.Linear(16, 3 * 16 + 3 * 2)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h = self.proj(x)
        q, k, v = (h[..., 16 * i : 16 * (i + 1)].reshape(b, n, 2, 8).transpose(1, 2)
                   for i in range(3))  # fmt: skip
        logits, first, residual = (h[..., 48 + 2 * i : 50 + 2 * i].transpose(1, 2)
                                   for i in range(3))  # fmt: skip
        return attnrewrite.zeros_attention(
            q, k, v, 4 * logits, torch.sigmoid(first), torch.sigmoid(residual),
            is_causal=self.is_causal, attn_mask=keep,
        )  # fmt: skip


def test_functional_causal_zeros_exports_with_dynamic_batch_and_length(tmp_path):
    model = FunctionalZeroS(is_causal=True).eval()
    x, keep = torch.randn(2, 20, 16), torch.ones(2, 20, dtype=torch.bool)
    keep[1, 14:] = False
    path = tmp_path / "zeros.onnx"
    out = export_onnx(model, (x, keep), path, method="zeros",
                      dynamic_shapes=tuple(dynamic({"x": x, "keep": keep}).values()))  # fmt: skip
    assert out.max_error <= 1e-5
    assert len(out.functions) == 1 and out.functions[0].startswith("ZeroSAttention")
    graph = onnx.load(str(path))
    assert {node.domain for node in graph.graph.node} <= STANDARD_DOMAINS
    body = next(f for f in graph.functions if f.name == out.functions[0])
    assert "Scan" in {node.op_type for node in body.node}  # the O(N) recurrence, not N×N
    for b, n in ((1, 3), (3, 150)):  # one file, other batch sizes and lengths
        x, keep = torch.randn(b, n, 16), torch.rand(b, n) > 0.3
        with torch.no_grad():
            expected = model(x, keep).numpy()
        np.testing.assert_allclose(run(path, {"x": x, "keep": keep}), expected, atol=1e-5)


def random_site_inputs(n=12):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 4, generator=g) for _ in range(3))
    logits = 3 * torch.randn(2, 3, n, generator=g)
    gates = [torch.rand(2, 3, n, generator=g) for _ in range(2)]
    return q, k, v, logits, *gates


def site_masks(n=12) -> dict[str, torch.Tensor | None]:
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[1, n - 4 :] = False
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    padding = torch.zeros(2, 1, n, n).masked_fill(~keep[:, None, None, :], torch.finfo().min)
    return {
        "none": None,
        "key row": keep[:, None, None, :],
        "padding, every row": padding,
        "causal + padding": padding.masked_fill(~causal, torch.finfo().min),
        "sliding window": causal & causal.T.tril(3).T,  # neither: exact attention
    }


@pytest.mark.filterwarnings("ignore:attnrewrite. a ZeroS site received a mask")
@pytest.mark.parametrize(
    ("mask_kind", "is_causal"), [(kind, False) for kind in site_masks()] + [("none", True)]
)
def test_site_function_body_decides_masks_as_the_site_op(mask_kind, is_causal):
    """The ONNX body (run eagerly here) takes the op's branch for every kind of mask."""
    mask = site_masks()[mask_kind]
    inputs = random_site_inputs()
    expected, expected_exact = zeros_site_attention_op(*inputs, mask, is_causal, 0.4)
    body = _zeros_site_body(mask, is_causal=is_causal, scale=0.4, cross=False)
    got, exact = body(*inputs) if mask is None else body(*inputs, mask)
    torch.testing.assert_close(got, expected)
    assert bool(exact) == bool(expected_exact) == (mask_kind == "sliding window")


def test_site_lowering_rejects_arguments_it_does_not_know():
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(attnrewrite.UnsupportedInputError, match="no ONNX lowering"):
        zeros_site_spec(q, q, q, q[..., 0], q[..., 0], q[..., 0], window=3)


def bert_batches() -> list[dict[str, torch.Tensor]]:
    batches = []
    for n in (12, 20):
        g = torch.Generator().manual_seed(n)
        mask = torch.ones(2, n, dtype=torch.long)
        mask[1, n - 5 :] = 0
        batches.append({"input_ids": torch.randint(3, 99, (2, n), generator=g),
                        "attention_mask": mask})  # fmt: skip
    return batches


@pytest.mark.slow
def test_distilled_bert_exports_its_adapters_with_dynamic_batch_and_length(tmp_path):
    """rewrite with dynamic shapes → distill → export_onnx of the rewritten module: the adapters'
    trained parameters are in the file, and the padding masks take the key-padding branch."""
    entry = next(e for e in ZOO if e.name == "bert")
    model, inputs = entry.build("eager"), entry.inputs()
    shapes = dynamic(inputs)
    rewritten = attnrewrite.rewrite(model, (), example_kwargs=inputs, method="zeros",
                                    qk_rank=2, dynamic_shapes=shapes)  # fmt: skip
    attnrewrite.distill(rewritten, bert_batches(), steps=3, lr=1e-2, progress=False)
    adapters = [m for m in rewritten.module.modules() if isinstance(m, ZeroSAdapter)]
    assert len(adapters) == 2 and all(a.qk_up.abs().sum() > 0 for a in adapters)
    path = tmp_path / "bert_zeros.onnx"
    out = export_onnx(rewritten, (), path, example_kwargs=inputs, dynamic_shapes=shapes)
    assert out.max_error <= 1e-4 and out.functions[0].startswith("ZeroSSiteAttention")
    assert len(out.report.replaced) == 2
    assert sum(node.domain == DOMAIN for node in onnx.load(str(path)).graph.node) == 2
    for b, n in ((1, 5), (3, 33)):
        mask = torch.ones(b, n, dtype=torch.long)
        mask[-1, n // 2 :] = 0
        feed = {"input_ids": torch.randint(3, 99, (b, n)), "attention_mask": mask}
        with torch.no_grad():
            expected = rewritten.module(**feed).last_hidden_state.numpy()
        np.testing.assert_allclose(run(path, feed), expected, atol=1e-4)


@pytest.mark.slow
def test_causal_decoder_with_padding_exports_with_dynamic_length(tmp_path):
    """Causal + padding masks (and grouped-query attention): the function decides at run time
    that they are causal ZeroS, as the PyTorch op does. (is_causal sites without a mask run the
    same causal body as the functional op above.)"""
    entry = next(e for e in ZOO if e.name == "llama_gqa_rope")
    model, inputs = entry.build("eager"), entry.inputs()
    shapes = dynamic(inputs)
    rewritten = attnrewrite.rewrite(model, (), example_kwargs=inputs, method="zeros",
                                    dynamic_shapes=shapes)  # fmt: skip
    with torch.no_grad():  # stand-ins for distilled adapters: every parameter matters
        for adapter in rewritten.module.modules():
            if isinstance(adapter, ZeroSAdapter):
                for p in adapter.parameters():
                    p.add_(0.5 * torch.randn_like(p))
    path = tmp_path / "llama_zeros.onnx"
    out = export_onnx(rewritten, (), path, example_kwargs=inputs, dynamic_shapes=shapes)
    assert out.max_error <= 1e-4
    for n in (7, 29):
        mask = torch.ones(2, n, dtype=torch.long)
        mask[1, n - 3 :] = 0
        feed = {"input_ids": torch.randint(3, 99, (2, n)), "attention_mask": mask}
        with torch.no_grad():
            expected = rewritten.module(**feed, use_cache=False).last_hidden_state
            original = model(**feed, use_cache=False).last_hidden_state
        assert (expected - original).abs().max() > 1e-2  # ZeroS ran, not the exact fallback
        np.testing.assert_allclose(run(path, feed), expected.numpy(), atol=1e-4)
