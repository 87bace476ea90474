"""Inference on packed tokens: a batch whose instances keep different numbers of tokens runs its projections and
FFNs on the kept tokens only, not on every instance padded to the longest.

On the pruning path a batch's stream is (B, N, D) with a keep mask (B, N): slots past an instance's kept tokens
are padding (``Stream.apply``). The layers here gather the kept rows once per layer into a packed (R, D) matrix
(R = the batch's kept tokens), run every Linear, LayerNorm, activation and residual on it, attend (``attend``:
PyTorch's fused SDPA per instance on views of the packed rows, or on the batch padded to its longest instance with
the key mask when padding wastes less than the extra calls cost), and scatter the layer's output back into the
(B, N, D) layout, padding slots zero. Kept heads run as in
``layers.head_attention``: by runs of consecutive heads on a head-major weight copy, no per-call weight slices; a
batch runs the union of its instances' kept heads, each instance's other heads gated to zero.

The values equal the padded reference path's (``layers.reference_path``) on every kept token; tests pin it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smarttrim.layers import Block, Heads, head_major, head_runs, output_runs

OP_OVERHEAD_MACS = 400_000
"""What one extra tensor op costs, in multiply-accumulates (~8 us at ~50 GMAC/s on a CPU core): the break-even of
running instances that keep different heads in groups (more, smaller matmuls) instead of their union
(``head_groups``), or of attending instance by instance (``per_instance``)."""


@dataclass(frozen=True)
class Packing:
    """Where a batch's kept tokens are in its (B, N) slots."""

    rows: Tensor
    """(R,) long: the flat indices (b * N + j) of the kept slots, instance by instance, in order."""
    instance: Tensor
    """(R,) long: each kept row's instance."""
    b: int
    n: int

    @staticmethod
    def of(keep: Tensor) -> Packing:
        """From a (B, N) 0/1 keep mask."""
        b, n = keep.shape
        rows = (keep.reshape(-1) > 0).nonzero().squeeze(1)
        return Packing(rows, torch.div(rows, n, rounding_mode="floor"), b, n)

    @staticmethod
    def dense(b: int, n: int, device: torch.device) -> Packing:
        rows = torch.arange(b * n, device=device)
        return Packing(rows, torch.div(rows, n, rounding_mode="floor"), b, n)

    @cached_property
    def lengths(self) -> tuple[int, ...]:
        """Each instance's number of kept rows (on the host: one synchronisation per packing)."""
        return tuple(torch.bincount(self.instance, minlength=self.b).tolist())

    def gather(self, x: Tensor) -> Tensor:
        """(B, N, D) -> (R, D): the kept rows."""
        return x.reshape(self.b * self.n, -1).index_select(0, self.rows)

    def scatter(self, rows: Tensor) -> Tensor:
        """(R, D) -> (B, N, D), padding slots zero."""
        out = rows.new_zeros(self.b * self.n, rows.shape[-1])
        return out.index_copy_(0, self.rows, rows).view(self.b, self.n, -1)

    def pad_heads(self, rows: Tensor) -> Tensor:
        """(R, Hk, Dh) per-head rows -> (B, Hk, N, Dh) for attention, padding zero."""
        hk, dh = rows.shape[1:]
        out = rows.new_zeros(self.b * self.n, hk, dh).index_copy_(0, self.rows, rows)
        return out.view(self.b, self.n, hk, dh).transpose(1, 2)


def _project(x: Tensor, weight: Tensor, bias: Tensor | None, runs: tuple[tuple[int, int], ...], parts: int,
             dh: int) -> Tensor:
    """x (R, D) through a head-major weight restricted to ``runs`` -> (R, Hk, parts, Dh)."""
    step = parts * dh
    outs = [F.linear(x, weight[a * step: z * step], None if bias is None else bias[a * step: z * step])
            .view(x.shape[0], z - a, parts, dh) for a, z in runs]
    return outs[0] if len(outs) == 1 else torch.cat(outs, 1)


def per_instance(pq: Packing, pkv: Packing, width: int) -> bool:
    """Whether attention runs instance by instance on the packed rows (no padding) rather than once on the batch
    padded to its longest instance: on a CPU, when the padded product's wasted MACs (``width`` = heads x head
    dim, both products QK and AV) outweigh ``OP_OVERHEAD_MACS`` per extra call. A GPU pays a kernel launch per
    call and keeps the single padded call."""
    if pq.b == 1 or pq.rows.device.type != "cpu":
        return False
    lq, lkv = pq.lengths, pkv.lengths
    waste = 2 * width * (pq.b * max(lq) * max(lkv) - sum(a * z for a, z in zip(lq, lkv, strict=True)))
    return waste > 4 * pq.b * OP_OVERHEAD_MACS


