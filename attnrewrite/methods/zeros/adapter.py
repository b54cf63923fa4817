"""The per-site adapter that puts ZeroS in place of a pretrained softmax-attention site.

ZeroS needs a logit per key and two gates per query, which a pretrained site does not have. The
adapter computes them from the site's own q and k with a few parameters per head, calls the op,
and maps the result back to the scale of the original output:

  s_i = k_i · w_h,   σ¹_t = sigmoid(q_t · u¹_h + c¹_h),   σʰ_t = sigmoid(q_t · uʰ_h + cʰ_h),
  out_t = γ_h ∘ LayerNorm(o_t) + β_h       (LayerNorm over dv, no affine, as in the paper's layer)

optionally with low-rank updates q ← q + q·A_q·B_q, k ← k + k·A_k·B_k per head (rank r; this is
a rank-r update of the q/k projections; B starts at 0 so it starts as the identity).

Initialization. Built at rewrite time (no data), w = 0 and the gates' parameters are 0 (σ¹ = σʰ =
1/2), γ = 1, β = 0: ZeroS with constant logits has all weights 0, so the site outputs β = 0 until
it is distilled. `attnrewrite.distill` first initializes from calibration data: w_h = scale · q̄_h
(q̄_h: the head's mean query), so the softmax part of ZeroS is the attention of the mean query;
with σ¹ = σʰ the weights are w_{t,i} = ½(softmax(s)_i − 1/n_t), cos-modulated; then γ, β are the
per-channel least-squares fit of the original output on LayerNorm(o) (so the first output is at
least as close to the original as its mean). The site then needs distillation: without it the
output does not approximate the original attention.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..gqa import expand_gqa
from ..masks import site_mask_terms, warn_exact_fallback
from ..op_context import refuse_trainable_mask
from .op import use_triton_kernels, zeros_attention, zeros_attention_backward_op

LAYER_NORM_EPS = 1e-5

#: A distillation hook: called as tap(adapter, q, k, v, attn_mask) instead of the adapter's own
#: computation; it returns what the site outputs (attnrewrite.distill installs them).
Tap = Callable[["ZeroSAdapter", torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"],
               torch.Tensor]  # fmt: skip


def with_key_bias(
    key_logits: torch.Tensor, key_bias: torch.Tensor, key_valid: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The key logits with a mask's finite per-key bias added, as softmax adds it to scores."""
    return key_logits.to(dtype) + torch.where(key_valid, key_bias, 0.0)


def _site_terms(q, k, key_logits, attn_mask, is_causal):
    """(logits, key_valid, is_causal) of the ZeroS call for an SDPA mask, or None when ZeroS
    cannot honor it."""
    if attn_mask is None:
        return key_logits, None, is_causal
    stats = torch.promote_types(q.dtype, torch.float32)
    terms = site_mask_terms(attn_mask, tuple(q.shape[:-2]), q.shape[-2], k.shape[-2], stats)
    if terms is None:
        return None
    key_bias, key_valid, causal = terms
    return with_key_bias(key_logits, key_bias, key_valid, stats), key_valid, causal


def _exact_attention_backward(grad_out, q, k, v, attn_mask, scale):
    """(dq, dk, dv) of softmax attention: dS = P∘(dP − rowsum(dP∘P)), dP = dO·Vᵀ."""
    stats = torch.promote_types(q.dtype, torch.float32)
    q, k, v, grad_out = (x.to(stats) for x in (q, k, v, grad_out))
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = scale * q @ k.transpose(-2, -1)
    if attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    else:
        scores = scores + attn_mask.to(stats)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no key has no gradient
    d_probs = grad_out @ v.transpose(-2, -1)
    d_scores = probs * (d_probs - (d_probs * probs).sum(-1, keepdim=True))
    return (
        scale * d_scores @ k,
        scale * d_scores.transpose(-2, -1) @ q,
        probs.transpose(-2, -1) @ grad_out,
    )


