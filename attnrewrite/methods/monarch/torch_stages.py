"""The stages of stages.py in plain PyTorch: the fast CPU path (and any device without Triton).

Each stage is a batch of small attentions (b×b or M×M per group). Groups are processed in
chunks whose score tile fits in the L2 cache, so the bias, the softmax passes and the matrix
products of a chunk touch memory once. Products are batched (`torch.bmm`) and read the stages'
strided views as they are: MKL takes the L-update's by-slot rows (row stride b·d) and the
transposed keys of q·keysᵀ natively, and at these sizes a copy into cache costs more than it
saves (measured on the machine of benchmarks/results/). Results go straight into their views
when those are contiguous and are copied from cache otherwise. No Python loop runs over blocks
or slots, only over chunks of them, whose views are made up front (`_Chunks.split`), so a chunk
issues few ops: each costs a few µs of dispatch under the GIL.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

from .stages import StageOps, Tensor, intermediate


def _l2_cache_bytes(caches: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """One core's L2 cache (Linux sysfs), or None where it cannot be read."""
    units = {"K": 1 << 10, "M": 1 << 20}
    for index in sorted(caches.glob("index*")):
        try:
            if (index / "level").read_text().strip() != "2":
                continue
            size = (index / "size").read_text().strip()
            return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
        except (OSError, ValueError):
            return None
    return None


