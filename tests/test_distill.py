"""distill: calibration batches at any batch size and length, and a non-finite batch or step
stopping it with the adapters as they were."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from hf_zoo import ZOO
from tiny_models import Encoder, encoder_inputs, perturb_adapters
from torch.export import Dim

import attnrewrite
from attnrewrite.distill import distill

AUTO = {0: Dim.AUTO, 1: Dim.AUTO}


def adapter_state(module):
    return {name: p.detach().clone() for name, p in module.named_parameters() if "zeros_" in name}


def bert_batch(batch: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, n, dtype=torch.long)
    mask[-1, n - n // 4 :] = 0
    return {"input_ids": torch.randint(3, 99, (batch, n), generator=g), "attention_mask": mask}


def plain_case():
    """A plain nn module called with (x, additive key mask)."""
    calibration = [
        encoder_inputs(b, n, seed=i) for i, (b, n) in enumerate([(3, 12), (2, 16), (1, 20)])
    ]
    rewrite = dict(example_inputs=encoder_inputs(2, 16))
    return Encoder().eval(), rewrite, calibration, (AUTO, {0: Dim.AUTO, 3: Dim.AUTO})


def bert_case():
    """A small HF BERT called with keyword arguments, padded."""
    model = next(e for e in ZOO if e.name == "bert").build("eager")
    calibration = [bert_batch(b, n, seed=i) for i, (b, n) in enumerate([(3, 10), (2, 12), (1, 16)])]
    rewrite = dict(example_kwargs=bert_batch(2, 12, seed=9))
    return model, rewrite, calibration, {"input_ids": AUTO, "attention_mask": AUTO}


@pytest.mark.parametrize("case", [plain_case, bert_case])
def test_distill_trains_on_batches_of_other_sizes_and_lengths(case):
    """A static rewrite distilled on batches of several batch sizes and lengths ends with the
    adapters of a rewrite captured with dynamic shapes (which takes every batch as it is)."""
    model, inputs, calibration, dynamic = case()
    states = []
    for dynamic_shapes in (None, dynamic):
        torch.manual_seed(0)
        res = attnrewrite.rewrite(model, method="zeros", qk_rank=2, dynamic_shapes=dynamic_shapes,
                                  **inputs)  # fmt: skip
        log = distill(res, calibration, steps=6, lr=1e-2, progress=False)
        assert all(len(losses) == 6 for losses in log.losses.values())
        states.append(adapter_state(res.module))
    static, reference = states
    assert static.keys() == reference.keys() and static
    for name in static:
        torch.testing.assert_close(static[name], reference[name], rtol=1e-5, atol=1e-6)
    assert any(static[name].abs().sum() > 0 for name in static if "qk_up" in name)


def copy_the_module(model, rewritten):
    """A copy does not know the model it was captured from."""
    return copy.deepcopy(rewritten)


def change_the_model(model, rewritten):
    """The model no longer computes what the rewritten module does."""
    model.out.weight = torch.nn.Parameter(model.out.weight.detach() + 1.0)
    return rewritten


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (copy_the_module, "batch 0 does not fit the shapes the module was captured at"),
        (change_the_model, "has other weights than the rewritten module \\('out.weight'"),
    ],
)
def test_distill_at_other_shapes_refuses_a_module_it_cannot_match(change, message):
    model, inputs, calibration, _ = plain_case()
    rewritten = attnrewrite.rewrite(model, method="zeros", **inputs).module
    module = change(model, rewritten)
    before = adapter_state(module)
    with pytest.raises(attnrewrite.AttnRewriteError, match=message):
        distill(module, calibration, steps=1, lr=1e-2, progress=False)
    after = adapter_state(module)
    assert all(torch.equal(before[name], after[name]) for name in before)


def rewritten_encoder():
    torch.manual_seed(0)
    res = attnrewrite.rewrite(Encoder().eval(), encoder_inputs(2, 16), method="zeros", qk_rank=2)
    perturb_adapters(res.module)
    return res.module


@pytest.mark.parametrize("initialize", [True, False])
@pytest.mark.parametrize("layerwise", [False, True])
def test_a_non_finite_batch_stops_distill_and_leaves_the_adapters(layerwise, initialize):
    module = rewritten_encoder()
    batches = [encoder_inputs(2, 16, seed=i) for i in range(4)]
    batches[2][0][1, 3, 5] = float("nan")
    module.zeros_softmax.training = True
    before = adapter_state(module)
    with pytest.raises(attnrewrite.AttnRewriteError, match="calibration batch 2 gives a non-fin"):
        distill(module, batches, steps=4, lr=1e-2, layerwise=layerwise, initialize=initialize,
                progress=False)  # fmt: skip
    after = adapter_state(module)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert module.zeros_softmax.training and module.zeros_softmax.tap is None
    assert all(p.requires_grad for p in module.parameters())


@pytest.mark.parametrize("layerwise", [False, True])
def test_a_diverging_step_stops_distill_with_the_adapters_before_it(layerwise, monkeypatch):
    module = rewritten_encoder()
    updated = []  # the adapters after each optimizer step
    adam_step = torch.optim.Adam.step

    def step_and_record(self, *args, **kwargs):
        result = adam_step(self, *args, **kwargs)
        updated.append(adapter_state(module))
        return result

    monkeypatch.setattr(torch.optim.Adam, "step", step_and_record)
    batches = [encoder_inputs(2, 16, seed=i) for i in range(3)]
    with pytest.raises(attnrewrite.AttnRewriteError, match=r"non-finite \w+ .* at step") as error:
        distill(module, batches, steps=10, lr=1e30, layerwise=layerwise, initialize=False,
                progress=False)  # fmt: skip
    step = int(re.search(r"at step (\d+)", str(error.value)).group(1))
    assert step > 1 and len(updated) == step - 1
    stopped = adapter_state(module)
    assert all(torch.equal(stopped[name], updated[-1][name]) for name in stopped)
    assert all(torch.isfinite(value).all() for value in stopped.values())
