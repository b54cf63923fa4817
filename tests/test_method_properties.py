"""Property-based tests of every method over random shapes, masks (fully masked rows and key
blocks included), dtypes and options: outputs are finite wherever SDPA's are, equal the method's
reference, and equal SDPA where the method is exact; and a site a method keeps is left exactly as
the canonical (method="sdpa") rewrite leaves it."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnrewrite
from attnrewrite.methods.hsa import hierarchy, hsa_attention_reference
from attnrewrite.methods.hsa.reference import with_masked_rows
from attnrewrite.methods.masks import key_mask_terms, with_causal
from attnrewrite.methods.monarch import monarch_attention_reference
from attnrewrite.methods.zeros import zeros_attention_reference

B = 2
#: (atol, rtol) of a method against its reference and of an exact case against SDPA. bf16 inputs
#: are compared in fp32: the op rounds its stage inputs and its output to bf16.
TOLERANCE = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 3e-2)}
KEY_PATTERNS = ("all", "none", "random", "run")


@dataclasses.dataclass(frozen=True)
class Case:
    method: str
    n: int
    heads: int
    d: int
    dv: int
    dtype: torch.dtype
    is_causal: bool
    mask: str  # "none", "bool", "additive" (−inf), "finfo" (finfo.min), "full" (equal rows)
    patterns: tuple[str, ...]  # per batch row: which keys are valid (KEY_PATTERNS)
    options: tuple[tuple[str, Any], ...]
    seed: int


@st.composite
def cases(draw: st.DrawFn) -> Case:
    method = draw(st.sampled_from(["sdpa", "monarch", "hsa"]))
    n = draw(st.integers(1, 20))
    options: dict[str, Any] = {}
    if method == "monarch":
        options = {
            "block_size": draw(st.sampled_from([None, 1, 2, 3, 4, 5, n, n + 3])),
            "num_steps": draw(st.integers(1, 3)),
            "pad": draw(st.sampled_from(["post", "pre"])),
        }
    elif method == "hsa":
        options = {"branching": draw(st.sampled_from([(), (2,), (3,), (4, 2), (2, 3, 2), (16, 4)]))}
    return Case(
        method=method,
        n=n,
        heads=draw(st.integers(1, 2)),
        d=draw(st.sampled_from([4, 8])),
        dv=draw(st.sampled_from([4, 8])),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        is_causal=draw(st.booleans()),
        mask=draw(st.sampled_from(["none", "bool", "additive", "finfo", "full"])),
        patterns=tuple(draw(st.sampled_from(KEY_PATTERNS)) for _ in range(B)),
        options=tuple(options.items()),
        seed=draw(st.integers(0, 2**16)),
    )


def valid_keys(patterns: tuple[str, ...], n: int, g: torch.Generator) -> torch.Tensor:
    """(B, n) bool: every key, none (a fully masked row), random ones, or all but one run of
    keys (which empties whole key blocks or tree nodes)."""
    rows = []
    for pattern in patterns:
        row = torch.ones(n, dtype=torch.bool)
        if pattern == "none":
            row[:] = False
        elif pattern == "random":
            row = torch.rand(n, generator=g) < 0.6
        elif pattern == "run":
            start = int(torch.randint(0, n, (1,), generator=g))
            row[start : start + max(1, n // 2)] = False
        rows.append(row)
    return torch.stack(rows)


def sdpa_mask(case: Case, valid: torch.Tensor) -> torch.Tensor | None:
    """The key mask spelled as `case.mask` says, as SDPA takes it."""
    keys = valid[:, None, None, :]
    if case.mask == "none":
        return None
    if case.mask == "bool":
        return keys
    if case.mask == "full":
        return keys.expand(B, 1, case.n, case.n)
    fill = -math.inf if case.mask == "additive" else torch.finfo(case.dtype).min
    return torch.zeros(keys.shape, dtype=case.dtype).masked_fill(~keys, fill)


def exact(q, k, v, mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    """Exact attention with the mask and the causal rule both applied (SDPA refuses the two
    together on some of its backends)."""
    if mask is not None and is_causal:
        mask, is_causal = with_causal(mask, q.shape[-2], k.shape[-2]), False
    return F.scaled_dot_product_attention(q, k, v, mask, is_causal=is_causal)


def reference(case: Case, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
    """The method's executable spec on fp32 copies of the inputs."""
    q, k, v = (x.float() for x in (q, k, v))
    options = dict(case.options)
    if case.method == "sdpa":
        fp32_mask = mask if mask is None or mask.dtype == torch.bool else mask.float()
        return exact(q, k, v, fp32_mask, case.is_causal)
    bias = weight = None
    if mask is not None:  # in its own dtype: finfo.min of bf16 marks a masked key in bf16 only
        bias, weight = key_mask_terms(mask, (B, case.heads), case.n, torch.float32)
    if case.method == "monarch":
        return monarch_attention_reference(
            q, k, v, bias, weight, is_causal=case.is_causal, **options
        )
    valid = None if weight is None else weight > 0
    out = hsa_attention_reference(q, k, v, bias, valid, is_causal=case.is_causal, **options)
    return with_masked_rows(out, v, bias, valid, case.is_causal)  # the op's rows with no key


