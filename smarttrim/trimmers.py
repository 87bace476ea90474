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


def _linear(x: Tensor, layer: nn.Linear) -> Tensor:
    return F.linear(x, layer.weight, layer.bias)


def _act() -> nn.Module:
    """The score networks' activation: SiLU. The trimmers run on tiny tensors at batch size 1, where erf-GELU
    costs ~7 us per call on a CPU whatever the size (tanh-GELU 5 us, SiLU 2 us on 145 x 16)."""
    return nn.SiLU()


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
        self.local = nn.Sequential(nn.Linear(trim_dim, hidden), _act(), nn.Linear(hidden, 1))  # eq. 3
        if kind == "cross_modal":
            self.global_mlp = nn.Sequential(  # eq. 4: g = MLP([c_s, c_c])
                nn.Linear(self_dim + other_dim, trim_dim), _act(), nn.Linear(trim_dim, trim_dim))
            self.w_k = nn.Linear(trim_dim, trim_dim, bias=False)  # eq. 5: g W_k H'^T
            if init_keep_logit is not None:
                nn.init.zeros_(self.w_k.weight)
        _stable_init(self.local[-1], init_keep_logit)

    @property
    def output_layer(self) -> nn.Linear:
        """The last layer of the local score network (its bias is the keep logit under stable init)."""
        return self.local[-1]

    def global_query(self, c_self: Tensor, c_other: Tensor) -> Tensor:
        """(B, D'): g W_k, the global vector of eq. 4 times W_k (what eq. 5 multiplies with H'^T)."""
        g0, g_act, g1 = self.global_mlp
        g = _linear(g_act(_linear(torch.cat([c_self, c_other], dim=-1), g0)), g1)  # (B, D'): eq. 4
        return F.linear(g, self.w_k.weight)

    def forward(self, x: Tensor, c_self: Tensor, c_other: Tensor, query: Tensor | None = None) -> Tensor:
        """x (B, N, D), c_self (B, Ds), c_other (B, Dc) -> informative scores π_t (B, N). ``query``: the
        ``global_query`` when already computed (``FusedGuides``).

        The submodules' weights applied functionally (the same ops, without a module call each: at batch size
        1 these networks run on tiny tensors and the calls would cost more than the arithmetic)."""
        h = _linear(x, self.proj)  # (B, N, D')
        l0, act, l1 = self.local
        score = _linear(act(_linear(h, l0)), l1)[..., 0]  # (B, N): eq. 3
        if self.kind == "cross_modal":
            if query is None:
                query = self.global_query(c_self, c_other)
            score = score + (h @ query[:, :, None])[..., 0]  # (B, N): eq. 5, g W_k H'^T
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
        self.mlp = nn.Sequential(nn.Linear(in_dim, trim_dim), _act(), nn.Linear(trim_dim, num_heads))
        _stable_init(self.mlp[-1], init_keep_logit)

    @property
    def output_layer(self) -> nn.Linear:
        """The last layer of the score network: one output (keep logit) per head."""
        return self.mlp[-1]

    def forward(self, guide: Tensor) -> Tensor:
        """guide (B, in_dim): c_s for an MSA, [c_s, c_c] for an MCA -> π_h (B, H)."""
        l0, act, l1 = self.mlp
        return _linear(act(_linear(guide, l0)), l1)


GUIDE_INPUTS = ("a", "b", "ab", "ba")
"""What a guide network of ``FusedGuides`` reads of the two [CLS] features (c_a, c_b), in its concatenation order."""


class FusedGuides:
    """The guide networks of one co-attention layer (the token trimmers' global MLPs and every head trimmer: all
    read the two [CLS] features through Linear -> SiLU -> Linear) computed as one: the first layers stacked into
    one matrix over [c_a, c_b], the second layers block-diagonal, W_k folded into the token trimmers' second
    layers. Inference only (build and call it without gradients): the same values as the separate networks (up to
    float rounding) in two matmuls instead of a dozen calls. Built from the current weights; ``stale`` says when
    they changed."""

    def __init__(self, members: list[tuple[str, nn.Module, str]], width: int) -> None:
        members = sorted(members, key=lambda m: isinstance(m[1], HeadTrimmer))  # token trimmers first
        firsts, seconds, biases0, biases1, self.sizes = [], [], [], [], []
        self.names = [name for name, _, _ in members]
        self.heads = [name for name, m, _ in members if isinstance(m, HeadTrimmer)]
        self._params = [p for _, m, _ in members for p in m.parameters()]
        self._versions = self._version()
        for _, module, reads in members:
            if isinstance(module, TokenTrimmer):
                l0, _, l1 = module.global_mlp
                w1, b1 = module.w_k.weight @ l1.weight, module.w_k.weight @ l1.bias  # (g W1 + b1) W_k^T
            else:
                l0, _, l1 = module.mlp
                w1, b1 = l1.weight, l1.bias
            w0 = l0.weight
            if reads not in GUIDE_INPUTS:
                raise ValueError(f"{reads!r}: a guide reads one of {GUIDE_INPUTS}")
            if reads in ("a", "b"):
                zeros = w0.new_zeros(w0.shape[0], width)
                w0 = torch.cat([w0, zeros] if reads == "a" else [zeros, w0], 1)
            elif reads == "ba":
                w0 = torch.cat([w0[:, width:], w0[:, :width]], 1)
            firsts.append(w0)
            biases0.append(l0.bias)
            seconds.append(w1)
            biases1.append(b1)
            self.sizes.append(w1.shape[0])
        self.w0, self.b0 = torch.cat(firsts), torch.cat(biases0)
        self.w1, self.b1 = torch.block_diag(*seconds), torch.cat(biases1)

    def _version(self) -> tuple[tuple[int, int], ...]:
        return tuple((p._version, p.data_ptr()) for p in self._params)

    @property
    def stale(self) -> bool:
        return self._version() != self._versions

    def __call__(self, c_a: Tensor, c_b: Tensor) -> tuple[dict[str, Tensor], dict[str, list[bool]]]:
        """(B, D) [CLS] features of the two streams -> each member's output (a token trimmer's ``global_query``
        (B, D'), a head trimmer's scores (B, H)) and, for a batch of one, the head trimmers' keep decisions
        (score > 0) read to the host at once."""
        hidden = F.silu(F.linear(torch.cat([c_a, c_b], -1), self.w0, self.b0))
        out = F.linear(hidden, self.w1, self.b1)
        outputs = dict(zip(self.names, out.split(self.sizes, -1), strict=True))
        flags: dict[str, list[bool]] = {}
        if out.shape[0] == 1 and self.heads:
            start = sum(self.sizes[: len(self.names) - len(self.heads)])
            decided = (out[0, start:] > 0).tolist()
            for name in self.heads:
                n = outputs[name].shape[-1]
                flags[name], decided = decided[:n], decided[n:]
        return outputs, flags


