"""Every attention layer of the common Hugging Face architectures is found, through both script
and compile front doors, in both attention implementations, and the canonical form is exact."""

from __future__ import annotations

import pytest
import torch
from hf_zoo import ZOO

import attnrewrite
import attnrewrite.backend

pytest.importorskip("transformers")


def first_output(outputs):
    return outputs[0]


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("entry", ZOO, ids=lambda e: e.name)
def test_every_attention_layer_is_found_and_exact(entry, impl):
    model = entry.build(impl)
    inputs = entry.inputs()
    with torch.no_grad():
        expected = first_output(model(**inputs))
        res = attnrewrite.rewrite(model, (), example_kwargs=inputs, method="sdpa")
        got = first_output(res.module(**inputs))
        torch._dynamo.reset()
        attnrewrite.backend.reports.clear()
        options = {"method": "sdpa", "inner": "eager"}
        compiled = first_output(
            torch.compile(model, backend="attnrewrite", options=options)(**inputs)
        )
    assert len(res.report.replaced) == entry.attention_layers, res.report
    compiled_sites = [s for r in attnrewrite.backend.reports for s in r.sites]
    assert sum(s.status == "replaced" for s in compiled_sites) == entry.attention_layers
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled, expected, atol=1e-5, rtol=1e-5)
    if entry.name in ("llama_gqa_rope", "mistral", "qwen2"):
        assert all(s.enable_gqa for s in res.report.sites)


def test_decoder_causal_layers_become_causal_sites():
    entry = next(e for e in ZOO if e.name == "gpt2")
    model, inputs = entry.build("eager"), entry.inputs()
    del inputs["attention_mask"]  # no padding: the causal mask is a constant, hence is_causal
    res = attnrewrite.rewrite(model, (), example_kwargs=inputs, method="monarch")
    assert [s.mask for s in res.report.sites] == ["causal"] * entry.causal_layers
    # causal Monarch is offered (benchmarks/causal.py decided it by measurement)
    assert all(s.status == "replaced" for s in res.report.sites)
