"""Substitute: put the chosen method's op in place of each canonical SDPA site the policy selects.

A site whose mask, shape or flags the method cannot honor stays SDPA and is reported with the
reason: the pass never trades a site for an operator that computes a different function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.fx

from ..methods import AttentionMethod, MethodOptions
from ..site import AttentionSite

Policy = Callable[[AttentionSite], "str | None"]


def substitute(
    gm: torch.fx.GraphModule,
    sites: list[AttentionSite],
    method: AttentionMethod,
    options: MethodOptions,
    policy: Policy | None = None,
) -> None:
    """Replace the selected, supported sites in place and mark every site replaced or kept."""
    changed = False
    for site in sites:
        if site.status != "found":
            continue
        reason = policy(site) if policy is not None else None
        reason = reason or method.unsupported_reason(site, options)
        if reason:
            site.keep(reason)
            continue
        site.method = method.name
        site.options = method.site_options(site, options)
        site.status = "replaced"
        old = site.sdpa_node
        args, kwargs = method.graph_arguments(site, options)
        if old.target is method.graph_target() and old.args == args and old.kwargs == kwargs:
            continue
        new = method.insert(gm, site, options)
        new.meta = dict(old.meta)
        old.replace_all_uses_with(new)
        gm.graph.erase_node(old)
        site.sdpa_node = new
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
