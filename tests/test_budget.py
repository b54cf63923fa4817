"""ErrorBudget: measured per-site errors, greedy selection within the budget on calibration data,
and the budget holding on held-out inputs within a stated slack."""

from __future__ import annotations

import pytest
import torch
from hf_zoo import ZOO
from tiny_models import Encoder, encoder_inputs
from torch.export import Dim

import attnrewrite
from attnrewrite.api import rewrite_graph
from attnrewrite.budget import relative_error
from attnrewrite.flops import exact_attention_flops, site_flops


class Embedder(torch.nn.Module):
    """A small BERT returning mean-pooled embeddings: the output whose error the budget bounds."""

    def __init__(self):
        super().__init__()
        self.bert = next(e for e in ZOO if e.name == "bert").build("eager")
        with torch.no_grad():  # sharpen the random model's attention so approximations show
            for layer in self.bert.encoder.layer:
                layer.attention.self.query.weight.mul_(6)
                layer.attention.self.key.weight.mul_(6)

    def forward(self, input_ids, attention_mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask[..., None].to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1)


def batch(seed: int, n: int = 64):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 99, (4, n), generator=g), torch.ones(4, n, dtype=torch.long)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Embedder().eval()


def model_error(model, res, inputs):
    with torch.no_grad():
        return relative_error([res.module(*inputs).double()], [model(*inputs).double()])


@pytest.mark.parametrize("max_error", [0.0, 0.02, 0.1, float("inf")])
def test_budget_holds_on_calibration_and_held_out_inputs(model, max_error):
    calibration, held_out = [batch(1), batch(2)], batch(3)
    policy = attnrewrite.ErrorBudget(max_error, calibration=calibration)
    res = attnrewrite.rewrite(model, batch(0), method="monarch", block_size=8, policy=policy)
    replaced = res.report.replaced
    assert all(s.measured_error is not None and s.flops_saved > 0 for s in res.report.sites)
    calibration_error = relative_error(
        [res.module(*c).double() for c in calibration], [model(*c).double() for c in calibration]
    )
    rounding = 1e-6  # the budget is measured against the canonical (SDPA) form of the model
    assert calibration_error <= max_error + rounding
    # Stated slack: on held-out inputs of the same distribution, within 2× the budget.
    assert model_error(model, res, held_out) <= 2 * max_error + rounding
    if max_error == 0.0:
        assert replaced == []
    if max_error == float("inf"):
        assert len(replaced) == 2
    for site in res.report.kept:
        assert site.reason.startswith("policy:")


def test_budget_picks_per_site_options_from_candidates(model):
    candidates = [{"block_size": 8}, {"block_size": 16, "num_steps": 1}]
    policy = attnrewrite.ErrorBudget(float("inf"), calibration=batch(1), candidates=candidates)
    res = attnrewrite.rewrite(model, batch(0), method="monarch", policy=policy)
    # each site gets the candidate with the most FLOPs saved per unit of its measured error
    for site in res.report.replaced:
        ratios = {}
        for overrides in candidates:
            alone = attnrewrite.rewrite(
                model,
                batch(0),
                method="monarch",
                **overrides,
                policy=attnrewrite.Select(layers=[site.layer]),
            )
            error = model_error(model, alone, batch(1))
            options = alone.report.sites[site.layer].options
            saved = attnrewrite.flops.flops_saved(site, "monarch", options)
            ratios[options["block_size"]] = saved / error
        assert site.options["block_size"] == max(ratios, key=ratios.get)


