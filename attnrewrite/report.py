"""The rewrite report: every attention site found, what was done with it, and why."""

from __future__ import annotations

import dataclasses
import json

from .site import AttentionSite


def _shape(shape: tuple[int, ...] | None) -> str:
    return "-" if shape is None else "×".join(str(d) for d in shape)


@dataclasses.dataclass
class Report:
    method: str
    sites: list[AttentionSite] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    """What the capture changed about the call (e.g. a KV cache turned off)."""

    @property
    def replaced(self) -> list[AttentionSite]:
        return [s for s in self.sites if s.status == "replaced"]

    @property
    def kept(self) -> list[AttentionSite]:
        return [s for s in self.sites if s.status == "kept"]

    def summary(self) -> str:
        partial = [s for s in self.replaced if "heads" in s.options]
        in_part = f" ({len(partial)} in part: some heads stay exact)" if partial else ""
        return (
            f"{len(self.sites)} attention site(s): {len(self.replaced)} replaced with "
            f"{self.method}{in_part}, {len(self.kept)} kept"
        )

    def to_json(self, indent: int | None = 2) -> str:
        payload = {
            "method": self.method,
            "notes": self.notes,
            "sites": [s.to_dict() for s in self.sites],
        }
        return json.dumps(payload, indent=indent, default=str)

    def __str__(self) -> str:
        header = ("site", "layer", "spelling", "status", "q shape", "mask", "details")
        rows = [header]
        for s in self.sites:
            if s.status == "replaced":
                details = ", ".join(f"{k}={v}" for k, v in s.options.items())
            else:
                details = s.reason
            if s.measured_error is not None:
                details += (
                    f" [alone: error {s.measured_error:.3g}, saves {s.flops_saved:.3g} FLOPs]"
                )
            mask = s.mask if s.mask_shape is None else f"{s.mask} {_shape(s.mask_shape)}"
            rows.append(
                (
                    s.name,
                    "-" if s.layer is None else str(s.layer),
                    s.spelling,
                    s.status,
                    _shape(s.q_shape),
                    mask,
                    details,
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths, strict=False)) + "  " + r[-1]
            for r in rows
        ]
        notes = [f"note: {note}" for note in self.notes]
        return "\n".join([self.summary(), *notes, *lines])