def _chunk_elements(l2_bytes: int | None) -> int:
    """Score elements per chunk and thread: the largest power of two whose fp32 scores fit one
    core's L2 cache (2^17 where its size is unknown). Measured with an SDPA call before each
    Monarch call, as in benchmarks/attention_speed.py: on the 2 MiB L2 of benchmarks/results/,
    2^19 runs N = 4K in 23.9 ms and 8K in 55.6 (2^18: 24.2, 66.6; 2^17: 25.2, 69.4); on a
    1.25 MiB L2, 2^17 and 2^18 ran alike and 2^16 paid dispatch."""
    if not l2_bytes:
        return 1 << 17
    return 1 << max(15, min(20, (l2_bytes // 4).bit_length() - 1))


CHUNK_ELEMENTS = _chunk_elements(_l2_cache_bytes())
# Sequences whose whole stage has at most this many score elements are flattened, chunks
# spanning sequences (their by-slot views copied: cheap at these sizes).
FLAT_ELEMENTS = 1 << 17
# Stages with fewer score elements than twice this run on one thread (PyTorch's own grain size).
PARALLEL_MIN_ELEMENTS = 1 << 15

Parts = Sequence[Tensor]


class Workspace:
    """Intermediate buffers of the CPU path, reused from one call to the next on one thread.

    glibc's malloc hands large freed blocks back to the OS, so every call would page-fault its
    intermediates in anew: thousands of faults a call at N = 4K (resource.getrusage), about a
    fifth of its time on the machine of benchmarks/results/ (benchmarks/attention_speed.py with
    and without; docs/performance.md). Each op call is one
    `begin()`; a buffer no call has taken for two calls is dropped, so what is held is what the
    last two calls used (a forward and a backward in training; about 2·g·N·d values a forward
    at T = 1). The caller never sees a buffer: outputs are fresh tensors.
    """

    _threads = threading.local()

    def __init__(self) -> None:
        self._buffers: dict[tuple, list[Tensor]] = {}
        self._last_call: dict[tuple, int] = {}
        self._taken: Counter[tuple] = Counter()
        self._call = 0

    @classmethod
    def of_this_thread(cls) -> Workspace:
        if not hasattr(cls._threads, "workspace"):
            cls._threads.workspace = cls()
        return cls._threads.workspace

    def begin(self) -> None:
        """A new call: buffers are free again; those idle for two calls go."""
        self._call += 1
        for key in [key for key, call in self._last_call.items() if call < self._call - 2]:
            del self._buffers[key], self._last_call[key]
        self._taken.clear()

    @property
    def nbytes(self) -> int:
        """The memory held between calls."""
        return sum(buffer.nbytes for pool in self._buffers.values() for buffer in pool)

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialized buffer, distinct from the others this call took."""
        key = (shape, dtype, device)
        pool = self._buffers.setdefault(key, [])
        index = self._taken[key]
        self._taken[key] += 1
        self._last_call[key] = self._call
        if index == len(pool):
            # a normal tensor even under inference_mode: a later call outside it writes it
            with torch.inference_mode(False):
                pool.append(torch.empty(shape, dtype=dtype, device=device))
        return pool[index]


class _Chunks:
    """Splits a stage's [g, group, ...] views into cache-sized chunks.

    When one sequence's whole stage fits a chunk, the views are flattened to [g·group, ...]
    (a copy only for the by-slot views of short sequences, where it is cheap) and chunks span
    sequences; otherwise chunks stay within a sequence and the views stay strided.
    chunk_elements None: one chunk of everything, with no size arithmetic (torch.export).
    """

    def __init__(
        self,
        groups: int,
        n_groups: int,
        rows: int,
        cols: int,
        threads: int,
        chunk_elements: int | None,
        workspace: Workspace | None = None,
    ) -> None:
        self._pending: list[tuple[Tensor, Tensor]] = []
        self.workspace = workspace
        self.whole = chunk_elements is None
        if chunk_elements is None:
            self.threads, self.flat, self.count = 1, True, 1
            return
        per_group = rows * cols
        total = groups * n_groups
        self.threads = threads if total * per_group >= 2 * PARALLEL_MIN_ELEMENTS else 1
        self.step = max(1, chunk_elements // per_group)
        self.flat = n_groups * per_group <= min(chunk_elements, FLAT_ELEMENTS)
        if self.flat:
            self.step = min(self.step, math.ceil(total / self.threads))  # a chunk for every thread
            self.count = math.ceil(total / self.step)
        else:
            self.count = groups * math.ceil(n_groups / self.step)

    def split(self, x: Tensor) -> Parts:
        """x's chunks, as views (one call each, not one indexing per chunk)."""
        if self.whole:
            return [x.reshape(-1, *x.shape[2:])]
        if self.flat:
            return self._flattened(x).split(self.step)
        return [part for sequence in x.unbind() for part in sequence.split(self.step)]

    def _flattened(self, x: Tensor) -> Tensor:
        """x as [g·group, ...]: a view, or a copy (by-slot views)."""
        try:
            return x.view(-1, *x.shape[2:])
        except RuntimeError:
            copy = intermediate((x.shape[0] * x.shape[1], *x.shape[2:]), x, self.workspace)
            copy.view(x.shape).copy_(x)
            return copy

    def output(self, x: Tensor) -> Parts:
        """The chunks that results for the view `x` go to: views of x, or of flat scratch that
        `run` copies back (a by-slot view cannot be flattened in place; one chunk always takes
        scratch, as asking would guard on sizes under torch.export)."""
        if not self.flat:
            return self.split(x)
        if not self.whole:
            try:
                return x.view(-1, *x.shape[2:]).split(self.step)
            except RuntimeError:
                pass
        scratch = intermediate((x.shape[0] * x.shape[1], *x.shape[2:]), x, self.workspace)
        self._pending.append((x, scratch))
        return [scratch] if self.whole else scratch.split(self.step)

    def run(self, work: Callable[[int], None]) -> None:
        """work(c) for every chunk c, then the copies back. With several threads, each takes
        the next chunk when it is done with its last, so a thread that the shared machine
        deschedules delays only its own chunk."""
        _share(self.count, work, self.threads)
        for target, scratch in self._pending:
            target.copy_(scratch.view(target.shape))
        self._pending.clear()


def _share(count: int, work: Callable[[int], None], threads: int) -> None:
    """work(i) for i < count on up to `threads` threads (the caller's is one of them), each
    taking the next i when it is done with its last, with single-threaded ops."""
    threads = min(threads, count)
    pending = iter(range(count))  # shared: a range iterator's next() is atomic under the GIL

    def share() -> None:
        for i in pending:
            work(i)

    inference = torch.is_inference_mode_enabled()
    helpers = [
        _pool(threads - 1).submit(_single_threaded, share, inference) for _ in range(threads - 1)
    ]
    share()
    for done in helpers:
        done.result()


_pools: dict[int, ThreadPoolExecutor] = {}


def _single_threaded(fn: Callable[[], None], inference: bool) -> None:
    """fn() on a pool thread: single-threaded ops, no autograd (grad mode is per thread, and
    the stages never need it: an op's forward with inputs that require grad must not record),
    and the caller's inference mode, also per thread (tensors the caller made under
    torch.inference_mode can only be written under it)."""
    torch.set_num_threads(1)
    # in this order: inference_mode(False) turns grad mode back on
    with torch.inference_mode(inference), torch.no_grad():
        fn()


def _pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _pools:
        _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="attnrewrite-monarch")
    return _pools[threads]


@contextlib.contextmanager
def parallel_stage_ops() -> Iterator[TorchStageOps]:
    """`TorchStageOps` that spread chunks over torch.get_num_threads() threads, each running
    whole chunks with single-threaded ops (they release the GIL); intra-op threads are 1 until
    the block ends, for the glue between stages too. One op call: intermediates come from this
    thread's `Workspace`.

    Why: one join per stage instead of a parallel region per small op. A region stalls whenever
    a thread is descheduled; on the shared 2-core machine of benchmarks/results/ per-op
    parallelism was 3–20× slower at N = 256–16K.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield TorchStageOps(threads, workspace=Workspace.of_this_thread())
    finally:
        torch.set_num_threads(threads)


def by_sequence(
    ops: StageOps,
    run: Callable[[slice, StageOps], tuple[Tensor, ...]],
    groups: int,
    n: int,
    block_size: int,
) -> tuple[Tensor, ...]:
    """run(sequences, ops) → results along dim 0, for the g sequences of n tokens.

    With `TorchStageOps` on several threads, sequences whose every stage spans 4 chunks or more
    and one sequence per thread at least, each thread takes the next sequence and runs all its
    stages with single-threaded ops: its intermediates (aL, y) stay in that core's caches
    between the stages, and there is no join per stage. On the machine of benchmarks/results/
    this was 6–10% faster at N = 8K and 16K, and no faster at 4K (2 chunks a stage), where the
    coarser tasks balance worse and every sequence's intermediates fit the L3 cache anyway.
    """
    m = math.ceil(n / block_size)
    long = m * block_size * min(m, block_size) >= 4 * CHUNK_ELEMENTS
    if not isinstance(ops, TorchStageOps) or ops.threads == 1 or groups < ops.threads or not long:
        return run(slice(None), ops)
    results: list[tuple[Tensor, ...]] = [() for _ in range(groups)]

    def one(i: int) -> None:
        workspace = None if ops.workspace is None else Workspace.of_this_thread()
        results[i] = run(slice(i, i + 1), TorchStageOps(workspace=workspace))

    _share(groups, one, ops.threads)
    return tuple(torch.cat(parts) for parts in zip(*results, strict=True))


class _Scores:
    """S = scale·q·keysᵀ + bias (+ causal mask) of each group, computed a chunk at a time;
    with `minus_diagonal` (see `StageOps.attend`), the bias less a diagonal of the product."""

    def __init__(
        self,
        q: Tensor,
        keys: Tensor,
        bias: Tensor | None,
        scale: float,
        causal: int | None,
        ops: TorchStageOps,
        minus_diagonal: int | None = None,
        diagonal_weight: Tensor | None = None,
    ) -> None:
        groups, n_groups, rows = q.shape[:3]
        cols = keys.shape[2]
        self.chunks = _Chunks(
            groups, n_groups, rows, cols, ops.threads, ops.chunk_elements, ops.workspace
        )
        self.q, self.keys = self.chunks.split(q), self.chunks.split(keys)
        self.minus_diagonal = minus_diagonal
        self.diagonal_weight = _split(self.chunks, diagonal_weight)
        if minus_diagonal is not None:
            assert bias is not None and rows == cols, "a diagonal is folded into a square stage"
            self.bias, self.folded_bias = None, self.chunks.split(bias)
        else:
            self.bias = None if bias is None else self.chunks.split(bias.unsqueeze(-2))
        self.scale = scale
        self.ignored = q.new_empty(())  # baddbmm's `input`, ignored with beta = 0
        # filled, not added: a non-finite product where a later key is hidden must not reach
        # the row (inf + −inf is NaN), as the reference and the Triton kernels mask
        self.hidden = None
        if causal is not None:
            self.hidden = torch.ones(rows, cols, device=q.device, dtype=torch.bool).triu(causal + 1)

    def __call__(self, c: int) -> Tensor:
        """Chunk c's scores (baddbmm scales inside the product)."""
        rows, keys = self.q[c], self.keys[c]
        shape = (rows.shape[0], rows.shape[1], keys.shape[1])
        if self.bias is None:
            ignored = self.ignored.expand(shape)
            scores = torch.baddbmm(ignored, rows, keys.mT, beta=0.0, alpha=self.scale)
        else:  # the bias is copied into the result, and the product added to it
            scores = torch.baddbmm(self.bias[c].expand(shape), rows, keys.mT, alpha=self.scale)
        if self.minus_diagonal is not None:  # the diagonal of the product alone
            scores += self._less_diagonal(c, scores).unsqueeze(-2)
        if self.hidden is not None:
            scores.masked_fill_(self.hidden, -math.inf)
        return scores

    def _less_diagonal(self, c: int, scores: Tensor) -> Tensor:
        """Chunk c's bias less w·S[c + o, c] for each key c (S without bias)."""
        offset = self.minus_diagonal
        assert offset is not None
        keys = scores.shape[-1]  # rows c + o, keys c: a strided slice (ONNX has no diagonal)
        diagonal = scores.flatten(-2)[..., offset * keys :: keys + 1]
        if self.diagonal_weight is not None:
            diagonal = diagonal * self.diagonal_weight[c][..., offset:]
        if offset:
            diagonal = F.pad(diagonal, (0, offset))  # keys no row follows
        return self.folded_bias[c] - diagonal


def _bmm_into(a: Tensor, b: Tensor, target: Tensor) -> Tensor:
    """target = a·b. bmm's `out=` takes a strided target one matrix at a time; a product into
    fresh memory and one copy is cheaper."""
    if target.is_contiguous():
        return torch.bmm(a, b, out=target)
    return target.copy_(torch.bmm(a, b))


def _split(chunks: _Chunks, x: Tensor | None) -> Parts | None:
    return None if x is None else chunks.split(x)


def _output(chunks: _Chunks, x: Tensor | None) -> Parts | None:
    return None if x is None else chunks.output(x)


class TorchStageOps:
    """`StageOps` with batched matrix products, chunked over groups (see the module docstring);
    `threads` > 1 runs chunks on that many threads (see `parallel_stage_ops`).

    chunk_elements=None computes each stage in one piece, with no size arithmetic: the form the
    ONNX functions export (onnx/lowerings.py), so a deployed graph runs the op's own stages.
    workspace: where intermediates live (the op's eager calls; creating the ops begins a call).
    Both fold the first L-update's diagonal (`StageOps.attend`): no rowdot, and the bias added
    after the product, not copied into baddbmm's input. At N = 4K on the machine of
    benchmarks/results/ that was 5% of the chunked form's time and 11% of the ONNX function's
    in onnxruntime (side-by-side runs; docs/performance.md).
    """

    folds_diagonal = True

    def __init__(
        self,
        threads: int = 1,
        chunk_elements: int | None = CHUNK_ELEMENTS,
        workspace: Workspace | None = None,
    ) -> None:
        self.threads = threads
        self.chunk_elements = chunk_elements
        self.workspace = workspace
        if workspace is not None:
            workspace.begin()

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.promote_types(dtype, torch.float32)

    def attend(
        self,
        q: Tensor,
        keys: Tensor,
        values: Tensor | None,
        bias: Tensor | None,
        out: Tensor | None,
        lse: Tensor | None,
        *,
        scale: float,
        causal: int | None = None,
        sink_logit: Tensor | None = None,
        sink_value: Tensor | None = None,
        keys_out: Tensor | None = None,
        keys_dot: Tensor | None = None,
        transposed: Tensor | None = None,
        transposed_out: Tensor | None = None,
        bias_minus_diagonal: int | None = None,
        diagonal_weight: Tensor | None = None,
    ) -> None:
        scores_of = _Scores(
            q, keys, bias, scale, causal, self, bias_minus_diagonal, diagonal_weight
        )
        chunks = scores_of.chunks
        values_c, sink_logit_c = _split(chunks, values), _split(chunks, sink_logit)
        sink_value_c, transposed_c = _split(chunks, sink_value), _split(chunks, transposed)
        out_c, lse_c = _output(chunks, out), _output(chunks, lse)
        keys_out_c, keys_dot_c = _output(chunks, keys_out), _output(chunks, keys_dot)
        transposed_out_c = _output(chunks, transposed_out)
        lowest = torch.finfo(q.dtype).min  # the max of a row that sees nothing
        tiny = torch.finfo(q.dtype).tiny

        def chunk(c: int) -> None:
            probs = scores_of(c)
            top = probs.amax(-1, keepdim=True)
            if sink_logit_c is not None:
                sink = sink_logit_c[c][..., None]
                top = torch.maximum(top, sink)
            top.clamp_min_(lowest)
            probs.sub_(top).exp_()
            total = probs.sum(-1, keepdim=True)
            if sink_logit_c is not None:
                sink_weight = torch.exp(sink - top)
                total += sink_weight
            inverse = total.clamp_min(tiny).reciprocal_()
            probs.mul_(inverse)
            if out_c is not None and values_c is not None:
                result = _bmm_into(probs, values_c[c], out_c[c])
                if sink_value_c is not None:
                    result.addcmul_(sink_weight * inverse, sink_value_c[c])
            if keys_out_c is not None:
                result = _bmm_into(probs, scores_of.keys[c], keys_out_c[c])
                if keys_dot_c is not None:
                    torch.linalg.vecdot(scores_of.q[c], result, out=keys_dot_c[c])
            if lse_c is not None:
                torch.add(top, total.log_(), out=lse_c[c].unsqueeze(-1))
            if transposed_out_c is not None and transposed_c is not None:
                _bmm_into(probs.mT, transposed_c[c], transposed_out_c[c])

        chunks.run(chunk)

    def attend_grads(
        self,
        q: Tensor,
        keys: Tensor,
        values: Tensor,
        bias: Tensor | None,
        lse: Tensor,
        d_out: Tensor,
        delta: Tensor,
        dq: Tensor,
        dkeys: Tensor,
        dbias: Tensor | None,
        *,
        scale: float,
        causal: int | None = None,
        transposed: Tensor | None = None,
        transposed_out: Tensor | None = None,
    ) -> None:
        scores_of = _Scores(q, keys, bias, scale, causal, self)
        chunks = scores_of.chunks
        values_c, lse_c = chunks.split(values), chunks.split(lse.unsqueeze(-1))
        d_out_c, delta_c = chunks.split(d_out), chunks.split(delta.unsqueeze(-1))
        transposed_c = _split(chunks, transposed)
        dq_c, dkeys_c, dbias_c = chunks.output(dq), chunks.output(dkeys), _output(chunks, dbias)
        transposed_out_c = _output(chunks, transposed_out)

        def chunk(c: int) -> None:
            # a row that sees nothing has lse −inf and P = 0: shift it by +inf instead
            row_lse = lse_c[c].masked_fill(torch.isneginf(lse_c[c]), math.inf)
            probs = scores_of(c)
            probs.sub_(row_lse).exp_()
            if transposed_out_c is not None and transposed_c is not None:
                _bmm_into(probs.mT, transposed_c[c], transposed_out_c[c])
            d_scores = torch.bmm(d_out_c[c], values_c[c].mT)
            d_scores.sub_(delta_c[c]).mul_(probs)
            _bmm_into(d_scores, scores_of.keys[c], dq_c[c]).mul_(scale)
            _bmm_into(d_scores.mT, scores_of.q[c], dkeys_c[c]).mul_(scale)
            if dbias_c is not None:
                torch.sum(d_scores, -2, out=dbias_c[c])

        chunks.run(chunk)
