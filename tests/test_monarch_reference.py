"""MonarchAttention's reference against the paper's math (exact cases, a direct loop
implementation of the update equations, masks, padding, dtypes, the causal variant), and the fast
CPU path and the custom op against the reference (forward, gradients, compile, fallback)."""

from __future__ import annotations

import math

import pytest
import torch

import attnrewrite
from attnrewrite.methods.monarch import (
    default_block_size,
    monarch_attention_reference,
    torch_stages,
)
from attnrewrite.methods.monarch.op import monarch_attention_op
from attnrewrite.methods.monarch.stages import MonarchConfig, monarch_backward, monarch_forward
from attnrewrite.methods.monarch.torch_stages import TorchStageOps, Workspace


def exact_attention(q, k, v, key_bias=None, scale=None, is_causal=False):
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    scores = scale * q @ k.transpose(-2, -1)
    if key_bias is not None:
        scores = scores + key_bias[..., None, :]
    if is_causal:
        n = q.shape[-2]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
    return torch.softmax(scores, dim=-1) @ v


def monarch_loop(q, k, v, bias, valid, *, scale, b, steps, pad, causal=False):
    """Single-head MonarchAttention written as the paper's update equations, one scalar at a time.

    q, k: (N, d), v: (N, dv), bias: (N,) additive key bias, valid: (N,) bool (False: masked key,
    which also leaves the R-update as a query). Float64 throughout. causal: the causal variant
    of reference.py's docstring (D-update, L over blocks k < l plus the diagonal, L = [k = l − 1]
    for the first R-update).
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
    beta = [
        [bt if ok[r][c] or bt != -math.inf else -math.inf for c, bt in enumerate(row)]
        for r, row in enumerate(beta)
    ]

    def softmax(xs):
        finite = [x for x in xs if x != -math.inf]
        if not finite:
            return [0.0] * len(xs)
        top = max(finite)
        es = [math.exp(x - top) if x != -math.inf else 0.0 for x in xs]
        total = sum(es)
        return [e / total for e in es]

    def logsumexp(xs):
        finite = [x for x in xs if x != -math.inf]
        if not finite:
            return -math.inf
        top = max(finite)
        return top + math.log(sum(math.exp(x - top) for x in finite))

    if causal:  # D[l][j] over i ≤ j, its lse δ[l][j] and output Σ_i D v
        diag_logits = [
            [
                [scale * float(Q[ll][j] @ K[ll][i]) + beta[ll][i] for i in range(j + 1)]
                for j in range(b)
            ]
            for ll in range(m)
        ]
        delta = [[logsumexp(row) for row in block] for block in diag_logits]
        diag_out = [
            [sum((w * V[ll][i] for i, w in enumerate(softmax(row))), zeros_v) for row in block]
            for ll, block in enumerate(diag_logits)
        ]
        diag_weight = [[0.0] * m for _ in range(b)]
    first = 1 if causal else 0
    L = [
        [[1.0 if ll == kk + first else 0.0 for ll in range(m)] for kk in range(m)] for _ in range(b)
    ]
    for _ in range(steps):
        R = [[None] * b for _ in range(m)]
        for kk in range(m):
            for j in range(b):
                a_r = sum(L[j][kk][ll] * ok[ll][j] * Q[ll][j] for ll in range(m))
                c_r = sum(L[j][kk][ll] * ok[ll][j] for ll in range(m))
                R[kk][j] = softmax(
                    [
                        (scale * float(a_r @ K[kk][i]) / c_r if c_r > 0 else 0.0) + beta[kk][i]
                        for i in range(b)
                    ]
                )
        for j in range(b):
            a_l = [sum(R[kk][j][i] * K[kk][i] for i in range(b)) for kk in range(m)]
            c_l = [
                sum(r * (math.log(r) - beta[kk][i]) for i, r in enumerate(R[kk][j]) if r > 0)
                for kk in range(m)
            ]
            empty = [all(x == -math.inf for x in beta[kk]) for kk in range(m)]
            for ll in range(m):
                logits = [
                    -math.inf
                    if empty[kk] or (causal and kk >= ll)
                    else scale * float(Q[ll][j] @ a_l[kk]) - c_l[kk]
                    for kk in range(m)
                ]
                weights = softmax([*logits, delta[ll][j]] if causal else logits)
                for kk in range(m):
                    L[j][kk][ll] = weights[kk]
                if causal:
                    diag_weight[j][ll] = weights[m]
    out = torch.zeros(m * b, v.shape[1], dtype=q.dtype)
    for ll in range(m):
        for j in range(b):
            out[ll * b + j] = sum(
                L[j][kk][ll] * sum(R[kk][j][i] * V[kk][i] for i in range(b)) for kk in range(m)
            )
            if causal:
                out[ll * b + j] += diag_weight[j][ll] * diag_out[ll][j]
    return out[front : front + n]


def random_qkv(*shape, dv=None, dtype=torch.float32):
    *batch, n, d = shape
    return (
        torch.randn(*batch, n, d, dtype=dtype),
        torch.randn(*batch, n, d, dtype=dtype),
        torch.randn(*batch, n, dv or d, dtype=dtype),
    )


def assert_same_gradients(got, expected, inputs, grad_out, **tolerance):
    """The gradients of `got` and `expected` for `inputs` under `grad_out` agree."""
    for g, e in zip(
        torch.autograd.grad(got, inputs, grad_out),
        torch.autograd.grad(expected, inputs, grad_out),
        strict=True,
    ):
        torch.testing.assert_close(g, e, **tolerance)


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


LOOP_CASES = [
    (16, 4, 1, "post", ()),
    (16, 4, 3, "post", ()),
    (13, 4, 2, "post", ()),
    (13, 4, 2, "pre", ()),
    (10, 3, 2, "post", (0, 5)),
    (11, 4, 2, "pre", (1, 2, 3, 4)),  # a whole key block masked
    (9, 2, 1, "post", (8,)),
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("n", "b", "steps", "pad", "masked"), LOOP_CASES)
def test_reference_matches_loop_implementation_of_the_update_equations(
    n, b, steps, pad, masked, causal
):
    q, k, v = (x.double() for x in random_qkv(n, 5, dv=3))
    valid = torch.ones(n, dtype=torch.bool)
    valid[list(masked)] = False
    bias = torch.randn(n, dtype=torch.float64).masked_fill(~valid, -math.inf)
    scale = 0.4
    expected = monarch_loop(  # the causal variant runs one step (causality, reference.py)
        q, k, v, bias, valid, scale=scale, b=b, steps=1 if causal else steps, pad=pad, causal=causal
    )
    got = monarch_attention_reference(
        q,
        k,
        v,
        bias,
        valid.double(),
        scale=scale,
        block_size=b,
        num_steps=steps,
        pad=pad,
        is_causal=causal,
    )
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("n", "b", "steps", "pad", "masked"), LOOP_CASES)
def test_fast_path_matches_reference_forward_and_backward(n, b, steps, pad, masked, causal):
    """The stages (stages.py on torch_stages.py) against autograd of the reference, in fp64."""
    q, k, v = (x.double().requires_grad_() for x in random_qkv(2, n, 5, dv=3))
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[:, list(masked)] = False
    bias = torch.randn(2, n, dtype=torch.float64).masked_fill(~valid, -math.inf)
    config = MonarchConfig(0.4, b, steps, pad, causal)
    expected = monarch_attention_reference(
        q,
        k,
        v,
        bias,
        valid.double(),
        scale=0.4,
        block_size=b,
        num_steps=steps,
        pad=pad,
        is_causal=causal,
    )
    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    inputs = [x.detach() for x in (q, k, v)]
    got, _ = monarch_forward(*inputs, bias, valid, config, TorchStageOps())
    grads = monarch_backward(grad_out, *inputs, bias, valid, config, TorchStageOps())
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("chunk", [64, 1 << 17, None])
def test_fast_path_chunking_over_and_within_sequences_agrees(chunk):
    """Tiny chunks split each sequence's stage (strided views, several chunks per sequence);
    the default covers whole sequences per chunk (flattened views); None computes each stage in
    one piece (the ONNX functions' form). Forward and backward against the reference."""
    q, k, v = (x.double().requires_grad_() for x in random_qkv(3, 40, 6))
    mask = torch.ones(3, 40, dtype=torch.bool)
    mask[1, 30:] = False
    bias = torch.zeros(3, 40, dtype=torch.float64).masked_fill(~mask, -math.inf)
    ops = TorchStageOps(chunk_elements=chunk)
    inputs = [x.detach() for x in (q, k, v)]
    for causal in (False, True):
        config = MonarchConfig(0.3, 6, 2, "post", causal)
        got, _ = monarch_forward(*inputs, bias, mask, config, ops)
        expected = monarch_attention_reference(
            q, k, v, bias, mask.double(), scale=0.3, block_size=6, is_causal=causal
        )
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
        grad_out = torch.randn_like(expected)
        expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
        grads = monarch_backward(grad_out, *inputs, bias, mask, config, ops)
        for grad, expected_grad in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(grad, expected_grad, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("n", "b", "steps", "pad", "masked"), LOOP_CASES)
@pytest.mark.parametrize("chunk", [64, 1 << 17, None])
def test_folded_first_l_update_bias_equals_the_rowdot_one(
    n, b, steps, pad, masked, causal, chunk, monkeypatch
):
    """The CPU path (chunked, and whole as exported to ONNX) reads s·q̃·aL of step 1 off the
    L-update's own scores (a diagonal, the subdiagonal when causal) instead of a rowdot: no
    keys_dot is asked of that R-update, and the output is the rowdot path's, with masked
    queries, padding and several steps."""
    q, k, v = (x.double() for x in random_qkv(2, n, 5, dv=3))
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[:, list(masked)] = False
    bias = torch.randn(2, n, dtype=torch.float64).masked_fill(~valid, -math.inf)
    config = MonarchConfig(0.4, b, steps, pad, causal)
    unfolded = TorchStageOps(chunk_elements=chunk)
    unfolded.folds_diagonal = False
    expected, _ = monarch_forward(q, k, v, bias, valid, config, unfolded)

    keys_dots = []
    attend = TorchStageOps.attend

    def spy(self, *args, **kwargs):
        if kwargs.get("keys_out") is not None:
            keys_dots.append(kwargs.get("keys_dot") is not None)
        return attend(self, *args, **kwargs)

    monkeypatch.setattr(TorchStageOps, "attend", spy)
    folded = TorchStageOps(chunk_elements=chunk)
    got, _ = monarch_forward(q, k, v, bias, valid, config, folded)
    assert folded.folds_diagonal and keys_dots == [False] + [True] * (config.steps - 1)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("n", [1, 7, 16, 33])
def test_causal_one_block_and_unit_blocks_are_exact_causal_softmax(n):
    q, k, v = random_qkv(2, 3, n, 8)
    bias = torch.randn(2, 3, n)
    expected = exact_attention(q, k, v, key_bias=bias, is_causal=True)
    for b in (n, 1, 2 * n):
        got = monarch_attention_reference(q, k, v, bias, block_size=b, is_causal=True)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        got = attnrewrite.attention(
            q, k, v, bias[:, :, None, :], is_causal=True, method="monarch", block_size=b
        )
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_causal_queries_that_see_no_key_get_zero_output_and_finite_gradients():
    q, k, v = (x.double().requires_grad_() for x in random_qkv(1, 2, 12, 4))
    mask = torch.ones(1, 1, 1, 12, dtype=torch.bool)
    mask[..., :3] = False  # queries 0–2 see only masked keys
    out = monarch_attention_op(q, k, v, mask, None, 4, 2, "post", is_causal=True)
    assert (out[..., :3, :] == 0).all()
    assert torch.isfinite(out).all()
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[1][..., :3, :] == 0).all() and (grads[2][..., :3, :] == 0).all()


