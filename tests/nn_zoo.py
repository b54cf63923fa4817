"""torch.nn's own attention modules, each inside a small model, for coverage tests.

Dynamo keeps these modules' forwards whole (or, under no_grad in eval, calls fused native ops),
and symbolic_trace keeps them as leaf modules: the fused-call pass must open each one.
`attention_layers` is how many attention computations one forward pass runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

BATCH, SEQ, WIDTH, HEADS = 2, 24, 32, 4


@dataclasses.dataclass(frozen=True)
class NNEntry:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple[Any, ...]]
    attention_layers: int


def _tokens(seq: int = SEQ, batch_first: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    shape = (BATCH, seq, WIDTH) if batch_first else (seq, BATCH, WIDTH)
    return torch.randn(shape, generator=g)


def padding_mask(batch: int = BATCH, n: int = SEQ) -> torch.Tensor:
    """The second sequence's last keys masked (True = ignore, as torch.nn takes it)."""
    padding = torch.zeros(batch, n, dtype=torch.bool)
    padding[1, n - n // 4 :] = True
    return padding


class SequenceFirstAttention(nn.Module):
    """The defaults: sequence-first, need_weights=True with the weights dropped."""

    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(WIDTH, HEADS)

    def forward(self, x):
        out, _ = self.attention(x, x, x)
        return out


class PaddedAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)

    def forward(self, x, padding=None):
        return self.attention(x, x, x, key_padding_mask=padding, need_weights=False)[0]


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(WIDTH, HEADS, 64, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x, padding):
        return self.encoder(x, src_key_padding_mask=padding)


class DecoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(WIDTH, HEADS, 64, batch_first=True)

    def forward(self, x, memory):
        return self.layer(x, memory)


class Transformer(nn.Module):
    """With the causal flags, which nn.Transformer needs to stay traceable (README)."""

    def __init__(self):
        super().__init__()
        self.transformer = nn.Transformer(WIDTH, HEADS, 1, 1, 64, batch_first=True)

    def forward(self, src, tgt, tgt_mask):
        return self.transformer(
            src, tgt, tgt_mask=tgt_mask, src_is_causal=False, tgt_is_causal=True
        )


def _built(cls: type[nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return cls().eval()

    return build


NN_ZOO: list[NNEntry] = [
    NNEntry(
        "MultiheadAttention, sequence-first, weights dropped",
        _built(SequenceFirstAttention),
        lambda: (_tokens(batch_first=False),),
        1,
    ),
    NNEntry(
        "MultiheadAttention, batch-first, key padding",
        _built(PaddedAttention),
        lambda: (_tokens(), padding_mask()),
        1,
    ),
    NNEntry(
        "TransformerEncoder, key padding", _built(Encoder), lambda: (_tokens(), padding_mask()), 2
    ),
    NNEntry(
        "TransformerDecoderLayer (self + cross)",
        _built(DecoderLayer),
        lambda: (_tokens(), _tokens(16)),
        2,
    ),
    NNEntry(
        "Transformer, causal target",
        _built(Transformer),
        lambda: (_tokens(), _tokens(16), nn.Transformer.generate_square_subsequent_mask(16)),
        3,
    ),
]