def attend(qr: Tensor, kr: Tensor, vr: Tensor, pq: Packing, pkv: Packing, q_norm: nn.Module | None = None,
           k_norm: nn.Module | None = None) -> Tensor:
    """Scaled dot-product attention of packed per-head rows: queries qr (Rq, Hk, Dh) of the instances packed by
    ``pq`` to their own keys / values kr, vr (Rkv, Hk, Dh) packed by ``pkv`` -> context (Rq, Hk, Dh). Either each
    instance on its own rows (``per_instance``: no padding, no mask) or the batch padded with the key mask; both
    through PyTorch's fused SDPA. ``q_norm`` / ``k_norm``: per-head norms on the last dimension (timm's qk-norm)."""
    hk, dh = qr.shape[1:]
    if per_instance(pq, pkv, hk * dh):
        ctx = torch.empty_like(qr)
        a = c = 0
        for nq, nkv in zip(pq.lengths, pkv.lengths, strict=True):
            if nq:
                qh, kh = qr[a: a + nq].transpose(0, 1)[None], kr[c: c + nkv].transpose(0, 1)[None]
                if q_norm is not None:
                    qh, kh = q_norm(qh), k_norm(kh) if k_norm is not None else kh
                ctx[a: a + nq] = F.scaled_dot_product_attention(qh, kh, vr[c: c + nkv].transpose(0, 1)[None])[0] \
                    .transpose(0, 1)
            a, c = a + nq, c + nkv
        return ctx
    qh, kh, vh = pq.pad_heads(qr), pkv.pad_heads(kr), pkv.pad_heads(vr)  # (B, Hk, N, Dh)
    if q_norm is not None:
        qh, kh = q_norm(qh), k_norm(kh) if k_norm is not None else kh
    mask = torch.zeros(pkv.b * pkv.n, dtype=torch.bool, device=qr.device).index_fill_(0, pkv.rows, True)
    ctx = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask.view(pkv.b, 1, 1, pkv.n))  # (B, Hk, Nq, Dh)
    return ctx.transpose(1, 2).reshape(pq.b * pq.n, hk, dh).index_select(0, pq.rows)


def packed_attention(xq: Tensor, pq: Packing, xkv: Tensor | None, pkv: Packing, owner: nn.Module, q: Block,
                     k: Block, v: Block, out: nn.Linear, num_heads: int, heads: Heads | None,
                     q_norm: nn.Module | None = None, k_norm: nn.Module | None = None) -> Tensor:
    """Attention of packed query rows xq (Rq, D) to packed key/value rows ``xkv`` (Rkv, D; None: self-attention,
    the keys are the queries) -> (Rq, D_out) after the output projection. ``pq`` / ``pkv``: where the rows sit in
    their batches' slots (their padding is masked as keys)."""
    index = None if heads is None else heads.index
    key = tuple(range(num_heads)) if index is None else heads.key or tuple(index.tolist())  # type: ignore[union-attr]
    if not key:  # every head pruned for the whole batch: only the output bias remains
        r = xq.shape[0]
        return out.bias.expand(r, -1) if out.bias is not None else xq.new_zeros(r, out.out_features)
    runs = head_runs(key)
    dh = out.in_features // num_heads
    if heads is not None and heads.gate is not None:
        groups = head_groups(heads.gate, pq, pkv, len(key), dh * xq.shape[1], xkv is None)
        if groups is not None:
            return _grouped(xq, pq, xkv, pkv, owner, q, k, v, out, num_heads, key, groups, q_norm, k_norm)
    if xkv is None:
        weight, bias = head_major(owner, (q, k, v), num_heads, "qkv")
        y = _project(xq, weight, bias, runs, 3, dh)  # (R, Hk, 3, Dh)
        qr, kr, vr = y[:, :, 0], y[:, :, 1], y[:, :, 2]
    else:
        qr = _project(xq, q[0], q[1], runs, 1, dh)[:, :, 0]
        weight, bias = head_major(owner, (k, v), num_heads, "kv")
        y = _project(xkv, weight, bias, runs, 2, dh)
        kr, vr = y[:, :, 0], y[:, :, 1]
    ctx = attend(qr, kr, vr, pq, pkv, q_norm, k_norm)  # (Rq, Hk, Dh)
    if heads is not None and heads.gate is not None:
        ctx = ctx * heads.gate.index_select(0, pq.instance)[:, :, None]
    return output_runs(ctx.reshape(1, xq.shape[0], -1), out, runs, dh)[0]


