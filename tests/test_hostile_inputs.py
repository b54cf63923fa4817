"""Hostile inputs at every front door: bad methods, options and tensors are errors that name the
problem and the fix; NaN/Inf propagate as SDPA's do; empty and one-token sequences work; inputs a
Triton kernel cannot take fall back to PyTorch with a one-time warning."""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import attnrewrite
from attnrewrite.backend import parse_backend_options
from attnrewrite.errors import WARNED
from attnrewrite.methods.hsa import hsa_attention_reference
from attnrewrite.methods.hsa.op import TRITON_CPU_VARIABLE
from attnrewrite.methods.masks import with_causal
from attnrewrite.methods.monarch import kernel_backend, monarch_attention_reference
from attnrewrite.methods.zeros import force_triton_kernels, zeros_attention_reference

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_DEVICE = "cpu" if INTERPRETER else "cuda" if torch.cuda.is_available() else None

#: The methods `attnrewrite.attention` computes (ZeroS needs its own inputs: `zeros_attention`).
SOFTMAX_METHODS = {"sdpa": {}, "monarch": {"block_size": 4}, "hsa": {"branching": (4, 2)}}


def qkv(n: int = 16, heads: int = 2, d: int = 8, dtype: torch.dtype = torch.float32):
    return [torch.randn(1, heads, n, d, dtype=dtype) for _ in range(3)]


def zeros_inputs(n: int = 8, d: int = 8, dv: int = 8) -> list[torch.Tensor]:
    """q, k, v, key_logits, gate_first, gate_residual for `zeros_attention`."""
    q, k, v = torch.randn(1, 2, n, d), torch.randn(1, 2, n, d), torch.randn(1, 2, n, dv)
    return [q, k, v, torch.randn(1, 2, n), torch.rand(1, 2, n), torch.rand(1, 2, n)]


class Attention(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(x, x, x)


# Methods and options ------------------------------------------------------------------------------


OPTION_ERRORS = [
    ("linformer", {}, "unknown method 'linformer'; valid methods: hsa, monarch, sdpa, zeros"),
    (None, {}, "unknown method None; valid methods"),
    ("monarch", {"blocksize": 16}, r"unknown option\(s\) \['blocksize'\] .* block_size, num_steps"),
    ("sdpa", {"block_size": 4}, "valid options: none"),
    ("monarch", {"block_size": 0}, "block_size must be a positive int or None .*, got 0"),
    ("monarch", {"block_size": -4}, "block_size must be a positive int or None .*, got -4"),
    ("monarch", {"block_size": 4.0}, r"got 4\.0 \(a float; write 4\)"),
    ("monarch", {"block_size": 2.5}, r"block_size must be .*, got 2\.5 \(a float; pass a Python"),
    ("monarch", {"block_size": True}, r"block_size must be .*, got True \(a bool; pass a number\)"),
    ("monarch", {"block_size": "16"}, r"got '16' \(a str; pass a Python int\)"),
    ("monarch", {"num_steps": -1}, r"num_steps must be an int ≥ 1 \(alternating updates"),
    ("monarch", {"num_steps": 0}, "num_steps must be an int ≥ 1"),
    ("monarch", {"num_steps": False}, r"num_steps must be an int ≥ 1 .*\(a bool"),
    ("monarch", {"pad": "middle"}, "pad must be 'post' or 'pre' .*, got 'middle'"),
    ("monarch", {"pad": None}, "pad must be 'post' or 'pre' .*, got None"),
    ("hsa", {"branching": (0,)}, r"branching entries must be ints ≥ 2 .*got 0 in \(0,\)"),
    ("hsa", {"branching": (-4, 2)}, "branching entries must be ints ≥ 2"),
    ("hsa", {"branching": (1, 4)}, "a group of 1 is its own parent"),
    ("hsa", {"branching": (16, 4.0)}, r"branching entries must be ints ≥ 2 .*got 4\.0"),
    ("hsa", {"branching": (True, 4)}, "branching entries must be ints ≥ 2 .*got True"),
    ("hsa", {"branching": 16}, r"sequence of group sizes.*write \(16,\)"),
    ("hsa", {"branching": "16"}, "branching must be a sequence of group sizes"),
    ("hsa", {"branching": None}, "branching must be a sequence of group sizes"),
    ("zeros", {"qk_rank": -1}, r"qk_rank must be an int ≥ 0 \(0: no q/k update\), got -1"),
    ("zeros", {"qk_rank": 1.5}, r"qk_rank must be an int ≥ 0 .*\(a float"),
    ("zeros", {"qk_rank": True}, r"qk_rank must be an int ≥ 0 .*\(a bool"),
]


def call_attention(method: Any, options: dict[str, Any]) -> None:
    attnrewrite.attention(*qkv(), method=method, **options)


def call_rewrite(method: Any, options: dict[str, Any]) -> None:
    attnrewrite.rewrite(Attention(), (torch.randn(1, 2, 16, 8),), method=method, **options)


def call_backend_options(method: Any, options: dict[str, Any]) -> None:
    parse_backend_options({"method": method, **options})


@pytest.mark.parametrize("front_door", [call_attention, call_rewrite, call_backend_options])
@pytest.mark.parametrize(("method", "options", "message"), OPTION_ERRORS)
def test_bad_methods_and_options_are_named_at_every_front_door(
    front_door: Callable[[Any, dict[str, Any]], None],
    method: Any,
    options: dict[str, Any],
    message: str,
):
    with pytest.raises(attnrewrite.OptionError, match=message):
        front_door(method, options)


def test_compile_backend_surfaces_the_option_error():
    """Dynamo wraps backend errors; the message with the fix must survive the wrapping."""
    torch._dynamo.reset()
    compiled = torch.compile(Attention(), backend="attnrewrite", options={"num_steps": -1})
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="num_steps must be an int"):
        compiled(torch.randn(1, 2, 16, 8))