def test_per_head_budget_replaces_heads_where_whole_sites_do_not_fit(model):
    calibration, held_out = [batch(1), batch(2)], batch(3)
    everything = attnrewrite.ErrorBudget(float("inf"), calibration=calibration)
    res = attnrewrite.rewrite(model, batch(0), method="monarch", block_size=8, policy=everything)
    max_error = 0.5 * min(s.measured_error for s in res.report.sites)
    whole = attnrewrite.ErrorBudget(max_error, calibration=calibration)
    res = attnrewrite.rewrite(model, batch(0), method="monarch", block_size=8, policy=whole)
    assert res.report.replaced == []
    per_head = attnrewrite.ErrorBudget(max_error, calibration=calibration, per_head=True)
    res = attnrewrite.rewrite(model, batch(0), method="monarch", block_size=8, policy=per_head)
    heads = model.bert.config.num_attention_heads
    chosen = [s.options["heads"] for s in res.report.replaced]
    assert chosen and all(0 < len(h) < heads for h in chosen)
    assert "heads=" in str(res.report)
    for site in res.report.replaced:  # the report's "alone" figures are the chosen heads'
        assert site.flops_saved == exact_attention_flops(site) - site_flops(site)
        assert 0 < site.measured_error <= max_error + 1e-6
    calibration_error = relative_error(
        [res.module(*c).double() for c in calibration], [model(*c).double() for c in calibration]
    )
    assert 0 < calibration_error <= max_error + 1e-6
    assert model_error(model, res, held_out) <= 2 * max_error + 1e-6


def test_per_head_budget_needs_a_stateless_method():
    with pytest.raises(attnrewrite.OptionError, match="per_head=True\\) needs a stateless"):
        ids, mask = batch(0)
        budget = attnrewrite.ErrorBudget(1.0, per_head=True)
        attnrewrite.rewrite(Embedder().eval(), (ids, mask), method="zeros", policy=budget)


def test_budget_in_train_mode_measures_the_method_not_dropout_and_leaves_no_trace():
    """A model in train mode (dropout, BatchNorm): every measurement draws the same dropout masks,
    so an exact replacement (b ≥ N) measures ~0, and the calibration runs leave buffers and
    the random stream as they were."""

    class Normed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedder, self.norm = Embedder(), torch.nn.BatchNorm1d(32)

        def forward(self, input_ids, attention_mask):
            return self.norm(torch.dropout(self.embedder(input_ids, attention_mask), 0.1, True))

    torch.manual_seed(0)
    model = Normed().train()
    model.embedder.eval()  # its attention dropout would keep the sites
    state = {name: x.clone() for name, x in model.state_dict().items()}
    policy = attnrewrite.ErrorBudget(0.01)
    torch.manual_seed(1)
    res = attnrewrite.rewrite(model, batch(0), method="monarch", block_size=64, policy=policy)
    drawn = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(drawn, torch.rand(3))
    assert all(s.measured_error < 1e-5 for s in res.report.sites)
    for name, x in model.state_dict().items():
        assert torch.equal(x, state[name]), name


def test_budget_refuses_methods_it_cannot_count_and_calibration_off_an_unknown_graph(model):
    with pytest.raises(attnrewrite.OptionError, match="counts for hsa, monarch, not 'zeros'"):
        attnrewrite.rewrite(model, batch(0), method="zeros", policy=attnrewrite.ErrorBudget(0.1))
    gm = torch.export.export(model, batch(0), strict=False).module()  # not from capture()
    policy = attnrewrite.ErrorBudget(0.1, calibration=[batch(1, n=32)])
    with pytest.raises(attnrewrite.OptionError, match="the model it was captured from is unknown"):
        rewrite_graph(gm, "monarch", {"block_size": 8}, policy, example_calls=[(batch(0), {})])


