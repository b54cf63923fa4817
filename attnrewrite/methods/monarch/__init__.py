"""MonarchAttention (Yaras et al., NeurIPS 2025): a zero-shot, Θ(N√N·d) attention substitute.

Causal sites are replaced too, by the causal variant of reference.py (exact causal softmax inside
each block, Monarch over the earlier blocks): benchmarks/causal.py measured it well ahead
of block-local causal attention on real activations (benchmarks/results/causal.json).

Layout: reference.py (the executable spec), stages.py (the same updates as block-attention stages,
with the explicit backward), torch_stages.py (the stages on the CPU), kernels/monarch.py (the
stages and a fused short-sequence forward in Triton), op.py (the custom ops and their dispatch).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ...errors import OptionError
from ...site import AttentionSite
from ..base import CustomOpMethod, MethodOptions, check_int_option
from .op import kernel_backend, monarch_attention_backward_op, monarch_attention_op
from .reference import causal_steps, default_block_size, monarch_attention_reference

__all__ = [
    "MonarchMethod",
    "MonarchOptions",
    "default_block_size",
    "kernel_backend",
    "monarch_attention_backward_op",
    "monarch_attention_op",
    "monarch_attention_reference",
]


@dataclasses.dataclass(frozen=True)
class MonarchOptions(MethodOptions):
    """block_size: b (None: a power of two near √N, chosen from the run-time length);
    num_steps: T, the number of alternating updates (the paper's T);
    pad: "post" or "pre", where N is padded up to a multiple of b.
    """

    block_size: int | None = None
    num_steps: int = 2
    pad: str = "post"

    def check(self) -> None:
        if self.block_size is not None:
            check_int_option(
                "block_size",
                self.block_size,
                1,
                "a positive int or None (None: a power of two near √N, from the run-time length)",
            )
        check_int_option(
            "num_steps", self.num_steps, 1, "an int ≥ 1 (alternating updates T; the default is 2)"
        )
        if self.pad not in ("post", "pre"):
            raise OptionError(
                f"pad must be 'post' or 'pre' (where N is padded up to a multiple of block_size), "
                f"got {self.pad!r}"
            )


class MonarchMethod(CustomOpMethod):
    name = "monarch"
    key_masks_only = True
    options_type = MonarchOptions
    op = staticmethod(monarch_attention_op)
    op_name = "monarch_attention"

    def unsupported_reason(self, site: AttentionSite, options: MethodOptions) -> str | None:
        return self.tiling_reason(site, "MonarchAttention", "Monarch blocks queries and keys alike")

    def resolved_options(self, site: AttentionSite, options: MethodOptions) -> dict[str, Any]:
        """The options as they run: one step at causal sites, and the block size the site's
        length gives when it is not symbolic (a dynamic-shape graph must not guard on it: the op
        resolves it at run time)."""
        resolved = options.as_dict()
        if site.runs_causal:  # what the causal variant runs
            resolved["num_steps"] = causal_steps(resolved["num_steps"], True)
        if resolved["block_size"] is None and isinstance(site.q_len, int):
            resolved["block_size"] = default_block_size(site.q_len)
        return resolved
