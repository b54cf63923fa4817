"""distill for the methods that call one op per site (Monarch, HSA): the projections it trains
are found from the graph, only they change, the updates merge into plain weights, and the
result is deterministic, saveable, exportable and closer to the original model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

import attnrewrite
from attnrewrite import lora, transfer

DIM, HEADS, N = 32, 4, 16


class Attention(nn.Module):
    """Self-attention with separate q, k, v and output projections (as BERT and Llama have)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(DIM, DIM) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, HEADS, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(attended.transpose(1, 2).reshape(b, n, DIM))


class Stack(nn.Module):
    """Two residual attention layers whose attention is sharp enough to approximate badly."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(Attention() for _ in range(2))
        with torch.no_grad():
            for layer in self.layers:
                layer.q.weight.mul_(4.0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x, mask)
        return x


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, bool key mask): the last sequence ends in 4 padding tokens."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, 1, 1, N, dtype=torch.bool)
    mask[-1, ..., N - 4 :] = False
    return torch.randn(2, N, DIM, generator=g), mask


CALIBRATION = [batch(seed) for seed in range(4)]
OPTIONS = {"monarch": {"block_size": 4, "num_steps": 1}, "hsa": {"branching": (4,)}}
QUICK = {"steps": 30, "end_to_end_steps": 30, "progress": False}
FEW = {"steps": 4, "end_to_end_steps": 4, "progress": False}  # where what matters is not quality


def output_error(module: nn.Module, model: nn.Module) -> float:
    with torch.no_grad():
        return sum(
            float((module(*b) - model(*b)).square().sum() / model(*b).square().sum())
            for b in CALIBRATION
        )


@pytest.fixture(params=sorted(OPTIONS))
def method(request) -> str:
    return request.param


def rewritten(method: str):
    model = Stack().eval()
    return model, attnrewrite.rewrite(model, CALIBRATION[0], method=method, **OPTIONS[method])


def test_each_site_finds_its_q_k_v_and_output_projections(method):
    _, res = rewritten(method)
    gm = res.module
    sites = [n for n in gm.graph.nodes if n.target in transfer.method_ops()]
    assert len(sites) == 2
    for index, node in enumerate(sites):
        found = [lora.projection_into(gm, a) for a in node.args[:3]]
        found.append(lora.projection_from(gm, node))
        assert [p.owner for p in found] == [f"layers.{index}.{n}" for n in ("q", "k", "v", "out")]


def test_a_projection_read_elsewhere_is_not_trained():
    """A q projection whose output also feeds something else, or a weight tied to another
    layer, would change other values: it gets no update."""

    class Tied(Attention):
        def forward(self, x, mask):
            b, n, _ = x.shape
            q = self.q(x)
            heads = [t.view(b, n, HEADS, -1).transpose(1, 2) for t in (q, self.k(x), self.v(x))]
            attended = F.scaled_dot_product_attention(*heads, attn_mask=mask)
            return self.out(attended.transpose(1, 2).reshape(b, n, DIM)) + q

    res = attnrewrite.rewrite(Tied().eval(), CALIBRATION[0], method="monarch", block_size=4)
    (node,) = [n for n in res.module.graph.nodes if n.target in transfer.method_ops()]
    assert lora.projection_into(res.module, node.args[0]) is None
    assert lora.projection_into(res.module, node.args[1]).owner == "k"


def test_distill_brings_the_model_closer_and_changes_only_the_site_projections(method):
    model, res = rewritten(method)
    original = copy.deepcopy(model.state_dict())
    before = {name: p.detach().clone() for name, p in res.module.named_parameters()}
    flags = {name: p.requires_grad for name, p in res.module.named_parameters()}
    error = output_error(res.module, model)
    log = attnrewrite.distill(res, CALIBRATION, **QUICK)
    assert output_error(res.module, model) < 0.9 * error
    assert log.output_final < log.output_initial
    assert all(log.final[name] < log.initial[name] for name in log.initial)
    after = dict(res.module.named_parameters())
    assert after.keys() == before.keys()  # merged: no LoRA or gain parameters are left
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    projections = {f"layers.{i}.{p}.weight" for i in range(2) for p in ("q", "k", "v", "out")}
    projections |= {f"layers.{i}.{p}.bias" for i in range(2) for p in "qv"}
    assert changed == projections
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())
    assert flags == {name: p.requires_grad for name, p in res.module.named_parameters()}
    assert not any(str(n.target).startswith("_distill") for n in res.module.graph.nodes)


def test_merged_weights_compute_what_the_updates_computed():
    _, res = rewritten("monarch")
    gm = res.module
    sites = transfer.install(gm, rank=4, alpha=8.0, seed=0)
    with torch.no_grad():
        for site in sites:
            for update in site.updates.values():
                for p in update.parameters():
                    p.copy_(0.1 * torch.randn_like(p))
        updated = gm(*CALIBRATION[1])
    transfer.uninstall(gm, sites)
    with torch.no_grad():
        torch.testing.assert_close(gm(*CALIBRATION[1]), updated, atol=1e-5, rtol=1e-5)


def test_distill_is_deterministic_and_the_result_saves_and_loads(tmp_path):
    results = []
    for _ in range(2):
        _, res = rewritten("monarch")
        attnrewrite.distill(res, CALIBRATION, seed=3, **FEW)
        results.append(res.module)
    first, second = (dict(m.named_parameters()) for m in results)
    assert all(torch.equal(first[name], second[name]) for name in first)
    torch.save(results[0].state_dict(), tmp_path / "distilled.pt")
    _, fresh = rewritten("monarch")
    fresh.module.load_state_dict(torch.load(tmp_path / "distilled.pt"))
    with torch.no_grad():
        torch.testing.assert_close(fresh.module(*CALIBRATION[2]), results[0](*CALIBRATION[2]))


@pytest.mark.slow
def test_a_distilled_model_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    _, res = rewritten("monarch")
    attnrewrite.distill(res, CALIBRATION, **FEW)
    out = attnrewrite.export_onnx(res, CALIBRATION[0], tmp_path / "distilled.onnx")
    assert out.max_error <= 1e-4


def test_a_non_finite_batch_stops_distill_and_leaves_the_weights():
    _, res = rewritten("monarch")
    before = {name: p.detach().clone() for name, p in res.module.named_parameters()}
    x, mask = batch(9)
    x[0, 3, 5] = float("nan")
    with pytest.raises(attnrewrite.AttnRewriteError, match=r"calibration batch 1 .*non-finite"):
        attnrewrite.distill(res, [CALIBRATION[0], (x, mask)], **FEW)
    after = dict(res.module.named_parameters())
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not any(str(n.target).startswith("_distill") for n in res.module.graph.nodes)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"steps": -1}, r"steps must be an int ≥ 0"),
        ({"lr": -1.0}, r"lr must be a positive number"),
        ({"end_to_end_steps": -1}, r"end_to_end_steps must be an int ≥ 0"),
        ({"rank": 1.5}, r"rank must be an int ≥ 0"),
    ],
)
def test_bad_options_are_named(options, message):
    _, res = rewritten("monarch")
    with pytest.raises(attnrewrite.AttnRewriteError, match=message):
        attnrewrite.distill(res, CALIBRATION, **options)


def test_a_module_without_replaced_sites_is_refused():
    res = attnrewrite.rewrite(Stack().eval(), CALIBRATION[0], method="sdpa")
    with pytest.raises(attnrewrite.AttnRewriteError, match="no replaced attention site"):
        attnrewrite.distill(res, CALIBRATION)


def test_calibration_at_other_batch_sizes_and_lengths_trains_the_same_updates():
    """Batches the rewritten graph does not take run on the model captured again at their
    shapes, with the same trained updates: the result equals distilling a dynamic rewrite."""
    g = torch.Generator().manual_seed(5)
    shapes = [(2, N), (3, 12), (1, 20)]
    calibration = [
        (torch.randn(b, n, DIM, generator=g), torch.ones(b, 1, 1, n, dtype=torch.bool))
        for b, n in shapes
    ]
    results = []
    for dynamic in (None, ({0: Dim.AUTO, 1: Dim.AUTO}, {0: Dim.AUTO, 3: Dim.AUTO})):
        model = Stack().eval()
        res = attnrewrite.rewrite(
            model, calibration[0], method="monarch", block_size=4, dynamic_shapes=dynamic
        )
        attnrewrite.distill(res, calibration, **FEW)
        results.append(dict(res.module.named_parameters()))
    static, dynamic_ = results
    for name in static:
        torch.testing.assert_close(static[name], dynamic_[name], atol=1e-5, rtol=1e-4)
    assert any(not torch.equal(static[n], p) for n, p in Stack().named_parameters())
