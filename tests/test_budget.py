"""ErrorBudget: measured per-site errors, greedy selection within the budget on calibration data,
and the budget holding on held-out inputs within a stated slack."""

from __future__ import annotations

import pytest
import torch
from hf_zoo import ZOO

import attnrewrite
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


def test_budget_options_are_checked():
    with pytest.raises(attnrewrite.OptionError, match="max_error must be ≥ 0"):
        attnrewrite.ErrorBudget(-1.0)
    with pytest.raises(attnrewrite.OptionError, match="calibration must be a tuple"):
        attnrewrite.budget._calls([torch.ones(2)])
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


def test_budget_refuses_methods_it_cannot_count_and_calibration_off_the_graph(model):
    with pytest.raises(attnrewrite.OptionError, match="counts for hsa, monarch, not 'zeros'"):
        attnrewrite.rewrite(model, batch(0), method="zeros", policy=attnrewrite.ErrorBudget(0.1))
    policy = attnrewrite.ErrorBudget(0.1, calibration=[batch(1, n=32)])
    with pytest.raises(attnrewrite.OptionError, match="calibrate at the example inputs' shapes"):
        attnrewrite.rewrite(model, batch(0), method="monarch", block_size=8, policy=policy)