@dataclass(frozen=True)
class HeadGroup:
    """Instances of a batch that keep the same heads."""

    columns: Tensor
    """(Hg,) long: the group's heads as positions in the batch's union of kept heads."""
    heads: tuple[int, ...]
    """``columns`` on the host."""
    q_rows: Tensor
    """(Rq_g,) long: positions of the group's query rows among the packed query rows."""
    kv_rows: Tensor
    """(Rkv_g,) long: positions of its key/value rows among the packed key/value rows."""


def head_groups(gate: Tensor, pq: Packing, pkv: Packing, union: int, row_macs: int,
                self_attention: bool) -> list[HeadGroup] | None:
    """The instances of a batch grouped by the heads they keep (``gate`` (B, Hk): 0/1 over the union's heads), when
    running each group's own heads costs less than running the union for everyone, counting ``OP_OVERHEAD_MACS``
    per extra op; else None. ``row_macs``: MACs of one head's projection of one row (Dh x D)."""
    flags = (gate > 0).tolist()
    members: dict[tuple[bool, ...], list[int]] = {}
    for b, row in enumerate(flags):
        members.setdefault(tuple(row), []).append(b)
    counts_q, counts_kv = pq.lengths, pkv.lengths
    parts_q, parts_kv = (3, 0) if self_attention else (1, 2)  # projections on the queries' / the keys' rows

    def macs(rows_q: int, rows_kv: int, heads: int) -> int:
        return (rows_q * (parts_q + 1) + rows_kv * parts_kv) * heads * row_macs  # + 1: the output projection

    union_cost = macs(sum(counts_q), sum(counts_kv), union)
    grouped, ops = 0, 0
    for row, bs in members.items():
        kept = sum(row)
        grouped += macs(sum(counts_q[b] for b in bs), sum(counts_kv[b] for b in bs), kept)
        ops += 6 + 3 * len(head_runs(tuple(h for h, f in enumerate(row) if f)))
    if union_cost - grouped <= ops * OP_OVERHEAD_MACS:
        return None
    groups = []
    device = gate.device
    for row, bs in members.items():
        member = torch.zeros(pq.b, dtype=torch.bool, device=device)
        member[bs] = True
        columns = [h for h, f in enumerate(row) if f]
        groups.append(HeadGroup(torch.tensor(columns, dtype=torch.long, device=device), tuple(columns),
                                member.index_select(0, pq.instance).nonzero().squeeze(1),
                                member.index_select(0, pkv.instance).nonzero().squeeze(1)))
    return groups