def test_causal_op_gradcheck_with_key_mask_and_padding():
    q, k, v = (x.double().requires_grad_() for x in random_qkv(1, 1, 11, 4))
    mask = torch.ones(1, 1, 1, 11, dtype=torch.bool)
    mask[..., 5] = False
    assert torch.autograd.gradcheck(
        lambda q_, k_, v_: monarch_attention_op(
            q_, k_, v_, mask, None, 4, 2, "pre", False, False, True
        ),
        (q, k, v),
        fast_mode=True,
    )


def test_fallback_for_a_query_dependent_mask_is_exact_with_its_gradients():
    q, k, v = (x.double().requires_grad_() for x in random_qkv(1, 2, 8, 4))
    full = torch.rand(1, 1, 8, 8) > 0.3
    full[..., 0] = True
    with pytest.warns(RuntimeWarning, match="ran exact attention"):
        monarch_attention_op(q, k, v, full, None, 4, 2, "post", False, True)
    for causal in (False, True):
        mask = full & torch.ones(8, 8, dtype=torch.bool).tril() if causal else full
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, mask)
        got = monarch_attention_op(q, k, v, full, None, 4, 2, "post", False, True, causal)
        torch.testing.assert_close(got, expected)
        assert_same_gradients(got, expected, (q, k, v), torch.randn_like(got))