def call(batch_size: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (batch_size, n), generator=g)
    mask = torch.ones(batch_size, n, dtype=torch.long)
    mask[-1, n - n // 4 :] = 0
    return ids, mask


AUTO = {0: Dim.AUTO, 1: Dim.AUTO}


@pytest.mark.parametrize("case", ["bert", "plain"])
def test_budget_measures_calibration_at_other_batch_sizes_and_lengths(model, case):
    """Calibration at the example's shapes and at others: each site's measured error is the one
    a rewrite captured with dynamic shapes (taking every call as it is) gives on those calls."""
    if case == "bert":
        sizes = [(2, 32), (4, 64), (3, 36), (1, 40)]
        example, calibration = call(4, 64, 0), [call(b, n, i) for i, (b, n) in enumerate(sizes)]
        options, dynamic = {"block_size": 8}, (AUTO, AUTO)
    else:
        model = Encoder().eval()
        sizes = [(3, 48), (2, 64), (1, 80)]
        example = encoder_inputs(2, 64)
        calibration = [encoder_inputs(b, n, seed=i) for i, (b, n) in enumerate(sizes)]
        options, dynamic = {}, (AUTO, {0: Dim.AUTO, 3: Dim.AUTO})
    policy = attnrewrite.ErrorBudget(float("inf"), calibration=calibration)
    res = attnrewrite.rewrite(model, example, method="monarch", policy=policy, **options)
    assert res.report.sites and all(s.status == "replaced" for s in res.report.sites)
    for site in res.report.sites:
        select = attnrewrite.Select(names=[site.name])
        alone = attnrewrite.rewrite(
            model, example, method="monarch", policy=select, dynamic_shapes=dynamic, **options
        )
        with torch.no_grad():
            got = [alone.module(*c).double() for c in calibration]
            expected = [model(*c).double() for c in calibration]
        assert site.measured_error == pytest.approx(relative_error(got, expected), rel=1e-2)
        assert site.measured_error > 1e-6


def nan_call(call):
    x, mask = call
    x = x.clone()
    x[0, 1, 2] = float("nan")
    return x, mask


@pytest.mark.parametrize(
    ("calibration", "example", "message"),
    [
        ([], encoder_inputs(2, 16), "calibration is empty"),
        ([encoder_inputs(2, 16, seed=1), nan_call(encoder_inputs(2, 16, seed=2))],
         encoder_inputs(2, 16), "calibration call 1 gives non-finite outputs"),
        ([encoder_inputs(3, 8, seed=1), nan_call(encoder_inputs(1, 12, seed=2))],
         encoder_inputs(2, 16), "calibration call 1 gives non-finite outputs"),
        (None, nan_call(encoder_inputs(2, 16)), "example call 0 gives non-finite outputs"),
    ],
)  # fmt: skip
def test_budget_refuses_calibration_it_cannot_measure_on(calibration, example, message):
    with pytest.raises(attnrewrite.OptionError, match=message):
        policy = attnrewrite.ErrorBudget(0.01, calibration=calibration)
        attnrewrite.rewrite(Encoder().eval(), example, method="monarch", policy=policy)


def test_an_output_that_is_not_finite_is_an_infinite_error():
    expected = [torch.ones(3)]
    assert relative_error([torch.tensor([1.0, float("nan"), 1.0])], expected) == float("inf")
    assert relative_error([torch.tensor([1.0, float("inf"), 1.0])], expected) == float("inf")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: attnrewrite.rewrite(Encoder(), encoder_inputs(2, 16), method="monarch",
                                     policy="layers 0"),
         r"policy='layers 0' is not a policy: pass a callable .*Select\(layers=\[0\]\)"),
        (lambda: attnrewrite.Select(layers=3), r"Select\(layers=3\) takes a list of layer ind"),
        (lambda: attnrewrite.Select(names="encoder.*"), r"list of glob patterns .*names=\["),
        (lambda: attnrewrite.Select(min_seq_len="8"), r"min_seq_len must be an int ≥ 0, e.g."),
        (lambda: attnrewrite.Select(min_seq_len=-1), r"min_seq_len must be an int ≥ 0"),
        (lambda: attnrewrite.Select(heads=[True]), r"True is not a head index;.*heads=\[0, 3\]"),
        (lambda: attnrewrite.Select(layers=[0.5]), r"0.5 is not a layer index"),
        (lambda: attnrewrite.ErrorBudget("0.1"), r"max_error must be a number ≥ 0 .* got '0.1'"),
        (lambda: attnrewrite.ErrorBudget(-1.0), r"max_error must be a number ≥ 0"),
        (lambda: attnrewrite.ErrorBudget(0.1, calibration=()), r"\(\), a call without inputs"),
        (lambda: attnrewrite.ErrorBudget(0.1, calibration={}), r"\{\}, a call without inputs"),
        (lambda: attnrewrite.ErrorBudget(0.1, calibration=torch.ones(2)), "is one tensor"),
        (lambda: attnrewrite.ErrorBudget(0.1, calibration=[torch.ones(2)]),
         "call 0 is a Tensor"),
        (lambda: attnrewrite.ErrorBudget(0.1, candidates={"block_size": 8}),
         "pass a list of option sets"),
    ],
)  # fmt: skip
def test_bad_policies_are_errors_that_name_the_fix(make, message):
    with pytest.raises(attnrewrite.OptionError, match=message):
        make()