def is_exact(case: Case) -> bool:
    """Monarch with b = 1 or b ≥ N, HSA with a one-level tree, and SDPA itself."""
    options = dict(case.options)
    if case.method == "monarch":
        block = options["block_size"]
        return block is not None and (block == 1 or block >= case.n)
    if case.method == "hsa":
        return len(hierarchy(case.n, options["branching"])) == 1
    return True


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_methods_are_finite_where_sdpa_is_and_match_their_reference(case: Case):
    g = torch.Generator().manual_seed(case.seed)
    q, k = (torch.randn(B, case.heads, case.n, case.d, generator=g) for _ in range(2))
    v = torch.randn(B, case.heads, case.n, case.dv, generator=g)
    q, k, v = (x.to(case.dtype) for x in (q, k, v))
    valid = valid_keys(case.patterns, case.n, g)
    mask = sdpa_mask(case, valid)
    out = attnrewrite.attention(
        q, k, v, mask, case.is_causal, method=case.method, **dict(case.options)
    )
    assert out.shape == (B, case.heads, case.n, case.dv) and out.dtype == case.dtype
    sdpa = exact(q, k, v, mask, case.is_causal)
    assert torch.isfinite(out)[torch.isfinite(sdpa)].all()
    atol, rtol = TOLERANCE[case.dtype]
    torch.testing.assert_close(out.float(), reference(case, q, k, v, mask), atol=atol, rtol=rtol)
    if is_exact(case):
        # Exact on every row: masked queries (SDPA's attention over the valid keys) and rows
        # that see no valid key (SDPA spreads one whose keys are all at finfo.min over them).
        torch.testing.assert_close(out.float(), sdpa.float(), atol=atol, rtol=rtol)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_q=st.integers(1, 20),
    n_k=st.integers(1, 20),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    is_causal=st.booleans(),
    pattern=st.sampled_from((None, *KEY_PATTERNS)),
    seed=st.integers(0, 2**16),
)
def test_zeros_is_finite_and_matches_its_reference(n_q, n_k, dtype, is_causal, pattern, seed):
    """ZeroS over random shapes, masks (queries with no key included) and dtypes: finite, and
    its linear form equals the O(N²) reference."""
    n_k = n_q if is_causal else n_k
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 2, n_q, 8, generator=g).to(dtype)
    k, v = (torch.randn(B, 2, n_k, 8, generator=g).to(dtype) for _ in range(2))
    logits = 3 * torch.randn(B, 2, n_k, generator=g)
    gates = [torch.rand(B, 2, n_q, generator=g) for _ in range(2)]
    mask = None if pattern is None else valid_keys((pattern,) * B, n_k, g)
    out = attnrewrite.zeros_attention(q, k, v, logits, *gates, is_causal=is_causal, attn_mask=mask)
    assert out.shape == (B, 2, n_q, 8) and torch.isfinite(out).all()
    expected = zeros_attention_reference(
        q.float(), k.float(), v.float(), logits, *gates, is_causal=is_causal,
        key_valid=None if mask is None else mask[:, None, :],
    )  # fmt: skip
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)