def test_op_arguments_are_checked():
    q, k, v = random_qkv(1, 2, 8, 4)
    for kwargs, message in [
        ({"pad": "middle"}, "pad must be"),
        ({"num_steps": 0}, "num_steps must be"),
        ({"block_size": 0}, "block_size must be"),
    ]:
        with pytest.raises(attnrewrite.UnsupportedInputError, match=message):
            monarch_attention_op(q, k, v, **kwargs)
    with pytest.raises(attnrewrite.UnsupportedInputError, match="cross-attention"):
        monarch_attention_op(q, k[..., :6, :], v[..., :6, :])


def test_op_compiles_to_one_graph_and_trains_under_dynamo():
    def loss(q, k, v, mask):
        out = monarch_attention_op(q, k, v, mask, None, 4, 2, "post", False, False, True)
        return out.square().sum()

    q, k, v = (x.requires_grad_() for x in random_qkv(2, 3, 13, 8))
    mask = torch.ones(2, 1, 1, 13, dtype=torch.bool)
    mask[1, ..., 10:] = False
    explained = torch._dynamo.explain(loss)(q, k, v, mask)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    expected = torch.autograd.grad(loss(q, k, v, mask), (q, k, v))
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v, mask), (q, k, v))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


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
    bias = torch.zeros(1, 1, 12, dtype=torch.float64).masked_fill(~mask[0, 0], -math.inf)
    bias = bias.expand(1, 2, 12)
    ref = monarch_attention_reference(q, k, v, bias, (~torch.isinf(bias)).double(), block_size=4)
    assert_same_gradients(out, ref, (q, k, v), torch.randn_like(out))
    assert torch.autograd.gradcheck(
        lambda q_, k_, v_: monarch_attention_op(q_, k_, v_, mask, None, 4, 2, "post"),
        (q, k, v),
    )


