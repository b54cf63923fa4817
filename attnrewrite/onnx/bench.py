"""onnxruntime latency of two models (e.g. original and rewritten) over sequence lengths."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..errors import UnsupportedInputError
from ..methods.base import check_int_option
from .files import check_input


def _feed(session: Any, batch: int, seq_len: int, rng: np.random.Generator) -> dict[str, Any]:
    """Inputs for every model input: dim 0 is the batch, other dynamic dims the length.

    Integer inputs named like ids get token ids, other integer inputs (masks) ones; float
    inputs standard normal values.
    """
    feed = {}
    for spec in session.get_inputs():
        shape = [
            batch if i == 0 else (d if isinstance(d, int) else seq_len)
            for i, d in enumerate(spec.shape)
        ]
        if "int" in spec.type:
            ids = "ids" in spec.name
            feed[spec.name] = rng.integers(1000, 2000, shape) if ids else np.ones(shape, np.int64)
        else:
            feed[spec.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def _check_dynamic_axes(session: Any, path: str | Path, batch: int) -> None:
    """Raise unless the model takes every batch and length bench feeds it: dim 0 of each input
    is the batch (dynamic, or fixed at `batch`) and some other dim is dynamic (the length).
    Otherwise every length would be timed at the one shape the model fixes, or fail."""
    inputs = {spec.name: list(spec.shape) for spec in session.get_inputs()}
    problems = [
        f"dim 0 of {name} is fixed at {shape[0]}, not batch {batch}"
        for name, shape in inputs.items()
        if shape and isinstance(shape[0], int) and shape[0] != batch
    ]
    if all(isinstance(d, int) for shape in inputs.values() for d in shape[1:]):
        problems.append("no input has a dynamic dim besides dim 0 for the sequence length")
    if problems:
        shapes = ", ".join(f"{name} {shape}" for name, shape in inputs.items())
        raise UnsupportedInputError(
            f"bench needs dynamic batch and length axes: in {path}, {'; '.join(problems)} "
            f"(inputs: {shapes}). Export the model with them: torch.onnx.export(..., "
            "dynamic_shapes=...) or dynamic_axes=..."
        )


def median_latencies_ms(sessions: list[Any], feed: dict[str, Any], repeats: int) -> list[float]:
    """Each session's median latency, measured round by round (one run of each per round), so
    that whatever else the machine does falls on all of them alike."""
    for session in sessions:
        session.run(None, feed)  # warm-up
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(repeats):
        for session, own in zip(sessions, times, strict=True):
            start = time.perf_counter()
            session.run(None, feed)
            own.append(time.perf_counter() - start)
    return [1e3 * statistics.median(own) for own in times]


def compare_latency(
    original: str | Path,
    rewritten: str | Path,
    seq_lens: list[int],
    *,
    batch: int = 1,
    repeats: int = 10,
    threads: int | None = None,
    progress: bool = False,
) -> list[dict[str, float]]:
    """Median latency of both models at each length, measured in alternating rounds in one
    process. Both models need a dynamic batch (dim 0) and length axis."""
    import onnxruntime

    check_int_option("repeats", repeats, 1, "an int ≥ 1 (the timed runs whose median is reported)")
    check_int_option("batch", batch, 1, "an int ≥ 1")
    for seq_len in seq_lens:
        check_int_option("each sequence length", seq_len, 1, "an int ≥ 1")
    for path in (original, rewritten):
        check_input(path)

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    # Each session has its own thread pool, which by default spins for a while after a run: the
    # other session's next run would then share the cores with it (on 2 cores that doubled
    # Monarch's time at N = 4K after an exact-attention run).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = [
        onnxruntime.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
        for p in (original, rewritten)
    ]
    for session, path in zip(sessions, (original, rewritten), strict=True):
        _check_dynamic_axes(session, path, batch)
    rng = np.random.default_rng(0)
    rows = []
    for seq_len in tqdm(seq_lens, desc="onnxruntime latency", disable=not progress):
        feed = _feed(sessions[0], batch, seq_len, rng)
        first, second = median_latencies_ms(sessions, feed, repeats)
        rows.append(
            {
                "seq_len": seq_len,
                "batch": batch,
                "original_ms": first,
                "rewritten_ms": second,
                "speedup": first / second,
            }
        )
    return rows
