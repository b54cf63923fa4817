"""Precision: each method in fp32, bf16 and fp16 on the CPU, under autocast, no_grad and
inference_mode.

Documented tolerances (the README's "Limits and guarantees" states the same):
- functional op, fp32 inputs: within 1e-6 · max|out| of the op computed in fp64;
- functional op, bf16/fp16 inputs: statistics are fp32, so the output is the op's fp32 result on
  the same inputs rounded once: within half an ulp (eps/2 relative) of it, element by element;
- a rewritten model cast to bf16/fp16, or run under torch.autocast: within 2 · eps · max|out| of
  the same model in fp32 (eps = 2⁻⁷ for bf16, 2⁻¹⁰ for fp16).
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import METHOD_OPTIONS, Encoder, encoder_inputs, perturb_adapters

import attnrewrite

LOW_PRECISION = (torch.bfloat16, torch.float16)


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def functional_op(method: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    """The method's functional form on (q, k, v, key mask, ZeroS logits, ZeroS gates ×2)."""
    q, k, v, mask, logits, gate_first, gate_residual = tensors
    if method == "zeros":
        keep = torch.isfinite(mask)
        return attnrewrite.zeros_attention(
            q, k, v, logits, gate_first, gate_residual, attn_mask=keep
        )
    return attnrewrite.attention(q, k, v, mask, method=method, **METHOD_OPTIONS[method])


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=dtype_id)
@pytest.mark.parametrize("method", METHOD_OPTIONS)
def test_functional_op_precision(method, dtype):
    generator = torch.Generator().manual_seed(0)
    batch, heads, n, d = 2, 2, 256, 16
    qkv = [torch.randn(batch, heads, n, d, generator=generator) for _ in range(3)]
    mask = torch.zeros(batch, 1, 1, n)
    mask[1, ..., 200:] = float("-inf")
    logits = torch.randn(batch, heads, n, generator=generator)
    gates = [torch.rand(batch, heads, n, generator=generator) for _ in range(2)]
    inputs = [x.to(dtype) for x in (*qkv, mask, logits, *gates)]
    got = functional_op(method, inputs)
    assert got.dtype == dtype
    reference_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    expected = functional_op(method, [x.to(reference_dtype) for x in inputs])
    scale = expected.abs().max().item()
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6 * scale)
    else:  # one rounding of the fp32 result (the slack covers ties decided differently)
        half_ulp = torch.finfo(dtype).eps / 2 * 1.001
        torch.testing.assert_close(got.float(), expected, rtol=half_ulp, atol=1e-6 * scale)


@pytest.fixture(scope="module")
def fp32_models() -> dict[str, tuple[Encoder, torch.nn.Module]]:
    """Per method: the original fp32 model and its rewrite (ZeroS adapters given weights)."""
    models = {}
    for method, options in METHOD_OPTIONS.items():
        torch.manual_seed(0)
        model = Encoder()
        rewritten = attnrewrite.rewrite(model, encoder_inputs(2, 64), method=method, **options)
        perturb_adapters(rewritten.module)
        models[method] = (model, rewritten.module)
    return models


@pytest.mark.parametrize("mode", ["cast", "autocast"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtype_id)
@pytest.mark.parametrize("method", METHOD_OPTIONS)
def test_rewritten_model_in_low_precision(fp32_models, method, dtype, mode):
    model, rewritten = fp32_models[method]
    x, mask = encoder_inputs(2, 64)
    with torch.no_grad():
        expected = rewritten(x, mask)
        if mode == "autocast":
            with torch.autocast("cpu", dtype=dtype):
                got = rewritten(x, mask)
        else:
            low, x_low, mask_low = copy.deepcopy(model).to(dtype), x.to(dtype), mask.to(dtype)
            options = METHOD_OPTIONS[method]
            cast = attnrewrite.rewrite(low, (x_low, mask_low), method=method, **options).module
            perturb_adapters(cast)
            got = cast(x_low, mask_low)
    assert got.dtype == dtype
    tolerance = 2 * torch.finfo(dtype).eps * expected.abs().max().item()
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("method", METHOD_OPTIONS)
def test_no_grad_and_inference_mode_match_grad_mode(fp32_models, method, context):
    _, rewritten = fp32_models[method]
    x, mask = encoder_inputs(2, 64)
    expected = rewritten(x, mask)
    assert expected.requires_grad
    with context():
        got = rewritten(x, mask)
    assert not got.requires_grad
    torch.testing.assert_close(got, expected.detach(), rtol=0, atol=0)


@pytest.mark.parametrize(("method", "options"), [("monarch", {}), ("hsa", {"branching": (16, 4)})])
def test_inference_mode_on_threaded_lengths_and_afterwards(method, options, two_threads):
    """Long enough for the Monarch CPU path's worker threads (which run in the caller's
    inference mode: tensors made under it can only be written under it) and its reused buffers
    (made outside it, since later calls write them); both orders, twice."""
    q, k, v = (torch.randn(1, 4, 2048, 32) for _ in range(3))
    expected = attnrewrite.attention(q, k, v, method=method, **options)
    for _ in range(2):
        with torch.inference_mode():
            got = attnrewrite.attention(q, k, v, method=method, **options)
        torch.testing.assert_close(got, expected)
        again = attnrewrite.attention(q, k, v, method=method, **options)
        torch.testing.assert_close(again, expected)