def test_custom_op_registration_passes_opcheck():
    q, k, v = random_qkv(2, 2, 12, 8)
    mask = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    torch.library.opcheck(monarch_attention_op, (q, k, v, mask, None, 4, 2, "post"))
    torch.library.opcheck(monarch_attention_op, (q, k, v), {"block_size": 5, "pad": "pre"})
    torch.library.opcheck(
        monarch_attention_op, (q, k, v, mask), {"block_size": 5, "is_causal": True}
    )


@pytest.mark.slow
def test_decoder_causal_layers_are_replaced_and_exact_at_one_block():
    """GPT-2 (small random weights): every causal site runs the causal variant, which is exact
    causal attention when one block holds the sequence."""
    from hf_zoo import ZOO

    entry = next(e for e in ZOO if e.name == "gpt2")
    model, inputs = entry.build("eager"), entry.inputs()
    del inputs["attention_mask"]  # no padding: the causal mask is a constant, hence is_causal
    with torch.no_grad():
        expected = model(**inputs)[0]
        for block_size, tolerance in ((inputs["input_ids"].shape[1], 1e-5), (4, None)):
            res = attnrewrite.rewrite(
                model, (), example_kwargs=inputs, method="monarch", block_size=block_size
            )
            assert [s.status for s in res.report.sites] == ["replaced"] * entry.causal_layers
            got = res.module(**inputs)[0]
            if tolerance is not None:
                torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)
            else:
                assert torch.isfinite(got).all() and not torch.equal(got, expected)


