"""Per-head replacement (passes/head_split.py): the chosen heads run the method, the others stay
exact, head by head equal to the op and to SDPA on those heads; masks with and without a head
dim, GQA, causal; refused requests; ONNX export and torch.compile of a split site."""

from __future__ import annotations

import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim

import attnrewrite
from attnrewrite.flops import exact_attention_flops, site_flops
from attnrewrite.methods.hsa import hsa_attention_op
from attnrewrite.methods.monarch import monarch_attention_op
from attnrewrite.onnx import export_onnx

HEADS, N, D = 4, 32, 8


class Attention(torch.nn.Module):
    def __init__(self, is_causal: bool = False, enable_gqa: bool = False) -> None:
        super().__init__()
        self.is_causal, self.enable_gqa = is_causal, enable_gqa

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=self.is_causal, enable_gqa=self.enable_gqa
        )


class Heads:
    """A policy replacing `heads` of every site."""

    def __init__(self, heads) -> None:
        self.heads = heads

    def __call__(self, site):
        return None

    def site_options(self, site):
        return {"heads": self.heads}


def approximate(method, q, k, v, mask, is_causal, enable_gqa):
    if method == "monarch":
        return monarch_attention_op(
            q, k, v, mask, None, 8, 1, is_causal=is_causal, enable_gqa=enable_gqa
        )
    return hsa_attention_op(q, k, v, mask, None, [4, 2], is_causal, enable_gqa=enable_gqa)


def method_options(method):
    return {"block_size": 8, "num_steps": 1} if method == "monarch" else {"branching": (4, 2)}


def key_mask(heads: int, batch: bool = True) -> torch.Tensor:
    """Key padding as a (2, heads, N, N) mask, or (heads, N, N) (the same for every sequence)."""
    keep = torch.ones(2, heads, N, N, dtype=torch.bool)
    keep[0, ..., N - 5 :] = False
    keep[1, ..., :3] = False
    return keep if batch else keep[0]


@pytest.mark.parametrize("method", ["monarch", "hsa"])
@pytest.mark.parametrize(
    ("mask_heads", "is_causal", "kv_heads", "heads"),
    [
        (None, False, HEADS, [0, 2, 3]),
        (1, False, HEADS, [1]),  # a key mask broadcast over heads
        (HEADS, False, HEADS, [0, 3]),  # a mask with a head dim: split along with q
        (-HEADS, False, HEADS, [1, 3]),  # (heads, N, N): its head dim is its first
        (None, True, HEADS, [1, 2]),
        (None, False, 2, [0, 1]),  # GQA: both heads read key head 0
        (1, True, 2, [1, 2]),
    ],
)
def test_chosen_heads_run_the_method_and_the_others_stay_exact(
    method, mask_heads, is_causal, kv_heads, heads
):
    torch.manual_seed(0)
    q = torch.randn(2, HEADS, N, D)
    k, v = torch.randn(2, kv_heads, N, D), torch.randn(2, kv_heads, N, D)
    mask = None if mask_heads is None else key_mask(abs(mask_heads), mask_heads > 0)
    gqa = kv_heads != HEADS
    model = Attention(is_causal, gqa)
    inputs = (q, k, v) if mask is None else (q, k, v, mask)
    res = attnrewrite.rewrite(
        model, inputs, method=method, policy=Heads(heads), **method_options(method)
    )
    if method == "hsa" and is_causal:  # HSA's causal form is not causal: the site is kept
        assert "not offered for causal sites" in res.report.sites[0].reason
        return
    (site,) = res.report.replaced
    assert site.options["heads"] == heads
    assert "1 replaced with " + method + " (1 in part: some heads stay exact)" in str(res.report)
    got = res.module(*inputs)
    full = approximate(method, q, k, v, mask, is_causal, gqa)
    exact = model(*inputs)
    for head in range(HEADS):
        expected = full if head in heads else exact
        torch.testing.assert_close(got[:, head], expected[:, head], atol=0, rtol=0)


def test_a_split_site_runs_its_share_of_the_methods_flops():
    q, k, v = (torch.randn(1, HEADS, 64, D) for _ in range(3))
    split = attnrewrite.rewrite(
        Attention(), (q, k, v), method="monarch", policy=Heads([0, 2, 3]), block_size=8
    )
    whole = attnrewrite.rewrite(Attention(), (q, k, v), method="monarch", block_size=8)
    (site,), (whole_site,) = split.report.sites, whole.report.sites
    exact, method = exact_attention_flops(site), site_flops(whole_site)
    assert method < exact
    assert site_flops(site) == round(0.75 * method + 0.25 * exact)