def _grouped(xq: Tensor, pq: Packing, xkv: Tensor | None, pkv: Packing, owner: nn.Module, q: Block, k: Block,
             v: Block, out: nn.Linear, num_heads: int, key: tuple[int, ...], groups: list[HeadGroup],
             q_norm: nn.Module | None, k_norm: nn.Module | None) -> Tensor:
    """``packed_attention`` for instances that keep different heads, group by group: each group's Q / K / V and
    output projections run only its own heads on its own rows; attention runs once over the union (a head an
    instance does not keep has zero Q, K and V there, so its context is zero, as a gate would make it)."""
    dh = out.in_features // num_heads
    hk = len(key)
    n_kv = xq.shape[0] if xkv is None else xkv.shape[0]
    qkv = head_major(owner, (q, k, v), num_heads, "qkv") if xkv is None else None
    kvw = head_major(owner, (k, v), num_heads, "kv") if xkv is not None else None
    # each group's projections: (q rows, q values, kv rows, k values, v values); placed once their dtype is known
    # (under autocast the projections are bf16 while the residual stream is fp32)
    parts: list[tuple[HeadGroup, Tensor, Tensor, Tensor]] = []
    for g in groups:
        if not g.heads:
            continue
        runs = head_runs(tuple(key[c] for c in g.heads))
        if qkv is not None:
            y = _project(xq.index_select(0, g.q_rows), *qkv, runs, 3, dh)
            parts.append((g, y[:, :, 0], y[:, :, 1], y[:, :, 2]))
        else:
            assert xkv is not None and kvw is not None
            yq = _project(xq.index_select(0, g.q_rows), q[0], q[1], runs, 1, dh)[:, :, 0]
            y = _project(xkv.index_select(0, g.kv_rows), *kvw, runs, 2, dh)
            parts.append((g, yq, y[:, :, 0], y[:, :, 1]))
    dtype = parts[0][1].dtype if parts else xq.dtype
    rq = xq.new_zeros(xq.shape[0], hk, dh, dtype=dtype)
    rk, rv = xq.new_zeros(n_kv, hk, dh, dtype=dtype), xq.new_zeros(n_kv, hk, dh, dtype=dtype)
    for g, yq, yk, yv in parts:
        cols = g.columns[None, :]
        kv_rows = g.q_rows if xkv is None else g.kv_rows
        rq.index_put_((g.q_rows[:, None], cols), yq)
        rk.index_put_((kv_rows[:, None], cols), yk)
        rv.index_put_((kv_rows[:, None], cols), yv)
    ctx = attend(rq, rk, rv, pq, pkv, q_norm, k_norm)  # (Rq, Hk, Dh)
    outputs: list[tuple[Tensor, Tensor]] = []
    for g in groups:
        if not g.heads:
            outputs.append((g.q_rows, out.bias.expand(g.q_rows.numel(), -1) if out.bias is not None
                            else xq.new_zeros(g.q_rows.numel(), out.out_features)))
            continue
        runs = head_runs(tuple(key[c] for c in g.heads))
        part = ctx.index_select(0, g.q_rows).index_select(1, g.columns)  # (Rq_g, Hg, Dh)
        outputs.append((g.q_rows, output_runs(part.reshape(1, part.shape[0], -1), out, runs, dh)[0]))
    dtype = next((y.dtype for (_, y), g in zip(outputs, groups, strict=True) if g.heads), outputs[0][1].dtype)
    result = xq.new_empty(xq.shape[0], out.out_features, dtype=dtype)
    for rows, y in outputs:
        result.index_copy_(0, rows, y.to(dtype))
    return result


def vit_block_packed(block: nn.Module, x: Tensor, keep: Tensor, heads: Heads | None) -> Tensor:
    """timm ``Block`` (eval) on the kept tokens of x (B, N, D) with keep mask (B, N) -> (B, N, D)."""
    attn = block.attn
    p = Packing.of(keep)
    xp = p.gather(x)
    w, b = attn.qkv.weight, attn.qkv.bias
    d = w.shape[0] // 3
    blocks = [(w[i * d:(i + 1) * d], None if b is None else b[i * d:(i + 1) * d]) for i in range(3)]
    h = packed_attention(block.norm1(xp), p, None, p, attn, *blocks, attn.proj, attn.num_heads, heads,
                         q_norm=attn.q_norm, k_norm=attn.k_norm)
    xp = xp + block.ls1(h)
    xp = xp + block.ls2(block.mlp(block.norm2(xp)))
    return p.scatter(xp)


def cross_layer_packed(layer: nn.Module, x: Tensor, other: Tensor, keep: Tensor, other_keep: Tensor | None,
                       msa: Heads | None, mca: Heads | None) -> Tensor:
    """METER's co-attention layer (``layers.CrossLayer``, eval) on the kept tokens of x (B, N, D) (keep mask
    (B, N)), cross-attending to the kept tokens of ``other`` (B, M, D) (mask ``other_keep``, None: all) -> (B, N, D)."""
    p = Packing.of(keep)
    po = Packing.of(other_keep) if other_keep is not None else Packing.dense(*other.shape[:2], other.device)
    xp, op = p.gather(x), po.gather(other)
    for attention, context, pc, heads in ((layer.attention, None, p, msa), (layer.crossattention, op, po, mca)):
        s, o = attention.self, attention.output
        h = packed_attention(xp, p, context, pc, s, (s.query.weight, s.query.bias), (s.key.weight, s.key.bias),
                             (s.value.weight, s.value.bias), o.dense, attention.num_heads, heads)
        xp = o.LayerNorm(h + xp)
    return p.scatter(layer.output(layer.intermediate(xp), xp))


__all__ = ["OP_OVERHEAD_MACS", "HeadGroup", "Packing", "attend", "cross_layer_packed", "head_groups",
           "packed_attention", "per_instance", "vit_block_packed"]