@torch.library.custom_op("attnrewrite::zeros_site_attention", mutates_args=())
def zeros_site_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_logits: torch.Tensor,
    gate_first: torch.Tensor,
    gate_residual: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ZeroS output, False), or (exact SDPA output, True) when the mask is not one ZeroS can
    honor (checked at run time, inside the op, so compiled and exported graphs stay whole)."""
    terms = _site_terms(q, k, key_logits, attn_mask, is_causal)
    if terms is None:
        warn_exact_fallback("ZeroS")
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
        return out, torch.tensor(True, device=q.device)
    logits, key_valid, causal = terms
    attn_mask = None if key_valid is None else key_valid[..., None, :]  # (..., 1, Nk)
    out = zeros_attention(q, k, v, logits, gate_first, gate_residual, is_causal=causal,
                          attn_mask=attn_mask)  # fmt: skip
    return out, torch.tensor(False, device=q.device)


@zeros_site_attention_op.register_fake
def _(q, k, v, key_logits, gate_first, gate_residual, attn_mask=None, is_causal=False, scale=None):
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty((), dtype=torch.bool)


@torch.library.custom_op("attnrewrite::zeros_site_attention_backward", mutates_args=())
def zeros_site_attention_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_logits: torch.Tensor,
    gate_first: torch.Tensor,
    gate_residual: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
) -> list[torch.Tensor]:
    """Gradients of `zeros_site_attention_op`'s output for its six tensor inputs. An op of its
    own, so that torch.compile traces one opaque call instead of the run-time mask check."""
    terms = _site_terms(q, k, key_logits, attn_mask, is_causal)
    if terms is None:  # the forward ran exact attention: logits and gates had no effect
        grads = _exact_attention_backward(grad_out, q, k, v, attn_mask, scale)
        unused = (key_logits, gate_first, gate_residual)
        return [*(g.to(x.dtype) for g, x in zip(grads, (q, k, v), strict=True)),
                *(x.new_zeros(x.shape) for x in unused)]  # fmt: skip
    logits, key_valid, causal = terms
    grads = zeros_attention_backward_op(grad_out, q, k, v, logits, gate_first, gate_residual,
                                        causal, key_valid, use_triton_kernels(q, v))  # fmt: skip
    grads[3] = grads[3].to(key_logits.dtype)  # the bias is a constant shift of the logits
    return grads


@zeros_site_attention_backward_op.register_fake
def _(grad_out, q, k, v, key_logits, gate_first, gate_residual, attn_mask, is_causal, scale):
    """Contiguous gradients, as the implementation returns (empty_like would keep q's strides)."""
    return [x.new_empty(x.shape) for x in (q, k, v, key_logits, gate_first, gate_residual)]


def _setup_context(ctx, inputs, output):
    *tensors, attn_mask, is_causal, scale = inputs
    refuse_trainable_mask("ZeroS", attn_mask)
    ctx.has_mask = attn_mask is not None
    ctx.options = (is_causal, scale)
    ctx.save_for_backward(*tensors, *([attn_mask] if ctx.has_mask else []))


def _backward(ctx, grad_out, _grad_exact):
    saved = ctx.saved_tensors
    attn_mask = saved[6] if ctx.has_mask else None
    grads = zeros_site_attention_backward_op(grad_out, *saved[:6], attn_mask, *ctx.options)
    return (*grads, None, None, None)


zeros_site_attention_op.register_autograd(_backward, setup_context=_setup_context)


class ZeroSAdapter(nn.Module):
    """ZeroS at one attention site, from the site's own q, k, v (B, H, N, d) and SDPA mask.

    Parameters per head h: key-logit vector w_h (d), gate vectors and biases (2 × (d + 1)),
    output gain and bias (2 dv), and with qk_rank = r, A_q, A_k (d × r) and B_q, B_k (r × d).
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        value_dim: int,
        *,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
        qk_rank: int = 0,
    ) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.value_dim = num_heads, head_dim, value_dim
        self.is_causal, self.enable_gqa, self.qk_rank = is_causal, enable_gqa, qk_rank
        self.scale = scale
        self.key_logit_weight = nn.Parameter(torch.zeros(num_heads, head_dim))
        self.gate_weight = nn.Parameter(torch.zeros(2, num_heads, head_dim))
        self.gate_bias = nn.Parameter(torch.zeros(2, num_heads))
        self.out_gain = nn.Parameter(torch.ones(num_heads, value_dim))
        self.out_bias = nn.Parameter(torch.zeros(num_heads, value_dim))
        if qk_rank:
            # LoRA-style: A random (fixed seed, so rewriting is deterministic), B = 0.
            generator = torch.Generator().manual_seed(0)
            shape = (2, num_heads, head_dim, qk_rank)
            self.qk_down = nn.Parameter(torch.randn(shape, generator=generator) / head_dim**0.5)
            self.qk_up = nn.Parameter(torch.zeros(2, num_heads, qk_rank, head_dim))
        self.tap: Tap | None = None

    @property
    def logit_scale(self) -> float:
        """The site's softmax scale (SDPA's default 1/√d when it has none)."""
        return self.scale if self.scale is not None else 1.0 / math.sqrt(self.head_dim)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, head_dim={self.head_dim}, value_dim={self.value_dim}, "
            f"is_causal={self.is_causal}, qk_rank={self.qk_rank}"
        )

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None
    ) -> torch.Tensor:
        if self.tap is not None:
            return self.tap(self, q, k, v, attn_mask)
        return self.student(q, k, v, attn_mask)

    def student(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The site's ZeroS output (what `forward` returns when no tap is installed)."""
        raw, exact = self.zeros_output(q, k, v, attn_mask)
        return torch.where(exact, raw, self.affine(normalize_output(raw))).to(q.dtype)

    def zeros_output(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ZeroS output before the output LayerNorm, exact flag); see zeros_site_attention_op."""
        k, v = expand_gqa(q, k, self.enable_gqa), expand_gqa(q, v, self.enable_gqa)
        if self.qk_rank:
            q = q + q @ self.qk_down[0] @ self.qk_up[0]
            k = k + k @ self.qk_down[1] @ self.qk_up[1]
        key_logits = (k * self.key_logit_weight[:, None, :]).sum(-1)
        gates = [
            torch.sigmoid(
                (q * self.gate_weight[j][:, None, :]).sum(-1) + self.gate_bias[j][:, None]
            )
            for j in range(2)
        ]
        return zeros_site_attention_op(
            q, k, v, key_logits, gates[0], gates[1], attn_mask, self.is_causal, self.scale
        )

    def affine(self, normalized: torch.Tensor) -> torch.Tensor:
        return normalized * self.out_gain[:, None, :] + self.out_bias[:, None, :]

    def exact(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The original site's output: exact softmax attention of its own inputs."""
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask, is_causal=self.is_causal, scale=self.scale,
            enable_gqa=self.enable_gqa,
        )  # fmt: skip

    def query_weights(self, q: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor | None:
        """(B, H, Nq) weights that are 0 on padding queries (self-attention with a key-padding
        mask, whose queries are its keys), for losses; None when every query counts."""
        if attn_mask is None or attn_mask.shape[-1] != q.shape[-2]:
            return None
        n = q.shape[-2]
        terms = site_mask_terms(attn_mask, tuple(q.shape[:-2]), n, n, torch.float32)
        return None if terms is None else terms[1].float()

    @torch.no_grad()
    def init_key_logits(self, mean_query: torch.Tensor) -> None:
        """w_h = scale · q̄_h: the softmax part of ZeroS becomes the mean query's attention."""
        self.key_logit_weight.copy_(self.logit_scale * mean_query)

    @torch.no_grad()
    def init_output_affine(self, gain: torch.Tensor, bias: torch.Tensor) -> None:
        self.out_gain.copy_(gain)
        self.out_bias.copy_(bias)


def normalize_output(raw: torch.Tensor) -> torch.Tensor:
    """The per-head LayerNorm over dv, without affine, in fp32 (the paper's output norm)."""
    return F.layer_norm(raw.float(), raw.shape[-1:], eps=LAYER_NORM_EPS)