def fusable(module: nn.Module | None) -> bool:
    """A guide network ``FusedGuides`` can take: a head trimmer, or a cross-modal token trimmer (SiLU MLPs)."""
    if isinstance(module, HeadTrimmer):
        return isinstance(module.mlp[1], nn.SiLU)
    return isinstance(module, TokenTrimmer) and module.kind == "cross_modal" and isinstance(
        module.global_mlp[1], nn.SiLU)


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


class _MaskedAttention(torch.autograd.Function):
    """softmax(q k^T · scale over the kept keys) v, with gradients for q, k, v and the 0/1 key mask.

    Forward: pruned keys get weight exactly 0 (as if removed). Backward, with w the attention weights,
    g = dL/dw and r_i = Σ_j g_ij w_ij: dL/ds = w (g - r) (softmax), and for the mask (the straight-through
    gradient of a hard decision) dL/dm_j = Σ_{h,i} p_ij (g_ij - r_i), where p_ij = exp(s_ij - lse_i) is the
    weight key j gets (kept) or would get (pruned) relative to the kept keys' normaliser: the derivative of
    w_ij = e_ij m_j / Σ_k e_ik m_k at a binary m. Attention dropout (p > 0) is applied to w and enters g.
    One fused recomputation instead of autograd through a dozen (B, H, Nq, Nk) temporaries.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, scale: float,  # type: ignore[override]
                dropout_p: float) -> Tensor:
        s = (q @ k.transpose(-1, -2)) * scale  # (B, H, Nq, Nk)
        mask_grad = keep is not None and ctx.needs_input_grad[3]
        if keep is None:
            w = p = torch.softmax(s, -1)
        elif not mask_grad:
            w = p = torch.softmax(s.masked_fill(keep[:, None, None, :] == 0, float("-inf")), -1)
        else:  # p: every key's weight relative to the kept keys' normaliser (kept: w; pruned: would-be)
            lse = torch.logsumexp(s.masked_fill(keep[:, None, None, :] == 0, float("-inf")), -1, keepdim=True)
            p = torch.exp(s - lse)  # the prefix key is always kept: lse is finite
            w = p * keep[:, None, None, :].to(p.dtype)
        # under autocast softmax runs in fp32 while q, k, v are bf16: keep the weights in v's dtype, so the
        # backward (which autocast does not cover) multiplies like types
        w, p = w.to(v.dtype), p.to(v.dtype)
        drop = None
        if dropout_p > 0:
            drop = (torch.rand_like(w) >= dropout_p).to(w.dtype) / (1.0 - dropout_p)
        out = (w if drop is None else w * drop) @ v  # (B, H, Nq, Dh)
        ctx.save_for_backward(q, k, v, keep if mask_grad else None, p, drop)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):  # type: ignore[override]
        q, k, v, keep, p, drop = ctx.saved_tensors
        dout = dout.to(v.dtype)
        w = p if keep is None else p * keep[:, None, None, :].to(p.dtype)
        g = dout @ v.transpose(-1, -2)  # dL/dw: (B, H, Nq, Nk)
        dv = (w if drop is None else w * drop).transpose(-1, -2) @ dout
        if drop is not None:
            g = g * drop
        gr = g - (g * w).sum(-1, keepdim=True)
        ds = w * gr
        dq, dk = (ds @ k.to(ds.dtype)) * ctx.scale, (ds.transpose(-1, -2) @ q.to(ds.dtype)) * ctx.scale
        dkeep = None if keep is None else (p * gr).sum((1, 2)).to(keep.dtype)  # (B, Nk)
        return dq, dk, dv, dkeep, None, None


def masked_attention(q: Tensor, k: Tensor, v: Tensor, key_keep: Tensor | None, scale: float,
                     dropout_p: float) -> Tensor:
    """Attention whose keys are weighted by a 0/1 keep mask, differentiable in q, k, v and the mask.

    q (B, H, Nq, Dh), k/v (B, H, Nk, Dh), key_keep (B, Nk) 0/1 or None (every key) -> (B, H, Nq, Dh). A pruned
    key gets weight exactly 0 (as if removed) and the straight-through gradient of its mask still flows (see
    ``_MaskedAttention``). The training path's attention; without gradients use a fused kernel (identical
    values). The prefix key must be kept (the normaliser is then >= the prefix's weight: no NaN).
    """
    return _MaskedAttention.apply(q, k, v, key_keep, scale, dropout_p)
