"""Train ZeroS, softmax attention and plain linear attention from scratch on multi-query
associative recall (MQAR, as in the Zoology benchmark) and print their accuracy.

Each sequence lists P key-value pairs (k1 v1 k2 v2 …) and then queries every key once more in a
random order (k v …); the model must predict each queried key's value. The three models are the
same small causal language model (embedding, blocks of short causal convolution + attention +
MLP, each pre-norm and residual) and differ only in the attention layer:
  zeros    attnrewrite.nn.ZeroSAttention (RoPE, deviation logits, gates, per-head LayerNorm)
  softmax  causal softmax attention (SDPA) with RoPE
  linear   causal linear attention with the elu+1 feature map (Katharopoulos et al. 2020)
The short convolution (kernel 3, as Zoology's baselines use) lets every model bind a value to
the key before it, so the comparison measures the recall of the attention layer itself.

    .venv/bin/python examples/zeros_recall.py --threads 1

What it printed on a shared 2-core CPU (one seed; the machine was busy, times are inflated):

    attention   params  accuracy  train time
    softmax     116993     0.999      150.8s
    zeros       126361     0.988      141.7s
    linear      116993     0.957      209.0s

`--pairs 16` (sequence length 64) is harder and needs more steps than the default 600.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from attnrewrite.nn import ZeroSAttention, apply_rope


def mqar_batch(batch: int, pairs: int, vocab: int, generator: torch.Generator):
    """(tokens, targets): tokens (batch, 4·pairs); targets −100 except at query keys, where
    they hold the value to predict. Keys are 1…vocab, values vocab+1…2·vocab."""
    keys = torch.stack([torch.randperm(vocab, generator=generator)[:pairs] for _ in range(batch)])
    keys = keys + 1
    values = torch.randint(vocab + 1, 2 * vocab + 1, (batch, pairs), generator=generator)
    order = torch.stack([torch.randperm(pairs, generator=generator) for _ in range(batch)])
    context = torch.stack((keys, values), dim=-1).flatten(1)
    queries = torch.stack((keys.gather(1, order), values.gather(1, order)), dim=-1).flatten(1)
    tokens = torch.cat((context, queries), dim=1)
    targets = torch.full_like(tokens, -100)
    targets[:, 2 * pairs :: 2] = queries[:, 1::2]  # at each query key, predict its value
    return tokens, targets


class SoftmaxAttention(nn.Module):
    """Causal multi-head softmax attention with RoPE."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))  # fmt: skip
        o = F.scaled_dot_product_attention(apply_rope(q), apply_rope(k), v, is_causal=True)
        return self.out(o.transpose(1, 2).flatten(2))


class LinearAttention(SoftmaxAttention):
    """Causal linear attention: φ(q_t)·Σ_{i≤t} φ(k_i) v_iᵀ / φ(q_t)·Σ_{i≤t} φ(k_i), φ = elu + 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))  # fmt: skip
        q, k = F.elu(q) + 1, F.elu(k) + 1
        state = torch.einsum("bhnd,bhne->bhnde", k, v).cumsum(dim=2)
        numerator = torch.einsum("bhnd,bhnde->bhne", q, state)
        denominator = torch.einsum("bhnd,bhnd->bhn", q, k.cumsum(dim=2))[..., None]
        return self.out((numerator / denominator).transpose(1, 2).flatten(2))


class CausalZeroS(ZeroSAttention):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__(dim, num_heads, is_causal=True, rope=True)


ATTENTION = {"zeros": CausalZeroS, "softmax": SoftmaxAttention, "linear": LinearAttention}


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, attention: type[nn.Module]) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))
        self.conv = nn.Conv1d(dim, dim, kernel_size=3, groups=dim, padding=2)
        self.attention = attention(dim, num_heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        x = x + self.conv(self.norms[0](x).transpose(1, 2))[..., :n].transpose(1, 2)  # causal
        x = x + self.attention(self.norms[1](x))
        return x + self.mlp(self.norms[2](x))


class RecallModel(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, num_heads: int, attention: str) -> None:
        super().__init__()
        self.embed = nn.Embedding(2 * vocab + 1, dim)
        self.blocks = nn.Sequential(*(Block(dim, num_heads, ATTENTION[attention])
                                      for _ in range(layers)))  # fmt: skip
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * vocab + 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(tokens)))


def accuracy(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> float:
    with torch.no_grad():
        predicted = model(tokens).argmax(dim=-1)
    scored = targets != -100
    return (predicted[scored] == targets[scored]).float().mean().item()


def train(attention: str, args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(args.seed)
    model = RecallModel(args.vocab, args.dim, args.layers, args.heads, attention)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps)
    data = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for _ in range(args.steps):
        tokens, targets = mqar_batch(args.batch, args.pairs, args.vocab, data)
        loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    seconds = time.perf_counter() - start
    test = mqar_batch(1000, args.pairs, args.vocab, torch.Generator().manual_seed(args.seed + 1))
    return {"params": sum(p.numel() for p in model.parameters()),
            "accuracy": accuracy(model, *test), "seconds": seconds}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=8, help="key-value pairs per sequence")
    parser.add_argument("--vocab", type=int, default=64, help="number of keys (and of values)")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", nargs="+", default=list(ATTENTION), choices=list(ATTENTION))
    parser.add_argument("--threads", type=int, help="torch threads (1 is fastest for this size)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"MQAR: {args.pairs} pairs, sequence length {4 * args.pairs}, {args.vocab} keys; "
          f"dim {args.dim}, {args.layers} layers, {args.heads} heads, {args.steps} steps × "
          f"{args.batch}, seed {args.seed}; accuracy on 1000 held-out sequences")  # fmt: skip
    print(f"{'attention':9}  {'params':>7}  {'accuracy':>8}  {'train time':>10}")
    for attention in args.models:
        result = train(attention, args)
        print(f"{attention:9}  {result['params']:7d}  {result['accuracy']:8.3f}  "
              f"{result['seconds']:9.1f}s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