def test_integral_options_of_the_right_type_are_accepted():
    """The checks refuse bools and floats, not valid values at the edges of their range."""
    q, k, v = qkv()
    one = attnrewrite.attention(q, k, v, method="monarch", block_size=1, num_steps=1, pad="pre")
    torch.testing.assert_close(one, F.scaled_dot_product_attention(q, k, v))
    exact = attnrewrite.attention(q, k, v, method="hsa", branching=[])
    torch.testing.assert_close(exact, F.scaled_dot_product_attention(q, k, v))
    assert attnrewrite.get_method("zeros").parse_options({"qk_rank": 0}).qk_rank == 0


# Tensors ------------------------------------------------------------------------------------------


def _mask(dtype: torch.dtype = torch.bool, shape: tuple[int, ...] = (1, 1, 1, 16), **kw: Any):
    return torch.ones(shape, dtype=dtype, **kw)


INPUT_ERRORS = [
    ("integer tensors", lambda q, k, v: ((q.int(), k.int(), v.int()), {}),
     r"q must be floating point .*got torch\.int32; cast it, e\.g\. q\.float\(\)"),
    ("a list for q", lambda q, k, v: ((q.tolist(), k, v), {}),
     "q must be a torch.Tensor, got list"),
    ("1-D q", lambda q, k, v: ((q[0, 0, 0], k, v), {}), r"q must have shape \(\.\.\., N, d\)"),
    ("k in fp64", lambda q, k, v: ((q, k.double(), v), {}),
     r"dtypes differ \(torch\.float32, torch\.float64, torch\.float32\); cast them to one"),
    ("k on another device", lambda q, k, v: ((q, k.to("meta"), v), {}),
     r"different devices \(cpu, meta, cpu\); move them to one device"),
    ("mask on another device", lambda q, k, v: ((q, k, v, _mask(device="meta")), {}),
     r"attn_mask is on meta but q is on cpu; move it with attn_mask\.to\(q\.device\)"),
    ("int64 mask", lambda q, k, v: ((q, k, v, _mask(torch.int64)), {}),
     r"attn_mask must be bool .* got torch\.int64; convert a 0/1 mask with attn_mask\.bool\(\)"),
    ("fp16 mask for fp32 q", lambda q, k, v: ((q, k, v, _mask(torch.float16)), {}),
     r"attn_mask must be bool \(True = attend\) or torch\.float32 \(additive\)"),
    ("mask of the wrong shape", lambda q, k, v: ((q, k, v, _mask(shape=(3, 5))), {}),
     r"attn_mask of shape \(3, 5\) does not broadcast .*\(B, 1, 1, Nk\)"),
    ("mask with more dims than q", lambda q, k, v: ((q, k, v, _mask(shape=(1, 1, 2, 16, 16))), {}),
     r"attn_mask of shape \(1, 1, 2, 16, 16\) does not broadcast to the attention shape"),
    ("a list for the mask", lambda q, k, v: ((q, k, v, [[True] * 16]), {}),
     "attn_mask must be a torch.Tensor or None, got list"),
    ("head dims differ", lambda q, k, v: ((q, k[..., :4], v), {}), r"head dims differ \(8 vs 4\)"),
    ("k and v lengths differ", lambda q, k, v: ((q, k, v[..., :5, :]), {}),
     "must agree in all but the last dim"),
    ("batch dims differ", lambda q, k, v: ((q.expand(2, -1, -1, -1), k, v), {}),
     r"batch dims differ \(pass enable_gqa=True for grouped-query attention\)"),
    ("heads not a multiple", lambda q, k, v: ((torch.cat([q, q[:, :1]], 1), k, v),
                                              {"enable_gqa": True}),
     "3 query heads are not a multiple of 2 key/value heads"),
    ("is_causal a string", lambda q, k, v: ((q, k, v), {"is_causal": "yes"}),
     "is_causal must be a bool, got 'yes'"),
    ("enable_gqa None", lambda q, k, v: ((q, k, v), {"enable_gqa": None}),
     "enable_gqa must be a bool, got None"),
    ("scale a string", lambda q, k, v: ((q, k, v), {"scale": "0.1"}),
     r"scale must be a float or None \(None: 1/√d\), got '0\.1'"),
]  # fmt: skip


