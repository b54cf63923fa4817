"""The functional op and the script API: errors that name the fix, reports, policies."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import attnrewrite


def qkv(n=16, heads=2):
    return (torch.randn(1, heads, n, 8) for _ in range(3))


def test_sdpa_method_is_exact_attention():
    q, k, v = qkv()
    mask = torch.rand(1, 1, 16, 16) > 0.3
    mask[..., 0] = True
    for kwargs in ({}, {"attn_mask": mask}, {"is_causal": True}, {"scale": 0.3}):
        torch.testing.assert_close(
            attnrewrite.attention(q, k, v, **kwargs),
            F.scaled_dot_product_attention(q, k, v, **kwargs),
        )


def test_unknown_method_and_options_list_the_valid_ones():
    q, k, v = qkv()
    with pytest.raises(attnrewrite.OptionError, match="valid methods: hsa, monarch, sdpa, zeros"):
        attnrewrite.attention(q, k, v, method="linformer")
    with pytest.raises(attnrewrite.OptionError, match="valid options: block_size, num_steps, pad"):
        attnrewrite.attention(q, k, v, method="monarch", steps=2)
    with pytest.raises(attnrewrite.OptionError, match="valid options: none"):
        attnrewrite.attention(q, k, v, method="sdpa", block_size=4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"block_size": 0}, "block_size must be a positive int"),
        ({"num_steps": -1}, "num_steps must be an int ≥ 1"),
        ({"num_steps": 1.5}, "num_steps must be an int ≥ 1"),
        ({"pad": "middle"}, "pad must be 'post' or 'pre'"),
    ],
)
def test_option_values_are_checked(options, message):
    q, k, v = qkv()
    with pytest.raises(attnrewrite.OptionError, match=message):
        attnrewrite.attention(q, k, v, method="monarch", **options)


def test_monarch_refuses_masks_it_cannot_honor():
    q, k, v = qkv()
    window = torch.ones(16, 16, dtype=torch.bool).tril().triu(-3)
    with pytest.raises(attnrewrite.UnsupportedInputError, match="this mask is neither"):
        attnrewrite.attention(q, k, v, window, method="monarch")
    causal = torch.ones(16, 16, dtype=torch.bool).tril()  # causal with no padding: honored
    torch.testing.assert_close(
        attnrewrite.attention(q, k, v, causal, method="monarch", block_size=4),
        attnrewrite.attention(q, k, v, is_causal=True, method="monarch", block_size=4),
    )
    with pytest.raises(attnrewrite.UnsupportedInputError, match="cross-attention"):
        attnrewrite.attention(q, torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8), method="monarch")


def test_bad_inputs_are_named():
    q, k, v = qkv()
    with pytest.raises(attnrewrite.UnsupportedInputError, match="dtypes differ"):
        attnrewrite.attention(q, k.double(), v, method="monarch")
    with pytest.raises(attnrewrite.UnsupportedInputError, match="head dims differ"):
        attnrewrite.attention(q, k[..., :4], v, method="monarch")
    with pytest.raises(attnrewrite.UnsupportedInputError, match="does not broadcast"):
        attnrewrite.attention(q, k, v, torch.ones(3, 5, dtype=torch.bool), method="monarch")
    with pytest.raises(attnrewrite.UnsupportedInputError, match="attn_mask must be bool"):
        attnrewrite.attention(q, k, v, torch.ones(1, 16, dtype=torch.int64), method="monarch")


class Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 8)).unbind(-2)
        return x + F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(Layer() for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_report_names_layers_and_serializes():
    res = attnrewrite.rewrite(TwoLayers(), (torch.randn(2, 16, 8),), method="monarch", block_size=4)
    assert [s.name for s in res.report.sites] == ["layers.0", "layers.1"]
    assert [s.layer for s in res.report.sites] == [0, 1]
    data = json.loads(res.report.to_json())
    assert data["method"] == "monarch"
    assert data["sites"][0]["options"] == {"block_size": 4, "num_steps": 2, "pad": "post"}
    assert "2 replaced with monarch, 0 kept" in str(res.report)


def test_select_policy_keeps_unselected_layers_exact():
    model = TwoLayers()
    x = torch.randn(2, 16, 8)
    res = attnrewrite.rewrite(
        model, (x,), method="monarch", block_size=4, policy=attnrewrite.Select(layers=[1])
    )
    assert [s.status for s in res.report.sites] == ["kept", "replaced"]
    assert "not in the selected layers" in res.report.sites[0].reason
    with pytest.raises(attnrewrite.OptionError, match="list of glob patterns"):
        attnrewrite.Select(names="layers.*")


def test_monarch_rewrite_is_trainable():
    model = TwoLayers()
    x = torch.randn(2, 16, 8)
    res = attnrewrite.rewrite(model, (x,), method="monarch", block_size=4)
    res.module(x).square().mean().backward()
    grads = [p.grad for p in res.module.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_stacked_sites_feeding_each_other_are_all_replaced():
    class Stacked(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(F.scaled_dot_product_attention(q, k, v), k, v)

    q, k, v = qkv()
    res = attnrewrite.rewrite(Stacked(), (q, k, v), method="monarch", block_size=16)
    assert [s.status for s in res.report.sites] == ["replaced", "replaced"]
    torch.testing.assert_close(res.module(q, k, v), Stacked()(q, k, v), atol=1e-5, rtol=1e-5)


def test_hsa_on_alternating_layers_through_select():
    model = TwoLayers()
    x = torch.randn(2, 16, 8)
    res = attnrewrite.rewrite(
        model, (x,), method="hsa", branching=(4, 2), policy=attnrewrite.Select(layers=[1])
    )
    assert [s.status for s in res.report.sites] == ["kept", "replaced"]
    assert res.report.sites[1].method == "hsa"


def test_rewrite_leaves_the_model_state_inputs_and_random_stream_as_they_were():
    """A full (…, N, N) mask is classified by running the captured graph once on the example
    inputs; that run must not update the model's buffers (shared with the graph), write the
    inputs, or draw from the random stream."""

    class Stateful(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))
            self.norm = torch.nn.BatchNorm1d(8)

        def forward(self, q, k, v, mask):
            self.calls.add_(1)
            q = self.norm(q.flatten(0, 2)).view_as(q) + F.dropout(q, 0.1)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    mask = torch.ones(2, 1, 16, 16, dtype=torch.bool).tril()
    model = Stateful().train()
    state = {name: x.clone() for name, x in model.state_dict().items()}
    inputs = [x.clone() for x in (q, k, v, mask)]
    torch.manual_seed(0)
    attnrewrite.rewrite(model, (q, k, v, mask), method="monarch")
    drawn = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(drawn, torch.rand(3))
    for name, x in model.state_dict().items():
        assert torch.equal(x, state[name]), name
    for x, y in zip((q, k, v, mask), inputs, strict=True):
        assert torch.equal(x, y)


def test_select_min_seq_len_decides_a_dynamic_length_by_its_range_or_refuses():
    """One exported graph serves every length in its range: min_seq_len holds for all of them
    or for none, or the policy cannot decide once (and says how to)."""

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    policy = attnrewrite.Select(min_seq_len=512)
    ranges = {"short": (2, 511, 64, "kept"), "long": (512, 4096, 512, "replaced")}
    for low, high, n, status in ranges.values():
        length = torch.export.Dim("n", min=low, max=high)
        q, k, v = (torch.randn(1, 2, n, 8) for _ in range(3))
        res = attnrewrite.rewrite(
            Attention(), (q, k, v), method="monarch", policy=policy,
            dynamic_shapes=({2: length}, {2: length}, {2: length}),
        )  # fmt: skip
        assert [s.status for s in res.report.sites] == [status]
    length = torch.export.Dim("n", max=4096)
    with pytest.raises(attnrewrite.OptionError, match="cannot decide the dynamic sequence length"):
        attnrewrite.rewrite(
            Attention(), (q, k, v), method="monarch", policy=policy,
            dynamic_shapes=({2: length}, {2: length}, {2: length}),
        )  # fmt: skip


class ThreeInputs(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: attnrewrite.rewrite(ThreeInputs(), list(qkv()), method="sdpa"), r"a tuple"),
        (
            lambda: attnrewrite.rewrite(
                attnrewrite.rewrite(ThreeInputs(), tuple(qkv()), method="sdpa"),
                tuple(qkv()),
                method="sdpa",
            ),
            r"result\.module",
        ),
        (lambda: attnrewrite.rewrite(F.softmax, tuple(qkv()), method="sdpa"), r"nn\.Module"),
        (
            lambda: attnrewrite.rewrite(
                ThreeInputs(), tuple(qkv()), example_kwargs=[1], method="sdpa"
            ),
            r"example_kwargs must be a dict",
        ),
    ],
    ids=["list of inputs", "a RewriteResult", "not a module", "kwargs not a dict"],
)
def test_call_slips_are_named_with_the_fix(call, message):
    with pytest.raises(attnrewrite.AttnRewriteError, match=message):
        call()
