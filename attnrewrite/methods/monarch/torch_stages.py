"""The stages of stages.py in plain PyTorch: the fast CPU path (and any device without Triton).

Each stage is a batch of small attentions (b×b or M×M per group). Groups are processed in
chunks whose score tile fits in the L2 cache, so the bias, the softmax passes and the matrix
products of a chunk touch memory once. Products are batched (`torch.bmm`) and read the stages'
strided views directly (MKL takes the L-update's by-slot rows, row stride b·d, as they are);
the one exception is the right operand of q·keysᵀ, transposed per chunk, because MKL multiplies
by a transposed view 2–3× slower than by a contiguous copy at these sizes. Results go straight
into their views when those are contiguous and are copied from cache otherwise. No Python loop
runs over blocks or slots, only over chunks of them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from .stages import Tensor

# Score elements per chunk and thread: 2^17 fp32 = 512 KiB, well inside a 1.25 MiB per-core L2
# (the 2-core machine of benchmarks/results/); larger chunks spill, smaller ones pay dispatch.
CHUNK_ELEMENTS = 1 << 17
# Stages with fewer score elements than twice this run on one thread (PyTorch's own grain size).
PARALLEL_MIN_ELEMENTS = 1 << 15


ChunkIndex = slice | tuple[int, slice]


class _Chunks:
    """Indices that split a stage's [g, group, ...] views into cache-sized chunks.

    When one sequence's whole stage fits a chunk, the views are flattened to [g·group, ...]
    (a copy only for the by-slot views of short sequences, where it is cheap) and chunks span
    sequences; otherwise chunks stay within a sequence and the views stay strided.
    """

    def __init__(self, groups: int, n_groups: int, rows: int, cols: int, threads: int) -> None:
        per_group = rows * cols
        total = groups * n_groups
        self.threads = threads if total * per_group >= 2 * PARALLEL_MIN_ELEMENTS else 1
        step = max(1, CHUNK_ELEMENTS // per_group)
        self.flat = n_groups * per_group <= CHUNK_ELEMENTS
        self.index: list[ChunkIndex]
        if self.flat:
            step = min(step, math.ceil(total / self.threads))  # a chunk for every thread
            self.index = [slice(i, i + step) for i in range(0, total, step)]
        else:
            self.index = [
                (g, slice(i, i + step)) for g in range(groups) for i in range(0, n_groups, step)
            ]
        self._pending: list[tuple[Tensor, Tensor]] = []

    def view(self, x: Tensor | None) -> Tensor | None:
        """An input as the chunk indices address it."""
        if x is None or not self.flat:
            return x
        return x.reshape(-1, *x.shape[2:])

    def output(self, x: Tensor | None) -> Tensor | None:
        """Where results for the view `x` go: x itself, its flattened view, or flat scratch
        that `run` copies back (a by-slot view cannot be flattened in place)."""
        if x is None or not self.flat:
            return x
        try:
            return x.view(-1, *x.shape[2:])
        except RuntimeError:
            scratch = x.new_empty(x.shape[0] * x.shape[1], *x.shape[2:])
            self._pending.append((x, scratch))
            return scratch

    def run(self, work: Callable[[ChunkIndex], None]) -> None:
        """work(index) for every chunk, spread over the threads, then the copies back."""
        threads = min(self.threads, len(self.index))
        if threads == 1:
            for index in self.index:
                work(index)
        else:

            def share(part: int) -> None:
                torch.set_num_threads(1)  # this worker's ops run single-threaded
                for index in self.index[part::threads]:
                    work(index)

            for done in [_pool(threads).submit(share, part) for part in range(threads)]:
                done.result()
        for target, scratch in self._pending:
            target.copy_(scratch.view(target.shape))
        self._pending.clear()


_pools: dict[int, ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _pools:
        _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="attnrewrite-monarch")
    return _pools[threads]


@contextlib.contextmanager
def parallel_stage_ops() -> Iterator[TorchStageOps]:
    """`TorchStageOps` that spread chunks over torch.get_num_threads() threads, each running
    whole chunks with single-threaded ops (they release the GIL); intra-op threads are 1 until
    the block ends, for the glue between stages too.

    Why: one join per stage instead of a parallel region per small op. A region stalls whenever
    a thread is descheduled; on the shared 2-core machine of benchmarks/results/ per-op
    parallelism was 3–20× slower at N = 256–16K.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield TorchStageOps(threads)
    finally:
        torch.set_num_threads(threads)


def _product(a: Tensor, b: Tensor, target: Tensor | None = None) -> Tensor:
    """a·b, written straight into `target` when it is contiguous (else the caller copies)."""
    if target is not None and target.is_contiguous():
        return torch.bmm(a, b, out=target)
    return torch.bmm(a, b)


def _put(dest: Tensor, index: ChunkIndex, value: Tensor) -> None:
    """dest[index] = value, skipped when `_product` already wrote it there."""
    target = dest[index]
    if target.data_ptr() != value.data_ptr():
        target.copy_(value)


def _transposed(x: Tensor) -> Tensor:
    """xᵀ (last two dims) in contiguous memory: MKL's fast right operand."""
    out = x.new_empty(*x.shape[:-2], x.shape[-1], x.shape[-2])
    return out.copy_(x.transpose(-1, -2))


