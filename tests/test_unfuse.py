"""Fused attention calls are opened: nn.MultiheadAttention and nn.TransformerEncoderLayer under
torch.compile (Dynamo keeps F.multi_head_attention_forward whole; eval fast paths call fused
native ops) and torch.nn leaf modules in symbolic_trace graphs. Each rewrite is checked against
the original computation and against `rewrite()` of the same model."""

from __future__ import annotations

import pytest
import torch
from attnrewrite.passes.unfuse import unfuse_attention_calls
from nn_zoo import NN_ZOO, PaddedAttention, padding_mask
from torch import nn

import attnrewrite
import attnrewrite.backend

E, HEADS = 32, 4


def compiled(model, args, method, inner="eager", dynamic=None):
    """model(*args) through the attnrewrite backend, and the report of its graph."""
    torch._dynamo.reset()
    attnrewrite.backend.reports.clear()
    options = {"method": method, "inner": inner}
    out = torch.compile(model, backend="attnrewrite", options=options, dynamic=dynamic)(*args)
    return out, attnrewrite.backend.reports[-1]


def encoder(norm_first: bool = False, activation: str = "relu") -> nn.Module:
    layer = nn.TransformerEncoderLayer(
        E, HEADS, dim_feedforward=64, batch_first=True, norm_first=norm_first, activation=activation
    )
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    with torch.no_grad():  # norms that differ, so a composition that swaps them fails
        for name, parameter in model.named_parameters():
            if ".norm" in name and name.endswith("weight"):
                parameter.uniform_(0.5, 1.5)
            elif ".norm" in name:
                parameter.normal_()
    return model


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_multihead_attention_under_torch_compile_is_replaced(grad, masked):
    torch.manual_seed(0)
    model, x = PaddedAttention().eval(), torch.randn(2, 40, E)
    args = (x, padding_mask(2, 40)) if masked else (x,)
    with torch.set_grad_enabled(grad):
        exact, report = compiled(model, args, "sdpa")
        torch.testing.assert_close(exact, model(*args), atol=1e-5, rtol=1e-5)
        (site,) = report.sites
        assert (site.name, site.status, site.mask) == (
            "attention",
            "replaced",
            "key" if masked else "none",
        )
        monarch, report = compiled(model, args, "monarch")
        assert [s.status for s in report.sites] == ["replaced"]
        expected = attnrewrite.rewrite(model, args, method="monarch").module(*args)
        torch.testing.assert_close(monarch, expected, atol=1e-5, rtol=1e-5)
        assert (monarch - exact).abs().max() > 1e-3  # Monarch really ran


@pytest.mark.parametrize(("norm_first", "activation"), [(False, "relu"), (True, "gelu")])
def test_transformer_encoder_fast_path_is_opened(norm_first, activation):
    """Under no_grad, eval nn.TransformerEncoderLayer calls torch._transformer_encoder_layer_fwd
    (a call no matcher can look into); its composition gives the layer's output."""
    torch.manual_seed(0)
    model, x, padding = encoder(norm_first, activation), torch.randn(2, 40, E), padding_mask(2, 40)
    with torch.no_grad():  # (a src mask graph-breaks in Dynamo; test_native_... covers masks)
        for args in [(x,), (x, None, padding)]:
            torch._dynamo.reset()
            plain = torch.compile(model, backend="eager")(*args)  # Dynamo's own result
            exact, report = compiled(model, args, "sdpa")
            torch.testing.assert_close(exact, plain, atol=1e-5, rtol=1e-5)
            names = [s.name for s in report.sites]
            assert names == ["layers.0.self_attn", "layers.1.self_attn"]
            assert all(s.status == "replaced" for s in report.sites)
        monarch, report = compiled(model, (x, None, padding), "monarch")
        assert [s.status for s in report.sites] == ["replaced", "replaced"]
        rewritten = attnrewrite.rewrite(model, (x, None, padding), method="monarch")
        assert [s.name for s in rewritten.report.sites] == names
        expected = rewritten.module(x, None, padding)
        real = ~padding  # the eager fast path zeroes padded rows, Dynamo's graph does not
        torch.testing.assert_close(monarch[real], expected[real], atol=1e-5, rtol=1e-5)


