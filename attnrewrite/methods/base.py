"""What every attention method provides, and how its options are parsed and checked."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
import torch.fx

from ..errors import OptionError
from ..site import AttentionSite


def check_int_option(option: str, value: Any, minimum: int, requirement: str) -> None:
    """Raise OptionError unless `value` is an int ≥ `minimum`: bools (an int subclass) and
    floats are refused too, since a silently truncated or boolean block size is a wrong result.

    requirement: what the option must be, with its meaning, e.g. "an int ≥ 1 (the number of
    updates)"; the message adds the value and its type when the type is the problem.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
        return
    if isinstance(value, bool):
        hint = " (a bool; pass a number)"
    elif isinstance(value, float) and value.is_integer() and value >= minimum:
        hint = f" (a float; write {int(value)})"
    elif not isinstance(value, int):
        hint = f" (a {type(value).__name__}; pass a Python int)"
    else:
        hint = ""
    raise OptionError(f"{option} must be {requirement}, got {value!r}{hint}")


@dataclasses.dataclass(frozen=True)
class MethodOptions:
    """Base for a method's hyperparameters; subclasses add fields and check them in `check`."""

    @classmethod
    def parse(cls, method: str, options: Mapping[str, Any]) -> MethodOptions:
        """Build options from user keywords; unknown names are errors that list the valid ones."""
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - valid)
        if unknown:
            listing = ", ".join(sorted(valid)) or "none"
            raise OptionError(
                f"unknown option(s) {unknown} for method {method!r}; valid options: {listing}"
            )
        parsed = cls(**options)
        parsed.check()
        return parsed

    def check(self) -> None:
        """Raise OptionError naming the option and the fix when a value is out of range."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: The report's note on a site whose (…, N, N) mask only a call can classify ("full" or
#: "causal_key": under torch.compile the example-input probe does not run at all).
RUN_TIME_MASK_CHECK = (
    "per call: a mask that is neither key padding nor causal + key padding runs exact attention"
)


class AttentionMethod(ABC):
    """An attention operator the substitute pass can put in place of a canonical SDPA site."""

    name: ClassVar[str]
    options_type: ClassVar[type[MethodOptions]] = MethodOptions
    #: True for methods that honor key-padding masks and causal masks combined with key padding
    #: only (`masks.site_mask_terms`): `keep_reason` keeps sites whose mask is neither on the
    #: example inputs ("general"), and `site_options` notes the run-time check of the others.
    key_masks_only: ClassVar[bool] = False

    def parse_options(self, options: Mapping[str, Any]) -> MethodOptions:
        return self.options_type.parse(self.name, options)

    def approximation_reason(self, site: AttentionSite, label: str) -> str | None:
        """The preconditions of every approximate method: no active attention dropout (none
        has it) and no trainable mask (their ops give no mask gradient)."""
        if site.dropout_p:
            return f"attention dropout p={site.dropout_p} is active; {label} has none"
        if site.mask_requires_grad:
            return f"the mask is trainable (it requires grad); {label} gives no gradient for it"
        return None

    def tiling_reason(self, site: AttentionSite, label: str, why: str) -> str | None:
        """`approximation_reason`, and for methods that tile queries and keys alike as many
        queries as keys (`why` says what needs Nq = Nk)."""
        reason = self.approximation_reason(site, label)
        if reason:
            return reason
        if not site.same_length:
            return (
                f"cross-attention (Nq={site.q_len}, Nk={site.k_len}: not known equal): {why} "
                "and needs Nq = Nk"
            )
        return None

    def keep_reason(self, site: AttentionSite, options: MethodOptions) -> str | None:
        """Why this method cannot replace `site` whatever a policy says, or None: a mask that
        varies between queries on the example inputs for a method honoring key masks only, or
        `unsupported_reason`."""
        if self.key_masks_only and site.mask == "general":
            return (
                "the mask varies between queries on the example inputs and is neither causal "
                f"nor key padding (a bias or a window); {self.name} honors key-padding and "
                "causal masks only"
            )
        return self.unsupported_reason(site, options)

    @abstractmethod
    def unsupported_reason(self, site: AttentionSite, options: MethodOptions) -> str | None:
        """Why this method cannot compute exactly what the site asks for, or None if it can."""

    def site_options(self, site: AttentionSite, options: MethodOptions) -> dict[str, Any]:
        """What the report shows for a replaced site: `resolved_options`, and `mask_check` where
        a method honoring key masks only checks the site's mask per call (a "full" or
        "causal_key" mask: the example inputs cannot prove later masks of the same kind)."""
        shown = self.resolved_options(site, options)
        if self.key_masks_only and site.mask in ("full", "causal_key"):
            shown["mask_check"] = RUN_TIME_MASK_CHECK
        return shown

    def resolved_options(self, site: AttentionSite, options: MethodOptions) -> dict[str, Any]:
        """The options as they take effect at this site (defaults resolved)."""
        return options.as_dict()

    @abstractmethod
    def graph_target(self) -> Any:
        """The callable the substitute pass puts into the graph."""

    @abstractmethod
    def graph_arguments(
        self, site: AttentionSite, options: MethodOptions
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Arguments for `graph_target()`, built from the site's canonical SDPA node arguments."""

    def insert(
        self, gm: torch.fx.GraphModule, site: AttentionSite, options: MethodOptions
    ) -> torch.fx.Node:
        """Insert the method's call for `site` before its SDPA node and return it.

        The default calls `graph_target()`; methods with per-site state (parameters) override it
        to register a submodule on `gm` and call it.
        """
        args, kwargs = self.graph_arguments(site, options)
        with gm.graph.inserting_before(site.sdpa_node):
            return gm.graph.call_function(self.graph_target(), args, kwargs)

    @abstractmethod
    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        scale: float | None,
        enable_gqa: bool,
        options: MethodOptions,
    ) -> torch.Tensor:
        """The functional form used by `attnrewrite.attention`; raises on masks it cannot honor."""


class CustomOpMethod(AttentionMethod):
    """A method whose sites call one custom op with SDPA's arguments plus the method's own
    (`op_options`): the graph's call and the functional form differ only in `fallback`, which
    lets a rewritten site take exact attention for a mask the method cannot honor (the substitute
    pass checked the example inputs' mask) while `attnrewrite.attention` raises instead."""

    #: the op as a Python function (the functional form), and the graph's target
    op: ClassVar[Callable[..., torch.Tensor]]
    op_name: ClassVar[str]

    def op_options(self, options: MethodOptions) -> dict[str, Any]:
        """The op's keyword arguments for the method's options (a custom op takes lists)."""
        return {
            name: list(value) if isinstance(value, tuple) else value
            for name, value in options.as_dict().items()
        }

    def graph_target(self) -> Any:
        return getattr(torch.ops.attnrewrite, self.op_name).default

    def graph_arguments(
        self, site: AttentionSite, options: MethodOptions
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        sdpa = site.sdpa
        assert sdpa is not None
        kwargs = dict(
            attn_mask=sdpa.attn_mask,
            scale=sdpa.scale,
            **self.op_options(options),
            is_causal=sdpa.is_causal,
            enable_gqa=sdpa.enable_gqa,
            fallback=True,
        )
        return (sdpa.query, sdpa.key, sdpa.value), kwargs

    def __call__(self, q, k, v, attn_mask, is_causal, scale, enable_gqa, options):
        return self.op(
            q,
            k,
            v,
            attn_mask=attn_mask,
            scale=scale,
            **self.op_options(options),
            is_causal=is_causal,
            enable_gqa=enable_gqa,
            fallback=False,
        )
