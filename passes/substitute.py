"""Substitute: put the chosen method's op in place of each canonical SDPA site the policy selects.

A site whose mask, shape or flags the method cannot honor stays SDPA and is reported with the
reason: the pass never trades a site for an operator that computes a different function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch.fx

from ..methods import AttentionMethod, MethodOptions
from ..site import AttentionSite
from .head_split import checked_heads, insert_head_split

Policy = Callable[[AttentionSite], "str | None"]


def substitute(
    gm: torch.fx.GraphModule,
    sites: list[AttentionSite],
    method: AttentionMethod,
    options: MethodOptions,
    policy: Policy | None = None,
) -> None:
    """Replace the selected, supported sites in place and mark every site replaced or kept.

    A policy may also choose per-site options through a `site_options(site) -> dict` method,
    including `heads`: the head indices to replace, the others staying exact (head_split.py).
    """
    changed = False
    overrides = getattr(policy, "site_options", None)
    for site in sites:
        if site.status != "found":
            continue
        chosen = dict(overrides(site)) if overrides is not None else {}
        heads = chosen.pop("heads", None)
        site_options = method.parse_options({**options.as_dict(), **chosen}) if chosen else options
        # what the method cannot do first: a policy's reason would hide it
        reason = method.keep_reason(site, site_options)
        reason = reason or (policy(site) if policy is not None else None)
        if reason:
            site.keep(reason)
            continue
        if heads is not None:
            heads = checked_heads(site, method, heads)
        site.method = method.name
        site.options = method.site_options(site, site_options)
        site.status = "replaced"
        old = site.sdpa_node
        if heads is not None:
            site.options["heads"] = heads
            new = insert_head_split(gm, site, method, site_options, heads)
        else:
            args, kwargs = method.graph_arguments(site, site_options)
            if old.target is method.graph_target() and old.args == args and old.kwargs == kwargs:
                continue
            new = method.insert(gm, site, site_options)
        new.meta = dict(old.meta)
        old.replace_all_uses_with(new)
        gm.graph.erase_node(old)
        site.sdpa_node = new
        _forward_references(sites, old, new)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()


def _forward_references(sites: list[AttentionSite], old: torch.fx.Node, new: torch.fx.Node) -> None:
    """Sites whose inputs are another site's output (stacked attention) now read the new node."""
    for site in sites:
        if site.sdpa is None:
            continue
        fields = {f.name: getattr(site.sdpa, f.name) for f in dataclasses.fields(site.sdpa)}
        if any(value is old for value in fields.values()):
            site.sdpa = dataclasses.replace(
                site.sdpa, **{k: new for k, value in fields.items() if value is old}
            )