@pytest.mark.parametrize("method", [*SOFTMAX_METHODS, "zeros"])
@pytest.mark.parametrize(
    ("change", "message"), [case[1:] for case in INPUT_ERRORS], ids=[c[0] for c in INPUT_ERRORS]
)
def test_bad_tensors_are_named_for_every_method(method: str, change, message: str):
    """Checked in one place before any method runs, so every method says the same thing
    (ZeroS too: its bad inputs are named before it explains that it needs its own inputs)."""
    args, kwargs = change(*qkv())
    with pytest.raises(attnrewrite.UnsupportedInputError, match=message):
        attnrewrite.attention(*args, method=method, **SOFTMAX_METHODS.get(method, {}), **kwargs)


ZEROS_INPUT_ERRORS = [
    ("integer q", 0, lambda x: x.int(), r"q must be floating point, got torch\.int32"),
    ("k on another device", 1, lambda x: x.to("meta"), "k is on meta but q is on cpu"),
    ("logits on another device", 3, lambda x: x.to("meta"), "key_logits is on meta but q is"),
    (
        "gate of the wrong shape",
        4,
        lambda x: x[..., :3],
        r"does not broadcast to \(1, 2, 8\) \(one per query\)",
    ),
]


@pytest.mark.parametrize(
    ("position", "change", "message"),
    [case[1:] for case in ZEROS_INPUT_ERRORS],
    ids=[case[0] for case in ZEROS_INPUT_ERRORS],
)
def test_bad_zeros_inputs_are_named(position: int, change, message: str):
    args = zeros_inputs()
    args[position] = change(args[position])
    with pytest.raises(attnrewrite.UnsupportedInputError, match=message):
        attnrewrite.zeros_attention(*args)


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        ([True] * 8, "attn_mask must be a bool tensor or None, got list"),
        (torch.ones(8, dtype=torch.bool, device="meta"), "attn_mask is on meta but q is"),
        (torch.ones(8), r"must be bool \(True = attend\), got torch\.float32; for an additive"),
    ],
)
def test_bad_zeros_masks_are_named(mask: Any, message: str):
    with pytest.raises(attnrewrite.UnsupportedInputError, match=message):
        attnrewrite.zeros_attention(*zeros_inputs(), attn_mask=mask)


