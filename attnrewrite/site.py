"""One attention site: where it is, what it computes, and what was done with it."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .passes.graph_utils import tensor_meta

# "full": (…, N, N), a key-padding mask only if its rows are equal (checked at run time);
# "causal_key": a full mask that is causal combined with key padding on the example inputs
# (decoders; checked again at run time); "general": a full mask whose rows differ otherwise.
MaskKind = Literal["none", "key", "full", "causal_key", "general", "causal"]
Status = Literal["found", "replaced", "kept"]


def holds_for_every_call(condition: bool | torch.SymBool) -> bool:
    """Whether a condition on sizes holds for every call the graph will serve. Under Dynamo
    (inside a backend) deciding a symbolic condition installs a guard, and a call where it
    fails recompiles; a torch.export or FX graph serves every size in its range as it is, so a
    symbolic condition counts only when known true there (deciding it would guard nothing and
    silently fold, e.g., two length dims into one)."""
    if torch._guards.TracingContext.try_get() is not None:
        return bool(condition)
    return statically_known_true(condition)


@dataclasses.dataclass(frozen=True)
class SDPAArgs:
    """The arguments of a canonical `scaled_dot_product_attention` node."""

    query: torch.fx.Node
    key: torch.fx.Node
    value: torch.fx.Node
    attn_mask: torch.fx.Node | None = None
    dropout_p: float = 0.0
    is_causal: bool = False
    scale: float | None = None
    enable_gqa: bool = False


@dataclasses.dataclass
class AttentionSite:
    """A place in a graph where softmax attention was found (or a look-alike was examined).

    `status` is "replaced" when the site now runs `method`, "kept" when it was left as it was
    (`reason` says why), and "found" between the canonicalize and substitute passes.
    """

    name: str
    node: str
    layer: int | None
    spelling: str
    status: Status = "found"
    reason: str = ""
    method: str | None = None
    q_shape: tuple[int, ...] | None = None
    k_shape: tuple[int, ...] | None = None
    v_shape: tuple[int, ...] | None = None
    dtype: str | None = None
    mask: MaskKind = "none"
    mask_shape: tuple[int, ...] | None = None
    is_causal: bool = False
    scale: float | None = None
    dropout_p: float = 0.0
    enable_gqa: bool = False
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    measured_error: float | None = None  # model error with this site alone replaced (budget)
    flops_saved: int | None = None  # attention FLOPs saved by replacing it (budget)
    sdpa: SDPAArgs | None = dataclasses.field(default=None, repr=False, compare=False)
    sdpa_node: torch.fx.Node | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def q_len(self) -> int | None:
        return self.q_shape[-2] if self.q_shape else None

    @property
    def k_len(self) -> int | None:
        return self.k_shape[-2] if self.k_shape else None

    @property
    def same_length(self) -> bool:
        """Whether Nq = Nk holds for every input the graph serves, not just the example."""
        return holds_for_every_call(self.q_len == self.k_len)

    @property
    def runs_causal(self) -> bool:
        """Whether the site computes causal attention: the flag, or a mask that is causal with
        key padding on the example inputs (decoders)."""
        return self.is_causal or self.mask == "causal_key"

    @property
    def mask_requires_grad(self) -> bool:
        """Whether the graph's mask is trainable (e.g. a bias parameter), where the graph's
        producer recorded it (torch.export and Dynamo do; symbolic_trace does not)."""
        mask = tensor_meta(self.sdpa.attn_mask) if self.sdpa is not None else None
        return mask is not None and mask.requires_grad

    def keep(self, reason: str) -> None:
        self.status = "kept"
        self.reason = reason

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON: graph handles are left out."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("sdpa", "sdpa_node")
        }
