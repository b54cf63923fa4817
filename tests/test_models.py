"""The real pretrained model (all-MiniLM-L6-v2, offline): canonicalize keeps its output, every
attention layer is found in both HF attention implementations, Monarch runs end to end."""

from __future__ import annotations

import pytest
import torch
from conftest import load_minilm

import attnrewrite


def mean_pool(hidden, mask):
    mask = mask[..., None].to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_minilm_every_layer_found_and_canonical_form_is_exact(minilm_path, minilm_batch, impl):
    model = load_minilm(minilm_path, impl)
    ids, mask = minilm_batch
    with torch.no_grad():
        expected = model(ids, mask).last_hidden_state
        res = attnrewrite.rewrite(model, (ids, mask), method="sdpa")
        got = res.module(ids, mask).last_hidden_state
    assert len(res.report.sites) == 6
    assert all(s.status == "replaced" for s in res.report.sites)
    assert [s.layer for s in res.report.sites] == list(range(6))
    assert {s.spelling for s in res.report.sites} == {"eager" if impl == "eager" else "sdpa"}
    # six fp32 layers: eager softmax and the fused SDPA round apart by a few ulps each
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.slow
def test_minilm_monarch_one_block_is_exact_and_small_blocks_approximate(minilm_path, minilm_batch):
    model = load_minilm(minilm_path, "eager")
    ids, mask = minilm_batch
    n = ids.shape[1]
    with torch.no_grad():
        expected = mean_pool(model(ids, mask).last_hidden_state, mask)
        exact = attnrewrite.rewrite(model, (ids, mask), method="monarch", block_size=n)
        torch.testing.assert_close(
            mean_pool(exact.module(ids, mask).last_hidden_state, mask),
            expected,
            atol=1e-5,
            rtol=1e-5,
        )
        approx = attnrewrite.rewrite(model, (ids, mask), method="monarch", block_size=8)
        got = mean_pool(approx.module(ids, mask).last_hidden_state, mask)
    assert len(approx.report.replaced) == 6
    assert approx.report.sites[0].mask == "full"  # HF's expanded padding mask, checked at run time
    cosine = torch.nn.functional.cosine_similarity(got, expected)
    assert (cosine > 0.8).all()
    assert cosine[0] < 1 - 1e-6  # the long sentence spans several blocks: an approximation
    assert cosine[1] > 1 - 1e-5  # the short one fits in one block, where Monarch is exact