# Empty and one-token sequences --------------------------------------------------------------------


@pytest.mark.parametrize("method", SOFTMAX_METHODS)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_empty_sequences_give_empty_outputs_and_gradients(method: str, is_causal: bool, masked):
    q, k, v = (x.requires_grad_() for x in qkv(n=0))
    mask = torch.ones(1, 1, 1, 0, dtype=torch.bool) if masked else None
    out = attnrewrite.attention(q, k, v, mask, is_causal, method=method, **SOFTMAX_METHODS[method])
    assert out.shape == (1, 2, 0, 8)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


@pytest.mark.parametrize("method", SOFTMAX_METHODS)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("key_mask", [None, True, False])
def test_one_token_gives_its_value_row_or_zero_when_masked(method, is_causal: bool, key_mask):
    """One key: softmax weight 1, so the output is the value row (every method is exact here);
    a masked key leaves the query nothing to attend to: 0, as in SDPA."""
    q, k, v = qkv(n=1)
    mask = None if key_mask is None else torch.full((1, 1, 1, 1), key_mask)
    out = attnrewrite.attention(q, k, v, mask, is_causal, method=method, **SOFTMAX_METHODS[method])
    expected = F.scaled_dot_product_attention(q, k, v, mask, is_causal=is_causal)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out, v if key_mask is not False else torch.zeros_like(v))


#: (B, H, N, d, dv) with one size 0 besides N: an empty batch, no heads, d = 0 (every logit is an
#: empty sum: SDPA's softmax of the mask alone, the mean value without one), dv = 0.
EMPTY_DIMS = {
    "batch": (0, 2, 8, 4, 4),
    "heads": (1, 0, 8, 4, 4),
    "d": (1, 2, 8, 0, 4),
    "dv": (1, 2, 8, 4, 0),
}


def empty_dims_inputs(dims: str, masked: bool) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """q, k, v (requiring grad) of EMPTY_DIMS[dims], and a key-padding mask or None."""
    b, h, n, d, dv = EMPTY_DIMS[dims]
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(b, h, n, d, generator=g).requires_grad_() for _ in range(2))
    v = torch.randn(b, h, n, dv, generator=g).requires_grad_()
    mask = torch.arange(n) < n - 3 if masked else None
    return [q, k, v], None if mask is None else mask.expand(b, 1, 1, n)


def outputs_and_grads(out: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    grad_out = torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape) % 5 - 2.0
    return [out, *torch.autograd.grad(out, inputs, grad_out, allow_unused=True)]


