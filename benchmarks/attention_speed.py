"""MonarchAttention (T = 1, 2) vs SDPA (and FlashAttention-2 when installed): time and peak memory.

The paper's setting: one sequence, 12 heads, d = 64, b = √N (a power of two, as the op's default
block size). fp16 and bf16 on a GPU, fp32 on the CPU. The methods run interleaved, round after
round, so they share whatever else the machine is doing; each time is the median of the rounds.
The ratio is SDPA's median over the method's. Peak memory is the allocator's peak above the inputs
on a GPU, and on the CPU the peak resident memory above the inputs, in a fresh process per point.

    python benchmarks/attention_speed.py                 # CPU: fp32, 2 threads, N = 256 … 16K
    python benchmarks/attention_speed.py --device cuda   # fp16 and bf16, N = 256 … 64K

Writes benchmarks/results/attention_speed_<device>.json and .png and prints a table.

On Linux CPUs the allocator matters: glibc's malloc hands large freed blocks back to the OS,
and the next call page-faults fresh ones in. The CPU path keeps its intermediates from call to
call (torch_stages.Workspace); its outputs are fresh. To measure with glibc's thresholds raised
(as preloading jemalloc or tcmalloc would also do):

    export MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296
    python benchmarks/attention_speed.py --out benchmarks/results/attention_speed_cpu_malloc.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from attnrewrite.methods.monarch import default_block_size, monarch_attention_op

RESULTS = Path(__file__).parent / "results"
HEADS, HEAD_DIM = 12, 64


def flash_attention_2() -> Callable | None:
    """flash_attn's kernel when installed (CUDA only), taking (B, N, H, d) tensors."""
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return lambda q, k, v: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))


def methods(n: int, device: str) -> dict[str, Callable]:
    block = default_block_size(n)
    table: dict[str, Callable] = {
        f"monarch T={steps}": (
            lambda q, k, v, steps=steps: monarch_attention_op(q, k, v, None, None, block, steps)
        )
        for steps in (1, 2)
    }
    table["sdpa"] = F.scaled_dot_product_attention
    flash = flash_attention_2() if device == "cuda" else None
    if flash is not None:
        table["flash-attn-2"] = flash
    return table


