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

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smarttrim.trimmers import masked_attention


@dataclass
class Stream:
    """The tokens of one modality flowing through the encoder.

    x: (B, N, D) hidden states; index 0 is the prefix ([CLS]) token, never trimmed.
    keep: (B, N) 0/1 float. Masking path: cumulative keep mask (padding = 0), with straight-through
        gradients once a trimmer has acted. Pruning path: which slots hold a real token (packing padding).
    n0: (B,) number of trimmable tokens at the start (real tokens minus the prefix): keep-ratio denominator;
        a plain number when it is the same for every instance (images, unpadded texts).
    pos: (B, N) long, each slot's position in the stream's input sequence (the pruning path gathers it with
        the tokens); None = the identity (nothing gathered yet, or the masking path).
    dense: True when every slot is known to hold a kept token (pruning path after a batch of one or equal
        counts): attention then needs no key mask and nothing checks ``keep``.
    """

    x: Tensor
    keep: Tensor
    n0: Tensor | int
    pos: Tensor | None = None
    dense: bool = False

    def with_x(self, x: Tensor) -> Stream:
        """The same tokens with new hidden states (a layer's output)."""
        return Stream(x, self.keep, self.n0, self.pos, self.dense)

    def key_mask(self) -> Tensor | None:
        """The key mask attention needs: None when every slot is a kept token (no masking work at all)."""
        if self.dense:
            return None
        if self.keep.requires_grad or not bool(self.keep.all()):
            return self.keep
        return None

    def positions(self) -> Tensor:
        """(B, N) long: each slot's position in the input sequence."""
        if self.pos is not None:
            return self.pos
        b, n = self.keep.shape
        return torch.arange(n, device=self.keep.device).expand(b, n)

    def select(self, keep: Tensor) -> Stream:
        """Pruning path, batch of one, every slot a kept token: keep the tokens where ``keep`` (N,) bool is True
        (the prefix forced in) by indexing, no packing. The decision of a deterministic trimmer at batch size 1
        goes here directly (``apply`` is the general case)."""
        keep[0] = True
        index = keep.nonzero().squeeze(1)  # (N',)
        pos = self.pos.index_select(1, index) if self.pos is not None else index[None]
        return Stream(self.x.index_select(1, index), self.keep[:, : index.numel()], self.n0, pos, dense=True)

    def apply(self, decision: Tensor, prune: bool) -> Stream:
        """Apply a (B, N) 0/1 keep decision: mask (training path) or gather out (pruning path).

        Masks are cumulative (a dropped token stays dropped), the prefix is always kept and padding
        counts as pruned.
        """
        if not prune:
            decision = torch.cat([torch.ones_like(decision[:, :1]), decision[:, 1:]], dim=1)
            return Stream(self.x, self.keep * decision, self.n0, self.pos)
        keep = self.keep * decision  # (B, N)
        keep[:, 0] = 1.0  # the prefix
        pos = self.positions()
        if keep.shape[0] == 1:  # one instance: index the kept tokens, no packing
            index = keep[0].nonzero().squeeze(1)  # (N',)
            return Stream(self.x.index_select(1, index), keep.new_ones(1, index.numel()), self.n0,
                          pos.index_select(1, index), dense=True)
        low, high = torch.aminmax(keep.sum(1))
        n_max = int(high)
        order = torch.argsort(keep, dim=1, descending=True, stable=True)[:, :n_max]  # kept first, in order
        x = torch.gather(self.x, 1, order[..., None].expand(-1, -1, self.x.shape[-1]))  # (B, N', D)
        return Stream(x, torch.gather(keep, 1, order), self.n0, torch.gather(pos, 1, order),
                      dense=int(low) == n_max)

    def kept_fraction(self) -> Tensor:
        """(B,) fraction of the trimmable tokens still alive."""
        n0 = self.n0.clamp(min=1) if isinstance(self.n0, Tensor) else max(self.n0, 1)
        return (self.keep.sum(1) - 1) / n0