@pytest.mark.parametrize("method", ["monarch", "hsa"])
@pytest.mark.parametrize("dims", EMPTY_DIMS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("is_causal", [False, True])
def test_empty_dims_give_what_sdpa_gives(method: str, dims: str, masked: bool, is_causal: bool):
    """An empty batch, no heads or dv = 0: an empty output and gradients; d = 0: SDPA's output
    (no logits to approximate) and gradients. Never a crash in the chunking or reshapes."""
    inputs, mask = empty_dims_inputs(dims, masked)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HSA's causal variant warns about its use
        out = attnrewrite.attention(*inputs, mask, is_causal, method=method,
                                    **SOFTMAX_METHODS[method])  # fmt: skip
    if is_causal and mask is not None:  # SDPA takes the two combined
        n = inputs[0].shape[-2]
        mask, is_causal = with_causal(mask, n, n), False
    expected = F.scaled_dot_product_attention(*inputs, mask, is_causal=is_causal)
    for got, want in zip(outputs_and_grads(out, inputs), outputs_and_grads(expected, inputs),
                         strict=True):  # fmt: skip
        assert got.shape == want.shape
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dims", EMPTY_DIMS)
@pytest.mark.parametrize("is_causal", [False, True])
def test_zeros_on_empty_dims_gives_its_reference(dims: str, is_causal: bool):
    """ZeroS on the same sizes: its reference's output (0 for d = 0: q̂·k̂ is an empty sum) and
    gradients."""
    (q, k, v), _ = empty_dims_inputs(dims, masked=False)
    b, h, n, _, _ = EMPTY_DIMS[dims]
    inputs = [q, k, v, *(torch.rand(b, h, n).requires_grad_() for _ in range(3))]
    out = attnrewrite.zeros_attention(*inputs, is_causal=is_causal)
    expected = zeros_attention_reference(*inputs, is_causal=is_causal)
    for got, want in zip(outputs_and_grads(out, inputs), outputs_and_grads(expected, inputs),
                         strict=True):  # fmt: skip
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("n", [0, 1])
@pytest.mark.parametrize("is_causal", [False, True])
def test_zeros_on_empty_and_one_token_sequences(n: int, is_causal: bool):
    """ZeroS's weights over the allowed keys sum to zero: one key gets weight 0, so N = 1 gives
    0 (up to rounding; the layer's LayerNorm follows), as its reference does."""
    args = zeros_inputs(n)
    out = attnrewrite.zeros_attention(*args, is_causal=is_causal)
    assert out.shape == (1, 2, n, 8)
    torch.testing.assert_close(out, torch.zeros_like(out), atol=1e-6, rtol=0)
    reference = zeros_attention_reference(*args, is_causal=is_causal)
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=0)


# NaN and Inf --------------------------------------------------------------------------------------


def nonfinite_rows(out: torch.Tensor) -> torch.Tensor:
    return ~torch.isfinite(out).all(-1)


