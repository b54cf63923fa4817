"""What the report says about sites whose mask decides the method's fate: a mask the example
inputs show varying between queries keeps the site with every approximate method; a (…, N, N)
mask only a call can classify is replaced with a note that such masks run exact attention."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import attnrewrite
import attnrewrite.backend
from attnrewrite.errors import WARNED

OPTIONS = {"monarch": {"block_size": 4}, "hsa": {"branching": (4, 2)}, "zeros": {}}
N, HEADS = 16, 2


def alibi(n: int = N, heads: int = HEADS) -> torch.Tensor:
    """ALiBi's (1, H, N, N) bias: −slope·|i − j| per head, a float mask varying between queries."""
    distance = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs()
    slopes = 2.0 ** (-torch.arange(1, heads + 1, dtype=torch.float32))
    return -(slopes[:, None, None] * distance)[None]


class Biased(torch.nn.Module):
    """Self-attention of x (B, H, N, d) with an additive (…, N, N) float mask."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 24)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self.proj(x).chunk(3, -1)
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8) + bias, -1) @ v


def padding_bias(batch: int = 2, n: int = N) -> torch.Tensor:
    """A Hugging Face style expanded padding mask (B, 1, N, N): every row equal, finfo.min."""
    keep = torch.ones(batch, n, dtype=torch.bool)
    keep[1, n - 5 :] = False
    bias = torch.zeros(batch, 1, 1, n).masked_fill(~keep[:, None, None, :], torch.finfo().min)
    return bias.expand(batch, 1, n, n)


@pytest.mark.parametrize("method", OPTIONS)
def test_a_bias_varying_between_queries_keeps_the_site_with_the_reason(method: str):
    """On the example inputs ALiBi's rows differ: no approximate method honors it, so rewrite
    keeps the site (ZeroS too, which would otherwise run exact attention on every call)."""
    model, x = Biased().eval(), torch.randn(2, HEADS, N, 8)
    res = attnrewrite.rewrite(model, (x, alibi()), method=method, **OPTIONS[method])
    (site,) = res.report.sites
    assert site.status == "kept" and site.mask == "general"
    assert "varies between queries" in site.reason and f"{method} honors key-padding" in site.reason


@pytest.mark.parametrize("method", OPTIONS)
def test_a_mask_checked_per_call_is_replaced_with_a_note_that_says_so(method: str):
    """A (B, 1, N, N) padding mask has equal rows on the example inputs, which no later call
    is bound to: the site is replaced and its report row says which masks run exact."""
    model, x = Biased().eval(), torch.randn(2, HEADS, N, 8)
    res = attnrewrite.rewrite(model, (x, padding_bias()), method=method, **OPTIONS[method])
    (site,) = res.report.sites
    assert site.status == "replaced" and site.mask == "full"
    assert "runs exact attention" in site.options.get("mask_check", "")
    assert f"mask_check={site.options['mask_check']}" in str(res.report)


@pytest.fixture
def warnings_shown_once_stay_unshown():
    """The one-time warnings this test triggers stay for the tests that expect them."""
    shown = set(WARNED)
    yield
    WARNED.intersection_update(shown)


@pytest.mark.usefixtures("warnings_shown_once_stay_unshown")
@pytest.mark.parametrize("method", OPTIONS)
def test_under_compile_an_alibi_site_is_reported_to_run_exact_attention(method: str):
    """torch.compile's backend cannot run the example inputs through the graph (the probe needs
    rewrite's captured call signature), so ALiBi's mask is only known per call: the site is
    replaced, runs exact attention (with a one-time warning), and the report row says so."""
    model, x, bias = Biased().eval(), torch.randn(2, HEADS, N, 8), alibi()
    torch._dynamo.reset()
    attnrewrite.backend.reports.clear()
    options = {"method": method, "inner": "eager", **OPTIONS[method]}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exact fallback's and ZeroS's parameters' warnings
        got = torch.compile(model, backend="attnrewrite", options=options)(x, bias)
        expected = model(x, bias)
    (site,) = attnrewrite.backend.reports[-1].sites
    assert site.status == "replaced" and site.mask == "full"
    assert "runs exact attention" in site.options.get("mask_check", "")
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("method", OPTIONS)
def test_key_masks_and_causal_sites_need_no_note(method: str):
    """A (B, 1, 1, N) key mask is one by its shape: nothing is left to a call."""

    class KeyMasked(torch.nn.Module):
        def forward(self, q, k, v, keep):
            return F.scaled_dot_product_attention(q, k, v, keep[:, None, None, :])

    q, k, v = (torch.randn(2, HEADS, N, 8) for _ in range(3))
    keep = torch.ones(2, N, dtype=torch.bool)
    res = attnrewrite.rewrite(KeyMasked(), (q, k, v, keep), method=method, **OPTIONS[method])
    (site,) = res.report.sites
    assert site.status == "replaced" and "mask_check" not in site.options
