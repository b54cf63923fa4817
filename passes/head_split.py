"""Per-head replacement: some heads of a site run the method, the others stay exact SDPA.

Zero-shot error differs by head as well as by layer, so a policy may replace a strict subset of a
site's heads (`site_options(site)["heads"]`). The split is made of slices along the head dim
(runs of consecutive heads) and concatenations, with no index tensors: nothing is added to the
module's state, and it exports to ONNX as Slice and Concat.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.fx

from ..errors import OptionError
from ..methods import AttentionMethod, MethodOptions, get_method
from ..methods.base import CustomOpMethod
from ..site import AttentionSite

HEAD_DIM = 1  # (batch, heads, N, d)


def head_count(site: AttentionSite) -> int | None:
    """The site's head count where heads can be split: (batch, heads, N, d) queries, static."""
    shape = site.q_shape
    if shape is None or len(shape) != 4 or not isinstance(shape[HEAD_DIM], int):
        return None
    return shape[HEAD_DIM]


def checked_heads(site: AttentionSite, method: AttentionMethod, heads: object) -> list[int] | None:
    """The policy's `heads` for the site, sorted, or None when that is every head (no split).

    Raises OptionError for a request that cannot be honored: it comes from code, not data."""
    if not isinstance(method, CustomOpMethod):
        raise OptionError(
            f"per-head replacement needs a stateless method (monarch, hsa), not {method.name!r}"
        )
    n_heads = head_count(site)
    if n_heads is None:
        raise OptionError(
            f"per-head replacement at {site.name!r} needs (batch, heads, N, d) queries with a "
            f"static head count; its queries are {site.q_shape}"
        )
    if isinstance(heads, (str, bytes)) or not isinstance(heads, Sequence):
        raise OptionError(f"heads must be a list of head indices, got {heads!r}")
    chosen = sorted(set(heads))
    if not chosen or not all(isinstance(h, int) and 0 <= h < n_heads for h in chosen):
        raise OptionError(
            f"heads at {site.name!r} must be a non-empty list of indices in [0, {n_heads}), "
            f"got {list(heads)}"
        )
    return None if len(chosen) == n_heads else chosen


def insert_head_split(
    gm: torch.fx.GraphModule,
    site: AttentionSite,
    method: AttentionMethod,
    options: MethodOptions,
    heads: list[int],
) -> torch.fx.Node:
    """Insert `method` on `heads` and exact SDPA on the other heads before the site's SDPA node,
    and return the node that puts the heads back in order."""
    sdpa, graph = site.sdpa, gm.graph
    assert sdpa is not None and site.q_shape is not None and site.k_shape is not None
    n_heads = site.q_shape[HEAD_DIM]
    group = n_heads // site.k_shape[HEAD_DIM] if sdpa.enable_gqa else 1
    mask_shape = site.mask_shape or ()
    # the mask's dim that broadcasts against the heads (it may have fewer dims than q)
    mask_head_dim = len(mask_shape) - 4 + HEAD_DIM
    per_head_mask = mask_head_dim >= 0 and mask_shape[mask_head_dim] == n_heads > 1
    exact = [h for h in range(n_heads) if h not in heads]

    with graph.inserting_before(site.sdpa_node):

        def part(selected: list[int]) -> AttentionSite:
            """The site restricted to `selected` heads (keys and values expanded under GQA)."""
            kv = [h // group for h in selected]
            mask = sdpa.attn_mask
            if mask is not None and per_head_mask:
                mask = _take(graph, mask, selected, mask_head_dim)
            restricted = dataclasses.replace(
                sdpa,
                query=_take(graph, sdpa.query, selected),
                key=_take(graph, sdpa.key, kv),
                value=_take(graph, sdpa.value, kv),
                attn_mask=mask,
                enable_gqa=False,
            )
            return dataclasses.replace(site, sdpa=restricted)

        exact_sdpa = get_method("sdpa")
        outputs = {
            "approximate": method.insert(gm, part(heads), options),
            "exact": exact_sdpa.insert(gm, part(exact), exact_sdpa.parse_options({})),
        }
        # back in head order: runs of heads that come from the same part, in that part's order
        source = {h: ("approximate", i) for i, h in enumerate(heads)}
        source.update({h: ("exact", i) for i, h in enumerate(exact)})
        pieces, start = [], 0
        for h in range(1, n_heads + 1):
            if h < n_heads and source[h][0] == source[start][0]:
                continue
            name, first = source[start]
            pieces.append(_slice(graph, outputs[name], first, first + h - start))
            start = h
        return _cat(graph, pieces)


def _take(
    graph: torch.fx.Graph, node: torch.fx.Node, indices: list[int], dim: int = HEAD_DIM
) -> torch.fx.Node:
    """node's `indices` along dim, as slices of consecutive runs (a repeated index starts a new
    run)."""
    pieces, start = [], 0
    for i in range(1, len(indices) + 1):
        if i < len(indices) and indices[i] == indices[i - 1] + 1:
            continue
        pieces.append(_slice(graph, node, indices[start], indices[i - 1] + 1, dim))
        start = i
    return _cat(graph, pieces, dim)


def _slice(
    graph: torch.fx.Graph, node: torch.fx.Node, start: int, stop: int, dim: int = HEAD_DIM
) -> torch.fx.Node:
    return graph.call_function(torch.ops.aten.slice.Tensor, (node, dim, start, stop))


def _cat(graph: torch.fx.Graph, pieces: list[torch.fx.Node], dim: int = HEAD_DIM) -> torch.fx.Node:
    if len(pieces) == 1:
        return pieces[0]
    return graph.call_function(torch.ops.aten.cat.default, (pieces, dim))