@dataclass
class Heads:
    """Which heads of one attention module run.

    Masking path: ``gate`` (B, H) 0/1 with straight-through gradients, ``index`` None.
    Pruning path: ``index`` (Hk,) the union of the batch's kept heads (only those are computed) and
    ``gate`` (B, Hk), or None when every instance keeps all of them (always so for a batch of one).
    """

    index: Tensor | None = None
    gate: Tensor | None = None
    key: tuple[int, ...] | None = None
    """``index`` as a tuple when known on the host (batch of one): the head-slice cache needs no device read."""

    @staticmethod
    def from_flags(flags: list[bool], device: torch.device) -> Heads:
        """Pruning path, batch of one: the heads whose flag is True (host-side decisions, one device read for all
        heads); every head kept = nothing to slice."""
        if all(flags):
            return Heads()
        key = tuple(h for h, kept in enumerate(flags) if kept)
        index = _INDEX.get((key, device))
        if index is None:
            index = _INDEX.setdefault((key, device), torch.tensor(key, dtype=torch.long, device=device))
        return Heads(index=index, key=key)

    @staticmethod
    def from_decision(decision: Tensor, prune: bool) -> Heads:
        """Heads of a (B, H) 0/1 decision: gates (masking path), or the computed union and per-instance gates
        (pruning path; nothing to slice when the union is every head, no gate when all keep the union)."""
        if not prune:
            return Heads(gate=decision)
        num_heads = decision.shape[1]
        if decision.shape[0] == 1:
            index = decision[0].nonzero().squeeze(1)  # (Hk,)
            return Heads(index=None if index.numel() == num_heads else index)
        index = decision.any(0).nonzero().squeeze(1)  # (Hk,)
        full = index.numel() == num_heads
        gate = decision if full else decision[:, index]  # (B, Hk)
        return Heads(index=None if full else index, gate=None if bool(gate.all()) else gate)


_INDEX: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}
"""Index tensors of kept-head sets (a few per head count), shared by every module."""

_SLICES: weakref.WeakKeyDictionary[nn.Linear, dict[tuple[Any, ...], tuple[Any, Tensor, Tensor | None]]] = \
    weakref.WeakKeyDictionary()
MAX_CACHED_SLICES = 64
"""Kept-head sets cached per layer (a module of H heads has at most 2^H - 1 of them)."""


def head_slice(layer: nn.Linear, index: Tensor, num_heads: int, dim: int, parts: int = 1,
               key: tuple[int, ...] | None = None) -> tuple[Tensor, Tensor | None]:
    """``layer``'s weight and bias restricted to the heads ``index`` (Hk,): output rows (``dim`` 0; ``parts`` stacked
    blocks of ``num_heads`` heads, e.g. timm's fused qkv) or input columns (``dim`` 1; bias None, it is not per head).

    Without gradients (inference) the slices are cached per kept-head set, valid while the weights are unchanged
    (their version counters): instances that keep the same heads reuse one copy instead of slicing every call.
    ``key``: ``index`` as a tuple, when the caller has it (no device read)."""
    cache = None
    if not torch.is_grad_enabled():
        bias = layer.bias
        key = (dim, parts, key if key is not None else tuple(index.tolist()))
        version = (layer.weight._version, layer.weight.data_ptr(), None if bias is None else bias._version)
        cache = _SLICES.setdefault(layer, {})
        hit = cache.get(key)
        if hit is not None and hit[0] == version:
            return hit[1], hit[2]
    w = layer.weight
    if dim == 0:
        dh = w.shape[0] // parts // num_heads
        weight = w.view(parts, num_heads, dh, -1).index_select(1, index).reshape(-1, w.shape[1])
        bias = None if layer.bias is None else layer.bias.view(parts, num_heads, dh).index_select(1, index).reshape(-1)
    else:
        dh = w.shape[1] // num_heads
        weight, bias = w.view(w.shape[0], num_heads, dh).index_select(1, index).reshape(w.shape[0], -1), None
    if cache is not None:
        if len(cache) >= MAX_CACHED_SLICES:
            cache.clear()
        cache[key] = (version, weight, bias)
    return weight, bias


@functools.lru_cache(maxsize=4096)
def head_runs(key: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """The kept heads ``key`` (ascending) as maximal runs of consecutive heads, ``(start, stop)`` each: the
    weight rows (or columns) of a run are one contiguous block (a view), so a run is one matmul, no copy."""
    runs: list[tuple[int, int]] = []
    for h in key:
        if runs and runs[-1][1] == h:
            runs[-1] = (runs[-1][0], h + 1)
        else:
            runs.append((h, h + 1))
    return tuple(runs)


_MAJOR: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], tuple[Any, Tensor, Tensor | None]]] = \
    weakref.WeakKeyDictionary()


