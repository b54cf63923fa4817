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
import attnrewrite.backend

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
    "masked_fill_0d_tensor_neg_inf": lambda m, q, k, v, keep: (
        (q @ k.transpose(-2, -1)).masked_fill(~keep, torch.full((), float("-inf"))).softmax(-1) @ v
    ),
    "where_0d_tensor_finfo_min": lambda m, q, k, v, keep: (
        torch.where(keep, q @ k.transpose(-2, -1), torch.full((), FLOAT32_MIN)).softmax(-1) @ v
    ),
    "scale_as_0d_tensor": lambda m, q, k, v, keep: (
        ((q @ k.transpose(-2, -1)) * torch.full([], D**-0.5)).softmax(-1) @ v
    ),
    "causal_where_and_additive_padding": lambda m, q, k, v, keep: (
        (
            torch.where(m.causal[:N, :N] == 1, q @ k.transpose(-2, -1), torch.full((), FLOAT32_MIN))
            + additive(keep)
        ).softmax(-1)
        @ v
    ),
    # BLOOM: scores made on (B·H, N, N), masked on (B, H, N, N), probabilities viewed back
    "bloom_probabilities_viewed_for_bmm": lambda m, q, k, v, keep: torch.bmm(
        F.softmax(
            torch.baddbmm(
                torch.linspace(0.0, 1.0, N).expand(B * H, 1, N),
                q.flatten(0, 1),
                k.flatten(0, 1).transpose(1, 2),
                alpha=D**-0.5,
            )
            .view(B, H, N, N)
            .masked_fill(~keep, FLOAT32_MIN),
            dim=-1,
            dtype=torch.float32,
        ).view(B * H, N, N),
        v.flatten(0, 1),
    ).view(B, H, N, D),
    # MBart: scores viewed to (B, H, N, N) for the mask, then back to (B·H, N, N)
    "mbart_scores_viewed_for_mask": lambda m, q, k, v, keep: torch.bmm(
        F.softmax(
            (
                torch.bmm(q.flatten(0, 1) * D**-0.5, k.flatten(0, 1).transpose(1, 2)).view(
                    B, H, N, N
                )
                + additive(keep)
            ).view(B * H, N, N),
            dim=-1,
        ),
        v.flatten(0, 1),
    ),
    # SDPA's own math decomposition: √scale on q and on kᵀ, (B·H) products, _safe_softmax
    "sdpa_math_decomposition": lambda m, q, k, v, keep: torch.ops.aten._unsafe_view(
        torch.bmm(
            torch.ops.aten._safe_softmax(
                torch.ops.aten._unsafe_view(
                    torch.bmm(
                        torch.ops.aten.mul.Scalar(q, D**-0.25).expand(B, H, N, D).view(B * H, N, D),
                        torch.ops.aten.mul.Scalar(k.transpose(-2, -1), D**-0.25)
                        .expand(B, H, D, N)
                        .view(B * H, D, N),
                    ),
                    [B, H, N, N],
                )
                + additive(keep),
                -1,
            )
            .expand(B, H, N, N)
            .view(B * H, N, N),
            v.expand(B, H, N, D).view(B * H, N, D),
        ),
        [B, H, N, D],
    ),
    "einsum_ellipsis": lambda m, q, k, v, keep: torch.einsum(
        "...qk,...kd->...qd", torch.einsum("...qd,...kd->...qk", q, k).softmax(-1), v
    ),
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
    # casts that lose values: only floating dtypes that hold the inputs' values may pass
    "scores_cast_to_int32": (
        lambda m, q, k, v, keep: (
            (q @ k.transpose(-2, -1) * 3).to(torch.int32).to(torch.float32).softmax(-1) @ v
        ),
        "torch.int32",
    ),
    "probabilities_cast_to_int64": (
        lambda m, q, k, v, keep: (
            (q @ k.transpose(-2, -1)).softmax(-1).to(torch.int64).to(torch.float32) @ v
        ),
        "torch.int64",
    ),
    "probabilities_cast_to_bool": (
        lambda m, q, k, v, keep: (
            (q @ k.transpose(-2, -1)).softmax(-1).to(torch.bool).to(torch.float32) @ v
        ),
        "torch.bool",
    ),
    "scores_type_int16": (
        lambda m, q, k, v, keep: (
            (q @ k.transpose(-2, -1) * 3).type(torch.int16).float().softmax(-1) @ v
        ),
        "torch.int16",
    ),
    "log_softmax_weights": (
        lambda m, q, k, v, keep: (q @ k.transpose(-2, -1) * 0.3).log_softmax(-1) @ v,
        "^not attention: log_softmax",
    ),
    "sigmoid_attention": (
        lambda m, q, k, v, keep: torch.sigmoid(q @ k.transpose(-2, -1) * 0.3) @ v,
        "^not attention: sigmoid",
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


# Spellings added with the layout-regrouping and 0-d-fill matcher, checked through the compile
# backend too (the third front door; Dynamo graphs spell ops as torch functions).
COMPILED = [
    "masked_fill_0d_tensor_neg_inf",
    "where_0d_tensor_finfo_min",
    "scale_as_0d_tensor",
    "causal_where_and_additive_padding",
    "bloom_probabilities_viewed_for_bmm",
    "mbart_scores_viewed_for_mask",
    "sdpa_math_decomposition",
    "einsum_ellipsis",
    "scores_cast_to_int32",
    "probabilities_cast_to_int64",
    "probabilities_cast_to_bool",
    "scores_type_int16",
    "log_softmax_weights",
    "sigmoid_attention",
]


@pytest.mark.parametrize("name", COMPILED)
def test_spellings_through_the_compile_backend(name):
    found = name in ATTENTION
    module = Spelled(ATTENTION[name] if found else LOOK_ALIKES[name][0]).eval()
    args = inputs()
    torch._dynamo.reset()
    attnrewrite.backend.reports.clear()
    options = {"method": "sdpa", "inner": "eager"}
    got = run(torch.compile(module, backend="attnrewrite", options=options), args)
    (site,) = attnrewrite.backend.reports[-1].sites
    if found:
        assert site.status == "replaced", site
        torch.testing.assert_close(got, run(module, args), atol=1e-5, rtol=1e-5)
    else:
        assert site.status == "kept" and re.search(LOOK_ALIKES[name][1], site.reason), site
        assert torch.equal(got, run(module, args))


class Regrouped(nn.Module):
    """Batch and head dims merged and split with sizes read from the inputs (BLOOM's and
    MBart's spellings), so a dynamic batch or length stays symbolic through the regroups."""

    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling

    def forward(self, q, k, v, mask):
        b, h, n, d = q.shape
        if self.spelling == "view":  # MBart: scores viewed to 4-D for the mask and back
            scores = torch.bmm(q.reshape(b * h, n, d), k.reshape(b * h, n, d).transpose(1, 2))
            probs = F.softmax((scores.view(b, h, n, n) + mask).view(b * h, n, n), dim=-1)
            return torch.bmm(probs, v.reshape(b * h, n, d)).view(b, h, n, d)
        scores = torch.bmm(q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2)).unflatten(0, (b, h))
        probs = (scores + mask).softmax(-1).flatten(0, 1)  # BLOOM: probabilities flattened
        return torch.bmm(probs, v.flatten(0, 1))