# Sites a method keeps -----------------------------------------------------------------------------


#: Why each method keeps a site (its reason must be in the report), and the methods that do.
KEEPERS = {
    "cross": ("monarch", "hsa"),  # Nq ≠ Nk
    "query_mask": ("monarch", "hsa", "zeros"),  # a mask whose rows differ on the examples
    "dropout": ("monarch", "hsa", "zeros"),  # active attention dropout
    "three_d": ("zeros",),  # no heads dimension: ZeroS adapters are per head
    "causal_cross": ("zeros",),  # causal with Nq ≠ Nk (a KV cache)
}


@dataclasses.dataclass(frozen=True)
class KeptSpec:
    kind: str
    method: str
    eager: bool  # matmul-softmax-matmul (canonicalized to SDPA) instead of F.sdpa
    dtype: torch.dtype
    n: int


@st.composite
def kept_specs(draw: st.DrawFn) -> KeptSpec:
    kind = draw(st.sampled_from(sorted(KEEPERS)))
    # dropout and is_causal are F.sdpa arguments; eager dropout is the matcher's to keep
    eager = kind in ("cross", "query_mask", "three_d") and draw(st.booleans())
    return KeptSpec(
        kind=kind,
        method=draw(st.sampled_from(KEEPERS[kind])),
        eager=eager,
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        n=draw(st.integers(2, 12)),
    )


class KeptSite(torch.nn.Module):
    """One attention site of the kind `spec.kind`; inputs q, k, v and a bool mask."""

    def __init__(self, spec: KeptSpec):
        super().__init__()
        self.spec = spec

    def forward(self, q, k, v, mask):
        spec = self.spec
        dropout = 0.5 if spec.kind == "dropout" else 0.0
        causal = spec.kind == "causal_cross"
        attn_mask = mask if spec.kind == "query_mask" else None
        if not spec.eager:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask, dropout_p=dropout, is_causal=causal
            )
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, -math.inf)
        return torch.softmax(scores, dim=-1) @ v


def kept_inputs(spec: KeptSpec) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(spec.n)
    lead = (2 * 3,) if spec.kind == "three_d" else (2, 3)
    n_k = spec.n + 3 if spec.kind in ("cross", "causal_cross") else spec.n
    q = torch.randn(*lead, spec.n, 8, generator=g)
    k, v = (torch.randn(*lead, n_k, 8, generator=g) for _ in range(2))
    mask = torch.rand(*lead[:-1], 1, spec.n, n_k, generator=g) < 0.7
    mask[..., 0] = True  # every query sees a key (eager attention would give NaN otherwise)
    # Rows differ, and query 0 sees the last key: neither a key-padding mask nor a causal +
    # padding one (which Monarch and HSA honor; at n = 2 the old False, True was causal).
    mask[..., 0, -1], mask[..., 1, -1] = True, False
    return q.to(spec.dtype), k.to(spec.dtype), v.to(spec.dtype), mask


def run_seeded(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
    torch.manual_seed(1)  # the same dropout draws for every module
    with torch.no_grad():
        return module(*args)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=kept_specs())
def test_a_site_a_method_keeps_is_left_as_the_canonical_rewrite_leaves_it(spec: KeptSpec):
    """Kept sites report a reason and run bit for bit what method="sdpa" runs: the model itself
    where it called F.sdpa, its canonical SDPA form where it spelled attention out (equal to the
    model up to SDPA's rounding)."""
    model = KeptSite(spec).train(spec.kind == "dropout")
    args = kept_inputs(spec)
    kept = attnrewrite.rewrite(model, args, method=spec.method)
    assert [site.status for site in kept.report.sites] == ["kept"], kept.report
    assert kept.report.sites[0].reason
    canonical = attnrewrite.rewrite(model, args, method="sdpa").module
    got = run_seeded(kept.module, args)
    assert torch.equal(got, run_seeded(canonical, args))
    if not spec.eager:
        assert torch.equal(got, run_seeded(model, args))
    else:
        atol, rtol = TOLERANCE[spec.dtype]
        torch.testing.assert_close(got, run_seeded(model, args), atol=atol, rtol=rtol)
