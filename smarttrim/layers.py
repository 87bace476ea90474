"""Backbone building blocks that run on both paths.

* Masking path (training): shapes never change; pruned tokens are excluded as attention keys by a
  0/1 keep mask that carries the straight-through gradient; pruned heads are multiplied by 0 before
  the output projection.
* Pruning path (inference): the same decisions physically remove tokens (``Stream.compact``) and
  heads (Q/K/V rows and output-projection columns are sliced), so FLOPs and latency really drop.
  Instances of a batch keep different token counts: they are packed with padding + key masks; a batch
  runs the union of its instances' kept heads, gated per instance.

Parameter names follow the upstream modules exactly (timm ``Block``, METER's ``BertCrossLayer``), so
upstream and METER checkpoints load without renaming inside a layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smarttrim.trimmers import masked_softmax_attention


@dataclass
class Stream:
    """The tokens of one modality flowing through the encoder.

    x: (B, N, D) hidden states; index 0 is the prefix ([CLS]) token, never trimmed.
    keep: (B, N) 0/1 float. Masking path: cumulative keep mask (padding = 0), with straight-through
        gradients once a trimmer has acted. Pruning path: which slots hold a real token (packing padding).
    n0: (B,) number of trimmable tokens at the start (real tokens minus the prefix): keep-ratio denominator.
    """

    x: Tensor
    keep: Tensor
    n0: Tensor

    def key_mask(self) -> Tensor | None:
        """The key mask attention needs: None when every slot is a kept token (no masking work at all)."""
        if self.keep.requires_grad or not bool(self.keep.all()):
            return self.keep
        return None

    def apply(self, decision: Tensor, prune: bool) -> Stream:
        """Apply a (B, N) 0/1 keep decision: mask (training path) or gather out (pruning path).

        Masks are cumulative (a dropped token stays dropped), the prefix is always kept and padding
        counts as pruned.
        """
        decision = torch.cat([torch.ones_like(decision[:, :1]), decision[:, 1:]], dim=1)
        keep = self.keep * decision  # (B, N)
        if not prune:
            return Stream(self.x, keep, self.n0)
        n_max = int(keep.sum(1).max())
        order = torch.argsort(keep, dim=1, descending=True, stable=True)[:, :n_max]  # kept first, in order
        x = torch.gather(self.x, 1, order[..., None].expand(-1, -1, self.x.shape[-1]))  # (B, N', D)
        return Stream(x, torch.gather(keep, 1, order), self.n0)

    def kept_fraction(self) -> Tensor:
        """(B,) fraction of the trimmable tokens still alive."""
        return (self.keep.sum(1) - 1) / self.n0.clamp(min=1)


@dataclass
class Heads:
    """Which heads of one attention module run.

    Masking path: ``gate`` (B, H) 0/1 with straight-through gradients, ``index`` None.
    Pruning path: ``index`` (Hk,) the union of the batch's kept heads (only those are computed) and
    ``gate`` (B, Hk), or None when every instance keeps all of them (always so for a batch of one).
    """

    index: Tensor | None = None
    gate: Tensor | None = None

    @staticmethod
    def from_decision(decision: Tensor, prune: bool) -> Heads:
        if not prune:
            return Heads(gate=decision)
        index = decision.any(0).nonzero().flatten()  # (Hk,)
        gate = decision[:, index]  # (B, Hk)
        return Heads(index=index, gate=None if bool(gate.all()) else gate)


def _linear(x: Tensor, layer: nn.Linear, rows: Tensor | None) -> Tensor:
    if rows is None:
        return layer(x)
    bias = None if layer.bias is None else layer.bias[rows]
    return F.linear(x, layer.weight[rows], bias)


def multi_head_attention(
    x_q: Tensor, x_kv: Tensor, q: nn.Linear | Tensor, k: nn.Linear | Tensor, v: nn.Linear | Tensor,
    out: nn.Linear, num_heads: int, key_keep: Tensor | None, heads: Heads | None, dropout_p: float,
    q_norm: Callable[[Tensor], Tensor] | None = None, k_norm: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Multi-head attention with token key masks and head selection, on either path.

    x_q (B, Nq, D), x_kv (B, Nk, D) -> (B, Nq, D_out) after the output projection ``out``.
    q/k/v are Linear layers, or precomputed (B, N, H*Dh) projections (timm's fused qkv).
    key_keep (B, Nk) 0/1 or None (all keys present). With a gradient it runs the differentiable masked
    softmax; without one, PyTorch's fused SDPA with a boolean mask (identical values).
    """
    b, nq, _ = x_q.shape
    dh = out.in_features // num_heads
    index = None if heads is None else heads.index
    rows = None if index is None else (index[:, None] * dh + torch.arange(dh, device=index.device)).flatten()
    n_heads = num_heads if index is None else index.numel()
    if n_heads == 0:  # every head of this module pruned for the whole batch: only the bias remains
        return out.bias.expand(b, nq, -1) if out.bias is not None else x_q.new_zeros(b, nq, out.out_features)

    def split(t: nn.Linear | Tensor, x: Tensor, norm: Callable[[Tensor], Tensor] | None) -> Tensor:
        t = _linear(x, t, rows) if isinstance(t, nn.Linear) else t
        t = t.view(b, x.shape[1], n_heads, dh).transpose(1, 2)  # (B, Hk, N, Dh)
        return t if norm is None else norm(t)

    qh, kh, vh = split(q, x_q, q_norm), split(k, x_kv, k_norm), split(v, x_kv, None)
    if key_keep is not None and key_keep.requires_grad:
        ctx = masked_softmax_attention(qh, kh, vh, key_keep, dh**-0.5, dropout_p)
    else:
        mask = None if key_keep is None else (key_keep > 0)[:, None, None, :]  # (B, 1, 1, Nk)
        ctx = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, dropout_p=dropout_p)
    if heads is not None and heads.gate is not None:
        ctx = ctx * heads.gate[:, :, None, None]  # pruned heads contribute 0 to the output projection
    ctx = ctx.transpose(1, 2).reshape(b, nq, n_heads * dh)  # (B, Nq, Hk*Dh)
    if rows is None:
        return out(ctx)
    return F.linear(ctx, out.weight[:, rows], out.bias)