class _Scores:
    """S = scale·q·keysᵀ + bias (+ causal mask) of each group, computed a chunk at a time."""

    def __init__(
        self,
        q: Tensor,
        keys: Tensor,
        bias: Tensor | None,
        scale: float,
        causal: int | None,
        threads: int,
    ) -> None:
        groups, n_groups, rows = q.shape[:3]
        cols = keys.shape[2]
        self.chunks = _Chunks(groups, n_groups, rows, cols, threads)
        self.q, self.keys = self.chunks.view(q), self.chunks.view(keys)
        self.bias = self.chunks.view(None if bias is None else bias.contiguous())
        self.scale = scale
        self.mask = None
        if causal is not None:
            hidden = torch.ones(rows, cols, device=q.device, dtype=torch.bool).triu(causal + 1)
            zeros = torch.zeros(rows, cols, device=q.device, dtype=q.dtype)
            self.mask = zeros.masked_fill(hidden, -math.inf)

    def __call__(self, index: ChunkIndex) -> tuple[Tensor, Tensor]:
        """The chunk's scores and its rows q, contiguous: a by-slot chunk reads q with a row
        stride of b·d, which costs MKL more than one copy into cache."""
        rows = self.q[index].contiguous()
        keys_t = _transposed(self.keys[index])
        if self.bias is None:  # baddbmm scales inside the product; beta = 0 ignores `input`
            ignored = rows.new_empty(()).expand(rows.shape[0], rows.shape[1], keys_t.shape[-1])
            scores = torch.baddbmm(ignored, rows, keys_t, beta=0.0, alpha=self.scale)
        else:
            scores = torch.baddbmm(self.bias[index][..., None, :], rows, keys_t, alpha=self.scale)
        if self.mask is not None:
            scores += self.mask
        return scores, rows


class TorchStageOps:
    """`StageOps` with batched matrix products, chunked over groups (see the module docstring);
    `threads` > 1 runs chunks on that many threads (see `parallel_stage_ops`)."""

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads

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
    ) -> None:
        scores_of = _Scores(q, keys, bias, scale, causal, self.threads)
        view, output = scores_of.chunks.view, scores_of.chunks.output
        values, sink_logit, sink_value = view(values), view(sink_logit), view(sink_value)
        transposed = view(transposed)
        out, lse, keys_out, keys_dot = output(out), output(lse), output(keys_out), output(keys_dot)
        transposed_out = output(transposed_out)
        lowest = torch.finfo(q.dtype).min  # the max of a row that sees nothing
        # Without lse, sink or causal mask, torch.softmax (one fused pass) does; a row sees
        # nothing only when its group's bias is −inf throughout.
        fused = lse is None and sink_logit is None and causal is None
        blind = None
        if scores_of.bias is not None:
            blind = torch.isneginf(scores_of.bias).all(-1)
            blind = blind if bool(blind.any()) else None

        def chunk(index: ChunkIndex) -> None:
            probs, rows = scores_of(index)
            if fused:
                probs = torch.softmax(probs, -1)
                if blind is not None:
                    probs.masked_fill_(blind[index][..., None, None], 0.0)
                if out is not None and values is not None:
                    _put(out, index, _product(probs, values[index].contiguous(), out[index]))
                return
            top = probs.amax(-1, keepdim=True)
            if sink_logit is not None:
                sink = sink_logit[index][..., None]
                top = torch.maximum(top, sink)
            top.clamp_min_(lowest)
            probs.sub_(top).exp_()
            total = probs.sum(-1, keepdim=True)
            if sink_logit is not None:
                sink_weight = torch.exp(sink - top)
                total += sink_weight
            inverse = total.clamp_min(torch.finfo(total.dtype).tiny).reciprocal_()
            probs.mul_(inverse)
            if out is not None and values is not None:
                result = _product(probs, values[index].contiguous(), out[index])
                if sink_value is not None:
                    result.addcmul_(sink_weight * inverse, sink_value[index])
                _put(out, index, result)
            if keys_out is not None and keys_dot is not None:
                result = _product(probs, scores_of.keys[index], keys_out[index])
                _put(keys_out, index, result)
                keys_dot[index] = torch.linalg.vecdot(rows, result)
            if lse is not None:
                lse[index] = (top + total.log_()).squeeze(-1)
            if transposed_out is not None and transposed is not None:
                transposed_out[index] = torch.bmm(probs.transpose(-1, -2), transposed[index])

        scores_of.chunks.run(chunk)

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
        scores_of = _Scores(q, keys, bias, scale, causal, self.threads)
        view, output = scores_of.chunks.view, scores_of.chunks.output
        keys, values, lse = view(keys), view(values), view(lse)
        d_out, delta, transposed = view(d_out), view(delta), view(transposed)
        dq, dkeys, dbias = output(dq), output(dkeys), output(dbias)
        transposed_out = output(transposed_out)

        def chunk(index: ChunkIndex) -> None:
            # a row that sees nothing has lse −inf and P = 0: shift it by +inf instead
            row_lse = lse[index][..., None]
            row_lse = row_lse.masked_fill(torch.isneginf(row_lse), math.inf)
            probs, rows = scores_of(index)
            probs.sub_(row_lse).exp_()
            if transposed_out is not None and transposed is not None:
                transposed_out[index] = torch.bmm(probs.transpose(-1, -2), transposed[index])
            d_scores = torch.bmm(d_out[index], _transposed(values[index]))
            d_scores.sub_(delta[index][..., None]).mul_(probs)
            dq[index] = torch.bmm(d_scores, keys[index]).mul_(scale)
            dkeys[index] = torch.bmm(d_scores.transpose(-1, -2), rows).mul_(scale)
            if dbias is not None:
                dbias[index] = d_scores.sum(-2)

        scores_of.chunks.run(chunk)
