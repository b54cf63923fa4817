"""ZeroS: the reference against the paper's formula written out per (t, i); the linear form, the
op and the Triton kernels against the reference (masks, causal, ragged tiles, overflowing logits,
fp16/bf16, gradients); the layer; the rewrite adapter; distillation.

The Triton tests need TRITON_INTERPRET=1 before the kernels are imported (CPU) or a GPU; on CPU
`test_kernels_pass_in_the_triton_interpreter` runs them in a subprocess with the variable set, so
this process and the other test modules are not affected.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import attnrewrite
from attnrewrite.distill import distill
from attnrewrite.errors import WARNED
from attnrewrite.methods.base import RUN_TIME_MASK_CHECK
from attnrewrite.methods.zeros import (
    ZeroSAdapter,
    ZeroSMethod,
    ZeroSOptions,
    force_triton_kernels,
    site_mask_terms,
    zeros_attention,
    zeros_attention_op,
    zeros_attention_reference,
    zeros_linear,
    zeros_site_attention_op,
)
from attnrewrite.methods.zeros.linear import prepare_inputs, zeros_linear_backward
from attnrewrite.nn import ZeroSAttention, apply_rope, deviation_logits

TRITON_DEVICE = (
    "cuda"
    if torch.cuda.is_available()
    else "cpu"
    if os.environ.get("TRITON_INTERPRET") == "1"
    else None
)
needs_triton = pytest.mark.skipif(
    TRITON_DEVICE is None,
    reason="run by test_kernels_pass_in_the_triton_interpreter (subprocess, TRITON_INTERPRET=1)",
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread is several times faster than two on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_inputs(*batch, n_q, n_k=None, d=8, dv=None, dtype=torch.float64, logit_scale=3.0,
                  device="cpu"):  # fmt: skip
    """q, k, v, key_logits, gate_first, gate_residual."""
    n_k = n_q if n_k is None else n_k
    dv = d if dv is None else dv

    def randn(*shape):
        return torch.randn(*shape, dtype=dtype, device=device)

    return (randn(*batch, n_q, d), randn(*batch, n_k, d), randn(*batch, n_k, dv),
            logit_scale * randn(*batch, n_k), torch.rand(*batch, n_q, dtype=dtype, device=device),
            torch.rand(*batch, n_q, dtype=dtype, device=device))  # fmt: skip


def zeros_loop(q, k, v, s, sigma_1, sigma_h, allowed):
    """Single-head ZeroS written as the paper's formula, one (t, i) pair at a time (float64).

    q (Nq, d), k (Nk, d), v (Nk, dv), s (Nk,), gates (Nq,), allowed[t][i]: key i ∈ S_t.
    """
    out = torch.zeros(q.shape[0], v.shape[1], dtype=torch.float64)
    for t in range(q.shape[0]):
        keys = [i for i in range(k.shape[0]) if allowed[t][i]]
        n = len(keys)
        if n == 0:
            continue
        s_bar = sum(float(s[i]) for i in keys) / n
        top = max(float(s[i]) for i in keys)
        z = sum(math.exp(float(s[i]) - top) for i in keys)
        q_hat = q[t] / q[t].norm()
        for i in keys:
            delta = float(s[i]) - s_bar
            epsilon = math.exp(float(s[i]) - top) / z - 1 / n - delta / n
            w = float(sigma_1[t]) * delta / n + float(sigma_h[t]) * epsilon
            out[t] += w * float(q_hat @ (k[i] / k[i].norm())) * v[i]
    return out


def key_mask(batch, n, masked):
    mask = torch.ones(*batch, n, dtype=torch.bool)
    for index in masked:
        mask[index] = False
    return mask


# The reference is the paper's formula -------------------------------------------------------------


@pytest.mark.parametrize(
    ("is_causal", "n_q", "n_k", "masked"),
    [(False, 7, 7, ()), (True, 7, 7, ()), (False, 9, 9, (0, 1, 5)), (True, 9, 9, (0, 1, 5)),
     (False, 4, 11, (3,))],
)  # fmt: skip
def test_reference_matches_the_formula_term_by_term(is_causal, n_q, n_k, masked):
    q, k, v, s, g1, gh = random_inputs(n_q=n_q, n_k=n_k, d=5, dv=3)
    mask = key_mask((), n_k, [(i,) for i in masked])
    allowed = [[bool(mask[i]) and (not is_causal or i <= t) for i in range(n_k)]
               for t in range(n_q)]  # fmt: skip
    expected = zeros_loop(q, k, v, s, g1, gh, allowed)
    got = zeros_attention_reference(q, k, v, s, g1, gh, is_causal=is_causal, key_valid=mask)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)


def test_weights_sum_to_zero_so_identical_keys_and_values_give_zero():
    q, k, v, s, g1, gh = random_inputs(2, n_q=12)
    k = k[..., :1, :].expand_as(k)  # cosθ_{t,i} is the same for every key
    v = v[..., :1, :].expand_as(v)
    for is_causal in (False, True):
        out = zeros_attention_reference(q, k, v, s, g1, gh, is_causal=is_causal)
        assert out.abs().max() < 1e-12
    # distinct keys and values do give an output
    assert zeros_attention_reference(*random_inputs(2, n_q=12)).abs().max() > 1e-3


def test_logits_are_shift_invariant_and_gates_scale_their_terms():
    q, k, v, s, g1, gh = random_inputs(1, 2, n_q=10)
    base = zeros_attention_reference(q, k, v, s, g1, gh, is_causal=True)
    shifted = zeros_attention_reference(q, k, v, s + 123.0, g1, gh, is_causal=True)
    torch.testing.assert_close(shifted, base)
    zero = torch.zeros_like(g1)
    first = zeros_attention_reference(q, k, v, s, g1, zero)
    residual = zeros_attention_reference(q, k, v, s, zero, gh)
    torch.testing.assert_close(first + residual, zeros_attention_reference(q, k, v, s, g1, gh))
    assert zeros_attention_reference(q, k, v, s, zero, zero).abs().max() == 0


# The linear form ----------------------------------------------------------------------------------


def linear(q, k, v, s, g1, gh, *, is_causal=False, key_valid=None, chunk_size=16):
    inputs = prepare_inputs(q, k, v, s, g1, gh, key_valid)
    return inputs.unflatten(zeros_linear(inputs, is_causal, chunk_size))


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 40),
    n_k_extra=st.integers(0, 9),
    chunk_size=st.sampled_from([1, 3, 8, 16, 64]),
    is_causal=st.booleans(),
    masked_fraction=st.sampled_from([0.0, 0.3, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_linear_form_matches_reference(n, n_k_extra, chunk_size, is_causal, masked_fraction, seed):
    torch.manual_seed(seed)
    n_k = n if is_causal else n + n_k_extra
    q, k, v, s, g1, gh = random_inputs(2, 2, n_q=n, n_k=n_k, d=4, dv=3)
    mask = torch.rand(2, 1, n_k) >= masked_fraction
    expected = zeros_attention_reference(q, k, v, s, g1, gh, is_causal=is_causal,
                                         key_valid=mask)  # fmt: skip
    got = linear(q, k, v, s, g1, gh, is_causal=is_causal, key_valid=mask,
                 chunk_size=chunk_size)  # fmt: skip
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-8)


def reference_grads(inputs, grad_out, *, is_causal, mask):
    """Autograd of the reference: (dq, dk, dv, d_logits, d_gate_first, d_gate_residual)."""
    leaves = [x.detach().double().requires_grad_() for x in inputs]
    out = zeros_attention_reference(*leaves, is_causal=is_causal, key_valid=mask)
    return torch.autograd.grad(out, leaves, grad_out.double())


def linear_grads(inputs, grad_out, *, is_causal, mask, chunk_size):
    flat = prepare_inputs(*inputs, mask)
    flat_grad = grad_out.reshape(-1, *grad_out.shape[-2:])
    grads = zeros_linear_backward(flat, flat_grad, is_causal, chunk_size)
    return [g.reshape(x.shape) for g, x in zip(grads, inputs, strict=True)]


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40),
    n_k_extra=st.integers(0, 9),
    chunk_size=st.sampled_from([1, 3, 8, 64]),
    is_causal=st.booleans(),
    masked_fraction=st.sampled_from([0.0, 0.3, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_linear_backward_matches_autograd_of_reference(
    n, n_k_extra, chunk_size, is_causal, masked_fraction, seed
):
    torch.manual_seed(seed)
    n_k = n if is_causal else n + n_k_extra
    inputs = random_inputs(2, 2, n_q=n, n_k=n_k, d=4, dv=3)
    mask = torch.rand(2, 1, n_k) >= masked_fraction
    grad_out = torch.randn(2, 2, n, 3, dtype=torch.float64)
    expected = reference_grads(inputs, grad_out, is_causal=is_causal, mask=mask)
    got = linear_grads(inputs, grad_out, is_causal=is_causal, mask=mask, chunk_size=chunk_size)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("is_causal", [False, True])
def test_running_max_keeps_long_sequences_with_overflowing_logits_exact(is_causal):
    """Logits that rise along the sequence up to ~1000: e^s overflows even in fp64, and the
    causal prefix max grows in every chunk, so every chunk rescales the state."""
    n = 2048
    q, k, v, _, g1, gh = random_inputs(1, 1, n_q=n, d=8)
    s = 0.5 * torch.arange(n, dtype=torch.float64) + 5 * torch.randn(n, dtype=torch.float64)
    assert torch.isinf(torch.exp(s)).any()
    expected = zeros_attention_reference(q, k, v, s, g1, gh, is_causal=is_causal)
    for dtype in (torch.float64, torch.float32):
        got = linear(*(x.to(dtype) for x in (q, k, v, s, g1, gh)), is_causal=is_causal,
                     chunk_size=64)  # fmt: skip
        assert torch.isfinite(got).all()
        tol = 1e-9 if dtype == torch.float64 else 1e-3
        torch.testing.assert_close(got.double(), expected, atol=tol * expected.abs().max(), rtol=0)


@pytest.mark.parametrize("is_causal", [False, True])
def test_backward_with_overflowing_logits_across_many_chunks(is_causal):
    n = 384  # 24 chunks of 16, the prefix max rising in every one
    q, k, v, _, g1, gh = random_inputs(1, 1, n_q=n, d=8)
    s = 1.5 * torch.arange(n, dtype=torch.float64) + 3 * torch.randn(n, dtype=torch.float64)
    inputs = (q, k, v, s, g1, gh)
    grad_out = torch.randn(1, 1, n, 8, dtype=torch.float64)
    expected = reference_grads(inputs, grad_out, is_causal=is_causal, mask=None)
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-3)):
        got = linear_grads([x.to(dtype) for x in inputs], grad_out.to(dtype),
                           is_causal=is_causal, mask=None, chunk_size=16)  # fmt: skip
        for g, e in zip(got, expected, strict=True):
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g.double(), e, atol=tol * e.abs().max(), rtol=0)


def test_queries_without_keys_give_zero_and_stay_finite():
    q, k, v, s, g1, gh = random_inputs(2, n_q=20)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[0, :7] = False  # causal queries 0..6 of sequence 0 see no key
    mask[1] = False  # no key at all
    for is_causal in (False, True):
        got = linear(q, k, v, s, g1, gh, is_causal=is_causal, key_valid=mask, chunk_size=4)
        assert torch.isfinite(got).all()
        assert (got[1] == 0).all()
        if is_causal:
            assert (got[0, :7] == 0).all()


# The op -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_op_matches_reference_in_each_dtype(is_causal, dtype):
    inputs = random_inputs(2, 3, n_q=70, d=16, dtype=dtype)
    mask = torch.rand(2, 1, 70) > 0.2
    got = zeros_attention(*inputs, is_causal=is_causal, attn_mask=mask[:, :, None, :])
    assert got.dtype == dtype and got.shape == (2, 3, 70, 16)
    expected = zeros_attention_reference(*(x.double() for x in inputs), is_causal=is_causal,
                                         key_valid=mask)  # fmt: skip
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(got.double(), expected, atol=tol * expected.abs().max(), rtol=0)


@pytest.mark.parametrize("is_causal", [False, True])
def test_op_gradients_pass_gradcheck(is_causal):
    inputs = [x.requires_grad_() for x in random_inputs(1, 2, n_q=9, d=4, dv=3)]
    mask = torch.tensor([True] * 6 + [False] + [True] * 2)
    assert torch.autograd.gradcheck(
        lambda *xs: zeros_attention(*xs, is_causal=is_causal, attn_mask=mask), inputs
    )


def test_attn_mask_is_sdpas_per_key_mask_and_key_padding_mask_is_refused():
    """attn_mask means what SDPA's does (bool, True = attend): (B, Nk), (B, 1, 1, Nk) and (Nk,)
    select the same keys; torch's key_padding_mask (True = ignore) would invert the mask without
    an error, so that keyword is refused, by the layer too, with the fix."""
    inputs = random_inputs(2, 3, n_q=6)
    keep = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    expected = zeros_attention_reference(*inputs, key_valid=keep[:, None, :])
    for mask in (keep, keep[:, None, None, :], keep[:, None, None, :].expand(2, 3, 1, 6)):
        torch.testing.assert_close(zeros_attention(*inputs, attn_mask=mask), expected)
    per_key = zeros_attention_reference(*inputs, key_valid=keep[1])
    torch.testing.assert_close(zeros_attention(*inputs, attn_mask=keep[1]), per_key)
    with pytest.raises(attnrewrite.UnsupportedInputError, match="True = ignore"):
        zeros_attention(*inputs, key_padding_mask=~keep)
    layer, x = ZeroSAttention(16, 2), torch.randn(2, 6, 16)
    torch.testing.assert_close(layer(x, attn_mask=keep)[1, :4], layer(x[:, :4])[1])
    with pytest.raises(attnrewrite.UnsupportedInputError, match="attn_mask=~key_padding_mask"):
        layer(x, key_padding_mask=~keep)


def test_custom_op_registration_passes_opcheck():
    inputs = random_inputs(2, 2, n_q=10, d=8, dtype=torch.float32)
    mask = torch.rand(2, 2, 10) > 0.3
    torch.library.opcheck(zeros_attention_op, (*inputs, True, mask))
    cross = random_inputs(1, 2, n_q=5, n_k=8, dtype=torch.float32)
    torch.library.opcheck(zeros_attention_op, (*cross, False, None))


def test_op_compiles_whole_and_exports():
    inputs = random_inputs(1, 2, n_q=12, d=8, dtype=torch.float32)

    def fn(q, k, v, s, g1, gh):
        return zeros_attention(q, k, v, s, g1, gh, is_causal=True) * 2

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*inputs), fn(*inputs))
    leaves = [x.clone().requires_grad_() for x in inputs]  # the backward is traced too
    got = torch.autograd.grad(compiled(*leaves).square().sum(), leaves)
    expected = torch.autograd.grad(fn(*leaves).square().sum(), leaves)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)

    class Wrapper(nn.Module):
        def forward(self, *xs):
            return fn(*xs)

    exported = torch.export.export(Wrapper(), inputs)
    targets = {n.target for n in exported.graph.nodes if n.op == "call_function"}
    assert torch.ops.attnrewrite.zeros_attention.default in targets
    torch.testing.assert_close(exported.module()(*inputs), fn(*inputs))


def test_gates_and_logits_broadcast_and_get_gradients_of_their_own_shape():
    q, k, v, s, _, _ = random_inputs(2, 3, n_q=6)
    gate = torch.full((1, 3, 1), 0.7, dtype=torch.float64, requires_grad=True)
    out = zeros_attention(q, k, v, s, gate, gate)
    full = gate.detach().expand(2, 3, 6)
    torch.testing.assert_close(out, zeros_attention_reference(q, k, v, s, full, full))
    out.sum().backward()
    assert gate.grad.shape == gate.shape


def test_empty_sequences_give_empty_or_zero_outputs():
    q, k, v, s, g1, gh = random_inputs(1, n_q=3, n_k=0)
    assert (zeros_attention(q, k, v, s, g1, gh) == 0).all()
    q, k, v, s, g1, gh = random_inputs(1, n_q=0, n_k=4)
    assert zeros_attention(q, k, v, s, g1, gh).shape == (1, 0, 8)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"k": torch.randn(1, 2, 5, 8, dtype=torch.float32)}, "dtypes differ"),
        ({"k": torch.randn(1, 2, 5, 7, dtype=torch.float64)}, "head dims differ"),
        ({"v": torch.randn(1, 2, 4, 8, dtype=torch.float64)}, r"must be \(\.\.\., Nk, ·\)"),
        ({"k": torch.randn(1, 1, 5, 8, dtype=torch.float64)}, "grouped-query"),
        ({"key_logits": torch.randn(1, 2, 4, dtype=torch.float64)}, "one logit per key"),
        ({"gate_first": torch.rand(3, 5, dtype=torch.float64)}, "does not broadcast"),
        ({"gate_residual": torch.ones(1, 2, 5, dtype=torch.long)}, "must be floating point"),
        ({"attn_mask": torch.ones(1, 1, 5)}, "must be bool"),
        ({"attn_mask": torch.ones(1, 3, 1, 5, dtype=torch.bool)}, "does not broadcast"),
        ({"attn_mask": torch.ones(2, 5, dtype=torch.bool)}, r"\(B, Nk\) = \(1, 5\)"),
        ({"attn_mask": torch.ones(1, 1, 5, 5, dtype=torch.bool)}, "query axis of 5"),
        ({"key_padding_mask": torch.ones(1, 5, dtype=torch.bool)}, "attn_mask=~key_padding_mask"),
        ({"q": torch.randn(1, 2, 4, 8, dtype=torch.float64), "is_causal": True}, "as many queries"),
    ],
)
def test_bad_inputs_are_errors_that_name_the_problem(change, message):
    q, k, v, s, g1, gh = random_inputs(1, 2, n_q=5)
    args = dict(q=q, k=k, v=v, key_logits=s, gate_first=g1, gate_residual=gh)
    args.update(change)
    kwargs = {name: args.pop(name) for name in ("is_causal", "attn_mask", "key_padding_mask")
              if name in args}  # fmt: skip
    with pytest.raises(attnrewrite.UnsupportedInputError, match=message):
        zeros_attention(*args.values(), **kwargs)


# The Triton kernels (interpreter on CPU, or a GPU) ------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(TRITON_DEVICE is not None, reason="the kernel tests run in this process")
def test_kernels_pass_in_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton_kernel",
         str(Path(__file__))],
        env=env, capture_output=True, text=True, timeout=900, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    assert " passed" in result.stdout and "skipped" not in result.stdout, report


def kernel_inputs(*batch, n_q, n_k=None, d, dv, dtype=torch.float32, logit_scale=3.0):
    return [x.to(TRITON_DEVICE) for x in random_inputs(
        *batch, n_q=n_q, n_k=n_k, d=d, dv=dv, dtype=dtype, logit_scale=logit_scale)]  # fmt: skip


def kernel_forward_and_grads(inputs, grad_out, *, is_causal, mask, chunk_size):
    from attnrewrite.kernels.zeros import zeros_backward, zeros_forward

    flat = prepare_inputs(*inputs, mask)
    tensors = (flat.q, flat.k, flat.v, flat.key_logits.float(), flat.gate_first.float(),
               flat.gate_residual.float(), flat.key_valid)  # fmt: skip
    out = zeros_forward(*tensors, is_causal, chunk_size=chunk_size)
    flat_grad = grad_out.reshape(-1, *grad_out.shape[-2:]).contiguous()
    grads = zeros_backward(flat_grad, *tensors, is_causal, chunk_size=chunk_size)
    return flat.unflatten(out), [g.reshape(x.shape) for g, x in zip(grads, inputs, strict=True)]


def reference_forward_and_grads(inputs, grad_out, *, is_causal, mask):
    leaves = [x.detach().cpu().double().requires_grad_() for x in inputs]
    mask = None if mask is None else mask.cpu()
    out = zeros_attention_reference(*leaves, is_causal=is_causal, key_valid=mask)
    return out, torch.autograd.grad(out, leaves, grad_out.cpu().double())


def assert_close_to_scale(got, expected, tol):
    expected = expected.detach().double()
    scale = expected.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(got.detach().cpu().double(), expected, atol=tol * scale, rtol=0)


@needs_triton
@pytest.mark.parametrize(
    ("is_causal", "n_q", "n_k", "d", "dv", "masked"),
    [
        (True, 37, 37, 8, 5, False),  # ragged last chunk, head dims below the 16-wide tile
        (True, 48, 48, 16, 20, True),
        (False, 37, 37, 8, 5, True),
        (False, 9, 40, 20, 8, False),  # cross-attention shapes, Nq ≠ Nk
    ],
)
def test_triton_kernel_forward_and_backward_match_reference(is_causal, n_q, n_k, d, dv, masked):
    inputs = kernel_inputs(1, 2, n_q=n_q, n_k=n_k, d=d, dv=dv)
    mask = None
    if masked:
        mask = (torch.rand(1, 2, n_k) > 0.3).to(TRITON_DEVICE)
        mask[0, 0, :5] = False  # a masked prefix: causal rows with no key yet
    grad_out = torch.randn(1, 2, n_q, dv).to(TRITON_DEVICE)
    out, grads = kernel_forward_and_grads(inputs, grad_out, is_causal=is_causal, mask=mask,
                                          chunk_size=16)  # fmt: skip
    ref_out, ref_grads = reference_forward_and_grads(inputs, grad_out, is_causal=is_causal,
                                                     mask=mask)  # fmt: skip
    assert_close_to_scale(out, ref_out, 1e-5)
    for got, expected in zip(grads, ref_grads, strict=True):
        assert_close_to_scale(got, expected, 1e-5)


@needs_triton
@pytest.mark.parametrize("is_causal", [False, True])
def test_triton_kernel_survives_logits_that_overflow_exp(is_causal):
    """Logits rising to ~480 along 160 tokens (10 chunks): e^s overflows fp32 from token ~30 on."""
    n = 160
    q, k, v, _, g1, gh = kernel_inputs(1, 1, n_q=n, d=16, dv=16)
    s = (3.0 * torch.arange(n) + torch.randn(n)).to(TRITON_DEVICE)
    assert torch.isinf(torch.exp(s)).any()
    inputs = [q, k, v, s[None, None], g1, gh]
    grad_out = torch.randn(1, 1, n, 16).to(TRITON_DEVICE)
    out, grads = kernel_forward_and_grads(inputs, grad_out, is_causal=is_causal, mask=None,
                                          chunk_size=16)  # fmt: skip
    ref_out, ref_grads = reference_forward_and_grads(inputs, grad_out, is_causal=is_causal,
                                                     mask=None)  # fmt: skip
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert_close_to_scale(out, ref_out, 1e-4)
    for got, expected in zip(grads, ref_grads, strict=True):
        assert_close_to_scale(got, expected, 1e-4)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_kernel_low_precision_inputs_use_fp32_inside(dtype):
    inputs = kernel_inputs(1, 2, n_q=40, d=16, dv=16, dtype=dtype)
    grad_out = torch.randn(1, 2, 40, 16, dtype=dtype).to(TRITON_DEVICE)
    out, grads = kernel_forward_and_grads(inputs, grad_out, is_causal=True, mask=None,
                                          chunk_size=16)  # fmt: skip
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads[:3])  # dq, dk, dv
    assert all(g.dtype == torch.float32 for g in grads[3:])  # logits and gates are fp32 inside
    ref_out, ref_grads = reference_forward_and_grads(inputs, grad_out, is_causal=True, mask=None)
    tol = 2e-3 if dtype == torch.float16 else 1e-2  # the rounding of outputs and gradients
    assert_close_to_scale(out, ref_out, tol)
    for got, expected in zip(grads, ref_grads, strict=True):
        assert_close_to_scale(got, expected, tol)


@needs_triton
def test_triton_kernel_runs_through_the_op_and_its_autograd():
    inputs = [x.requires_grad_() for x in kernel_inputs(2, 1, n_q=70, d=16, dv=16)]
    mask = (torch.rand(2, 1, 70) > 0.2).to(TRITON_DEVICE)
    with force_triton_kernels():
        out = zeros_attention(*inputs, is_causal=True, attn_mask=mask[:, :, None, :])
        grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
    ref_out, ref_grads = reference_forward_and_grads(inputs, torch.ones_like(out), is_causal=True,
                                                     mask=mask)  # fmt: skip
    assert_close_to_scale(out, ref_out, 1e-5)
    for got, expected in zip(grads, ref_grads, strict=True):
        assert_close_to_scale(got, expected, 1e-5)


# The layer ----------------------------------------------------------------------------------------


def test_deviation_logits_follow_the_running_mean_formula():
    u = torch.randn(1, 2, 6, 4, dtype=torch.float64)
    mu = torch.randn(2, 4, dtype=torch.float64)
    tau = torch.tensor([0.0, 1.5], dtype=torch.float64)
    mask = torch.tensor([True, True, False, True, True, True])
    for is_causal in (False, True):
        got = deviation_logits(u, mu, tau, is_causal=is_causal, key_valid=mask)
        for h in range(2):
            for i in range(6):
                context = [j for j in range(6) if mask[j] and (not is_causal or j <= i)]
                u_bar = (tau[h].exp() * mu[h] + sum(u[0, h, j] for j in context)) / (
                    tau[h].exp() + len(context)
                )
                expected = -(u[0, h, i] @ u_bar) / 2.0
                torch.testing.assert_close(got[0, h, i], expected)


def test_rope_rotates_pairs_and_makes_scores_depend_on_offsets_only():
    x = torch.randn(1, 9, 8, dtype=torch.float64)
    rotated = apply_rope(x)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    q, k = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    rq, rk = apply_rope(q.expand(9, 8)), apply_rope(k.expand(9, 8))
    torch.testing.assert_close(rq[5] @ rk[2], rq[7] @ rk[4])  # offset 3 both times


@pytest.mark.parametrize("rope", [False, True])
def test_layer_is_causal_and_ignores_padding(rope):
    layer = ZeroSAttention(32, 4, is_causal=True, rope=rope).double()
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 9:] = False
    out = layer(x, mask)
    future = x.clone()
    future[:, 8:] = torch.randn(2, 4, 32, dtype=torch.float64)
    torch.testing.assert_close(layer(future, mask)[:, :8], out[:, :8])
    bidirectional = ZeroSAttention(32, 4).double()
    padded = x.clone()
    padded[1, 9:] = 100.0
    torch.testing.assert_close(bidirectional(padded, mask)[1, :9], bidirectional(x, mask)[1, :9])
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_layer_options_are_checked():
    with pytest.raises(attnrewrite.OptionError, match="not divisible"):
        ZeroSAttention(30, 4)
    with pytest.raises(attnrewrite.OptionError, match="even head_dim"):
        ZeroSAttention(30, 2, head_dim=5, rope=True)
    bad = [
        ({"num_heads": True}, "num_heads must be a positive int, got True"),
        ({"head_dim": 0}, "head_dim must be a positive int, got 0"),
        ({"head_dim": 4.0}, "head_dim must be a positive int, got 4.0"),
        ({"is_causal": "yes"}, "is_causal must be a bool"),
        ({"rope": True, "rope_base": -1.0}, "rope_base must be a number > 1"),
    ]
    for change, message in bad:
        with pytest.raises(attnrewrite.OptionError, match=message):
            ZeroSAttention(**{"dim": 16, "num_heads": 2, **change})
    layer, x = ZeroSAttention(16, 2), torch.randn(2, 5, 16)
    for mask in (torch.ones(2, 5), torch.ones(5, dtype=torch.bool)):
        with pytest.raises(attnrewrite.UnsupportedInputError, match=r"must be a \(B, N\)"):
            layer(x, mask)


# Rewriting pretrained attention: the adapter and the method ---------------------------------------


class Block(nn.Module):
    """Eager multi-head attention with a key-padding mask (and a causal mask when asked)."""

    def __init__(self, dim=32, heads=4, causal=False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, mask):
        b, n, dim = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(dim // self.heads)
        bias = torch.zeros(b, 1, n, n).masked_fill(~mask[:, None, None, :], torch.finfo().min)
        if self.causal:
            bias = bias.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), torch.finfo().min)
        attention = torch.softmax(scores + bias, dim=-1) @ v
        x = x + self.proj(attention.transpose(1, 2).reshape(b, n, dim))
        return x + self.mlp(x)


class TinyModel(nn.Module):
    def __init__(self, causal=False, layers=2):
        super().__init__()
        self.blocks = nn.ModuleList(Block(causal=causal) for _ in range(layers))

    def forward(self, x, mask):
        for block in self.blocks:
            x = block(x, mask)
        return x


def calibration_batches(count=4, n=16):
    batches = []
    for _ in range(count):
        mask = torch.ones(2, n, dtype=torch.bool)
        mask[1, n - 5 :] = False
        batches.append((torch.randn(2, n, 32), mask))
    return batches


@pytest.mark.parametrize("causal", [False, True])
def test_rewrite_adds_one_adapter_per_site_and_reports_that_it_needs_distillation(causal):
    model = TinyModel(causal=causal).eval()
    batch = calibration_batches(1)[0]
    result = attnrewrite.rewrite(model, batch, method="zeros", qk_rank=2)
    assert [s.status for s in result.report.sites] == ["replaced", "replaced"]
    adapters = dict(result.module.named_children())
    for site in result.report.sites:
        # the model's (B, 1, N, N) mask is classified per call
        assert site.options == {"qk_rank": 2, "needs_distillation": True,
                                "mask_check": RUN_TIME_MASK_CHECK,
                                "adapter": f"zeros_{site.name.replace('.', '_')}"}  # fmt: skip
        adapter = adapters[site.options["adapter"]]
        assert isinstance(adapter, ZeroSAdapter) and adapter.qk_rank == 2
    assert sum(isinstance(m, ZeroSAdapter) for m in result.module.modules()) == 2
    assert torch.isfinite(result.module(*batch)).all()
    assert "needs_distillation=True" in str(result.report)


def test_sites_in_one_module_get_distinct_adapters():
    class Shared(nn.Module):  # one block applied twice: two sites with one module path
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x, mask):
            return self.block(self.block(x, mask), mask)

    batch = calibration_batches(1)[0]
    result = attnrewrite.rewrite(Shared().eval(), batch, method="zeros")
    names = [site.options["adapter"] for site in result.report.sites]
    assert names == ["zeros_block", "zeros_block_1"]
    assert all(isinstance(getattr(result.module, name), ZeroSAdapter) for name in names)


def test_adapter_reads_a_causal_plus_padding_mask_as_causal_zeros():
    q, k, v = (torch.randn(2, 4, 10, 8) for _ in range(3))
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[1, 7:] = False
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    float_mask = torch.zeros(2, 1, 10, 10).masked_fill(~(causal & keep[:, None, None, :]),
                                                        torch.finfo().min)  # fmt: skip
    adapter = ZeroSAdapter(4, 8, 8)
    with torch.no_grad():
        adapter.key_logit_weight.normal_()
        adapter.gate_weight.normal_()
    raw, exact = adapter.zeros_output(q, k, v, float_mask)
    assert not exact
    logits = (k * adapter.key_logit_weight[:, None, :]).sum(-1)
    gates = [torch.sigmoid((q * adapter.gate_weight[j][:, None, :]).sum(-1)) for j in range(2)]
    expected = zeros_attention(q, k, v, logits, *gates, is_causal=True, attn_mask=keep)
    torch.testing.assert_close(raw, expected)
    bool_mask = causal & keep[:, None, None, :]
    torch.testing.assert_close(adapter.zeros_output(q, k, v, bool_mask)[0], expected)


def test_site_mask_terms_accept_key_and_causal_masks_only():
    n = 6
    keep = torch.tensor([True, True, True, True, False, False])
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    batch = (1, 2)
    bias, valid, is_causal = site_mask_terms(keep[None, None, None, :], batch, n, n, torch.float32)
    assert not is_causal and valid.shape == (1, 2, n) and (valid == keep).all()
    assert (bias[..., :4] == 0).all() and torch.isneginf(bias[..., 4:]).all()
    _, valid, is_causal = site_mask_terms(causal & keep, batch, n, n, torch.float32)
    assert is_causal and (valid == keep).all()
    band = causal & causal.T.tril(2).T  # a sliding window: not causal + padding
    assert site_mask_terms(band, batch, n, n, torch.float32) is None
    wrong_upper = causal.clone()
    wrong_upper[0, 3] = True
    assert site_mask_terms(wrong_upper, batch, n, n, torch.float32) is None


def test_an_adapter_refuses_a_mask_that_needs_a_gradient():
    """The site op gives attn_mask no gradient: a trainable bias must not silently stop training
    (rewrite keeps such sites where the graph records it; symbolic_trace does not)."""
    q, k, v = (torch.randn(1, 2, 8, 4, requires_grad=True) for _ in range(3))
    bias = torch.zeros(1, 1, 1, 8, requires_grad=True)
    adapter = ZeroSAdapter(2, 4, 4)
    with pytest.raises(attnrewrite.UnsupportedInputError, match="no gradient for attn_mask"):
        adapter(q, k, v, bias)
    adapter(q, k, v, bias.detach()).sum().backward()
    assert q.grad is not None


def test_a_mask_zeros_cannot_honor_runs_exact_attention_with_a_warning():
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    window = torch.ones(8, 8, dtype=torch.bool).tril().triu(-2)
    adapter = ZeroSAdapter(2, 4, 4)
    WARNED.discard("ZeroS")  # the warning is shown once per process
    with pytest.warns(RuntimeWarning, match="ZeroS site .* ran exact attention"):
        out = adapter(q, k, v, window)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, window))


def site_inputs():
    q, k, v, s, g1, gh = random_inputs(2, 2, n_q=10, d=4, dtype=torch.float32)
    return [x.requires_grad_() for x in (q, k, v, s, g1, gh)]


def test_site_op_gradients_match_zeros_with_the_mask_folded_in():
    inputs = site_inputs()
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[1, 6:] = False
    bias = torch.randn(2, 1, 1, 10).masked_fill(~keep[:, None, None, :], torch.finfo().min)
    out, exact = zeros_site_attention_op(*inputs, bias.expand(2, 1, 10, 10), False, None)
    assert not exact
    q, k, v, s, g1, gh = inputs
    expected = zeros_attention(q, k, v, s + torch.where(keep[:, None], bias[:, 0], 0.0), g1, gh,
                               attn_mask=keep)  # fmt: skip
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, inputs, grad),
                         torch.autograd.grad(expected, inputs, grad), strict=True):  # fmt: skip
        torch.testing.assert_close(got, want)


def test_site_op_falls_back_to_exact_attention_and_its_gradients():
    inputs = site_inputs()
    window = torch.ones(10, 10, dtype=torch.bool).tril().triu(-3)
    with pytest.warns(RuntimeWarning) if "ZeroS" not in WARNED else contextlib.nullcontext():
        out, exact = zeros_site_attention_op(*inputs, window, False, 0.3)
    assert exact
    q, k, v = inputs[:3]
    expected = F.scaled_dot_product_attention(q, k, v, window, scale=0.3)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad)
    for g, want in zip(got[:3], torch.autograd.grad(expected, (q, k, v), grad), strict=True):
        torch.testing.assert_close(g, want)
    assert all((g == 0).all() for g in got[3:])


def test_site_op_registration_passes_opcheck_and_compiles_with_backward():
    inputs = [x.detach() for x in site_inputs()]
    keep = torch.rand(2, 1, 1, 10) > 0.2
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    torch.library.opcheck(zeros_site_attention_op, (*inputs, keep, False, None))
    torch.library.opcheck(zeros_site_attention_op, (*inputs, causal & keep, False, 0.5))
    torch.library.opcheck(zeros_site_attention_op, (*inputs, None, True, None))

    def loss(*xs):
        return zeros_site_attention_op(*xs, causal & keep, False, None)[0].square().sum()

    leaves = [x.clone().requires_grad_() for x in inputs]
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(*leaves), leaves)
    expected = torch.autograd.grad(loss(*leaves), leaves)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


def test_method_keeps_sites_it_cannot_honor_with_a_reason():
    method, options = ZeroSMethod(), ZeroSOptions()
    site = attnrewrite.AttentionSite(name="x", node="sdpa", layer=0, spelling="sdpa",
                                     q_shape=(1, 2, 4, 8), k_shape=(1, 2, 6, 8),
                                     v_shape=(1, 2, 6, 8))  # fmt: skip
    assert method.unsupported_reason(site, options) is None  # non-causal cross-attention is fine
    site.is_causal = True
    assert "KV cache" in method.unsupported_reason(site, options)
    site.is_causal, site.dropout_p = False, 0.1
    assert "dropout" in method.unsupported_reason(site, options)
    site.dropout_p, site.q_shape = 0.0, (2, 4, 8)
    assert "(batch, heads, N, d)" in method.unsupported_reason(site, options)
    with pytest.raises(attnrewrite.OptionError, match="qk_rank must be an int ≥ 0"):
        ZeroSOptions.parse("zeros", {"qk_rank": -1})
    with pytest.raises(attnrewrite.UnsupportedInputError, match="zeros_attention"):
        attnrewrite.attention(*(torch.randn(1, 2, 4, 8) for _ in range(3)), method="zeros")


def test_rewritten_model_with_full_masks_exports_whole():
    model = TinyModel(causal=True, layers=1).eval()
    batch = calibration_batches(1)[0]
    rewritten = attnrewrite.rewrite(model, batch, method="zeros").module
    exported = torch.export.export(rewritten, batch, strict=False)
    targets = {n.target for n in exported.graph.nodes if n.op == "call_function"}
    assert torch.ops.attnrewrite.zeros_site_attention.default in targets
    torch.testing.assert_close(exported.module()(*batch), rewritten(*batch))


# Distillation -------------------------------------------------------------------------------------


def adapter_state(module):
    return {name: p.detach().clone() for name, p in module.named_parameters() if "zeros_" in name}


@pytest.mark.parametrize("layerwise", [False, True])
def test_distillation_lowers_each_sites_loss_and_touches_only_adapters(layerwise):
    torch.manual_seed(0)
    model = TinyModel().eval()
    batches = calibration_batches()
    rewritten = attnrewrite.rewrite(model, batches[0], method="zeros").module
    frozen = {n: p.detach().clone() for n, p in rewritten.named_parameters() if "zeros_" not in n}
    before = rewritten(*batches[0]) - model(*batches[0])
    log = distill(rewritten, batches, steps=40, lr=1e-2, layerwise=layerwise, progress=False)
    assert set(log.final) == {"zeros_blocks_0", "zeros_blocks_1"}
    for name in log.final:
        assert len(log.losses[name]) == 40
        assert log.final[name] < 0.97 * log.initial[name]
    for name, p in rewritten.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]) and p.requires_grad
    after = rewritten(*batches[0]) - model(*batches[0])
    assert after.norm() < before.norm()
    assert "initial MSE" in str(log) and '"final"' in log.to_json()


def test_data_initialization_beats_predicting_the_mean_output():
    """The least-squares output fit cannot be worse than its constant term alone."""
    torch.manual_seed(0)
    model = TinyModel(layers=1).eval()
    batches = calibration_batches()
    rewritten = attnrewrite.rewrite(model, batches[0], method="zeros").module
    adapter = rewritten.zeros_blocks_0
    outputs = []
    adapter.tap = lambda a, q, k, v, m: outputs.append(a.exact(q, k, v, m)) or outputs[-1]
    with torch.no_grad():
        for batch in batches:
            rewritten(*batch)
    adapter.tap = None
    targets = torch.cat(outputs)  # (B, H, N, dv)
    weights = torch.cat([b[1] for b in batches])[:, None, :, None].float().expand(-1, 4, -1, 1)
    mean = (targets * weights).sum(dim=(0, 2)) / weights.sum(dim=(0, 2))  # per head and channel
    mean_mse = ((targets - mean[:, None]) ** 2 * weights).sum() / (weights.sum() * 8)
    log = distill(rewritten, batches, steps=1, lr=1e-9, progress=False)
    assert log.initial["zeros_blocks_0"] < mean_mse


def test_distillation_is_deterministic_for_a_seed_and_restores_flags():
    batches = calibration_batches()
    states = []
    for seed in (3, 3, 4):
        torch.manual_seed(0)
        model = TinyModel(layers=1)
        rewritten = attnrewrite.rewrite(model.eval(), batches[0], method="zeros", qk_rank=2).module
        rewritten.zeros_blocks_0.training = True
        distill(rewritten, batches, steps=6, lr=1e-2, seed=seed, progress=False)
        assert rewritten.zeros_blocks_0.training
        assert all(p.requires_grad for p in rewritten.parameters())
        assert rewritten.zeros_blocks_0.tap is None
        states.append(adapter_state(rewritten))
    assert all(torch.equal(states[0][n], states[1][n]) for n in states[0])
    assert any(not torch.equal(states[0][n], states[2][n]) for n in states[0])
    assert any("qk_up" in n and states[0][n].abs().sum() > 0 for n in states[0])


def test_distillation_can_continue_without_reinitializing():
    torch.manual_seed(0)
    batches = calibration_batches()
    rewritten = attnrewrite.rewrite(TinyModel(layers=1).eval(), batches[0], method="zeros").module
    first = distill(rewritten, batches, steps=10, lr=1e-2, progress=False)
    second = distill(rewritten, batches, steps=10, lr=1e-2, progress=False, initialize=False)
    assert second.initial == first.final
    assert second.final["zeros_blocks_0"] < first.final["zeros_blocks_0"]


def test_distillation_errors_name_the_fix():
    model = TinyModel(layers=1).eval()
    batches = calibration_batches(1)
    with pytest.raises(attnrewrite.AttnRewriteError, match="no replaced attention site to distill"):
        distill(model, batches, steps=1, lr=1e-2)
    rewritten = attnrewrite.rewrite(model, batches[0], method="zeros")
    with pytest.raises(attnrewrite.AttnRewriteError, match="calibration is empty"):
        distill(rewritten, [], steps=1, lr=1e-2)
    with pytest.raises(attnrewrite.AttnRewriteError, match="steps must be an int"):
        distill(rewritten, batches, steps=0, lr=1e-2)