def vit_block_forward(block: nn.Module, x: Tensor, key_keep: Tensor | None, heads: Heads | None) -> Tensor:
    """timm ``Block.forward`` on our attention (same modules, same order: norm1, attn, ls1, drop_path...).

    x (B, N, D) -> (B, N, D). timm's fused qkv runs as one matmul, sliced to the kept heads' rows.
    timm's optional ``attn.norm`` (scale-norm) is not supported: ``build_vision`` checks it is Identity.
    """
    attn = block.attn
    h = block.norm1(x)
    d = attn.proj.in_features
    rows = None
    if heads is not None and heads.index is not None:
        head_rows = (heads.index[:, None] * (d // attn.num_heads) + torch.arange(d // attn.num_heads,
                                                                                 device=x.device)).flatten()
        rows = torch.cat([head_rows, head_rows + d, head_rows + 2 * d])
    q, k, v = _linear(h, attn.qkv, rows).chunk(3, dim=-1)  # each (B, N, Hk*Dh)
    p = attn.attn_drop.p if block.training else 0.0
    h = multi_head_attention(h, h, q, k, v, attn.proj, attn.num_heads, key_keep, heads, p,
                             q_norm=attn.q_norm, k_norm=attn.k_norm)
    x = x + block.drop_path1(block.ls1(attn.proj_drop(h)))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


class BertSelfAttention(nn.Module):
    """Q/K/V projections of METER's BertSelfAttention (names ``query``, ``key``, ``value``)."""

    def __init__(self, hidden: int, kv_dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_dim, hidden)
        self.value = nn.Linear(kv_dim, hidden)


class BertSelfOutput(nn.Module):
    def __init__(self, hidden: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)


class BertAttention(nn.Module):
    """Attention + output projection + residual + post-LayerNorm (BERT)."""

    def __init__(self, hidden: int, heads: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.self = BertSelfAttention(hidden, hidden)
        self.output = BertSelfOutput(hidden, eps, dropout)
        self.num_heads = heads
        self.dropout_p = dropout

    def forward(self, x: Tensor, context: Tensor, key_keep: Tensor | None, heads: Heads | None) -> Tensor:
        """x (B, Nq, D) attends to context (B, Nk, D) -> (B, Nq, D)."""
        s, o = self.self, self.output
        p = self.dropout_p if self.training else 0.0
        h = multi_head_attention(x, context, s.query, s.key, s.value, o.dense, self.num_heads, key_keep,
                                 heads, p)
        return o.LayerNorm(o.dropout(h) + x)


class BertIntermediate(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))


class BertOutput(nn.Module):
    def __init__(self, hidden: int, intermediate: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(intermediate, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class CrossLayer(nn.Module):
    """METER's BertCrossLayer: self-attention, cross-attention to the other stream, FFN (post-LN)."""

    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.attention = BertAttention(hidden, heads, eps, dropout)
        self.crossattention = BertAttention(hidden, heads, eps, dropout)
        self.intermediate = BertIntermediate(hidden, intermediate)
        self.output = BertOutput(hidden, intermediate, eps, dropout)

    def forward(self, x: Tensor, other: Tensor, keep: Tensor | None, other_keep: Tensor | None,
                msa: Heads | None, mca: Heads | None) -> Tensor:
        """x (B, N, D) one stream, other (B, M, D) the other stream's previous-layer output -> (B, N, D)."""
        x = self.attention(x, x, keep, msa)
        x = self.crossattention(x, other, other_keep, mca)
        return self.output(self.intermediate(x), x)


class Pooler(nn.Module):
    """First token -> dense -> tanh (METER's cross-modal poolers)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.dense(x[:, 0]))
