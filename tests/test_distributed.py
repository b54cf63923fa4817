"""Training rewritten models under DistributedDataParallel (gloo, two processes on this machine).

DDP averages the gradients of the ranks' halves of a batch, so a few SGD steps on two processes
must land on the parameters that single-process training on the whole batch reaches. All four
runs (Monarch and ZeroS, rewritten eagerly and compiled) share one spawn of two processes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing
import torch.nn.functional as F
from tiny_models import DIM, METHOD_OPTIONS, Encoder, encoder_inputs, perturb_adapters
from torch.nn.parallel import DistributedDataParallel

import attnrewrite

WORLD_SIZE, GLOBAL_BATCH, SEQ_LEN, STEPS, LR = 2, 4, 16, 4, 0.5
#: (method, compiled): compiled Monarch is the original model under the attnrewrite backend;
#: compiled ZeroS is the rewritten model (its adapters are parameters of the model, so DDP and
#: the optimizer see them), compiled with the same backend.
RUNS = [("monarch", False), ("zeros", False), ("monarch", True), ("zeros", True)]
Result = tuple[list[float], dict[str, torch.Tensor]]


def batch(rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's rows of the global batch: (x, key mask, regression target)."""
    x, mask = encoder_inputs(GLOBAL_BATCH, SEQ_LEN, seed=1)
    target = torch.randn(GLOBAL_BATCH, SEQ_LEN, DIM, generator=torch.Generator().manual_seed(2))
    rows = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    return x[rows], mask[rows], target[rows]


def build(method: str, compiled: bool, x: torch.Tensor, mask: torch.Tensor) -> torch.nn.Module:
    """The same initial model in every process (seeded), rewritten unless the backend will."""
    torch.manual_seed(0)
    model = Encoder()
    if method == "monarch" and compiled:
        return model
    rewritten = attnrewrite.rewrite(model, (x, mask), method=method, **METHOD_OPTIONS[method])
    perturb_adapters(rewritten.module)
    return rewritten.module


def train(
    model: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, target: torch.Tensor
) -> list[float]:
    """STEPS steps of SGD on one batch; the loss before each step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = F.mse_loss(model(x, mask), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def run(method: str, compiled: bool, rank: int, world_size: int) -> Result:
    """Train one configuration; under DDP the losses are averaged over the ranks."""
    x, mask, target = batch(rank, world_size)
    module = build(method, compiled, x, mask)
    model = DistributedDataParallel(module) if world_size > 1 else module
    if compiled:
        options = {"method": method, "inner": "aot_eager", **METHOD_OPTIONS[method]}
        model = torch.compile(model, backend="attnrewrite", options=options)
    losses = torch.tensor(train(model, x, mask, target))
    if world_size > 1:
        dist.all_reduce(losses)
        losses /= world_size
    return losses.tolist(), {n: p.detach().clone() for n, p in module.named_parameters()}


def worker(rank: int, world_size: int, rendezvous: str, out_dir: str) -> None:
    """One DDP process: every run of RUNS, results saved for the test to compare."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world_size)
    try:
        results = {run_key: run(*run_key, rank, world_size) for run_key in RUNS}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> list[dict[tuple[str, bool], Result]]:
    out_dir = tmp_path_factory.mktemp("ddp")
    rendezvous = f"file://{out_dir / 'rendezvous'}"
    torch.multiprocessing.spawn(
        worker, args=(WORLD_SIZE, rendezvous, str(out_dir)), nprocs=WORLD_SIZE, join=True
    )
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def single_process_results() -> dict[str, Result]:
    """Eager single-process training on the whole batch, the reference for every run."""
    return {method: run(method, False, rank=0, world_size=1) for method in ("monarch", "zeros")}


@pytest.mark.slow
@pytest.mark.parametrize(("method", "compiled"), RUNS)
def test_ddp_training_matches_single_process_training(
    ddp_results, single_process_results, method, compiled
):
    losses, parameters = ddp_results[0][(method, compiled)]
    assert losses[-1] < losses[0], losses
    for name, value in ddp_results[1][(method, compiled)][1].items():
        assert torch.equal(value, parameters[name]), f"ranks disagree on {name}"
    expected_losses, expected = single_process_results[method]
    assert parameters.keys() == expected.keys()
    torch.testing.assert_close(losses, expected_losses, atol=1e-5, rtol=1e-4)
    for name, value in parameters.items():
        torch.testing.assert_close(value, expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_compiling_zeros_warns_that_its_adapters_are_outside_the_model():
    """Adapters the backend creates live in the compiled graph, where no optimizer finds them."""
    torch._dynamo.reset()
    attnrewrite.errors.WARNED.discard("compile-parameters")
    options = {"method": "zeros", "inner": "eager"}
    compiled = torch.compile(Encoder(), backend="attnrewrite", options=options)
    with pytest.warns(RuntimeWarning, match="rewrite first"):
        compiled(*encoder_inputs(2, 8))
