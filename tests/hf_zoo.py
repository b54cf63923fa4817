"""Small random-weight Hugging Face models of the common architectures, for coverage tests.

Each entry builds a model from a tiny config (no download) and example inputs; `attention_layers`
is how many attention computations one forward pass runs (what the matcher must find).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

BATCH, SEQ = 2, 12


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    name: str
    build: Callable[[str], torch.nn.Module]
    inputs: Callable[[], dict[str, torch.Tensor]]
    attention_layers: int
    causal_layers: int = 0


def _ids(vocab: int = 99) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, SEQ - 3 :] = 0
    return {"input_ids": torch.randint(3, vocab, (BATCH, SEQ), generator=g), "attention_mask": mask}


def _decoder_ids() -> dict[str, Any]:
    return {**_ids(), "use_cache": False}  # as most tests call decoders; see test_hf_coverage


def _pixels() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(BATCH, 3, 32, 32, generator=g)}


def _seq2seq() -> dict[str, Any]:
    inputs = _decoder_ids()
    inputs["decoder_input_ids"] = inputs["input_ids"][:, :8]
    return inputs


def _model(config_cls: str, model_cls: str, **config: Any) -> Callable[[str], torch.nn.Module]:
    def build(attn_implementation: str) -> torch.nn.Module:
        import transformers

        torch.manual_seed(0)
        cfg = getattr(transformers, config_cls)(**config)
        cfg._attn_implementation = attn_implementation
        return getattr(transformers, model_cls)(cfg).eval()

    return build


_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)

ZOO: list[ZooEntry] = [
    ZooEntry("bert", _model("BertConfig", "BertModel", vocab_size=99, **_SMALL), _ids, 2),
    ZooEntry("roberta", _model("RobertaConfig", "RobertaModel", vocab_size=99, **_SMALL), _ids, 2),
    ZooEntry(
        "distilbert",
        _model(
            "DistilBertConfig",
            "DistilBertModel",
            vocab_size=99,
            dim=32,
            n_layers=2,
            n_heads=4,
            hidden_dim=64,
        ),
        _ids,
        2,
    ),
    ZooEntry(
        "gpt2",
        _model("GPT2Config", "GPT2Model", vocab_size=99, n_embd=32, n_layer=2, n_head=4),
        _decoder_ids,
        2,
        causal_layers=2,
    ),
    ZooEntry(
        "llama_gqa_rope",
        _model("LlamaConfig", "LlamaModel", vocab_size=99, num_key_value_heads=2, **_SMALL),
        _decoder_ids,
        2,
        causal_layers=2,
    ),
    ZooEntry(
        "mistral",
        _model("MistralConfig", "MistralModel", vocab_size=99, num_key_value_heads=2, **_SMALL),
        _decoder_ids,
        2,
        causal_layers=2,
    ),
    ZooEntry(
        "qwen2",
        _model("Qwen2Config", "Qwen2Model", vocab_size=99, num_key_value_heads=1, **_SMALL),
        _decoder_ids,
        2,
        causal_layers=2,
    ),
    ZooEntry(
        "opt",
        _model(
            "OPTConfig",
            "OPTModel",
            vocab_size=99,
            hidden_size=32,
            word_embed_proj_dim=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=64,
        ),
        _decoder_ids,
        2,
        causal_layers=2,
    ),
    ZooEntry(
        "gpt_neox",
        _model("GPTNeoXConfig", "GPTNeoXModel", vocab_size=99, **_SMALL),
        _decoder_ids,
        2,
        causal_layers=2,
    ),
    ZooEntry("phi", _model("PhiConfig", "PhiModel", vocab_size=99, **_SMALL), _decoder_ids, 2, 2),
    ZooEntry(
        "gemma_mqa",
        _model("GemmaConfig", "GemmaModel", vocab_size=99, num_key_value_heads=1, **_SMALL),
        _decoder_ids,
        2,
        causal_layers=2,
    ),
    ZooEntry(
        "vit", _model("ViTConfig", "ViTModel", image_size=32, patch_size=8, **_SMALL), _pixels, 2
    ),
    ZooEntry(
        "t5",
        _model(
            "T5Config",
            "T5Model",
            vocab_size=99,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
        ),
        _seq2seq,
        6,
        causal_layers=2,
    ),
    ZooEntry(
        "bart",
        _model(
            "BartConfig",
            "BartModel",
            vocab_size=99,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
        ),
        _seq2seq,
        6,
        causal_layers=2,
    ),
]
