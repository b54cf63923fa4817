"""MonarchAttention's reference against the paper's math: exact cases, a direct loop
implementation of the update equations, masks, padding, dtypes and gradients."""

from __future__ import annotations

import math

import pytest
import torch

import attnrewrite
from attnrewrite.methods.monarch import default_block_size, monarch_attention_reference
from attnrewrite.methods.monarch.op import monarch_attention_op


def exact_attention(q, k, v, key_bias=None, scale=None):
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    scores = scale * q @ k.transpose(-2, -1)
    if key_bias is not None:
        scores = scores + key_bias[..., None, :]
    return torch.softmax(scores, dim=-1) @ v


def monarch_loop(q, k, v, bias, valid, *, scale, b, steps, pad):
    """Single-head MonarchAttention written as the paper's update equations, one scalar at a time.

    q, k: (N, d), v: (N, dv), bias: (N,) additive key bias, valid: (N,) bool (False: masked key,
    which also leaves the R-update as a query). Float64 throughout.
    """
    n = q.shape[0]
    m = math.ceil(n / b)
    n_pad = m * b - n
    front = n_pad if pad == "pre" else 0
    # position (block, slot) → original token index or None for padding
    origin = [[(blk * b + j - front) for j in range(b)] for blk in range(m)]
    origin = [[t if 0 <= t < n else None for t in row] for row in origin]
    zeros_d, zeros_v = (
        torch.zeros(q.shape[1], dtype=q.dtype),
        torch.zeros(v.shape[1], dtype=q.dtype),
    )
    Q = [[q[t] if t is not None else zeros_d for t in row] for row in origin]
    K = [[k[t] if t is not None else zeros_d for t in row] for row in origin]
    V = [[v[t] if t is not None else zeros_v for t in row] for row in origin]
    ok = [[t is not None and bool(valid[t]) for t in row] for row in origin]
    beta = [[float(bias[t]) if t is not None else -math.inf for t in row] for row in origin]
    beta = [[bt if ok[r][c] or bt != -math.inf else -math.inf for c, bt in enumerate(row)]
            for r, row in enumerate(beta)]  # fmt: skip

    def softmax(xs):
        finite = [x for x in xs if x != -math.inf]
        if not finite:
            return [0.0] * len(xs)
        top = max(finite)
        es = [math.exp(x - top) if x != -math.inf else 0.0 for x in xs]
        total = sum(es)
        return [e / total for e in es]

    L = [[[1.0 if kk == ll else 0.0 for ll in range(m)] for kk in range(m)] for _ in range(b)]
    for _ in range(steps):
        R = [[None] * b for _ in range(m)]
        for kk in range(m):
            for j in range(b):
                a_r = sum(L[j][kk][ll] * ok[ll][j] * Q[ll][j] for ll in range(m))
                c_r = sum(L[j][kk][ll] * ok[ll][j] for ll in range(m))
                R[kk][j] = softmax([
                    (scale * float(a_r @ K[kk][i]) / c_r if c_r > 0 else 0.0) + beta[kk][i]
                    for i in range(b)
                ])  # fmt: skip
        for j in range(b):
            a_l = [sum(R[kk][j][i] * K[kk][i] for i in range(b)) for kk in range(m)]
            c_l = [
                sum(r * (math.log(r) - beta[kk][i]) for i, r in enumerate(R[kk][j]) if r > 0)
                for kk in range(m)
            ]
            empty = [all(x == -math.inf for x in beta[kk]) for kk in range(m)]
            for ll in range(m):
                logits = [
                    -math.inf if empty[kk] else scale * float(Q[ll][j] @ a_l[kk]) - c_l[kk]
                    for kk in range(m)
                ]
                for kk, w in enumerate(softmax(logits)):
                    L[j][kk][ll] = w
    out = torch.zeros(m * b, v.shape[1], dtype=q.dtype)
    for ll in range(m):
        for j in range(b):
            out[ll * b + j] = sum(
                L[j][kk][ll] * sum(R[kk][j][i] * V[kk][i] for i in range(b)) for kk in range(m)
            )
    return out[front : front + n]


def random_qkv(*shape, dv=None, dtype=torch.float32):
    *batch, n, d = shape
    return (torch.randn(*batch, n, d, dtype=dtype), torch.randn(*batch, n, d, dtype=dtype),
            torch.randn(*batch, n, dv or d, dtype=dtype))  # fmt: skip


@pytest.mark.parametrize("n", [1, 7, 16, 33])
def test_one_block_and_unit_blocks_are_exact_softmax(n):
    q, k, v = random_qkv(2, 3, n, 8)
    expected = exact_attention(q, k, v)
    for b in (n, 1):
        got = monarch_attention_reference(q, k, v, block_size=b, num_steps=2)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [16, 13])