def test_threaded_fast_path_runs_under_autograd_on_long_sequences(two_threads):
    """Chunks of a long sequence run on pool threads, where grad mode is off by default only in
    the caller: products into preallocated outputs there must not record autograd."""
    q, k, v = (x.requires_grad_() for x in random_qkv(1, 2, 2304, 8))
    out = monarch_attention_op(q, k, v, None, None, 48, 1)
    expected = monarch_attention_reference(q, k, v, block_size=48, num_steps=1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    assert_same_gradients(out, expected, (q, k, v), torch.randn_like(out), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("causal", [False, True])
def test_sequences_on_their_own_threads_match_the_reference(causal, monkeypatch, two_threads):
    """Long sequences (N·b ≥ 4 chunks, as at N ≥ 8K) run one sequence per thread through every
    stage (torch_stages.by_sequence); forced here on a short one, with padding, a key mask and
    gradients, forward and backward against the reference."""
    monkeypatch.setattr(torch_stages, "CHUNK_ELEMENTS", 1 << 6)
    shared, share = [], torch_stages._share

    def recorded(count, work, threads):
        shared.append(work.__qualname__)
        share(count, work, threads)

    monkeypatch.setattr(torch_stages, "_share", recorded)
    q, k, v = (x.double().requires_grad_() for x in random_qkv(3, 2, 45, 8))
    keep = torch.ones(3, 1, 1, 45, dtype=torch.bool)
    keep[1, ..., 40:] = False
    out = monarch_attention_op(q, k, v, keep, None, 8, 2, is_causal=causal)
    expected = monarch_attention_reference(
        q,
        k,
        v,
        torch.zeros(3, 2, 45, dtype=torch.float64).masked_fill(~keep[:, :, 0], -math.inf),
        keep[:, :, 0].expand(3, 2, 45).double(),
        block_size=8,
        num_steps=2,
        is_causal=causal,
    )
    valid = keep[:, :, 0, :, None].expand(3, 2, 45, 1)
    torch.testing.assert_close(out * valid, expected * valid, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(out) * valid
    assert_same_gradients(out, expected, (q, k, v), grad, atol=1e-10, rtol=1e-10)
    assert shared.count("by_sequence.<locals>.one") == 2  # the forward's and the backward's


def test_reused_buffers_never_leak_into_a_later_call():
    """The CPU path keeps intermediates from call to call (torch_stages.Workspace) so a later
    call does not page-fault them in anew: results equal fresh buffers bit for bit while shapes,
    masks, T and causality change from call to call (chunked, flat and in one piece), buffers
    idle for two calls are dropped, and outputs are never a buffer."""
    workspace = Workspace()
    calls = [(3, 40, 6, 1, False), (3, 40, 6, 2, True), (2, 23, 5, 2, False), (3, 40, 6, 1, False)]
    for chunk in (64, 1 << 17):
        for groups, n, b, steps, causal in calls:
            q, k, v = random_qkv(groups, n, 6)
            bias = torch.zeros(groups, n).masked_fill(torch.rand(groups, n) < 0.2, -math.inf)
            valid = ~torch.isneginf(bias)
            config = MonarchConfig(0.3, b, steps, "post", causal)
            fresh, _ = monarch_forward(q, k, v, bias, valid, config, TorchStageOps(1, chunk))
            ops = TorchStageOps(chunk_elements=chunk, workspace=workspace)
            reused, _ = monarch_forward(q, k, v, bias, valid, config, ops)
            assert torch.equal(reused, fresh)
            grad_out = torch.randn_like(fresh)
            fresh_grads = monarch_backward(
                grad_out, q, k, v, bias, valid, config, TorchStageOps(1, chunk)
            )
            ops = TorchStageOps(chunk_elements=chunk, workspace=workspace)
            grads = monarch_backward(grad_out, q, k, v, bias, valid, config, ops)
            assert all(map(torch.equal, grads, fresh_grads))
    held = workspace.nbytes
    for _ in range(3):  # the same call over and over: no buffer added
        first, _ = monarch_forward(q, k, v, bias, valid, config, TorchStageOps(workspace=workspace))
        assert workspace.nbytes <= held
    again, _ = monarch_forward(q, k, v, bias, valid, config, TorchStageOps(workspace=workspace))
    assert torch.equal(first, again) and first.data_ptr() != again.data_ptr()
    single_call = workspace.nbytes
    assert 0 < single_call < held  # the shapes of the earlier calls went after two idle calls


def test_the_op_reuses_this_threads_buffers_on_cpu():
    q, k, v = (x.view(1, 2, 64, 6) for x in random_qkv(2, 64, 6))
    workspace = Workspace.of_this_thread()
    for _ in range(3):  # (earlier tests' buffers go after two calls)
        monarch_attention_op(q, k, v, None, None, 8, 1)
    held = workspace.nbytes
    monarch_attention_op(q, k, v, None, None, 8, 1)
    assert workspace.nbytes == held > 0


def test_chunks_are_sized_by_the_l2_cache(tmp_path):
    """A chunk's fp32 scores fill one core's L2 (read from Linux sysfs), within 2^15 … 2^20."""
    for index, (level, size) in enumerate([("1", "48K"), ("2", "2048K"), ("3", "480M")]):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "level").write_text(level + "\n")
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    assert torch_stages._l2_cache_bytes(tmp_path) == 2 << 20
    assert torch_stages._l2_cache_bytes(tmp_path / "missing") is None
    sizes = {
        None: 1 << 17,
        1_310_720: 1 << 18,
        2 << 20: 1 << 19,
        64 << 10: 1 << 15,
        1 << 30: 1 << 20,
    }
    for l2, elements in sizes.items():
        assert torch_stages._chunk_elements(l2) == elements