@pytest.mark.parametrize("method", SOFTMAX_METHODS)
@pytest.mark.parametrize("poisoned", ["q", "k", "v"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("is_causal", [False, True])
def test_nan_and_inf_propagate_like_sdpa(method: str, poisoned: str, value: float, is_causal):
    """A non-finite input never raises and is never hidden: every output row SDPA makes NaN or
    infinite is non-finite here too (approximate methods may spread it to more rows: Monarch and
    HSA mix tokens through block statistics). The exception is ±inf in q or k: HSA's block
    logits use means, so a row may get a −inf logit (a masked key, as in SDPA) where SDPA's is
    +inf. There, as everywhere, the op must equal its reference, NaN for NaN."""
    q, k, v = qkv(16, heads=1)
    tensors = {"q": q, "k": k, "v": v}
    tensors[poisoned][..., 5, 0] = value
    out = attnrewrite.attention(q, k, v, None, is_causal, method=method, **SOFTMAX_METHODS[method])
    if math.isnan(value) or poisoned == "v" or method == "sdpa":
        sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        assert nonfinite_rows(sdpa).any()
        assert (nonfinite_rows(out) >= nonfinite_rows(sdpa)).all()
    if method == "monarch":
        reference = monarch_attention_reference(q, k, v, block_size=4, is_causal=is_causal)
    elif method == "hsa":
        reference = hsa_attention_reference(q, k, v, branching=(4, 2), is_causal=is_causal)
    else:
        return
    assert torch.equal(nonfinite_rows(out), nonfinite_rows(reference))
    torch.testing.assert_close(out, reference, equal_nan=True)


@pytest.mark.parametrize("poisoned", ["q", "k", "v", "key_logits", "gate_first"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_nan_propagates_through_zeros_to_every_row_that_uses_it(poisoned: str, is_causal: bool):
    """A NaN in query t's q or gate poisons row t; in key i's k, v or logit, every row that may
    use key i (all rows; rows t ≥ i when causal). It may reach more rows (0·NaN in shared sums),
    never fewer."""
    names = ["q", "k", "v", "key_logits", "gate_first", "gate_residual"]
    args = zeros_inputs(8)
    target = args[names.index(poisoned)]
    if target.dim() == 4:
        target[..., 3, 0] = math.nan
    else:
        target[..., 3] = math.nan
    out = attnrewrite.zeros_attention(*args, is_causal=is_causal)
    rows = torch.arange(8)
    per_query = poisoned in ("q", "gate_first")
    expected = rows == 3 if per_query else (rows >= 3 if is_causal else rows >= 0)
    assert (nonfinite_rows(out)[0, 0] >= expected).all()


# Kernel limits ------------------------------------------------------------------------------------


def test_zeros_head_dims_beyond_the_kernels_fall_back_with_one_warning():
    """The ZeroS kernels take head dims up to 256: larger ones run the PyTorch form (no Triton
    needed, so this runs on CPU with the kernels forced) and say so once per process."""
    WARNED.discard("zeros-head-dim")
    args = zeros_inputs(8, d=264, dv=8)
    with force_triton_kernels():
        with pytest.warns(RuntimeWarning, match="head dims up to 256, got 264 .* shown once"):
            out = attnrewrite.zeros_attention(*args)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            again = attnrewrite.zeros_attention(*args)
    torch.testing.assert_close(out, zeros_attention_reference(*args))
    torch.testing.assert_close(again, out)


def test_hsa_groups_beyond_the_kernels_fall_back_with_one_warning(monkeypatch):
    """The HSA kernels hold families of up to 64 children; a larger group below the root runs
    the reference (forced kernels on CPU need no interpreter for that) and says so once."""
    pytest.importorskip("triton")
    monkeypatch.setenv("ATTNREWRITE_TRITON_CPU", "1")
    WARNED.discard("hsa-group-size")
    q, k, v = qkv(n=200, heads=1)
    with pytest.warns(RuntimeWarning, match=r"groups of up to 64 .*branching \(100, 2\)"):
        out = attnrewrite.attention(q, k, v, method="hsa", branching=(100, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attnrewrite.attention(q, k, v, method="hsa", branching=(100, 2))
    torch.testing.assert_close(out, hsa_attention_reference(q, k, v, branching=(100, 2)))


@pytest.mark.slow
@pytest.mark.skipif(KERNEL_DEVICE is not None, reason="the kernel tests run in this process")
def test_kernels_propagate_nan_in_the_triton_interpreter():
    """The Triton interpreter must be chosen before Triton is imported: rerun the kernel tests
    of this file in a subprocess with TRITON_INTERPRET=1 (as test_monarch_kernels.py does)."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
         "test_kernels_hide_no_nan or test_kernels_take_empty_dims"],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600,
        cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    report = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0 and "skipped" not in result.stdout, report


@contextlib.contextmanager
def kernels_forced(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every method's Triton kernels, for CPU tensors too (under the interpreter)."""
    monkeypatch.setenv(TRITON_CPU_VARIABLE, "1")
    with kernel_backend("triton"), force_triton_kernels():
        yield


@pytest.mark.skipif(
    KERNEL_DEVICE is None,
    reason="run by test_kernels_propagate_nan_in_the_triton_interpreter (subprocess)",
)
@pytest.mark.parametrize("method", ["monarch", "hsa", "zeros"])
@pytest.mark.parametrize("poisoned", [0, 1, 2])
def test_kernels_hide_no_nan(method: str, poisoned: int, monkeypatch: pytest.MonkeyPatch):
    """The kernels treat a NaN as the PyTorch paths do: every row the PyTorch path makes
    non-finite is non-finite from the kernels too (rows with zero weight or no key are 0 by
    explicit guards, which a NaN must not pass for)."""
    tensors = [torch.randn(1, 2, 16, 8) for _ in range(3)]
    tensors[poisoned][..., 5, 0] = math.nan
    if method == "zeros":
        tensors += [torch.randn(1, 2, 16), torch.rand(1, 2, 16), torch.rand(1, 2, 16)]

    def run(device: str) -> torch.Tensor:
        inputs = [x.to(device) for x in tensors]
        if method == "zeros":
            return attnrewrite.zeros_attention(*inputs).cpu()
        return attnrewrite.attention(*inputs, method=method, **SOFTMAX_METHODS[method]).cpu()

    expected = run("cpu")  # the PyTorch path
    with kernels_forced(monkeypatch):
        kernels = run(KERNEL_DEVICE)
    assert nonfinite_rows(expected).any()
    assert (nonfinite_rows(kernels) >= nonfinite_rows(expected)).all()


@pytest.mark.skipif(
    KERNEL_DEVICE is None,
    reason="run by test_kernels_propagate_nan_in_the_triton_interpreter (subprocess)",
)
@pytest.mark.parametrize("method", ["monarch", "hsa", "zeros"])
@pytest.mark.parametrize("dims", EMPTY_DIMS)
def test_kernels_take_empty_dims(method: str, dims: str, monkeypatch: pytest.MonkeyPatch):
    """With the kernels dispatched, the sizes of EMPTY_DIMS give what the PyTorch path gives,
    gradients too."""
    (q, k, v), _ = empty_dims_inputs(dims, masked=False)
    b, h, n, _, _ = EMPTY_DIMS[dims]
    tensors = [q, k, v]
    if method == "zeros":
        tensors += [torch.randn(b, h, n), torch.rand(b, h, n), torch.rand(b, h, n)]

    def run(device: str) -> list[torch.Tensor]:
        inputs = [x.detach().to(device).requires_grad_() for x in tensors]
        if method == "zeros":
            out = attnrewrite.zeros_attention(*inputs)
        else:
            out = attnrewrite.attention(*inputs, method=method, **SOFTMAX_METHODS[method])
        return [x.cpu() for x in outputs_and_grads(out, inputs)]

    expected = run("cpu")
    with kernels_forced(monkeypatch):
        got = run(KERNEL_DEVICE)
    for x, want in zip(got, expected, strict=True):
        assert x.shape == want.shape
        torch.testing.assert_close(x, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["monarch", "hsa"])
def test_a_mask_that_needs_a_gradient_is_refused_where_none_is_given(method: str):
    """Monarch and HSA differentiate q, k and v only: a trainable bias must not silently stop
    training. A mask that needs no gradient (detached, or under no_grad) runs."""
    q, k, v = (x.requires_grad_() for x in qkv())
    bias = torch.zeros(16, requires_grad=True)  # (Nk,): also SDPA's shape rule, which wants 2-D
    options = SOFTMAX_METHODS[method]
    with pytest.raises(attnrewrite.UnsupportedInputError, match="no gradient for attn_mask"):
        attnrewrite.attention(q, k, v, bias, method=method, **options)
    with torch.no_grad():
        attnrewrite.attention(q, k, v, bias, method=method, **options)
    attnrewrite.attention(q, k, v, bias.detach(), method=method, **options).sum().backward()
    assert q.grad is not None
    attnrewrite.attention(q, k, v, bias, method="sdpa").sum().backward()
    assert bias.grad is not None


@pytest.mark.parametrize("method", ["monarch", "hsa", "zeros"])
def test_rewrite_keeps_a_site_whose_mask_trains(method: str):
    """No approximate method gives the mask a gradient: a trainable bias keeps its site."""

    class Biased(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.randn(16))
            self.proj = torch.nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = self.proj(x).chunk(3, -1)
            return torch.softmax(q @ k.transpose(-2, -1) / 8**0.5 + self.bias, -1) @ v

    model, x = Biased(), torch.randn(2, 1, 16, 8)
    res = attnrewrite.rewrite(model, (x,), method=method, **SOFTMAX_METHODS.get(method, {}))
    (site,) = res.report.sites
    assert site.status == "kept" and "mask is trainable" in site.reason
    res.module(x).sum().backward()
    assert model.bias.grad is not None and model.bias.grad.abs().sum() > 0