def test_every_head_chosen_is_a_plain_replacement():
    q, k, v = (torch.randn(1, HEADS, N, D) for _ in range(3))
    res = attnrewrite.rewrite(
        Attention(), (q, k, v), method="monarch", policy=Heads([3, 1, 2, 0]), block_size=8
    )
    assert "heads" not in res.report.sites[0].options
    targets = [node.target for node in res.module.graph.nodes if node.op == "call_function"]
    assert torch.ops.attnrewrite.monarch_attention.default in targets
    assert torch.ops.aten.cat.default not in targets


@pytest.mark.parametrize(
    ("method", "heads", "message"),
    [
        ("monarch", [], "non-empty list of indices in \\[0, 4\\)"),
        ("monarch", [0, 4], "non-empty list of indices in \\[0, 4\\)"),
        ("monarch", "0", "list of head indices"),
        ("zeros", [0], "stateless method"),
    ],
)
def test_heads_that_cannot_be_honored_are_refused(method, heads, message):
    q, k, v = (torch.randn(1, HEADS, N, D) for _ in range(3))
    with pytest.raises(attnrewrite.OptionError, match=message):
        attnrewrite.rewrite(Attention(), (q, k, v), method=method, policy=Heads(heads))


def test_split_site_compiles_whole_and_exports_to_onnx_with_dynamic_shapes(tmp_path):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, HEADS, N, D) for _ in range(3))
    mask = key_mask(1)
    batch, length = Dim("batch"), Dim("length", min=2, max=4096)
    dims = {0: batch, 2: length}
    dynamic = {"q": dims, "k": dims, "v": dims, "mask": {0: batch, 2: length, 3: length}}
    res = attnrewrite.rewrite(
        Attention(),
        (q, k, v, mask),
        method="monarch",
        policy=Heads([0, 2]),
        block_size=8,
        dynamic_shapes=dynamic,
    )
    explained = torch._dynamo.explain(res.module)(q, k, v, mask)
    assert explained.graph_break_count == 0
    torch._dynamo.reset()
    exported = export_onnx(res, (q, k, v, mask), tmp_path / "split.onnx", dynamic_shapes=dynamic)
    # another batch and length than the export's
    q, k, v = (torch.randn(3, HEADS, N + 9, D) for _ in range(3))
    mask = torch.ones(3, 1, N + 9, N + 9, dtype=torch.bool)
    mask[0, ..., N:] = False
    session = onnxruntime.InferenceSession(str(exported.path))
    feed = {
        name: x.numpy() for name, x in zip(["q", "k", "v", "mask"], (q, k, v, mask), strict=True)
    }
    (got,) = session.run(None, feed)
    torch.testing.assert_close(torch.from_numpy(got), res.module(q, k, v, mask), atol=1e-5, rtol=0)


def test_a_policy_choosing_heads_works_through_the_compile_backend():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, HEADS, N, D) for _ in range(3))
    model = Attention()
    options = {"method": "monarch", "policy": Heads([0, 2]), "block_size": 8, "num_steps": 1}
    got = torch.compile(model, backend="attnrewrite", options=options)(q, k, v)
    torch._dynamo.reset()
    full, exact = approximate("monarch", q, k, v, None, False, False), model(q, k, v)
    for head in range(HEADS):
        expected = full if head in (0, 2) else exact
        torch.testing.assert_close(got[:, head], expected[:, head])


def test_select_replaces_the_heads_it_names_in_the_layers_it_names():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, HEADS, N, D) for _ in range(3))
    policy = attnrewrite.Select(heads=[3, 1])
    res = attnrewrite.rewrite(Attention(), (q, k, v), method="hsa", branching=(4, 2), policy=policy)
    assert res.report.sites[0].options["heads"] == [1, 3]
    got, full = res.module(q, k, v), approximate("hsa", q, k, v, None, False, False)
    exact = F.scaled_dot_product_attention(q, k, v)
    for head in range(HEADS):
        expected = full if head in (1, 3) else exact
        torch.testing.assert_close(got[:, head], expected[:, head], atol=0, rtol=0)


@pytest.mark.parametrize("name", ["bert", "llama_gqa_rope"])
def test_hf_models_take_per_head_replacement(name):
    """Padding masks (BERT), causal masks with grouped key/value heads and RoPE (Llama): every
    site splits, and replacing one head of four moves the output less than replacing all."""
    pytest.importorskip("transformers")
    from hf_zoo import ZOO

    entry = next(e for e in ZOO if e.name == name)
    model, inputs = entry.build("sdpa"), entry.inputs()
    one_head = attnrewrite.rewrite(
        model, example_kwargs=inputs, method="monarch", block_size=4, policy=Heads([0])
    )
    every_head = attnrewrite.rewrite(model, example_kwargs=inputs, method="monarch", block_size=4)
    assert [s.options.get("heads") for s in one_head.report.sites] == [[0]] * 2
    with torch.no_grad():
        exact = model(**inputs).last_hidden_state
        errors = [
            float((res.module(**inputs).last_hidden_state - exact).norm() / exact.norm())
            for res in (one_head, every_head)
        ]
    assert 0 < errors[0] < errors[1]