@pytest.mark.parametrize("spelling", ["view", "unflatten"])
def test_regroups_with_dynamic_batch_and_length(spelling):
    batch, length = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("n", min=2, max=64)
    q, k, v, keep = inputs()
    dynamic = ({0: batch, 2: length},) * 3 + ({0: batch, 3: length},)
    res = attnrewrite.rewrite(
        Regrouped(spelling), (q, k, v, additive(keep)), method="sdpa", dynamic_shapes=dynamic
    )
    assert [s.status for s in res.report.sites] == ["replaced"], res.report
    assert res.report.sites[0].q_shape[1:] == (H, res.report.sites[0].q_shape[2], D)
    q, k, v = (torch.randn(4, H, 13, D) for _ in range(3))
    keep = torch.ones(4, 1, 1, 13, dtype=torch.bool)
    keep[2, ..., 9:] = False
    args = (q, k, v, additive(keep))
    torch.testing.assert_close(run(res.module, args), run(Regrouped(spelling), args))


class HalfAttention(nn.Module):
    """Attention in a 16-bit dtype whose scores go through `cast` (a dtype) before the softmax,
    or get a float32 additive mask (which promotes them to float32) when `cast` is None."""

    def __init__(self, cast: torch.dtype | None = None):
        super().__init__()
        self.cast = cast

    def forward(self, q, k, v, mask):
        scores = q @ k.transpose(-2, -1) * D**-0.5
        scores = scores.to(self.cast) if self.cast is not None else scores + mask
        return scores.softmax(-1).to(v.dtype) @ v


