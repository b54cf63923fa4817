"""Forward time of ZeroS vs exact attention (SDPA) and MonarchAttention over the sequence length.

ZeroS is linear in N, so t(16K)/t(4K) should be near 4 (SDPA's is near 16, Monarch's near 8).
On CPU this times the PyTorch path (linear.py); on a GPU the Triton kernels. Median of repeats,
after a warm-up call; results go to benchmarks/results/zeros_speed.json.

    .venv/bin/python benchmarks/zeros_speed.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import attnrewrite
from attnrewrite.methods.zeros import zeros_attention

RESULTS = Path(__file__).parent / "results" / "zeros_speed.json"


def methods(is_causal: bool) -> dict[str, Callable[..., torch.Tensor]]:
    """name → f(q, k, v, logits, gate_first, gate_residual)."""
    table = {
        "zeros": lambda q, k, v, s, g1, gh: zeros_attention(
            q, k, v, s, g1, gh, is_causal=is_causal
        ),
        "sdpa": lambda q, k, v, *_: F.scaled_dot_product_attention(q, k, v, is_causal=is_causal),
    }
    if not is_causal:  # Monarch has no causal variant
        table["monarch"] = lambda q, k, v, *_: attnrewrite.attention(q, k, v, method="monarch")
    return table


def median_seconds(
    fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], repeats: int,
    device: torch.device,
) -> float:  # fmt: skip
    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    fn(*inputs)  # warm-up
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn(*inputs)
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    rows = []
    with torch.no_grad():
        for is_causal in (False, True):
            for n in args.lengths:
                torch.manual_seed(0)
                shape = (1, args.heads, n)
                q, k, v = (torch.randn(*shape, args.head_dim, device=device, dtype=dtype)
                           for _ in range(3))  # fmt: skip
                logits = torch.randn(shape, device=device, dtype=dtype)
                gates = torch.rand(shape, device=device, dtype=dtype)
                for name, fn in methods(is_causal).items():
                    inputs = (q, k, v, logits, gates, gates)
                    seconds = median_seconds(fn, inputs, args.repeats, device)
                    rows.append({"method": name, "causal": is_causal, "n": n, "seconds": seconds})
                    print(f"{name:8} causal={is_causal!s:5} N={n:6d}  {seconds * 1e3:10.2f} ms",
                          flush=True)  # fmt: skip
    ratios = {}
    if {4096, 16384} <= set(args.lengths):
        for name in ("zeros", "sdpa", "monarch"):
            for is_causal in (False, True):
                t = {r["n"]: r["seconds"] for r in rows
                     if r["method"] == name and r["causal"] == is_causal}  # fmt: skip
                if t:
                    key = f"{name}{' causal' if is_causal else ''}"
                    ratios[key] = t[16384] / t[4096]
                    print(f"t(16K)/t(4K) {key:14} {ratios[key]:6.2f}")
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name()
    else:
        device_name = f"{platform.machine()} CPU, {os.cpu_count()} cores"
    payload = {
        "device": device_name,
        "torch_threads": torch.get_num_threads(),
        "batch": 1, "heads": args.heads, "head_dim": args.head_dim, "dtype": args.dtype,
        "repeats": args.repeats, "statistic": "median forward seconds after one warm-up",
        "rows": rows, "t16k_over_t4k": ratios,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