def test_one_compiled_graph_serves_every_length():
    torch.manual_seed(0)
    model = encoder()
    torch._dynamo.reset()
    attnrewrite.backend.reports.clear()
    options = {"method": "monarch", "inner": "aot_eager"}
    run = torch.compile(model, backend="attnrewrite", options=options)
    with torch.no_grad():
        for n in (17, 40, 64):
            x = torch.randn(2, n, E)
            expected = attnrewrite.rewrite(model, (x,), method="monarch").module(x)
            torch.testing.assert_close(run(x), expected, atol=1e-5, rtol=1e-5)
    assert len(attnrewrite.backend.reports) == 2  # the first length, then one dynamic graph
    assert all(s.status == "replaced" for s in attnrewrite.backend.reports[-1].sites)


class NativeAttention(nn.Module):
    """Calls the fused op the way nn.MultiheadAttention's fast path does."""

    def __init__(self, mask_type, use_weights=False):
        super().__init__()
        self.attention = nn.MultiheadAttention(E, HEADS, batch_first=True)
        self.mask_type, self.use_weights = mask_type, use_weights

    def forward(self, x, mask):
        a = self.attention
        out, weights = torch._native_multi_head_attention(
            x, x, x, E, HEADS, a.in_proj_weight, a.in_proj_bias, a.out_proj.weight,
            a.out_proj.bias, mask, self.use_weights, True, self.mask_type,
        )  # fmt: skip
        return out + weights.sum() if self.use_weights else out


def native_mask(mask_type, dtype):
    n, masked = 40, padding_mask(2, 40)
    if mask_type == 0:
        masked = torch.ones(n, n, dtype=torch.bool).triu(1)
    elif mask_type == 2:
        masked = torch.ones(n, n, dtype=torch.bool).triu(1) | masked[:, None, None, :]
        masked = masked.expand(2, HEADS, n, n)
    if dtype == torch.bool:
        return masked
    return torch.zeros(masked.shape).masked_fill(masked, -torch.inf)


