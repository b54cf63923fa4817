"""The canonicalize pass: attention spelled many ways becomes one SDPA node with the same output;
look-alikes are kept bit-identical, with a reason."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from attnrewrite.passes import spellings
from torch import nn

import attnrewrite

B, H, N, D = 2, 3, 10, 8
FLOAT32_MIN = torch.finfo(torch.float32).min


class Spelled(nn.Module):
    """Wraps a function of (q, k, v, mask) so it can be exported, traced and compiled."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.register_buffer("temperature", torch.tensor(math.sqrt(D)))
        self.register_buffer("causal", torch.ones(64, 64).tril())
        self.dropout = nn.Dropout(0.1)
        self.softmax = nn.Softmax(dim=-1)  # a leaf module in symbolic_trace graphs

    def forward(self, q, k, v, mask):
        return self.fn(self, q, k, v, mask)


def inputs():
    q, k, v = torch.randn(B, H, N, D), torch.randn(B, H, N, D), torch.randn(B, H, N, D)
    keep = torch.ones(B, 1, 1, N, dtype=torch.bool)
    keep[1, ..., 7:] = False
    return q, k, v, keep


def additive(keep):
    return torch.zeros(keep.shape).masked_fill(~keep, FLOAT32_MIN)


ATTENTION = {
    "matmul_div_sqrt_F_softmax": lambda m, q, k, v, keep: (
        F.softmax(torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(D), dim=-1) @ v
    ),
    "at_mul_torch_softmax": lambda m, q, k, v, keep: (
        torch.softmax((q @ k.transpose(-1, -2)) * D**-0.5, dim=3) @ v
    ),
    "bmm_3d_method_softmax": lambda m, q, k, v, keep: torch.bmm(
        torch.bmm(q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2)).softmax(-1), v.flatten(0, 1)
    ),
    "no_scale": lambda m, q, k, v, keep: torch.matmul(
        torch.matmul(q, k.transpose(2, 3)).softmax(dim=-1), v
    ),
    "additive_mask": lambda m, q, k, v, keep: (
        torch.softmax(q @ k.transpose(-2, -1) / 3.0 + additive(keep), -1) @ v
    ),
    "constant_shift": lambda m, q, k, v, keep: (
        ((q @ k.transpose(-2, -1)) * 0.3 - 5.0).softmax(-1) @ v
    ),
    "softmax_module": lambda m, q, k, v, keep: m.softmax(q @ k.transpose(-2, -1) * 0.3) @ v,
    "per_key_bias_1d": lambda m, q, k, v, keep: (  # (Nk,): SDPA itself takes masks of 2-D up
        torch.softmax(q @ k.transpose(-2, -1) / 3.0 + additive(keep)[1, 0, 0], -1) @ v
    ),
    "masked_fill_neg_inf": lambda m, q, k, v, keep: (
        (q @ k.transpose(-2, -1)).masked_fill(~keep, float("-inf")).softmax(-1) @ v
    ),
    "masked_fill_finfo_min": lambda m, q, k, v, keep: (
        (q @ k.transpose(-2, -1) * 0.3).masked_fill(~keep, FLOAT32_MIN).softmax(-1) @ v
    ),
    "where_keep_scores": lambda m, q, k, v, keep: (
        torch.where(keep, q @ k.transpose(-2, -1), float("-inf")).softmax(-1) @ v
    ),
    "upcast_softmax_cast_back": lambda m, q, k, v, keep: (
        F.softmax((q @ k.transpose(-2, -1)).float(), dim=-1, dtype=torch.float32).to(q.dtype) @ v
    ),
    "dropout_eval_functional_and_module": lambda m, q, k, v, keep: (
        m.dropout(F.dropout(F.softmax(q @ k.transpose(-2, -1), -1), 0.1, training=False)) @ v
    ),
    "scale_on_query_before_product": lambda m, q, k, v, keep: (
        ((q * D**-0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
    ),
    "tensor_temperature": lambda m, q, k, v, keep: (
        (q @ k.transpose(-2, -1) / m.temperature).softmax(-1) @ v
    ),
    "scale_after_mask": lambda m, q, k, v, keep: (
        ((q @ k.transpose(-2, -1) + additive(keep)) * 0.25).softmax(-1) @ v
    ),
    "existing_sdpa": lambda m, q, k, v, keep: F.scaled_dot_product_attention(q, k, v, keep),
    "einsum_bhqd": lambda m, q, k, v, keep: torch.einsum(
        "bhqk,bhkd->bhqd", torch.einsum("bhqd,bhkd->bhqk", q, k).softmax(-1), v
    ),
    "einsum_other_letters_bnhd_layout": lambda m, q, k, v, keep: torch.einsum(
        "zyij,zjyc->ziyc",
        torch.einsum("ziyc,zjyc->zyij", q.transpose(1, 2), k.transpose(1, 2)).softmax(-1),
        v.transpose(1, 2),
    ),
    "baddbmm_bias_alpha": lambda m, q, k, v, keep: torch.bmm(
        torch.baddbmm(
            additive(keep).expand(B, H, N, N).reshape(B * H, N, N),
            q.flatten(0, 1),
            k.flatten(0, 1).transpose(1, 2),
            alpha=0.3,
        ).softmax(-1),
        v.flatten(0, 1),
    ),
    "permute_from_bnhd": lambda m, q, k, v, keep: (
        (q @ k.transpose(1, 2).contiguous().permute(0, 2, 3, 1)).softmax(-1) @ v
    ),
    "mT": lambda m, q, k, v, keep: (q @ k.mT).softmax(-1) @ v,
    "single_head_2d_t": lambda m, q, k, v, keep: (q[0, 0] @ k[0, 0].t()).softmax(-1) @ v[0, 0],
    "in_graph_rsqrt_scale": lambda m, q, k, v, keep: (
        ((q @ k.transpose(-2, -1)) * torch.rsqrt(torch.tensor(float(D)))).softmax(-1) @ v
    ),
    "per_head_scale": lambda m, q, k, v, keep: (
        ((q @ k.transpose(-2, -1)) * torch.linspace(0.1, 0.5, H).view(H, 1, 1)).softmax(-1) @ v
    ),
    "per_key_scale": lambda m, q, k, v, keep: (
        ((q @ k.transpose(-2, -1)) / torch.linspace(1.0, 2.0, N)).softmax(-1) @ v
    ),
    "private_softmax_and_type_as": lambda m, q, k, v, keep: (
        torch._softmax((q @ k.transpose(-2, -1)).double(), -1, False).type_as(v) @ v
    ),
    "fused_qkv_chunk_unbind_split": lambda m, q, k, v, keep: (
        lambda qkv: F.softmax(qkv[0] @ qkv[1].transpose(-2, -1), -1) @ qkv[2]
    )(torch.cat([q, k, v], dim=-1).split(D, dim=-1)),
    "cross_attention": lambda m, q, k, v, keep: (q[:, :, :4] @ k.transpose(-2, -1)).softmax(-1) @ v,
    "gated_attention": lambda m, q, k, v, keep: (
        torch.sigmoid(q.mean(-1, keepdim=True)) * ((q @ k.transpose(-2, -1)).softmax(-1) @ v)
    ),
}

# Spellings whose canonical form carries a flag: is_causal or enable_gqa.
CAUSAL = {
    "causal_tril_buffer_sliced": lambda m, q, k, v, keep: (
        (q @ k.transpose(-2, -1)).masked_fill(m.causal[:N, :N] == 0, float("-inf")).softmax(-1) @ v
    ),
    "causal_arange_comparison": lambda m, q, k, v, keep: (
        torch.where(
            torch.arange(N)[:, None] >= torch.arange(N)[None, :],
            q @ k.transpose(-2, -1),
            FLOAT32_MIN,
        ).softmax(-1)
        @ v
    ),
    "causal_triu_additive": lambda m, q, k, v, keep: (
        (
            q @ k.transpose(-2, -1) + torch.triu(torch.full((N, N), float("-inf")), diagonal=1)
        ).softmax(-1)
        @ v
    ),
}
GQA = {
    "gqa_repeat_interleave": lambda m, q, k, v, keep: (
        (q @ k[:, :1].repeat_interleave(H, dim=1).transpose(-2, -1)).softmax(-1)
        @ v[:, :1].repeat_interleave(H, dim=-3)
    ),
    "gqa_expand_reshape": lambda m, q, k, v, keep: (
        lambda kv: (q @ kv(k).transpose(-2, -1)).softmax(-1) @ kv(v)
    )(lambda x: x[:, :1, None].expand(B, 1, H, N, D).reshape(B, H, N, D)),
}

LOOK_ALIKES = {
    "softmax_over_queries": (
        lambda m, q, k, v, keep: (q @ k.transpose(-2, -1)).softmax(-2) @ v,
        "not the key dim",
    ),
    "probabilities_returned": (
        lambda m, q, k, v, keep: (lambda p: (p @ v, p))((q @ k.transpose(-2, -1)).softmax(-1)),
        "users",
    ),
    "probabilities_squared": (
        lambda m, q, k, v, keep: ((q @ k.transpose(-2, -1)).softmax(-1) ** 2) @ v,
        "not a product with values",
    ),
    "probabilities_renormalized": (
        lambda m, q, k, v, keep: (lambda p: (p / p.sum(-1, keepdim=True)) @ v)(
            (q @ k.transpose(-2, -1)).softmax(-1)
        ),
        "users",
    ),
    "values_on_the_left": (
        lambda m, q, k, v, keep: v.transpose(-2, -1) @ (q @ k.transpose(-2, -1)).softmax(-1),
        "right operand",
    ),
    "classifier_softmax": (lambda m, q, k, v, keep: (q.mean(-1)).softmax(-1), "not a product"),
    "scores_used_elsewhere": (
        lambda m, q, k, v, keep: (lambda s: (s.softmax(-1) @ v, s.mean()))(q @ k.transpose(-2, -1)),
        "outside the attention region",
    ),
    "per_query_key_scale": (
        lambda m, q, k, v, keep: (
            ((q @ k.transpose(-2, -1)) * torch.linspace(0.5, 1.5, N * N).view(N, N)).softmax(-1) @ v
        ),
        "cannot be folded",
    ),
    # in place, results unused: the writes must survive the pass (FX counts them as dead code)
    "mask_written_in_place": (
        lambda m, q, k, v, keep: (
            lambda s: (s.masked_fill_(~keep, -math.inf), s.softmax(-1) @ v)[1]
        )(q @ k.transpose(-2, -1)),
        "users|masked_fill_",  # symbolic_trace sees a second user, export an in-place score
    ),
    "probabilities_scaled_in_place": (
        lambda m, q, k, v, keep: (lambda p: (p.mul_(2.0), p @ v)[1])(
            (q @ k.transpose(-2, -1)).softmax(-1)
        ),
        "users|feed mul_",
    ),
    "soft_capped_scores": (
        lambda m, q, k, v, keep: (
            (torch.tanh(q @ k.transpose(-2, -1) / 50.0) * 50.0).softmax(-1) @ v
        ),
        "neither operand",
    ),
    "inexact_masked_fill": (
        lambda m, q, k, v, keep: (q @ k.transpose(-2, -1)).masked_fill(~keep, -1e4).softmax(-1) @ v,
        "not an exact mask",
    ),
}


def run(module, args):
    with torch.no_grad():
        return module(*args)


def count(gm, spelling):
    return sum(spelling.matches(n) for n in gm.graph.nodes)


def captures(module, args):
    """The two script front doors: torch.export (ATen graph) and symbolic_trace (torch graph)."""
    yield "export", module
    yield "symbolic_trace", torch.fx.symbolic_trace(module)


@pytest.mark.parametrize("name", [*ATTENTION, *CAUSAL, *GQA])
def test_attention_spellings_become_one_sdpa_node(name):
    fn = {**ATTENTION, **CAUSAL, **GQA}[name]
    module = Spelled(fn).eval()
    args = inputs()
    expected = run(module, args)
    for how, model in captures(module, args):
        res = attnrewrite.rewrite(model, args, method="sdpa")
        assert [s.status for s in res.report.sites] == ["replaced"], (how, res.report)
        site = res.report.sites[0]
        assert (site.is_causal, site.mask) == (
            (True, "causal") if name in CAUSAL else (False, site.mask)
        )
        assert site.enable_gqa == (name in GQA), how
        assert count(res.module, spellings.SOFTMAX) == 0, how
        assert count(res.module, spellings.SDPA) == 1, how
        torch.testing.assert_close(run(res.module, args), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", LOOK_ALIKES)
def test_look_alikes_are_kept_bit_identical_with_a_reason(name):
    fn, reason = LOOK_ALIKES[name]
    module = Spelled(fn).eval()
    args = inputs()
    for how, model in captures(module, args):
        expected = run(model, args)
        res = attnrewrite.rewrite(model, args, method="monarch", block_size=4)
        assert [s.status for s in res.report.sites] == ["kept"], (how, res.report)
        assert re.search(reason, res.report.sites[0].reason), (how, res.report.sites[0].reason)
        got = run(res.module, args)
        for a, b in zip(
            torch.utils._pytree.tree_leaves(got),
            torch.utils._pytree.tree_leaves(expected),
            strict=True,
        ):
            assert torch.equal(a, b), how


def test_active_dropout_keeps_the_site():
    module = Spelled(ATTENTION["dropout_eval_functional_and_module"]).train()
    traced = torch.fx.symbolic_trace(module)
    res = attnrewrite.rewrite(traced, inputs(), method="sdpa")
    assert res.report.sites[0].status == "kept"
    assert "dropout p=0.1 is active" in res.report.sites[0].reason


def test_graph_without_attention_is_left_as_it_is():
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2)).eval()
    traced = torch.fx.symbolic_trace(model)
    res = attnrewrite.rewrite(traced, (torch.randn(3, 8),), method="monarch")
    assert res.report.sites == []
    assert res.module.code == traced.code


