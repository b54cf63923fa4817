"""Hierarchical Self-Attention against an independent brute force: the dense block-structured
matrix built from an explicit tree, L-BFGS over every block-structured matrix (KL optimality, plain
and causal), masks, padding, dtypes, gradients, the front doors, and the Triton kernels (run in the
Triton interpreter in a subprocess on CPU, directly on a GPU)."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

import attnrewrite
from attnrewrite.errors import OptionError, UnsupportedInputError
from attnrewrite.methods import masks
from attnrewrite.methods.hsa import (
    HSAMethod,
    HSAOptions,
    hierarchy,
    hsa_attention_flops,
    hsa_attention_op,
    hsa_attention_reference,
    softmax_attention_flops,
)
from attnrewrite.methods.hsa.op import TRITON_CPU_VARIABLE, uses_triton
from attnrewrite.site import AttentionSite

# ---------------------------------------------------------------------------------------------
# Brute force: an explicit tree, scalar loops, no padding (the last groups are simply shorter).


@dataclasses.dataclass(eq=False)
class Node:
    tokens: list[int]
    children: list[Node]


def build_tree(n: int, branching: tuple[int, ...]) -> Node:
    """Windows of b₁ tokens, groups of b₂ windows, ..., a root over what remains, literally."""
    nodes = [Node([i], []) for i in range(n)]
    for size in branching:
        nodes = [
            Node([t for child in nodes[s : s + size] for t in child.tokens], nodes[s : s + size])
            for s in range(0, len(nodes), size)
        ]
    return Node(list(range(n)), nodes)


def families(node: Node) -> list[Node]:
    """Every node with children, parents before their children."""
    if not node.children:
        return []
    return [node] + [f for child in node.children for f in families(child)]


class BlockStructure:
    """The block-structured matrices of a tree, built from per-family distributions w_B (rows
    of `weights` [families, W, W], W the widest family, zero-padded):
    A_ij = P(A)·w_B[C]/c_C for i ∈ B, j ∈ C ≠ B valid (A the lowest common ancestor), A_ii = P(i),
    P(B) = P(A)·w_B[B]. Each entry is a product of weights along i's path, gathered at once."""

    def __init__(self, root: Node, n: int, valid: list[bool], causal: bool):
        self.families = families(root)
        self.width = width = max(len(f.children) for f in self.families)
        self.admissible = torch.zeros(len(self.families), width, width, dtype=torch.bool)
        for f, family in enumerate(self.families):
            for col, child in enumerate(family.children):
                has_keys = any(valid[t] for t in child.tokens)
                for row in range(len(family.children)):
                    self.admissible[f, row, col] = (col == row or has_keys) and not (
                        causal and col > row
                    )
        number = {id(family): f for f, family in enumerate(self.families)}
        one = len(self.families) * width * width  # a constant 1 appended to the flat weights
        paths: dict[tuple[int, int], tuple[list[int], int]] = {}
        for i in range(n):
            node, path = root, []
            while node.children:
                base = number[id(node)] * width * width
                row = next(b for b, child in enumerate(node.children) if i in child.tokens)
                for col, child in enumerate(node.children):
                    keys = [t for t in child.tokens if valid[t]]
                    for j in keys if col != row else []:
                        paths[i, j] = ([*path, base + row * width + col], len(keys))
                path = [*path, base + row * width + row]
                node = node.children[row]
            paths[i, i] = (path, 1)
        depth = max(len(p) for p, _ in paths.values())
        self.index = torch.full((n, n, depth), one)
        self.divisor = torch.ones(n, n, dtype=torch.float64)
        self.present = torch.zeros(n, n, dtype=torch.bool)
        for (i, j), (path, divisor) in paths.items():
            self.index[i, j, : len(path)] = torch.tensor(path)
            self.divisor[i, j] = divisor
            self.present[i, j] = True

    def matrix(self, weights: torch.Tensor) -> torch.Tensor:
        flat = torch.cat([weights.reshape(-1), torch.ones(1, dtype=weights.dtype)])
        return torch.where(self.present, flat[self.index].prod(-1) / self.divisor, 0.0)

    def member(self, logits: torch.Tensor) -> torch.Tensor:
        """The matrix of free family logits [families, W, W] (inadmissible entries ignored)."""
        return self.matrix(torch.softmax(logits.masked_fill(~self.admissible, -math.inf), -1))


