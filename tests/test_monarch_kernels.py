"""MonarchAttention's Triton kernels against the reference: on a GPU, or on CPU in the Triton
interpreter on small shapes.

The interpreter must be chosen before Triton is imported (TRITON_INTERPRET=1), which would
affect every other module in this process; on a CPU-only machine
`test_kernels_pass_in_the_triton_interpreter` therefore reruns this file in a subprocess with
the variable set, and the kernel tests skip here. Tiles are 16 wide under the interpreter, so a
block of 20 slots or 18 blocks already takes two tiles (online softmax across tiles, ragged
masks). bf16 is not tested on CPU: the interpreter computes bf16 tiles wrongly (numpy has no
bfloat16).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnrewrite
from attnrewrite.methods.monarch import op as monarch_op
from attnrewrite.methods.monarch.reference import monarch_attention_reference
from attnrewrite.methods.monarch.stages import MonarchConfig, monarch_backward, monarch_forward

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETER else "cuda" if torch.cuda.is_available() else None
needs_triton = pytest.mark.skipif(
    DEVICE is None,
    reason="run by test_kernels_pass_in_the_triton_interpreter (subprocess, TRITON_INTERPRET=1)",
)


@pytest.fixture(scope="module")
def kernels():
    from attnrewrite.kernels import monarch

    return monarch


@pytest.mark.slow
@pytest.mark.skipif(DEVICE is not None, reason="the kernel tests run in this process")
def test_kernels_pass_in_the_triton_interpreter():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(Path(__file__)),
            "-k",
            "not test_kernels_pass_in_the_triton_interpreter",
        ],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=900,
        cwd=Path(__file__).parent.parent,
    )
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    assert " passed" in result.stdout and "skipped" not in result.stdout, report


def inputs(groups, n, d, masked, dtype=torch.float32):
    q, k, v = (torch.randn(groups, n, d, device=DEVICE, dtype=dtype) for _ in range(3))
    valid = torch.ones(groups, n, device=DEVICE, dtype=torch.bool)
    valid[:, list(masked)] = False
    bias = torch.randn(groups, n, device=DEVICE).masked_fill(~valid, -math.inf)
    return q, k, v, bias, valid


def reference(q, k, v, bias, valid, config):
    return monarch_attention_reference(
        q.double(),
        k.double(),
        v.double(),
        bias.double(),
        valid.double(),
        scale=config.scale,
        block_size=config.block_size,
        num_steps=config.num_steps,
        pad=config.pad,
        is_causal=config.is_causal,
    )


STAGE_CASES = [
    pytest.param(
        1, 13, 4, 3, "pre", True, (0, 5), id="causal-mask-prepad-T3", marks=pytest.mark.slow
    ),
    pytest.param(1, 11, 4, 2, "pre", False, (1, 2, 3, 4), id="empty-key-block"),
    pytest.param(1, 9, 4, 2, "pre", True, (0, 4, 8), id="unread-slot-causal"),
    pytest.param(1, 45, 20, 2, "post", True, (3,), id="b20-two-tiles", marks=pytest.mark.slow),
    pytest.param(1, 70, 4, 1, "post", True, (), id="M18-two-tiles", marks=pytest.mark.slow),
]


@needs_triton
@pytest.mark.parametrize(("groups", "n", "b", "steps", "pad", "causal", "masked"), STAGE_CASES)
def test_stage_kernels_match_reference_forward_and_backward(
    kernels, groups, n, b, steps, pad, causal, masked
):
    q, k, v, bias, valid = inputs(groups, n, 5, masked)
    config = MonarchConfig(0.4, b, steps, pad, causal)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    expected = reference(*leaves, bias, valid, config)
    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)
    ops = kernels.TritonStageOps()
    got, _ = monarch_forward(q, k, v, bias, valid, config, ops)
    grads = monarch_backward(grad_out.float(), q, k, v, bias, valid, config, ops)
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=2e-5)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad.double(), expected_grad, atol=5e-5, rtol=5e-5)


@needs_triton
def test_stage_kernels_in_fp16_keep_fp32_statistics(kernels):
    q, k, v, bias, valid = inputs(1, 24, 8, (3,))
    config = MonarchConfig(0.3, 5, 2, "post", True)
    half = [x.half() for x in (q, k, v)]
    got, _ = monarch_forward(*half, bias, valid, config, kernels.TritonStageOps())
    assert got.dtype == torch.float16
    expected = reference(*half, bias, valid, config)
    torch.testing.assert_close(got.double(), expected, atol=2e-2, rtol=2e-2)


FUSED_CASES = [
    (16, 4, 1, "post", False, ()),
    (13, 4, 3, "pre", False, (1,)),
    (11, 4, 2, "pre", False, (1, 2, 3, 4)),
    (16, 4, 2, "post", True, ()),
    (13, 4, 3, "post", True, (0, 5)),
    (12, 3, 2, "pre", True, (0,)),
    (7, 1, 2, "post", True, ()),
    (200, 14, 2, "pre", True, (3,)),
    # slot 1 masked in every block: its R rows serve masked queries only, which then shape them
    (8, 4, 2, "post", False, (1, 5)),
    (9, 4, 2, "pre", True, (0, 4, 8)),
    (4, 4, 2, "post", False, (2,)),  # one block: exact on every row, the masked one's too
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("n", "b", "steps", "pad", "causal", "masked"), FUSED_CASES)
def test_fused_kernel_matches_reference(kernels, n, b, steps, pad, causal, masked, dtype):
    q, k, v, bias, valid = inputs(2, n, 5, masked, dtype)
    config = MonarchConfig(0.4, b, steps, pad, causal)
    got = kernels.fused_forward(q, k, v, bias, valid, config)
    assert got is not None and got.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(
        got.double(), reference(q, k, v, bias, valid, config), atol=tolerance, rtol=tolerance
    )


@needs_triton
def test_fused_kernel_declines_long_sequences(kernels):
    q, k, v, _, _ = inputs(1, 300, 4, ())
    config = MonarchConfig(0.5, 4, 1, "post", False)  # 75 blocks: 128 × 16 × 16 tile elements
    assert kernels.fused_forward(q, k, v, None, None, config) is None


@needs_triton
@pytest.mark.parametrize("fused", [True, False])
def test_op_runs_the_kernels_when_asked_and_agrees_with_the_cpu_path(kernels, monkeypatch, fused):
    """Forward through the fused kernel or (when it declines) the stage kernels; the backward
    always runs the stage kernels."""
    if not fused:
        monkeypatch.setattr(kernels, "FUSED_MAX_ELEMENTS", 0)
    q, k, v = (torch.randn(1, 1, 14, 4, device=DEVICE, requires_grad=True) for _ in range(3))
    mask = torch.ones(1, 1, 1, 14, device=DEVICE, dtype=torch.bool)
    mask[..., 12:] = False
    arguments = (mask, None, 4, 2, "post", False, False, True)
    results = {}
    for backend in ("triton", "torch"):
        with monarch_op.kernel_backend(backend):
            out = monarch_op.monarch_attention_op(q, k, v, *arguments)
            grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out)) if fused else ()
        results[backend] = (out, *grads)
    for got, expected in zip(results["triton"], results["torch"], strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@needs_triton
def test_kernels_refuse_cpu_tensors_without_the_interpreter(kernels, monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    q = torch.randn(1, 8, 4)  # CPU tensors, whatever the machine
    with (
        monarch_op.kernel_backend("triton"),
        pytest.raises(attnrewrite.UnsupportedInputError, match="TRITON_INTERPRET=1"),
    ):
        monarch_op.monarch_attention_op(q, q, q)
    with pytest.raises(ValueError, match="unknown Monarch backend"):
        monarch_op.kernel_backend("cuda").__enter__()
