"""SmartTrim's trimmers (paper Section 4.1) and the one decision function both paths share.

* ``TokenTrimmer``: eqs. 3-6. H' = Linear(H); local score MLP(H'); global vector g = MLP([c_s, c_c]);
  global score g W_k H'^T; π_t = local + global. The ``local`` variant has no global term; the
  ``random`` variant has no parameters and keeps each token with a fixed probability.
* ``HeadTrimmer``: eq. 7. π_h = MLP(c_s) for an MSA, MLP([c_s, c_c]) for an MCA.
* ``decide``: eq. 8. Training: hard straight-through Gumbel-sigmoid samples (two independent Gumbel
  noises, temperature τ). Evaluation: the deterministic σ(π) > 0.5, i.e. π > 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _StraightThrough(torch.autograd.Function):
    """Forward: the hard 0/1 decision soft > 0.5 (exact, no rounding). Backward: identity to ``soft``."""

    @staticmethod
    def forward(ctx, soft: Tensor) -> Tensor:  # type: ignore[override]
        return (soft > 0.5).to(soft.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad


def gumbel_sigmoid(logits: Tensor, tau: float) -> Tensor:
    """Hard straight-through sample of eq. 8: 1[σ((π + G' - G'')/τ) > 0.5] with the soft sample's gradient."""
    g1 = -torch.empty_like(logits).exponential_().log()  # Gumbel(0, 1)
    g2 = -torch.empty_like(logits).exponential_().log()
    soft = torch.sigmoid((logits + g1 - g2) / tau)
    return _StraightThrough.apply(soft)


def decide(logits: Tensor, tau: float, sample: bool) -> Tensor:
    """Binary keep decisions from informative scores π: sampled (training) or σ(π) > 0.5 (inference)."""
    return gumbel_sigmoid(logits, tau) if sample else (logits > 0).to(logits.dtype)


def _stable_init(last: nn.Linear, keep_logit: float | None) -> None:
    """Stable initialization: a constant, confident 'keep' (zero weights, bias = keep_logit)."""
    if keep_logit is not None:
        nn.init.zeros_(last.weight)
        nn.init.constant_(last.bias, keep_logit)


class TokenTrimmer(nn.Module):
    """Cross-modal-aware token trimmer (eqs. 3-6); ``kind='local'`` drops the global term."""

    def __init__(self, dim: int, self_dim: int, other_dim: int, trim_dim: int, kind: str,
                 init_keep_logit: float | None) -> None:
        super().__init__()
        if kind not in ("cross_modal", "local"):
            raise ValueError(f"token_trimmer={kind!r}: TokenTrimmer is 'cross_modal' or 'local'")
        hidden = max(trim_dim // 2, 1)
        self.kind = kind
        self.proj = nn.Linear(dim, trim_dim)  # H -> H'
        self.local = nn.Sequential(nn.Linear(trim_dim, hidden), nn.GELU(), nn.Linear(hidden, 1))  # eq. 3
        if kind == "cross_modal":
            self.global_mlp = nn.Sequential(  # eq. 4: g = MLP([c_s, c_c])
                nn.Linear(self_dim + other_dim, trim_dim), nn.GELU(), nn.Linear(trim_dim, trim_dim))
            self.w_k = nn.Linear(trim_dim, trim_dim, bias=False)  # eq. 5: g W_k H'^T
            if init_keep_logit is not None:
                nn.init.zeros_(self.w_k.weight)
        _stable_init(self.local[-1], init_keep_logit)

    @property
    def output_layer(self) -> nn.Linear:
        """The last layer of the local score network (its bias is the keep logit under stable init)."""
        return self.local[-1]

    def forward(self, x: Tensor, c_self: Tensor, c_other: Tensor) -> Tensor:
        """x (B, N, D), c_self (B, Ds), c_other (B, Dc) -> informative scores π_t (B, N)."""
        h = self.proj(x)  # (B, N, D')
        score = self.local(h).squeeze(-1)  # (B, N)
        if self.kind == "cross_modal":
            g = self.w_k(self.global_mlp(torch.cat([c_self, c_other], dim=-1)))  # (B, D')
            score = score + torch.einsum("bd,bnd->bn", g, h)
        return score


class RandomTokenTrimmer(nn.Module):
    """Random baseline: keeps each token independently with probability ``rate`` (set by the model so
    that the group's mean keep ratio equals its target). Same decision in training and inference."""

    def __init__(self) -> None:
        super().__init__()
        self.rate = 1.0

    def forward(self, x: Tensor, c_self: Tensor, c_other: Tensor) -> Tensor:
        """Returns ±inf scores (B, N): the decision is already made, ``decide`` only thresholds it."""
        keep = torch.rand(x.shape[:2], device=x.device) < self.rate
        return torch.where(keep, torch.inf, -torch.inf).to(x.dtype)


class HeadTrimmer(nn.Module):
    """Global head trimmer (eq. 7): [CLS] features -> one keep score per head."""

    def __init__(self, in_dim: int, num_heads: int, trim_dim: int, init_keep_logit: float | None) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, trim_dim), nn.GELU(), nn.Linear(trim_dim, num_heads))
        _stable_init(self.mlp[-1], init_keep_logit)

    @property
    def output_layer(self) -> nn.Linear:
        """The last layer of the score network: one output (keep logit) per head."""
        return self.mlp[-1]

    def forward(self, guide: Tensor) -> Tensor:
        """guide (B, in_dim): c_s for an MSA, [c_s, c_c] for an MCA -> π_h (B, H)."""
        return self.mlp(guide)


def random_rate(target: float, num_trimmers: int) -> float:
    """Per-trimmer keep probability r with mean_k r^k = target over a chain of cumulative trimmers."""
    if num_trimmers == 0 or target >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):  # bisection: mean_k r^k is increasing in r
        mid = (lo + hi) / 2
        if sum(mid ** k for k in range(1, num_trimmers + 1)) / num_trimmers < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def masked_softmax_attention(q: Tensor, k: Tensor, v: Tensor, key_keep: Tensor, scale: float,
                             dropout_p: float) -> Tensor:
    """Attention whose keys are weighted by a 0/1 keep mask, differentiable in the mask.

    q (B, H, Nq, Dh), k/v (B, H, Nk, Dh), key_keep (B, Nk) -> (B, H, Nq, Dh). A pruned key gets weight
    exactly 0 (as if removed) and the straight-through gradient of its mask still flows. The max is taken
    over kept keys (the prefix token is always kept), so the denominator is >= 1: no NaN, no epsilon.
    """
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, Nq, Nk)
    mask = key_keep[:, None, None, :]  # (B, 1, 1, Nk)
    top = scores.masked_fill(mask == 0, float("-inf")).amax(-1, keepdim=True).detach()
    weights = torch.exp((scores - top).clamp(max=0.0)) * mask
    attn = weights / weights.sum(-1, keepdim=True)
    return F.dropout(attn, dropout_p) @ v  # (B, H, Nq, Dh)