def inputs(n: int, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator(device).manual_seed(0)
    shape = (1, HEADS, n, HEAD_DIM)
    return tuple(
        torch.randn(shape, device=device, dtype=dtype, generator=generator) for _ in range(3)
    )


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_round(fn: Callable, args: tuple, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn(*args)
    synchronize(device)
    return time.perf_counter() - start


def gpu_peak_bytes(fn: Callable, args: tuple) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(*args)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def cpu_peak_bytes(method: str, n: int, threads: int) -> int:
    """Peak resident memory above the inputs' in a fresh process: Linux's high-water mark
    (VmHWM), reset once the inputs exist (the CPU allocator keeps no peak of its own)."""
    code = f"""
import re, sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
import attention_speed as bench
torch.set_num_threads({threads})
def status(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
with torch.no_grad():  # library start-up (MKL buffers, thread pools) is not the op's memory
    bench.methods(256, "cpu")[{method!r}](*bench.inputs(256, "cpu", torch.float32))
args = bench.inputs({n}, "cpu", torch.float32)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
with torch.no_grad():
    bench.methods({n}, "cpu")[{method!r}](*args)
print((status("VmHWM") - before) * 1024)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    return int(result.stdout.strip().splitlines()[-1])


def measure(
    n: int, device: str, dtype: torch.dtype, rounds: int, skip: set[str], threads: int
) -> dict[str, dict]:
    args = inputs(n, device, dtype)
    table = {name: fn for name, fn in methods(n, device).items() if name not in skip}
    times: dict[str, list[float]] = {name: [] for name in table}
    with torch.no_grad():
        for fn in table.values():  # warm up: autotuning, allocator, thread pools
            fn(*args)
        for _ in range(rounds):
            for name, fn in table.items():
                times[name].append(time_round(fn, args, device))
        result = {}
        for name, fn in table.items():
            peak = (
                gpu_peak_bytes(fn, args) if device == "cuda" else cpu_peak_bytes(name, n, threads)
            )
            result[name] = {
                "median_s": statistics.median(times[name]),
                "min_s": min(times[name]),
                "rounds": len(times[name]),
                "peak_bytes": peak,
            }
    baseline = result.get("sdpa")
    for row in result.values():
        row["speedup_vs_sdpa"] = baseline["median_s"] / row["median_s"] if baseline else None
    return result


def plot(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1,
        len({r["dtype"] for r in records}),
        squeeze=False,
        figsize=(6 * len({r["dtype"] for r in records}), 4.5),
    )
    for ax, dtype in zip(axes[0], sorted({r["dtype"] for r in records}), strict=True):
        rows = [r for r in records if r["dtype"] == dtype]
        for name in sorted({r["method"] for r in rows}):
            points = sorted((r["n"], r["median_s"]) for r in rows if r["method"] == name)
            ax.plot(*zip(*points, strict=True), marker="o", label=name)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="sequence length N",
            ylabel="time (s)",
            title=f"{title}, {dtype}",
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--lengths",
        default=None,
        help="comma-separated N (default: 256…16K on CPU, 256…64K on CUDA)",
    )
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per point")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch)")
    parser.add_argument(
        "--sdpa-max-n",
        type=int,
        default=16384,
        help="longest N at which exact attention runs (it is O(N²))",
    )
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no GPU is available here; run on the CPU (the default)")
    torch.set_num_threads(args.threads)
    default_lengths = [256, 512, 1024, 2048, 4096, 8192, 16384]
    if args.device == "cuda":
        default_lengths += [32768, 65536]
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else default_lengths
    dtypes = [torch.float16, torch.bfloat16] if args.device == "cuda" else [torch.float32]
    records: list[dict] = []
    conditions = {
        "device": torch.cuda.get_device_name()
        if args.device == "cuda"
        else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": args.threads,
        "torch": torch.__version__,
        "load_average_before": os.getloadavg(),
        "heads": HEADS,
        "head_dim": HEAD_DIM,
        "batch": 1,
        # glibc's malloc returns large freed blocks to the OS and the next call page-faults
        # them back in: allocator settings change CPU timings (docs/performance.md)
        "allocator_environment": {
            name: value
            for name, value in os.environ.items()
            if name.startswith(("MALLOC_", "LD_PRELOAD", "OMP_", "GOMP_", "KMP_"))
        },
        "note": "timings are medians of interleaved rounds; other processes shared the machine"
        if args.device == "cpu"
        else "",
    }
    out = Path(args.out) if args.out else RESULTS / f"attention_speed_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    points = [(dtype, n) for dtype in dtypes for n in lengths]
    for dtype, n in tqdm(points, desc="attention_speed", unit="point"):
        rounds = args.rounds or (10 if n <= 4096 else 5 if n <= 16384 else 3)
        skip = {"sdpa", "flash-attn-2"} if n > args.sdpa_max_n else set()
        for name, row in measure(n, args.device, dtype, rounds, skip, args.threads).items():
            records.append(
                {
                    "method": name,
                    "n": n,
                    "dtype": str(dtype).removeprefix("torch."),
                    "block_size": default_block_size(n),
                    **row,
                }
            )
        # after every point, so that a run stopped at a time limit keeps what it measured
        conditions["load_average_after"] = os.getloadavg()
        out.write_text(json.dumps({"conditions": conditions, "records": records}, indent=2))
    plot(records, out.with_suffix(".png"), f"attention time, {args.device}")
    print(f"\n{'dtype':8} {'N':>6} {'method':14} {'median':>10} {'vs SDPA':>8} {'peak MiB':>9}")
    for r in records:
        speedup = f"{r['speedup_vs_sdpa']:.1f}×" if r["speedup_vs_sdpa"] else "—"
        print(
            f"{r['dtype']:8} {r['n']:>6} {r['method']:14} {r['median_s'] * 1e3:>8.1f}ms "
            f"{speedup:>8} {r['peak_bytes'] / 2**20:>9.1f}"
        )
    before, after = conditions["load_average_before"], conditions["load_average_after"]
    print(f"load average before/after: {before} / {after}")
    print(f"allocator environment: {conditions['allocator_environment'] or 'default'}")
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