def brute_force_hsa_matrix(q, k, bias, valid, scale, root, causal):
    """HSA's matrix by the dynamic program written node by node (single head, float64)."""
    n = q.shape[0]
    scores = scale * q @ k.T + bias[None, :]
    structure = BlockStructure(root, n, valid, causal)
    weights = torch.zeros(len(structure.families), structure.width, structure.width,
                          dtype=q.dtype)  # fmt: skip
    lse = {}

    def count(node):
        return sum(valid[t] for t in node.tokens)

    def mean(x, node):
        keys = [t for t in node.tokens if valid[t]]
        return x[keys].mean(0) if keys else torch.zeros_like(x[0])

    def q_mean(node):
        return q[node.tokens[0]] if not node.children else mean(q, node)

    def self_logit(node):
        if not node.children:
            i = node.tokens[0]
            return scores[i, i] if valid[i] else torch.tensor(-math.inf, dtype=q.dtype)
        if count(node) == 0:
            return torch.tensor(-math.inf, dtype=q.dtype)
        return sum(count(c) * lse[id(c)] for c in node.children if count(c)) / count(node)

    def solve(node):
        for child in node.children:
            solve(child)
        f = structure.families.index(node) if node.children else None
        for b, child in enumerate(node.children):
            logits = []
            for c, other in enumerate(node.children):
                if not structure.admissible[f, b, c]:
                    logits.append(torch.tensor(-math.inf, dtype=q.dtype))
                elif c == b:
                    logits.append(self_logit(child))
                else:
                    mean_bias = mean(bias[:, None], other)[0]
                    logits.append(
                        scale * q_mean(child) @ mean(k, other) + mean_bias + math.log(count(other))
                    )
            logits = torch.stack(logits)
            lse[id(child)] = torch.logsumexp(logits, 0)
            if torch.isfinite(logits).any():
                weights[f, b, : len(logits)] = torch.softmax(logits, 0)

    solve(root)
    return structure.matrix(weights)


def hsa_matrix(q, k, bias, valid, scale, branching, causal):
    """HSA's matrix from the reference: its output for v = I."""
    eye = torch.eye(q.shape[-2], dtype=q.dtype)
    return hsa_attention_reference(
        q, k, eye, bias, valid, scale=scale, branching=branching, is_causal=causal
    )


def target_softmax(q, k, bias, valid, scale, causal):
    scores = scale * q @ k.T + bias[None, :]
    scores = scores.masked_fill(~valid[None, :], -math.inf)
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), -math.inf)
    return torch.softmax(scores, -1)


def summed_kl(matrix, target, valid):
    """Σ over valid rows of KL(A_i ‖ P_i), with 0·log 0 = 0."""
    rows = valid.nonzero().squeeze(-1)
    a, p = matrix[rows], target[rows]
    terms = torch.where(a > 0, a * (a.clamp_min(1e-300).log() - p.clamp_min(1e-300).log()), 0.0)
    return terms.sum()


