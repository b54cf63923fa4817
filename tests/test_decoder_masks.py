"""Decoder masks: causal combined with key padding in one (B, 1, N, N) tensor, as Hugging Face
decoders build them for padded batches. Monarch runs its causal form on them with the last row's
key terms; masks no causal form reproduces keep the site. Causal forms must never let a row see
a later token: Monarch's runs one step, HSA's is not offered in rewritten graphs."""

from __future__ import annotations

import warnings

import pytest
import torch
from hf_zoo import ZOO

import attnrewrite
from attnrewrite.methods.masks import site_mask_terms

#: options under which each method is exact (one block / a one-level tree), and approximate
EXACT = {"monarch": {"block_size": 16}, "hsa": {"branching": (16,)}}
APPROXIMATE = {"monarch": {"block_size": 4}, "hsa": {"branching": (4, 2)}}


def padded_gpt2(attn_implementation: str, side: str):
    entry = next(e for e in ZOO if e.name == "gpt2")
    model, inputs = entry.build(attn_implementation), entry.inputs()
    if side == "left":
        inputs["attention_mask"] = inputs["attention_mask"].flip(-1)
    return model, inputs


def run_without_fallback(module: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The module's output; a run-time fallback to exact attention is a test failure."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("error", message="attnrewrite", category=RuntimeWarning)
        return module(**inputs)[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("attn_implementation", "side"), [("sdpa", "right"), ("sdpa", "left"), ("eager", "right")]
)
def test_causal_padding_masks_are_replaced_and_exact_in_the_exact_cases(attn_implementation, side):
    method = "monarch"  # HSA keeps causal sites (test_causal_forms_never_see_later_tokens)
    model, inputs = padded_gpt2(attn_implementation, side)
    with torch.no_grad():
        expected = model(**inputs)[0]
    exact = attnrewrite.rewrite(model, (), example_kwargs=inputs, method=method, **EXACT[method])
    assert [(s.status, s.mask) for s in exact.report.sites] == [("replaced", "causal_key")] * 2
    torch.testing.assert_close(run_without_fallback(exact.module, inputs), expected)

    approx = attnrewrite.rewrite(
        model, (), example_kwargs=inputs, method=method, **APPROXIMATE[method]
    )
    assert [s.status for s in approx.report.sites] == ["replaced"] * 2
    assert all(s.options["num_steps"] == 1 for s in approx.report.sites)  # the causal form's
    got = run_without_fallback(approx.module, inputs)
    assert torch.isfinite(got).all() and not torch.allclose(got, expected, atol=1e-3)


@pytest.mark.slow
def test_float_masks_with_rows_that_see_no_key_keep_every_site():
    """Eager left padding: the padded queries' rows are all finfo.min, which SDPA spreads over
    all N keys; no causal form reproduces that, so every site (sharing one mask) is kept."""
    model, inputs = padded_gpt2("eager", "left")
    res = attnrewrite.rewrite(model, (), example_kwargs=inputs, method="monarch", block_size=4)
    assert [(s.status, s.mask) for s in res.report.sites] == [("kept", "general")] * 2
    assert "neither causal nor key padding" in res.report.sites[0].reason
    with torch.no_grad():
        torch.testing.assert_close(res.module(**inputs)[0], model(**inputs)[0])


def causal_padding(keep: torch.Tensor) -> torch.Tensor:
    n = keep.shape[-1]
    return torch.ones(n, n, dtype=torch.bool).tril() & keep[:, None, None, :]


@pytest.mark.parametrize("method", ["monarch", "hsa"])
def test_functional_op_reads_a_causal_padding_mask_as_causal_with_key_padding(method):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8) for _ in range(3))
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[1, 7:] = False
    options = APPROXIMATE[method]
    got = attnrewrite.attention(q, k, v, causal_padding(keep), method=method, **options)
    expected = attnrewrite.attention(
        q, k, v, keep[:, None, None, :], is_causal=True, method=method, **options
    )
    torch.testing.assert_close(got, expected)


def test_site_mask_terms_refuse_float_rows_without_a_key_but_accept_bool_ones():
    keep = torch.ones(1, 6, dtype=torch.bool)
    keep[0, :2] = False  # left padding: queries 0 and 1 see no key
    mask = causal_padding(keep)
    _, valid, is_causal = site_mask_terms(mask, (1, 1), 6, 6, torch.float32)
    assert is_causal and torch.equal(valid, keep[:, None, :])
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    assert site_mask_terms(additive, (1, 1), 6, 6, torch.float32) is None
    right_padded = causal_padding(keep.flip(-1))
    additive = torch.zeros(mask.shape).masked_fill(~right_padded, torch.finfo(torch.float32).min)
    assert site_mask_terms(additive, (1, 1), 6, 6, torch.float32)[2]


def later_tokens_reach(attention, q, k, v) -> float:
    """The most any output row changes when every later token's q, k, v change."""
    out, worst = attention(q, k, v), 0.0
    for t in range(q.shape[-2] - 1):
        changed = [x.clone() for x in (q, k, v)]
        for x in changed:
            x[..., t + 1 :, :] = torch.randn_like(x[..., t + 1 :, :])
        worst = max(worst, (attention(*changed) - out)[..., : t + 1, :].abs().max().item())
    return worst


def test_causal_forms_never_see_later_tokens():
    """Monarch at T ≥ 2 would pool later queries into the R rows earlier rows read, so its
    causal form runs one step. HSA's tree aggregates pool later tokens of a group: a
    direct call warns, a rewritten graph's op (fallback) runs exact causal attention, and
    rewrite keeps causal sites."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 24, 8) for _ in range(3))
    for steps in (1, 2, 3):

        def monarch(*x, steps=steps):
            return attnrewrite.attention(
                *x, is_causal=True, method="monarch", block_size=4, num_steps=steps
            )

        assert later_tokens_reach(monarch, q, k, v) == 0
    hsa = torch.ops.attnrewrite.hsa_attention

    def in_a_graph(*x):
        return hsa(*x, None, None, [4, 2], is_causal=True, fallback=True)

    with pytest.warns(RuntimeWarning, match="ran exact causal attention"):
        attnrewrite.errors.WARNED.discard("hsa-causal-exact")
        torch.testing.assert_close(
            in_a_graph(q, k, v), torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True
            )
        )  # fmt: skip
    with pytest.warns(RuntimeWarning, match="later tokens"):
        attnrewrite.errors.WARNED.discard("hsa-causal")
        attnrewrite.attention(q, k, v, is_causal=True, method="hsa", branching=(4, 2))
    model, inputs = padded_gpt2("sdpa", "right")
    res = attnrewrite.rewrite(model, (), example_kwargs=inputs, method="hsa", branching=(4, 2))
    assert [s.status for s in res.report.sites] == ["kept"] * 2
    assert "not offered for causal sites" in res.report.sites[0].reason