def test_unit_blocks_and_one_block_honor_key_bias_exactly(n):
    q, k, v = random_qkv(2, 2, n, 8)
    bias = torch.randn(2, 2, n)
    bias[0, :, 3] = -math.inf
    expected = exact_attention(q, k, v, key_bias=bias)
    for b in (1, n):
        got = monarch_attention_reference(q, k, v, bias, block_size=b, num_steps=1)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("n", "b", "steps", "pad", "masked"),
    [
        (16, 4, 1, "post", ()),
        (16, 4, 3, "post", ()),
        (13, 4, 2, "post", ()),
        (13, 4, 2, "pre", ()),
        (10, 3, 2, "post", (0, 5)),
        (11, 4, 2, "pre", (1, 2, 3, 4)),  # a whole key block masked
        (9, 2, 1, "post", (8,)),
    ],
)
def test_reference_matches_loop_implementation_of_the_update_equations(n, b, steps, pad, masked):
    q, k, v = (x.double() for x in random_qkv(n, 5, dv=3))
    valid = torch.ones(n, dtype=torch.bool)
    valid[list(masked)] = False
    bias = torch.randn(n, dtype=torch.float64).masked_fill(~valid, -math.inf)
    scale = 0.4
    expected = monarch_loop(q, k, v, bias, valid, scale=scale, b=b, steps=steps, pad=pad)
    got = monarch_attention_reference(
        q, k, v, bias, valid.double(), scale=scale, block_size=b, num_steps=steps, pad=pad
    )
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_fully_masked_blocks_and_rows_stay_finite():
    q, k, v = random_qkv(2, 2, 12, 4)
    mask = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    mask[0, ..., 4:8] = False  # one empty key block at b=4
    mask[1] = False  # every key masked
    out = attnrewrite.attention(q, k, v, mask, method="monarch", block_size=4)
    assert torch.isfinite(out).all()
    # an empty block gets zero weight: its values cannot leak into the output
    v_poisoned = v.clone()
    v_poisoned[0, :, 4:8] = 1e6
    out_poisoned = attnrewrite.attention(q, k, v_poisoned, mask, method="monarch", block_size=4)
    torch.testing.assert_close(out_poisoned[0], out[0])
    assert (out[1] == 0).all()


def test_key_padding_mask_matches_exact_attention_on_valid_queries_at_one_block():
    q, k, v = random_qkv(2, 4, 10, 8)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, mask[:, None, None, :])
    for spelled in (mask[:, None, None, :], mask[:, None, None, :].expand(2, 1, 10, 10)):
        got = attnrewrite.attention(q, k, v, spelled, method="monarch", block_size=10)
        torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1, :, :6], expected[1, :, :6], atol=1e-5, rtol=1e-5)


def test_additive_float_mask_with_finfo_min_acts_like_a_boolean_mask():
    q, k, v = random_qkv(1, 2, 16, 8)
    keep = torch.ones(1, 16, dtype=torch.bool)
    keep[0, 11:] = False
    additive = torch.zeros(1, 1, 1, 16).masked_fill(~keep[:, None, None, :], torch.finfo().min)
    by_bool = attnrewrite.attention(q, k, v, keep[:, None, None, :], method="monarch", block_size=4)
    by_float = attnrewrite.attention(q, k, v, additive, method="monarch", block_size=4)
    torch.testing.assert_close(by_float, by_bool, atol=1e-6, rtol=1e-6)


def test_default_block_size_is_a_power_of_two_near_sqrt_n():
    assert [default_block_size(n) for n in (1, 2, 8, 16, 256, 1000, 4096)] == [
        1,
        2,
        4,
        4,
        16,
        32,
        64,
    ]


def test_monarch_is_an_approximation_between_the_exact_cases():
    q, k, v = random_qkv(1, 2, 64, 16)
    exact = exact_attention(q, k, v)
    errors = [
        (monarch_attention_reference(q, k, v, block_size=8, num_steps=t) - exact).norm()
        / exact.norm()
        for t in (1, 2, 3)
    ]
    assert all(0 < e < 1 for e in errors)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_use_fp32_statistics(dtype):
    q, k, v = random_qkv(1, 2, 32, 16)
    ref = monarch_attention_reference(q, k, v, block_size=8)
    got = monarch_attention_reference(q.to(dtype), k.to(dtype), v.to(dtype), block_size=8)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=2e-2)


def test_grouped_query_attention_repeats_key_value_heads():
    q = torch.randn(1, 4, 16, 8)
    k, v = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    got = attnrewrite.attention(q, k, v, method="monarch", block_size=4, enable_gqa=True)
    expected = attnrewrite.attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), method="monarch", block_size=4
    )
    torch.testing.assert_close(got, expected)


def test_op_backward_matches_autograd_of_the_reference():
    q, k, v = (x.double().requires_grad_() for x in random_qkv(1, 2, 12, 4))
    mask = torch.ones(1, 1, 1, 12, dtype=torch.bool)
    mask[..., 9:] = False
    out = monarch_attention_op(q, k, v, mask, None, 4, 2, "post")
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    bias = torch.zeros(1, 1, 12, dtype=torch.float64).masked_fill(~mask[0, 0], -math.inf)
    bias = bias.expand(1, 2, 12)
    ref = monarch_attention_reference(q, k, v, bias, (~torch.isinf(bias)).double(), block_size=4)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    for got, expected in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, expected)
    assert torch.autograd.gradcheck(
        lambda q_, k_, v_: monarch_attention_op(q_, k_, v_, mask, None, 4, 2, "post"),
        (q, k, v),
    )


def test_custom_op_registration_passes_opcheck():
    q, k, v = random_qkv(2, 2, 12, 8)
    mask = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    torch.library.opcheck(monarch_attention_op, (q, k, v, mask, None, 4, 2, "post"))
    torch.library.opcheck(monarch_attention_op, (q, k, v), {"block_size": 5, "pad": "pre"})