def half_inputs(dtype: torch.dtype, fill: float, fully_masked: bool):
    q, k, v, keep = inputs()
    if fully_masked:
        keep[1] = False  # every key of the second batch's rows masked
    mask = torch.zeros(keep.shape).masked_fill(~keep, fill)
    return (*(x.to(dtype) for x in (q, k, v)), mask)


@pytest.mark.parametrize(
    ("dtype", "cast"), [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)]
)
def test_a_16_bit_cast_to_the_other_16_bit_dtype_narrows(dtype, cast):
    """Neither 16-bit float holds the other's values: SDPA in the model's dtype would not round
    the scores as the model does."""
    args = half_inputs(dtype, FLOAT32_MIN, fully_masked=False)
    for how, model in captures(HalfAttention(cast), args):
        res = attnrewrite.rewrite(model, args, method="sdpa")
        (site,) = res.report.sites
        assert site.status == "kept" and "does not hold every" in site.reason, (how, site)
        assert torch.equal(run(res.module, args), run(model, args)), how


@pytest.mark.parametrize(
    ("fill", "fully_masked"),
    [(-1e5, True), (FLOAT32_MIN, False)],
    ids=["fully_masked_row_beyond_float16", "finfo_min_partly_masked_rows"],
)
def test_a_float32_mask_in_a_float16_model_keeps_its_values(fill, fully_masked):
    """A float32 mask value beyond float16's range becomes float16's finfo.min, not -inf: a row
    whose keys are all masked with -1e5 attends as the model's float32 softmax does (shifted
    scores), where -inf would give zeros. (The model adds -1e5 in float32, whose spacing there,
    1/128, rounds the scores: hence the tolerance.)"""
    args = half_inputs(torch.float16, fill, fully_masked)
    model = HalfAttention()
    for how, captured in captures(model, args):
        res = attnrewrite.rewrite(captured, args, method="sdpa")
        assert [s.status for s in res.report.sites] == ["replaced"], (how, res.report)
        got, expected = run(res.module, args), run(model, args)
        torch.testing.assert_close(got, expected, atol=1e-2, rtol=1e-2)


class Wrapped(nn.Module):
    """A module around a rewritten GraphModule, so torch.export captures it again."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, q, k, v, mask):
        return self.inner(q, k, v, mask)


@pytest.mark.parametrize(
    ("method", "options"), [("monarch", {"block_size": 5}), ("hsa", {}), ("zeros", {})]
)
def test_a_rewritten_model_reports_its_method_ops_as_already_rewritten(method, options):
    args = inputs()
    first = attnrewrite.rewrite(
        Spelled(ATTENTION["additive_mask"]).eval(), args, method=method, **options
    )
    assert [s.status for s in first.report.sites] == ["replaced"]
    expected = run(first.module, args)
    torch._dynamo.reset()
    attnrewrite.backend.reports.clear()
    options = {"method": "sdpa", "inner": "eager"}
    compiled = torch.compile(first.module, backend="attnrewrite", options=options)
    fronts = {
        "export": lambda: attnrewrite.rewrite(Wrapped(first.module), args, method="sdpa"),
        "graph_module": lambda: attnrewrite.rewrite(first.module, args, method="sdpa"),
        "symbolic_trace": lambda: attnrewrite.rewrite(
            torch.fx.symbolic_trace(first.module), args, method="sdpa"
        ),
        "compile": lambda: (run(compiled, args), attnrewrite.backend.reports[-1]),
    }
    for how, again in fronts.items():
        res = again()
        module, report = (compiled, res[1]) if how == "compile" else (res.module, res.report)
        (site,) = report.sites
        assert site.status == "kept", (how, site)
        assert re.match(r"already rewritten: attnrewrite[:.]", site.reason), (how, site.reason)
        assert site.q_shape == (B, H, N, D), how
        torch.testing.assert_close(run(module, args), expected, atol=0, rtol=0)