@pytest.mark.parametrize("mask_type", [None, 0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_native_multi_head_attention_composition_equals_the_op(mask_type, dtype):
    torch.manual_seed(0)
    model, x = NativeAttention(mask_type).eval(), torch.randn(2, 40, E)
    mask = None if mask_type is None else native_mask(mask_type, dtype)
    with torch.no_grad():
        got, report = compiled(model, (x, mask), "sdpa")
        torch.testing.assert_close(got, model(x, mask), atol=1e-5, rtol=1e-5)
    assert [s.status for s in report.sites] == ["replaced"]


def test_used_fast_path_weights_keep_the_call_with_the_reason():
    torch.manual_seed(0)
    model, x = NativeAttention(1, use_weights=True).eval(), torch.randn(2, 40, E)
    with torch.no_grad():
        got, report = compiled(model, (x, padding_mask(2, 40)), "monarch")
        torch.testing.assert_close(got, model(x, padding_mask(2, 40)))
    (site,) = report.sites
    assert (site.spelling, site.status) == ("fused_mha", "kept")
    assert "attention weights are used" in site.reason and "attnrewrite.rewrite(" in site.reason


def test_returned_multihead_weights_keep_the_site():
    """F.multi_head_attention_forward is opened as it is, weights included: the probabilities are
    then used twice, so the site is kept, as rewrite() keeps it."""

    class Weights(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(E, HEADS, batch_first=True)

        def forward(self, x):
            out, weights = self.attention(x, x, x)
            return out, weights

    torch.manual_seed(0)
    model, x = Weights().eval(), torch.randn(2, 40, E)
    (out, weights), report = compiled(model, (x,), "monarch")
    torch.testing.assert_close((out, weights), model(x))
    (site,) = report.sites
    assert site.status == "kept" and "users" in site.reason


def test_symbolic_trace_leaf_modules_are_opened():
    """symbolic_trace keeps torch.nn modules as leaves (call_module): each is opened."""

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.TransformerDecoderLayer(E, HEADS, dim_feedforward=64, batch_first=True)

        def forward(self, x, memory):
            return self.layer(x, memory)

    torch.manual_seed(0)
    model, x, memory = Decoder().eval(), torch.randn(2, 40, E), torch.randn(2, 24, E)
    traced = attnrewrite.rewrite(torch.fx.symbolic_trace(model), (x, memory), method="monarch")
    exported = attnrewrite.rewrite(model, (x, memory), method="monarch")
    rows = [(s.name, s.status) for s in traced.report.sites]
    assert rows == [(s.name, s.status) for s in exported.report.sites]
    assert rows == [("layer.self_attn", "replaced"), ("layer.multihead_attn", "kept")]
    torch.testing.assert_close(traced.module(x, memory), exported.module(x, memory))


def test_graph_without_fused_calls_is_untouched():
    traced = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(8, 8), nn.ReLU()))
    code = traced.code
    assert unfuse_attention_calls(traced) == {}
    assert traced.code == code


def test_transformer_with_causal_flags_is_rewritten_alike_by_both_paths():
    """nn.Transformer checks a mask's values to detect causality unless told: with the flags,
    rewrite() and torch.compile see the same three sites and compute the same function."""
    torch.manual_seed(0)
    model = nn.Transformer(E, HEADS, 1, 1, 64, batch_first=True).eval()
    src, tgt = torch.randn(2, 30, E), torch.randn(2, 20, E)
    flags = {
        "tgt_mask": nn.Transformer.generate_square_subsequent_mask(20),
        "tgt_is_causal": True,
        "src_is_causal": False,
    }
    with torch.no_grad():
        rewritten = attnrewrite.rewrite(model, (src, tgt), example_kwargs=flags, method="monarch")
        torch._dynamo.reset()
        attnrewrite.backend.reports.clear()
        options = {"method": "monarch", "inner": "eager"}
        got = torch.compile(model, backend="attnrewrite", options=options)(src, tgt, **flags)
        torch.testing.assert_close(got, rewritten.module(src, tgt, **flags))
    rows = [(s.name, s.status, s.mask) for s in rewritten.report.sites]
    assert rows == [(s.name, s.status, s.mask) for s in attnrewrite.backend.reports[-1].sites]
    assert rows == [
        ("encoder.layers.0.self_attn", "replaced", "none"),
        ("decoder.layers.0.self_attn", "replaced", "causal"),
        ("decoder.layers.0.multihead_attn", "kept", "none"),  # cross-attention
    ]


def test_a_mask_checked_by_value_gets_the_flag_as_the_fix():
    model = encoder()
    x, mask = torch.randn(2, 30, E), nn.Transformer.generate_square_subsequent_mask(30)
    with pytest.raises(attnrewrite.AttnRewriteError, match="pass is_causal="):
        attnrewrite.rewrite(model, (x, mask), method="monarch")

    class Caller(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = model

        def forward(self, x, mask):
            return self.encoder(x, mask)

    with pytest.raises(attnrewrite.AttnRewriteError, match="does not run on fake tensors"):
        attnrewrite.rewrite(torch.fx.symbolic_trace(Caller()), (x, mask), method="monarch")
    flag = {"is_causal": True}
    res = attnrewrite.rewrite(model, (x, mask), example_kwargs=flag, method="monarch")
    assert [(s.status, s.mask) for s in res.report.sites] == [("replaced", "causal")] * 2


@pytest.mark.parametrize("entry", NN_ZOO, ids=lambda e: e.name)
def test_torch_nn_attention_is_found_by_every_front_door(entry):
    """rewrite() (torch.export), a symbolic_trace GraphModule (leaf modules) and torch.compile
    (with grad, and under no_grad, where eval fast paths run) find every attention layer; the
    canonical form computes the model's function."""
    model, args = entry.build(), entry.inputs()
    expected = model(*args)  # grad enabled: no fast path, the modules' own composition
    for captured in (model, torch.fx.symbolic_trace(model)):
        res = attnrewrite.rewrite(captured, args, method="sdpa")
        assert [s.status for s in res.report.sites] == ["replaced"] * entry.attention_layers
        torch.testing.assert_close(res.module(*args), expected, atol=1e-5, rtol=1e-5)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            _, report = compiled(model, args, "sdpa")
        assert [s.status for s in report.sites] == ["replaced"] * entry.attention_layers