def random_case(n, *, masked=(), seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    k = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    bias = 0.5 * torch.randn(n, generator=generator, dtype=torch.float64)
    valid = torch.ones(n, dtype=torch.bool)
    valid[list(masked)] = False
    return q, k, bias, valid


def random_qkv(*shape, dv=None, dtype=torch.float32):
    *batch, n, d = shape
    return (torch.randn(*batch, n, d, dtype=dtype), torch.randn(*batch, n, d, dtype=dtype),
            torch.randn(*batch, n, dv or d, dtype=dtype))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The operator against the brute force.

BRUTE_FORCE_CASES = [
    # n, branching, causal, masked tokens
    (12, (2, 3), False, ()),
    (12, (2, 3), True, ()),
    (13, (4,), False, (0, 5)),
    (13, (4,), True, (0, 5)),
    (11, (3, 2), False, (3, 4, 5)),  # a whole window masked
    (11, (3, 2), True, (3, 4, 5)),
    (9, (2, 2, 2), True, (8,)),
    (7, (16, 4), False, (2,)),  # one window: exact softmax
]


@pytest.mark.parametrize(("n", "branching", "causal", "masked"), BRUTE_FORCE_CASES)
def test_reference_matrix_equals_the_brute_force_and_is_block_structured(
    n, branching, causal, masked
):
    q, k, bias, valid = random_case(n, masked=masked)
    root = build_tree(n, branching)
    got = hsa_matrix(q, k, bias, valid, 0.7, branching, causal)
    expected = brute_force_hsa_matrix(q, k, bias, valid.tolist(), 0.7, root, causal)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    valid_rows = got[valid]
    torch.testing.assert_close(valid_rows.sum(-1), torch.ones(len(valid_rows), dtype=q.dtype))
    assert (got[:, ~valid] == 0).all()
    if causal:
        assert (got.triu(1) == 0).all()
    for family in families(root):
        for b, row_child in enumerate(family.children):
            rows = [t for t in row_child.tokens if valid[t]]
            for c, col_child in enumerate(family.children):
                cols = [t for t in col_child.tokens if valid[t]]
                if c != b and rows and cols:
                    block = got[rows][:, cols]
                    assert torch.allclose(block, block[0, 0].expand_as(block), atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_no_block_structured_matrix_has_lower_kl_lbfgs(causal):
    """L-BFGS over every block-structured matrix of the tree (free logits per family row) finds
    HSA's matrix and never a lower summed KL to (causal) softmax; neither do random members."""
    n, branching, masked = 12, (2, 3), (7,)
    q, k, bias, valid = random_case(n, masked=masked, seed=1)
    root = build_tree(n, branching)
    target = target_softmax(q, k, bias, valid, 0.7, causal)
    hsa = hsa_matrix(q, k, bias, valid, 0.7, branching, causal)
    hsa_kl = summed_kl(hsa, target, valid)

    structure = BlockStructure(root, n, valid.tolist(), causal)
    shape = structure.admissible.shape
    generator = torch.Generator().manual_seed(2)

    for _ in range(20):
        sample = structure.member(3 * torch.randn(shape, generator=generator, dtype=q.dtype))
        assert summed_kl(sample, target, valid) >= hsa_kl - 1e-12

    logits = torch.randn(shape, generator=generator, dtype=q.dtype).requires_grad_()
    optimizer = torch.optim.LBFGS(
        [logits], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure():
        optimizer.zero_grad()
        loss = summed_kl(structure.member(logits), target, valid)
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        best = structure.member(logits)
        best_kl = summed_kl(best, target, valid)
    assert best_kl >= hsa_kl - 1e-10
    assert best_kl <= hsa_kl + 1e-7
    torch.testing.assert_close(best[valid], hsa[valid], atol=1e-4, rtol=0)


@pytest.mark.parametrize("n", [1, 7, 16, 33])
@pytest.mark.parametrize("causal", [False, True])
def test_one_level_hierarchy_is_exact_softmax(n, causal):
    q, k, v = random_qkv(2, 3, n, 8)
    bias = torch.randn(2, 3, n)
    bias[0, :, 0] = -math.inf
    scores = q @ k.transpose(-2, -1) / math.sqrt(8) + bias[..., None, :]
    if causal:
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
    expected = torch.nan_to_num(torch.softmax(scores, -1)) @ v
    for branching in ((), (n + 1,), (64, 4)):
        got = hsa_attention_reference(q, k, v, bias, branching=branching, is_causal=causal)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_hierarchy_pads_with_invalid_tokens_that_change_nothing():
    assert hierarchy(256, (16, 4)) == (16, 4, 4)
    assert hierarchy(100, (16, 4)) == (16, 4, 2)
    assert hierarchy(16, (16, 4)) == (16,)
    assert hierarchy(17, (16, 4)) == (16, 2)
    assert hierarchy(37, ()) == (37,)
    # 100 tokens pad to 128; with 28 explicitly invalid tokens appended, the answer is the same.
    q, k, v = random_qkv(1, 2, 100, 8)
    got = hsa_attention_reference(q, k, v, branching=(16, 4))
    padded = [torch.cat([x, torch.randn(1, 2, 28, 8)], dim=-2) for x in (q, k, v)]
    valid = torch.ones(1, 2, 128, dtype=torch.bool)
    valid[..., 100:] = False
    expected = hsa_attention_reference(*padded, valid=valid, branching=(16, 4))[..., :100, :]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_invalid_tokens_get_no_weight_and_every_output_is_finite():
    q, k, v = random_qkv(2, 2, 40, 8)
    mask = torch.ones(2, 1, 1, 40, dtype=torch.bool)
    mask[0, ..., 8:16] = False  # a whole window at branching (4, 2)
    mask[0, ..., 39] = False
    mask[1] = False  # every key masked
    for causal in (False, True):
        out = attnrewrite.attention(q, k, v, mask, is_causal=causal, method="hsa", branching=(4, 2))
        assert torch.isfinite(out).all()
        poisoned = v.clone()
        poisoned[0, :, 8:16] = 1e6
        poisoned[0, :, 39] = 1e6
        again = attnrewrite.attention(q, k, poisoned, mask, is_causal=causal, method="hsa",
                                      branching=(4, 2))  # fmt: skip
        torch.testing.assert_close(again[0], out[0])
        assert (out[1] == 0).all()


def test_float_masks_with_finfo_min_and_equal_row_full_masks_act_like_key_masks():
    q, k, v = random_qkv(2, 2, 24, 8)
    keep = torch.ones(2, 1, 1, 24, dtype=torch.bool)
    keep[1, ..., 17:] = False
    by_bool = attnrewrite.attention(q, k, v, keep, method="hsa", branching=(4, 2))
    additive = torch.zeros(2, 1, 1, 24).masked_fill(~keep, torch.finfo(torch.float32).min)
    full = keep.expand(2, 1, 24, 24)
    for mask in (additive, full):
        got = attnrewrite.attention(q, k, v, mask, method="hsa", branching=(4, 2))
        torch.testing.assert_close(got, by_bool, atol=1e-6, rtol=1e-6)


def edge_masks(n: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive key masks (4, 1, 1, n) at the edges of SDPA's semantics: every key at finfo.min
    (Hugging Face's mask value), left padding at finfo.min (causal rows before the first real
    key see none), a NaN bias, and finfo.min keys followed by −inf ones."""
    lowest = torch.finfo(dtype).min
    mask = torch.zeros(4, 1, 1, n, dtype=dtype)
    mask[0] = lowest
    mask[1, ..., :5] = lowest
    mask[2, ..., 3] = math.nan
    mask[3, ..., : n // 2], mask[3, ..., n // 2 :] = lowest, -math.inf
    return mask


def run_hsa_op(q, k, v, mask, branching, causal):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HSA's causal variant warns about its use
        return hsa_attention_op(q, k, v, mask, None, list(branching), causal)


def hsa_and_softmax(q, k, v, mask, branching, causal):
    """HSA's output (the op) and exact attention's for the same mask, causal or not: SDPA's, and
    eager softmax's (equal to SDPA's where a row sees a finite logit), whose gradients are
    exact where SDPA's are not: SDPA's backward recomputes P = exp(S − logsumexp(S)), and at
    finfo.min the log-sum-exp rounds to S, so every P of a row that sees no valid key is 1."""
    n = q.shape[-2]
    out = run_hsa_op(q, k, v, mask, branching, causal)
    mask = masks.with_causal(mask, n, n) if causal else mask
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + mask
    return out, sdpa, torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("branching", [(), (4, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_rows_without_a_valid_key_and_nan_masks_give_what_sdpa_gives(branching, causal):
    """SDPA spreads a row whose keys are all at finfo.min evenly over them (their mean value),
    and a NaN bias makes every row that sees it NaN: HSA gives the same, not 0 for the one and
    finite rows for the other. One level (branching=()) is exact softmax, equal to SDPA on
    every finite row. Gradients: v's are exact on rows that see no valid key; the q and k
    gradients of softmax there differentiate logits that rounded to the bias, so they are
    compared only where every row sees a valid key."""
    n = 16
    q, k, v = (x.double().requires_grad_() for x in random_qkv(4, 2, n, 8))
    out, sdpa, eager = hsa_and_softmax(q, k, v, edge_masks(n, torch.float64), branching, causal)
    torch.testing.assert_close(eager[[0, 1, 3]], sdpa[[0, 1, 3]])
    nan_rows = sdpa[2].isnan().all(-1)  # rows that see the NaN key: all, or j ≥ 3 when causal
    assert nan_rows.any() and (out[2].isnan().all(-1) >= nan_rows).all()
    no_valid_key = [0, 3]
    torch.testing.assert_close(out[no_valid_key], sdpa[no_valid_key])
    if causal:
        torch.testing.assert_close(out[1, :, :5], sdpa[1, :, :5])
    if branching == ():
        torch.testing.assert_close(out[1], sdpa[1])
    grad_out = torch.randn_like(out)
    grad_out[2] = 0  # the NaN batch element
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected_grads = torch.autograd.grad(eager, (q, k, v), grad_out)
    torch.testing.assert_close(grads[2][no_valid_key], expected_grads[2][no_valid_key])
    if branching == () and not causal:
        for got, want in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(got[1], want[1])


def test_masks_that_differ_between_queries_raise_or_run_exact_attention_in_graphs():
    q, k, v = random_qkv(1, 2, 12, 8)
    mask = torch.rand(12, 12) > 0.3
    mask.fill_diagonal_(True)
    with pytest.raises(UnsupportedInputError, match="this mask is neither"):
        attnrewrite.attention(q, k, v, mask, method="hsa", branching=(4,))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        got = hsa_attention_op(q, k, v, mask, None, [4], fallback=True)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, mask)
    torch.testing.assert_close(got, expected)


def test_cross_attention_is_refused_with_the_fix():
    q = torch.randn(1, 2, 8, 4)
    k, v = torch.randn(1, 2, 12, 4), torch.randn(1, 2, 12, 4)
    with pytest.raises(UnsupportedInputError, match="method='sdpa'"):
        attnrewrite.attention(q, k, v, method="hsa")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_use_fp32_statistics(dtype):
    q, k, v = random_qkv(1, 2, 48, 16)
    expected = hsa_attention_reference(q, k, v, branching=(8, 2))
    got = hsa_attention_reference(q.to(dtype), k.to(dtype), v.to(dtype), branching=(8, 2))
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)


def test_grouped_query_attention_repeats_key_value_heads():
    q = torch.randn(1, 4, 16, 8)
    k, v = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    got = attnrewrite.attention(q, k, v, method="hsa", branching=(4,), enable_gqa=True)
    expected = attnrewrite.attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), method="hsa", branching=(4,)
    )
    torch.testing.assert_close(got, expected)


def test_op_backward_matches_autograd_of_the_reference_and_gradcheck():
    q, k, v = (x.double().requires_grad_() for x in random_qkv(1, 2, 14, 4))
    mask = torch.ones(1, 1, 1, 14, dtype=torch.bool)
    mask[..., 11:] = False
    for causal in (False, True):
        out = hsa_attention_op(q, k, v, mask, None, [3, 2], causal)
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        ref = hsa_attention_reference(q, k, v, valid=mask[0, 0, 0], branching=(3, 2),
                                      is_causal=causal)  # fmt: skip
        ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
        for got, expected in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(got, expected)
        assert torch.autograd.gradcheck(
            lambda q_, k_, v_, c=causal: hsa_attention_op(q_, k_, v_, mask, None, [3, 2], c),
            (q, k, v),
            fast_mode=True,
        )


def test_custom_op_registration_passes_opcheck():
    q, k, v = random_qkv(2, 2, 12, 8)
    mask = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    torch.library.opcheck(hsa_attention_op, (q, k, v, mask, None, [4, 2]))
    torch.library.opcheck(hsa_attention_op, (q, k, v, None, 0.3, [5]), {"is_causal": True})


# ---------------------------------------------------------------------------------------------
# Options, method, FLOPs, front doors.


def test_options_are_checked_with_the_fix_in_the_message():
    assert HSAOptions.parse("hsa", {"branching": [8, 2]}).branching == (8, 2)
    assert HSAOptions.parse("hsa", {}).branching == (16, 4)
    assert HSAOptions.parse("hsa", {"branching": ()}).branching == ()
    for bad, message in [
        (16, r"write \(16,\)"),
        ((16, 1), "ints ≥ 2"),
        ((0,), "ints ≥ 2"),
        ((True, 4), "ints ≥ 2"),
        (("16",), "ints ≥ 2"),
        ("16", "sequence of group sizes"),
    ]:
        with pytest.raises(OptionError, match=message):
            HSAOptions.parse("hsa", {"branching": bad})
    with pytest.raises(OptionError, match="valid options: branching"):
        HSAOptions.parse("hsa", {"block_size": 4})
    with pytest.raises(OptionError, match="ints ≥ 2"):
        hsa_attention_op(*random_qkv(1, 8, 4), None, None, [1])


def test_method_keeps_only_sites_it_cannot_compute():
    method, options = HSAMethod(), HSAOptions()
    site = AttentionSite(name="s", node="n", layer=0, spelling="sdpa", q_shape=(1, 2, 256, 8),
                         k_shape=(1, 2, 256, 8))  # fmt: skip
    assert method.unsupported_reason(site, options) is None
    assert method.site_options(site, options) == {"branching": (16, 4), "tree": (16, 4, 4)}
    causal = dataclasses.replace(site, is_causal=True, mask="causal")
    assert "not offered for causal sites" in method.unsupported_reason(causal, options)
    cross = dataclasses.replace(site, k_shape=(1, 2, 100, 8))
    assert "cross-attention" in method.unsupported_reason(cross, options)
    dropout = dataclasses.replace(site, dropout_p=0.1)
    assert "dropout" in method.unsupported_reason(dropout, options)


def test_flops_count_the_levels_of_the_tree():
    assert softmax_attention_flops(256, 32) == 4 * 256 * 256 * 32
    # (16, 4, 4) over 256 tokens: 16 windows of 16, 4 groups of 4 windows, a root of 4 groups.
    per_level = [
        4 * 16 * 16 * 16 * 32 + 2 * 256 * 32 + 6 * 256 * 32,
        4 * 4 * 4 * 4 * 32 + 2 * 16 * 32 + 6 * 16 * 32,
        4 * 1 * 4 * 4 * 32 + 2 * 4 * 32,
    ]
    assert hsa_attention_flops(256, 32, (16, 4)) == sum(per_level)
    assert hsa_attention_flops(256, 32, (16, 4)) < 0.08 * softmax_attention_flops(256, 32)
    assert hsa_attention_flops(0, 32, (16, 4)) == 0


def test_front_doors_rewrite_and_compile_with_key_padding_masks():
    class TwoLayers(torch.nn.Module):
        def forward(self, q, k, v, mask):
            first = torch.softmax(q @ k.transpose(-2, -1) / 2.0 + mask, dim=-1) @ v
            return torch.nn.functional.scaled_dot_product_attention(
                first.tanh(), k, v, is_causal=True
            )

    q, k, v = random_qkv(2, 2, 24, 4)
    mask = torch.zeros(2, 1, 1, 24).masked_fill(torch.arange(24) >= 20, torch.finfo().min)
    first = attnrewrite.attention(q, k, v, mask, scale=0.5, method="hsa", branching=(4, 2))
    # the causal site stays exact: HSA's causal form lets earlier rows see later tokens
    expected = torch.nn.functional.scaled_dot_product_attention(first.tanh(), k, v, is_causal=True)
    result = attnrewrite.rewrite(TwoLayers(), (q, k, v, mask), method="hsa", branching=(4, 2))
    assert [s.status for s in result.report.sites] == ["replaced", "kept"]
    torch.testing.assert_close(result.module(q, k, v, mask), expected, atol=1e-5, rtol=1e-5)
    compiled = torch.compile(
        TwoLayers(), backend="attnrewrite",
        options={"method": "hsa", "branching": (4, 2), "inner": "eager"},
    )  # fmt: skip
    torch.testing.assert_close(compiled(q, k, v, mask), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Triton kernels: in the interpreter (CPU, in a subprocess) or on a GPU.

ON_GPU = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if ON_GPU else "cpu"
kernel_test = pytest.mark.skipif(
    not (ON_GPU or (INTERPRETED and os.environ.get(TRITON_CPU_VARIABLE) == "1")),
    reason="runs on a GPU, or on CPU in test_kernels_in_the_triton_interpreter's subprocess",
)


@pytest.mark.slow
def test_kernels_in_the_triton_interpreter():
    """Run this file's kernel tests in a subprocess with the Triton interpreter: TRITON_INTERPRET
    must be set before triton is imported, and it must not leak into the other tests."""
    if ON_GPU or INTERPRETED:
        pytest.skip("the kernel tests run directly in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1", TRITON_CPU_VARIABLE: "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
         "test_kernel_"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]


KERNEL_CASES = [
    # n, branching, causal, dv: small families packed several per tile, ragged tiles (b = 3, 7),
    # three levels, one family per tile (b = 40), a lone window below the root.
    (37, (4, 2), False, 8),
    (37, (4, 2), True, 5),
    (30, (3, 2), False, 8),
    (33, (2, 2, 2), True, 8),
    (45, (7,), False, 8),
    (150, (40,), True, 8),
    (20, (16, 4), False, 8),
]


@kernel_test
@pytest.mark.parametrize(("n", "branching", "causal", "dv"), KERNEL_CASES)
def test_kernel_forward_and_gradients_match_the_reference(n, branching, causal, dv):
    generator = torch.Generator().manual_seed(n)
    q, k = (torch.randn(2, 2, n, 8, generator=generator) for _ in range(2))
    v = torch.randn(2, 2, n, dv, generator=generator)
    mask = torch.ones(2, 1, 1, n, dtype=torch.bool)
    mask[1, ..., n - 9 :] = False
    mask[0, ..., 4:8] = False
    q, k, v, mask = (x.to(DEVICE) for x in (q, k, v, mask))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    assert uses_triton(q, branching)
    out = hsa_attention_op(*leaves, mask, None, list(branching), causal)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)

    ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
    valid = mask[:, :, 0].expand(2, 2, n)
    ref = hsa_attention_reference(*ref_leaves, valid=valid, branching=branching,
                                  is_causal=causal)  # fmt: skip
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for got, expected in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)


@kernel_test
def test_kernel_handles_additive_bias_gqa_and_half_precision():
    q = torch.randn(1, 4, 40, 16, device=DEVICE)
    k, v = torch.randn(1, 2, 40, 16, device=DEVICE), torch.randn(1, 2, 40, 16, device=DEVICE)
    bias = torch.randn(1, 1, 1, 40, device=DEVICE)
    bias[..., 30:] = torch.finfo(torch.float32).min
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = hsa_attention_op(*leaves, bias, 0.3, [4, 2], enable_gqa=True)
    grads = torch.autograd.grad(out.sum(), leaves)
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
    key_bias = bias.double()[:, :, 0].expand(1, 4, 40)
    ref = hsa_attention_reference(ref_leaves[0], *(x.repeat_interleave(2, 1) for x in
                                  ref_leaves[1:]), key_bias, valid=key_bias > -1e30, scale=0.3,
                                  branching=(4, 2))  # fmt: skip
    ref_grads = torch.autograd.grad(ref.sum(), ref_leaves)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for got, expected in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)
    half = hsa_attention_op(q.half(), k.half(), v.half(), bias.half(), 0.3,
                            [4, 2], enable_gqa=True)  # fmt: skip
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), out, atol=2e-2, rtol=2e-2)


@kernel_test
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_rows_without_a_valid_key_and_nan_masks_match_the_reference(causal):
    """The kernels' forward and backward give rows that see no valid key SDPA's output (the
    mean value of their finfo.min keys) and let a NaN bias through, as the op's PyTorch path
    (fp64 inputs) does."""
    n = 16
    q, k, v = (x.to(DEVICE).requires_grad_() for x in random_qkv(4, 2, n, 8))
    mask = edge_masks(n, torch.float32).to(DEVICE)
    assert uses_triton(q, (4, 2))
    out, sdpa, _ = hsa_and_softmax(q, k, v, mask, (4, 2), causal)
    nan_rows = sdpa[2].isnan().all(-1)
    assert nan_rows.any() and (out[2].isnan().all(-1) >= nan_rows).all()
    torch.testing.assert_close(out[[0, 3]], sdpa[[0, 3]])
    ref_leaves = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]
    ref = run_hsa_op(*ref_leaves, mask.cpu(), (4, 2), causal)
    # the NaN may reach more rows (through 0·NaN in the kernels' sums), never fewer
    assert (out[2].isnan().all(-1).cpu() >= ref[2].isnan().all(-1)).all()
    finite = [0, 1, 3]
    torch.testing.assert_close(out.cpu().double()[finite], ref[finite], atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(out)
    grad_out[2] = 0
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.cpu().double())
    for got, expected in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.cpu().double()[finite], expected[finite], atol=1e-4,
                                   rtol=1e-4)  # fmt: skip


@kernel_test
def test_kernel_dispatch_leaves_lone_roots_and_huge_groups_to_pytorch():
    q = torch.randn(1, 1, 300, 8, device=DEVICE)
    assert uses_triton(q, (4, 2))
    assert not uses_triton(q, (512,))  # one window: plain softmax
    assert not uses_triton(q, (100, 2))  # a group larger than a tile
    assert not uses_triton(q.double(), (4, 2))
