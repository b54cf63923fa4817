"""Attention FLOPs per site (2 FLOPs per multiply-add), for policies and benchmarks."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from .site import AttentionSite


def _dims(site: AttentionSite) -> tuple[int, int, int, int, int]:
    """(batch·heads, Nq, Nk, d, dv) of a site with static shapes."""
    *batch, n_q, d = site.q_shape
    n_k, d_v = site.k_shape[-2], site.v_shape[-1]
    return math.prod(batch), n_q, n_k, d, d_v


def exact_attention_flops(site: AttentionSite) -> int:
    """softmax(QKᵀ)V: 2·Nq·Nk·d for the scores and 2·Nq·Nk·dv for the values, per head."""
    groups, n_q, n_k, d, d_v = _dims(site)
    return groups * 2 * n_q * n_k * (d + d_v)


def monarch_attention_flops(site: AttentionSite, options: Mapping[str, Any]) -> int:
    """Per step 2·N·(b + M)·d multiply-adds (R- and L-updates), plus N·(b + M)·dv for the
    output (docs/methods.md#monarch-cost), with M = ⌈N / b⌉."""
    groups, n, _, d, d_v = _dims(site)
    b = options["block_size"]
    m = math.ceil(n / b)
    padded = m * b
    per_step = 2 * padded * (b + m) * d
    return groups * 2 * (options["num_steps"] * per_step + padded * (b + m) * d_v)


def hsa_site_flops(site: AttentionSite, options: Mapping[str, Any]) -> int:
    """HSA's dynamic program per head (methods/hsa/reference.py), for every head."""
    from .methods.hsa.reference import hsa_attention_flops

    groups, n, _, d, _ = _dims(site)
    return groups * hsa_attention_flops(n, d, options["branching"])


#: method name → FLOPs of a site rewritten with that method and its resolved options
METHOD_FLOPS: dict[str, Callable[[AttentionSite, Mapping[str, Any]], int]] = {
    "sdpa": lambda site, options: exact_attention_flops(site),
    "monarch": monarch_attention_flops,
    "hsa": hsa_site_flops,
}


def flops_saved(site: AttentionSite, method: str, options: Mapping[str, Any]) -> int:
    return exact_attention_flops(site) - METHOD_FLOPS[method](site, options)


def site_flops(site: AttentionSite) -> int:
    """The attention FLOPs a site runs as rewritten: the method's on the heads it replaced (all
    of them, or options["heads"]), exact attention on the others and at kept sites."""
    exact = exact_attention_flops(site)
    if site.status != "replaced" or site.method is None:
        return exact
    method = METHOD_FLOPS[site.method](site, site.options)
    heads = site.options.get("heads")
    if heads is None:
        return method
    assert site.q_shape is not None
    share = len(heads) / site.q_shape[1]
    return round(share * method + (1 - share) * exact)