def test_multihead_attention_weights_dropped_by_the_caller_do_not_keep_the_site():
    """`out, _ = mha(x, x, x)` (need_weights defaults to True): the unused weights are dead code,
    not a second user of the probabilities."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(16, 4)  # sequence-first, as by default

        def forward(self, x):
            out, _ = self.mha(x, x, x)
            return out

    model, x = Block().eval(), torch.randn(10, 2, 16)
    res = attnrewrite.rewrite(model, (x,), method="sdpa")
    assert [s.status for s in res.report.sites] == ["replaced"]
    torch.testing.assert_close(run(res.module, (x,)), run(model, (x,)))


def test_multihead_attention_module_is_found_through_rewrite():
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x, padding):
            return self.mha(x, x, x, key_padding_mask=padding, need_weights=False)[0]

    x, padding = torch.randn(2, 10, 16), torch.zeros(2, 10, dtype=torch.bool)
    padding[1, 7:] = True
    res = attnrewrite.rewrite(Block().eval(), (x, padding), method="sdpa")
    assert [s.status for s in res.report.sites] == ["replaced"]
    assert res.report.sites[0].name == "mha" and res.report.sites[0].mask == "key"
    torch.testing.assert_close(run(res.module, (x, padding)), run(Block().eval(), (x, padding)))


@pytest.mark.parametrize("kv_batch", [(B, 1), (1, 1), (1, H)])
def test_keys_and_values_broadcast_over_query_batch_dims_are_expanded(kv_batch):
    """SDPA broadcasts k and v over q's batch dims (multi-query attention spelled so, as in
    Falcon): the canonical site has them expanded, so the methods see q's batch dims. With
    block_size = N Monarch is exact, so the rewritten module must match SDPA."""

    class Broadcast(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    q = torch.randn(B, H, N, D)
    k, v = torch.randn(*kv_batch, N, D), torch.randn(*kv_batch, N, D)
    expected = Broadcast()(q, k, v)
    for how, model in captures(Broadcast(), (q, k, v)):
        for method, options in (("sdpa", {}), ("monarch", {"block_size": N})):
            res = attnrewrite.rewrite(model, (q, k, v), method=method, **options)
            (site,) = res.report.sites
            assert site.status == "replaced" and site.k_shape == (B, H, N, D), (how, site)
            torch.testing.assert_close(run(res.module, (q, k, v)), expected, atol=1e-5, rtol=1e-5)