def head_major(owner: nn.Module, blocks: tuple[tuple[Tensor, Tensor | None], ...], num_heads: int,
               tag: str) -> tuple[Tensor, Tensor | None]:
    """The projections ``blocks`` (each a (H*Dh, D) weight and its bias: e.g. Q, K, V) interleaved per head:
    rows [h*P*Dh, (h+1)*P*Dh) hold head h's P blocks, so every run of consecutive heads is one contiguous block of
    rows for all P projections at once. Built once per weight version (inference; cached on ``owner``)."""
    version = tuple((w._version, w.data_ptr(), None if b is None else b._version) for w, b in blocks)
    cache = _MAJOR.setdefault(owner, {})
    hit = cache.get((tag,))
    if hit is not None and hit[0] == version:
        return hit[1], hit[2]
    with torch.no_grad():
        d_in = blocks[0][0].shape[1]
        weight = torch.stack([w.view(num_heads, -1, d_in) for w, _ in blocks], 1).reshape(-1, d_in).contiguous()
        bias = None
        if all(b is not None for _, b in blocks):
            bias = torch.stack([b.view(num_heads, -1) for _, b in blocks], 1).reshape(-1).contiguous()
    cache[(tag,)] = (version, weight, bias)
    return weight, bias


def project_runs(x: Tensor, weight: Tensor, bias: Tensor | None, runs: tuple[tuple[int, int], ...],
                 parts: int, dh: int) -> list[Tensor]:
    """x (B, N, D) through a head-major ``weight`` (``head_major``) restricted to ``runs`` of heads: one matmul per
    run on a view of its rows -> ``parts`` tensors (B, Hk, N, Dh), the kept heads in order."""
    b, n, _ = x.shape
    step = parts * dh
    outs = []
    for start, stop in runs:
        rows = slice(start * step, stop * step)
        y = F.linear(x, weight[rows], None if bias is None else bias[rows])  # (B, N, run*P*Dh)
        outs.append(y.view(b, n, stop - start, parts, dh))
    y = outs[0] if len(outs) == 1 else torch.cat(outs, 2)  # (B, N, Hk, P, Dh)
    return [y[:, :, :, p].transpose(1, 2) for p in range(parts)]


def output_runs(ctx: Tensor, out: nn.Linear, runs: tuple[tuple[int, int], ...], dh: int) -> Tensor:
    """The output projection of the kept heads: ctx (B, N, Hk*Dh), the heads of ``runs`` in order -> (B, N, D_out),
    one accumulating matmul per run on views of ctx's and the weight's columns (no copy)."""
    b, n, _ = ctx.shape
    flat = ctx.reshape(b * n, -1)
    weight = out.weight
    autocast = torch.is_autocast_enabled(ctx.device.type)  # in-place ops are not autocast: accumulate out of place
    y = None
    col = 0
    for start, stop in runs:
        width = (stop - start) * dh
        w = weight[:, start * dh: stop * dh].t()  # (run*Dh, D_out) view
        part = flat[:, col: col + width]
        if y is None:
            y = torch.addmm(out.bias, part, w) if out.bias is not None else part @ w
        elif autocast:
            y = torch.addmm(y, part, w)
        else:
            y.addmm_(part, w)
        col += width
    assert y is not None
    return y.view(b, n, -1)


def _linear(x: Tensor, layer: nn.Linear, heads: Heads | None, num_heads: int, parts: int = 1) -> Tensor:
    """``layer(x)`` restricted to the output features of the computed heads (None / no index: every head)."""
    if heads is None or heads.index is None:
        return layer(x)
    return F.linear(x, *head_slice(layer, heads.index, num_heads, 0, parts, heads.key))


