"""FLOPs of the inference path, the paper's way: torchprofile MACs on one instance (batch of one, no
padding), plus an analytic count of the same matmuls from the per-layer token and head counts.

torchprofile traces one fixed input, so each instance is counted separately and averaged. It reports
multiply-accumulates (MACs); ``torch.utils.flop_counter`` reports 2 x MACs.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torchprofile import profile_macs

from smarttrim.config import ModelConfig
from smarttrim.model import SmartTrimModel, SmartTrimOutput, conv_stem
from smarttrim.trimmers import TokenTrimmer

_INPUTS = ("pixel_values", "input_ids", "attention_mask")


class _PrunePath(nn.Module):
    """Positional-tensor wrapper for tracing: the inference (pruning) path's logits."""

    def __init__(self, model: SmartTrimModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        batch = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}
        return self.model(batch, path="prune").logits


def strip_padding(batch_of_one: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop padding from a batch of one (the paper counts FLOPs on unpadded single instances)."""
    n = int(batch_of_one["attention_mask"][0].sum())
    return {**batch_of_one, "input_ids": batch_of_one["input_ids"][:, :n],
            "attention_mask": batch_of_one["attention_mask"][:, :n]}


def count_flops(model: SmartTrimModel, batch_of_one: dict[str, Tensor]) -> int:
    """torchprofile MACs of one instance on the inference path (eval mode, text padding removed)."""
    if batch_of_one["input_ids"].shape[0] != 1:
        raise ValueError(f"count_flops takes a batch of one instance, got batch size "
                         f"{batch_of_one['input_ids'].shape[0]} (count each instance and average)")
    batch = strip_padding(batch_of_one)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return int(profile_macs(_PrunePath(model), tuple(batch[k] for k in _INPUTS)))
    finally:
        model.train(was_training)


def _attention_macs(n_q: int, n_kv: int, d_in_q: int, d_in_kv: int, d_out: int, heads: int, dh: int) -> int:
    """Q, K, V projections + QK^T + AV + output projection, ``heads`` heads of size ``dh``."""
    w = heads * dh
    return n_q * d_in_q * w + 2 * n_kv * d_in_kv * w + 2 * n_q * n_kv * w + n_q * w * d_out


def _stem_macs(cfg: ModelConfig) -> int:
    """Patch embedding: one p x p convolution (``linear``), or the ``conv`` stem's 3x3 convolutions."""
    if cfg.patch_stem == "linear":
        return cfg.num_patches * 3 * cfg.patch_size**2 * cfg.vision_width
    macs, side = 0, cfg.image_size
    for conv in (m for m in conv_stem(cfg.patch_size, cfg.vision_width, cfg.patch_stem) if isinstance(m, nn.Conv2d)):
        side //= conv.stride[0]
        macs += side * side * conv.in_channels * 9 * conv.out_channels
    return macs


def _mlp_macs(*dims: int) -> int:
    """Per-row MACs of a chain of Linear layers with the given dims."""
    return sum(a * b for a, b in zip(dims[:-1], dims[1:], strict=False))


def analytic_macs(model: SmartTrimModel, out: SmartTrimOutput, text_len: int) -> int:
    """Matmul MACs of one instance's inference-path forward, from ``out.sizes`` (eval, batch of one).

    Counts every Linear, convolution and attention product (backbone, trimmers, head); skips the
    element-wise work (norms, activations) that torchprofile also counts, so it is a little lower.
    NLVR2's two image passes are both counted with the mean of their sizes (exact when they agree).
    """
    cfg, trim, trimmers = model.config, model.trim_config, model.trimmers
    sizes = {k: int(round(float(v[0]))) for k, v in out.sizes.items()}
    passes = 2 if cfg.task == "nlvr2" else 1
    vw, th, h = cfg.vision_width, cfg.text_hidden, cfg.hidden_size
    dim = (lambda w: trim.trimmer_dim or max(8, w // 4)) if trim is not None else (lambda w: 0)

    def token_trimmer(n: int, width: int, other: int, placement: str, layer: int) -> int:
        t = None if trimmers is None else trimmers.get(placement, layer)
        if not isinstance(t, TokenTrimmer):  # absent, or random (no parameters, no work)
            return 0
        d = dim(width)
        macs = n * _mlp_macs(width, d, max(d // 2, 1), 1)
        if t.kind == "cross_modal":
            macs += _mlp_macs(width + other, d, d, d) + n * d
        return macs

    def head_trimmer(in_dim: int, width: int, num_heads: int, placement: str, layer: int) -> int:
        present = trimmers is not None and trimmers.get(placement, layer) is not None
        return _mlp_macs(in_dim, dim(width), num_heads) if present else 0

    # text encoder (untrimmed RoBERTa), run once per instance
    t = text_len
    macs = cfg.text_layers * (_attention_macs(t, t, th, th, th, cfg.text_heads, th // cfg.text_heads)
                              + 2 * t * th * cfg.text_intermediate)
    for _ in range(passes):
        # visual encoder
        n = cfg.num_patches + 1
        macs += _stem_macs(cfg)
        mlp = int(vw * cfg.vision_mlp_ratio)
        for layer in range(cfg.vision_layers):
            macs += token_trimmer(n, vw, th, "vision_tokens", layer)
            n = sizes.get(f"vision.{layer}.tokens", n)
            macs += head_trimmer(vw, vw, cfg.vision_heads, "vision_heads", layer)
            k = sizes.get(f"vision.{layer}.heads", cfg.vision_heads)
            macs += _attention_macs(n, n, vw, vw, vw, k, vw // cfg.vision_heads) + 2 * n * vw * mlp
        # cross-modal encoder
        n_i, n_t = n, t
        macs += n_t * th * h + n_i * vw * h
        dh = h // cfg.cross_heads
        for layer in range(cfg.cross_layers):
            macs += token_trimmer(n_t, h, h, "text_tokens", layer) + token_trimmer(n_i, h, h, "image_tokens", layer)
            n_t = sizes.get(f"cross.text.{layer}.tokens", n_t)
            n_i = sizes.get(f"cross.image.{layer}.tokens", n_i)
            for stream, n_s, n_o in (("text", n_t, n_i), ("image", n_i, n_t)):
                macs += head_trimmer(h, h, cfg.cross_heads, f"{stream}_msa_heads", layer)
                macs += head_trimmer(2 * h, h, cfg.cross_heads, f"{stream}_mca_heads", layer)
                k_msa = sizes.get(f"cross.{stream}.{layer}.msa_heads", cfg.cross_heads)
                k_mca = sizes.get(f"cross.{stream}.{layer}.mca_heads", cfg.cross_heads)
                macs += _attention_macs(n_s, n_s, h, h, h, k_msa, dh) + _attention_macs(n_s, n_o, h, h, h, k_mca, dh)
                macs += 2 * n_s * h * cfg.cross_intermediate
        macs += 2 * h * h  # poolers
    if cfg.task == "retrieval":  # the pair's score: rank_output (the ITM head does not run at inference)
        return macs + _mlp_macs(2 * h, 1)
    head_dims = [m.in_features for m in model.head if isinstance(m, nn.Linear)] + [cfg.num_labels]
    return macs + _mlp_macs(*head_dims)
