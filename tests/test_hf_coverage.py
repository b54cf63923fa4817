"""Every attention layer of the common Hugging Face architectures is found, through both script
and compile front doors, in both attention implementations, and the canonical form is exact."""

from __future__ import annotations

import pytest
import torch
from hf_zoo import ZOO

import attnrewrite
import attnrewrite.backend
from attnrewrite.api import WITHOUT_KV_CACHE_NOTE
from attnrewrite.errors import AttnRewriteError

pytest.importorskip("transformers")


def first_output(outputs):
    return outputs[0]


DECODERS = [e for e in ZOO if e.causal_layers]


def plain_call(entry) -> dict:
    """The model's inputs as users pass them: no use_cache (Hugging Face's default is True)."""
    return {k: v for k, v in entry.inputs().items() if k != "use_cache"}


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("entry", ZOO, ids=lambda e: e.name)
def test_every_attention_layer_is_found_and_exact(entry, impl):
    model = entry.build(impl)
    inputs = plain_call(entry)
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


@pytest.mark.parametrize("entry", DECODERS, ids=lambda e: e.name)
def test_decoders_rewrite_from_the_plain_call_without_their_kv_cache(entry):
    model = entry.build("sdpa")
    inputs = plain_call(entry)
    if "decoder_input_ids" in inputs:  # encoder-decoders need both id tensors
        args, kwargs = (
            (),
            {"input_ids": inputs["input_ids"], "decoder_input_ids": inputs["decoder_input_ids"]},
        )
    else:
        args, kwargs = (inputs["input_ids"],), {}
    flags = [m.config.use_cache for m in model.modules() if hasattr(m, "config")]
    res = attnrewrite.rewrite(model, args, example_kwargs=kwargs, method="sdpa")
    assert flags == [m.config.use_cache for m in model.modules() if hasattr(m, "config")]
    assert res.report.notes == [WITHOUT_KV_CACHE_NOTE]
    assert WITHOUT_KV_CACHE_NOTE in str(res.report)
    assert len(res.report.replaced) == entry.attention_layers, res.report
    with torch.no_grad():
        expected = first_output(model(*args, **kwargs, use_cache=False))
        torch.testing.assert_close(first_output(res.module(*args, **kwargs)), expected)


def test_encoders_are_captured_as_called():
    entry = next(e for e in ZOO if e.name == "bert")
    res = attnrewrite.rewrite(entry.build("sdpa"), (), example_kwargs=entry.inputs(), method="sdpa")
    assert res.report.notes == []


def test_an_explicit_use_cache_is_respected():
    entry = next(e for e in ZOO if e.name == "llama_gqa_rope")
    model, ids = entry.build("sdpa"), entry.inputs()["input_ids"]
    res = attnrewrite.rewrite(model, (ids,), example_kwargs={"use_cache": False}, method="sdpa")
    assert res.report.notes == []
    assert len(res.report.replaced) == entry.attention_layers
    with pytest.raises(AttnRewriteError, match=r"use_cache': False"):
        attnrewrite.rewrite(model, (ids,), example_kwargs={"use_cache": True}, method="sdpa")