def multi_head_attention(
    x_q: Tensor, x_kv: Tensor, q: nn.Linear | Tensor, k: nn.Linear | Tensor, v: nn.Linear | Tensor,
    out: nn.Linear, num_heads: int, key_keep: Tensor | None, heads: Heads | None, dropout_p: float,
    q_norm: Callable[[Tensor], Tensor] | None = None, k_norm: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Multi-head attention with token key masks and head selection, on either path.

    x_q (B, Nq, D), x_kv (B, Nk, D) -> (B, Nq, D_out) after the output projection ``out``.
    q/k/v are Linear layers, or precomputed (B, N, H*Dh) projections (timm's fused qkv).
    key_keep (B, Nk) 0/1 or None (all keys present). A mask with a gradient (training path) runs
    ``masked_attention`` (exact gradients for q, k, v and the mask), as does training in bf16 (3x faster than
    SDPA's CPU backward there); otherwise PyTorch's fused SDPA with a boolean mask (the same values).
    """
    b, nq = x_q.shape[:2]
    dh = out.in_features // num_heads
    index = None if heads is None else heads.index
    n_heads = num_heads if index is None else index.numel()
    if n_heads == 0:  # every head of this module pruned for the whole batch: only the bias remains
        return out.bias.expand(b, nq, -1) if out.bias is not None else x_q.new_zeros(b, nq, out.out_features)

    def split(t: nn.Linear | Tensor, x: Tensor, norm: Callable[[Tensor], Tensor] | None) -> Tensor:
        t = _linear(x, t, heads, num_heads) if isinstance(t, nn.Linear) else t
        t = t.view(b, x.shape[1], n_heads, dh).transpose(1, 2)  # (B, Hk, N, Dh)
        return t if norm is None else norm(t)

    qh, kh, vh = split(q, x_q, q_norm), split(k, x_kv, k_norm), split(v, x_kv, None)
    mask_grad = key_keep is not None and key_keep.requires_grad
    if mask_grad or (torch.is_grad_enabled() and qh.requires_grad and qh.dtype != torch.float32):
        # training: exact mask gradients; and in bf16 it is 3x faster than SDPA's CPU backward
        ctx = masked_attention(qh, kh, vh, key_keep, dh**-0.5, dropout_p)
    else:
        mask = None if key_keep is None else (key_keep > 0)[:, None, None, :]  # (B, 1, 1, Nk)
        ctx = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, dropout_p=dropout_p)
    if heads is not None and heads.gate is not None:
        ctx = ctx * heads.gate[:, :, None, None]  # pruned heads contribute 0 to the output projection
    ctx = ctx.transpose(1, 2).reshape(b, nq, n_heads * dh)  # (B, Nq, Hk*Dh)
    if index is None:
        return out(ctx)
    return F.linear(ctx, head_slice(out, index, num_heads, 1, key=heads.key if heads is not None else None)[0],
                    out.bias)


_FAST = True
"""Whether the inference fast paths run (``reference_path`` switches them off, for equivalence tests and benches)."""


@contextlib.contextmanager
def reference_path() -> Iterator[None]:
    """Within the block, inference runs the reference pruning path (head weights sliced per kept-head set, every
    instance padded to the longest) instead of the fast paths: the two must give the same values."""
    global _FAST
    previous, _FAST = _FAST, False
    try:
        yield
    finally:
        _FAST = previous


def fast_paths() -> bool:
    """Whether the inference fast paths are on (outside ``reference_path``)."""
    return _FAST


def _runs_path(heads: Heads | None) -> bool:
    """Whether attention runs its kept heads by runs of consecutive heads (``head_attention``): inference with
    some heads pruned for the whole batch."""
    return _FAST and heads is not None and heads.index is not None and not torch.is_grad_enabled()


Block = tuple[Tensor, Tensor | None]


def head_attention(x_q: Tensor, x_kv: Tensor | None, owner: nn.Module, q: Block, k: Block, v: Block, out: nn.Linear,
                   num_heads: int, key_keep: Tensor | None, heads: Heads,
                   q_norm: Callable[[Tensor], Tensor] | None = None,
                   k_norm: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Inference attention over the kept heads ``heads.index`` without copying weight slices: the kept heads
    split into runs of consecutive heads (``head_runs``); each run's Q, K, V rows are one contiguous block of a
    head-major copy of the projections made once per weight version (``head_major``), and the output projection
    accumulates one matmul per run on column views. ``x_kv`` None: self-attention (Q, K and V in one matmul per
    run); else Q from ``x_q``, K and V (one matmul per run) from ``x_kv``. The same values as
    ``multi_head_attention`` with the same ``heads`` (per-instance gates included)."""
    assert heads.index is not None
    key = heads.key if heads.key is not None else tuple(heads.index.tolist())
    if not key:  # every head pruned for the whole batch: only the output bias remains
        b, nq = x_q.shape[:2]
        return out.bias.expand(b, nq, -1) if out.bias is not None else x_q.new_zeros(b, nq, out.out_features)
    runs = head_runs(key)
    dh = out.in_features // num_heads
    if x_kv is None:
        weight, bias = head_major(owner, (q, k, v), num_heads, "qkv")
        qh, kh, vh = project_runs(x_q, weight, bias, runs, 3, dh)
    else:
        qh, = project_runs(x_q, q[0], q[1], runs, 1, dh)  # one projection: head-major already
        weight, bias = head_major(owner, (k, v), num_heads, "kv")
        kh, vh = project_runs(x_kv, weight, bias, runs, 2, dh)
    if q_norm is not None:
        qh, kh = q_norm(qh), k_norm(kh) if k_norm is not None else kh
    mask = None if key_keep is None else (key_keep > 0)[:, None, None, :]  # (B, 1, 1, Nk)
    ctx = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)  # (B, Hk, Nq, Dh)
    if heads.gate is not None:
        ctx = ctx * heads.gate[:, :, None, None]
    b, _, nq, _ = ctx.shape
    return output_runs(ctx.transpose(1, 2).reshape(b, nq, -1), out, runs, dh)


def vit_block_forward(block: nn.Module, x: Tensor, key_keep: Tensor | None, heads: Heads | None) -> Tensor:
    """timm ``Block.forward`` on our attention (same modules, same order: norm1, attn, ls1, drop_path...).

    x (B, N, D) -> (B, N, D). timm's fused qkv runs as one matmul, sliced to the kept heads' rows.
    timm's optional ``attn.norm`` (scale-norm) is not supported: ``build_vision`` checks it is Identity.
    """
    attn = block.attn
    h = block.norm1(x)
    if heads is not None and _runs_path(heads):
        w, b = attn.qkv.weight, attn.qkv.bias
        d = w.shape[0] // 3
        blocks = [(w[i * d:(i + 1) * d], None if b is None else b[i * d:(i + 1) * d]) for i in range(3)]
        h = head_attention(h, None, attn, *blocks, attn.proj, attn.num_heads, key_keep, heads,
                           q_norm=attn.q_norm, k_norm=attn.k_norm)
    else:
        q, k, v = _linear(h, attn.qkv, heads, attn.num_heads, parts=3).chunk(3, dim=-1)  # each (B, N, Hk*Dh)
        p = attn.attn_drop.p if block.training else 0.0
        h = multi_head_attention(h, h, q, k, v, attn.proj, attn.num_heads, key_keep, heads, p,
                                 q_norm=attn.q_norm, k_norm=attn.k_norm)
    x = x + block.drop_path1(block.ls1(attn.proj_drop(h)))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def _drop(dropout: nn.Dropout, x: Tensor) -> Tensor:
    """``dropout(x)``, without the call when it is the identity (eval mode, or p = 0): at batch size 1 every op
    dispatched counts."""
    return dropout(x) if dropout.training and dropout.p > 0 else x


def roberta_forward(text: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """transformers' ``RobertaModel`` forward (no pooler) on its own modules: embeddings, then every
    ``RobertaLayer`` (self-attention, output, intermediate, output) in the same order with the same ops.

    input_ids / attention_mask (B, T) -> last hidden states (B, T, D). The model's per-call mask building,
    output bookkeeping and attention-interface dispatch cost more than the arithmetic of a short text at
    batch size 1; padding keys are masked as there (no mask at all when there is no padding). The keep-all
    tests pin it to ``RobertaModel.forward``.
    """
    emb = text.embeddings
    pad = emb.padding_idx
    t = input_ids.shape[1]
    padded = not bool(input_ids.ne(pad).all())
    if padded:  # RoBERTa numbers the non-padding tokens from pad + 1 (padding keeps position pad)
        position = emb.position_embeddings(emb.create_position_ids_from_input_ids(input_ids, pad))
    else:
        position = emb.position_embeddings.weight[pad + 1: pad + 1 + t]  # (T, D)
    x = emb.word_embeddings(input_ids) + emb.token_type_embeddings.weight[0] + position
    x = _drop(emb.dropout, emb.LayerNorm(x))  # (B, T, D)
    mask = (attention_mask > 0)[:, None, None, :] if not bool(attention_mask.all()) else None  # (B, 1, 1, T)
    for layer in text.encoder.layer:
        sa, so = layer.attention.self, layer.attention.output
        b, n, d = x.shape
        dh = sa.attention_head_size

        def heads(lin: nn.Linear, x: Tensor = x, b: int = b, n: int = n, dh: int = dh) -> Tensor:
            return lin(x).view(b, n, -1, dh).transpose(1, 2)  # (B, H, T, Dh)

        p = sa.dropout.p if sa.training else 0.0
        ctx = F.scaled_dot_product_attention(heads(sa.query), heads(sa.key), heads(sa.value), attn_mask=mask,
                                             dropout_p=p, scale=sa.scaling)
        x = so.LayerNorm(_drop(so.dropout, so.dense(ctx.transpose(1, 2).reshape(b, n, d))) + x)
        out = layer.output
        x = out.LayerNorm(_drop(out.dropout, out.dense(layer.intermediate(x))) + x)
    return x


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
        if heads is not None and _runs_path(heads):
            h = head_attention(x, None if context is x else context, s, (s.query.weight, s.query.bias),
                               (s.key.weight, s.key.bias), (s.value.weight, s.value.bias), o.dense, self.num_heads,
                               key_keep, heads)
        else:
            p = self.dropout_p if self.training else 0.0
            h = multi_head_attention(x, context, s.query, s.key, s.value, o.dense, self.num_heads, key_keep,
                                     heads, p)
        return o.LayerNorm(_drop(o.dropout, h) + x)


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
        return self.LayerNorm(_drop(self.dropout, self.dense(h)) + residual)


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
