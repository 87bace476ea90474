"""The METER backbone with SmartTrim trimmers: one model, a masking path (training) and a pruning path
(inference) that share every decision function.

Data flow (paper Sections 3.1 and 4; trimmers act at the *start* of a layer, on its input tokens):

  text  -> RoBERTa (untrimmed) ------------------------------+--> [T_CLS] guides the visual trimmers
  image -> ViT layers, token trimmers guided by [T_CLS] -----+
  both  -> co-attention layers l = 1..L: trim both streams' tokens (each guided by the other stream's
           previous-layer [CLS]), decide MSA/MCA heads, then text and image layers run on the kept
           tokens, each cross-attending to the other stream's kept previous-layer output
        -> poolers on each [CLS] -> concatenated features -> task head (retrieval: ``rank_output``, the score of
           one image-text pair; each image is paired with its 1 + N texts in training, METER's IRTR)
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from functools import partial

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from transformers import RobertaConfig, RobertaModel

from smarttrim.config import ModelConfig, TrimConfig, model_config
from smarttrim.layers import CrossLayer, Heads, Pooler, Stream, fast_paths, roberta_forward, vit_block_forward
from smarttrim.losses import cost_loss, distill_kl, task_loss
from smarttrim.packed import cross_layer_packed, vit_block_packed
from smarttrim.trimmers import FusedGuides, HeadTrimmer, RandomTokenTrimmer, TokenTrimmer, decide, fusable, random_rate

GROUPS = ("vision_tokens", "text_tokens", "heads")


def build_vision(cfg: ModelConfig) -> VisionTransformer:
    """A timm ViT in CLIP layout (pre-norm, no patch-embed bias, QuickGELU), returning all tokens."""
    vit = VisionTransformer(
        img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.vision_width, depth=cfg.vision_layers,
        num_heads=cfg.vision_heads, mlp_ratio=cfg.vision_mlp_ratio, qkv_bias=True, pre_norm=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-5), act_layer=cfg.vision_act, num_classes=0, global_pool="",
    )
    if cfg.patch_stem != "linear":  # same interface: (B, 3, H, W) -> (B, D, H/p, W/p), flattened by timm
        vit.patch_embed.proj = conv_stem(cfg.patch_size, cfg.vision_width, cfg.patch_stem)
    for i, block in enumerate(vit.blocks):  # our attention re-implements timm's; guard what it omits
        if not isinstance(block.attn.norm, nn.Identity):
            raise ValueError(f"vision block {i}: timm attention scale-norm is not supported")
    return vit


def conv_stem(patch_size: int, width: int, stem: str = "conv") -> nn.Sequential:
    """log2(patch_size) stride-2 3x3 convolutions, GELU between them, widths width / 2^k up to ``width``
    (Xiao et al. 2021, "Early convolutions help transformers see better").

    ``stem="conv_context"`` (``ModelConfig.patch_stem``) adds one stride-1 3x3 convolution at the patch grid, which
    widens each token's receptive field from 15 to 31 px at patch 8, so that one token sees a whole object of the
    built-in world. Measured on one-object images (``bench/one_object`` drawings, meter-small trained on their
    shape labels from mean-pooled tokens, AdamW 3e-4, batch 32): 0.998 shape accuracy after 400 steps with it,
    0.49 without it (colour is 1.0 either way).
    """
    context = stem == "conv_context"
    steps = patch_size.bit_length() - 1
    widths = [3] + [width // 2 ** (steps - 1 - k) for k in range(steps)]
    layers: list[nn.Module] = []
    for k in range(steps):
        layers.append(nn.Conv2d(widths[k], widths[k + 1], 3, stride=2, padding=1))
        if k < steps - 1 or context:
            layers.append(nn.GELU())
    if context:
        layers.append(nn.Conv2d(width, width, 3, stride=1, padding=1))
    return nn.Sequential(*layers)


def build_text(cfg: ModelConfig) -> RobertaModel:
    """A transformers RoBERTa encoder (no pooler) built from the config: no hub access."""
    rc = RobertaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.text_hidden, num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads, intermediate_size=cfg.text_intermediate,
        max_position_embeddings=cfg.text_max_positions, type_vocab_size=1, layer_norm_eps=1e-5,
        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
        pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
    )
    return RobertaModel(rc, add_pooling_layer=False)


def build_head(cfg: ModelConfig) -> nn.Sequential:
    """METER's task heads over the concatenated [text; image] pooled features (2h; NLVR2: two pairs, 4h).

    Retrieval: METER's ITM head (``itm_score.fc``: no match / match), the pre-training objective; the retrieval
    score itself is ``SmartTrimModel.rank_output``."""
    h = cfg.hidden_size
    if cfg.task == "retrieval":
        return nn.Sequential(nn.Linear(2 * h, 2))
    in_dim = 4 * h if cfg.task == "nlvr2" else 2 * h
    return nn.Sequential(nn.Linear(in_dim, 2 * h), nn.LayerNorm(2 * h), nn.GELU(), nn.Linear(2 * h, cfg.num_labels))


def rank_from_itm(itm_weight: Tensor, itm_bias: Tensor) -> tuple[Tensor, Tensor]:
    """METER's initialization of the retrieval score ``rank_output`` (IRTR fine-tuning) from the ITM head
    ``itm_score.fc``: its "match" row, index 1. (2, 2h), (2,) -> (1, 2h), (1,) copies."""
    return itm_weight[1:].detach().clone(), itm_bias[1:].detach().clone()


def _meter_init(module: nn.Module) -> None:
    """METER's init_weights for the modules it adds on top of the uni-modal encoders."""
    if isinstance(module, nn.Linear | nn.Embedding):
        module.weight.data.normal_(mean=0.0, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        module.bias.data.zero_()
        module.weight.data.fill_(1.0)
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.data.zero_()


class METERBackbone(nn.Module):
    """METER's modules under METER's names (``cross_modal_*``, ``token_type_embeddings``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.vision = build_vision(cfg)
        self.text = build_text(cfg)
        self.cross_modal_text_transform = nn.Linear(cfg.text_hidden, h)
        self.cross_modal_image_transform = nn.Linear(cfg.vision_width, h)
        self.token_type_embeddings = nn.Embedding(3 if cfg.task == "nlvr2" else 2, h)
        layer = partial(CrossLayer, h, cfg.cross_heads, cfg.cross_intermediate, cfg.layer_norm_eps, cfg.dropout)
        self.cross_modal_text_layers = nn.ModuleList(layer() for _ in range(cfg.cross_layers))
        self.cross_modal_image_layers = nn.ModuleList(layer() for _ in range(cfg.cross_layers))
        self.cross_modal_text_pooler = Pooler(h)
        self.cross_modal_image_pooler = Pooler(h)
        for name, child in self.named_children():
            if name not in ("vision", "text"):
                child.apply(_meter_init)


class TrimmerSet(nn.Module):
    """Every trimmer of a model, keyed by layer index (as a string) per placement."""

    def __init__(self, cfg: ModelConfig, trim: TrimConfig) -> None:
        super().__init__()
        init = trim.init_keep_logit if trim.stable_init else None
        vision_layers = trim.vision_token_layers
        if vision_layers is None:
            vision_layers = tuple(range(1, cfg.vision_layers))
        cross_layers = trim.cross_token_layers if trim.cross_token_layers is not None else tuple(
            range(cfg.cross_layers))
        for name, layers, depth in (("vision_token_layers", vision_layers, cfg.vision_layers),
                                    ("cross_token_layers", cross_layers, cfg.cross_layers)):
            bad = [i for i in layers if i >= depth]
            if bad:
                raise ValueError(f"{name}={layers!r}: layers {bad} do not exist (the encoder has {depth})")

        def dim(width: int) -> int:
            return trim.trimmer_dim or max(8, width // 4)

        def token(width: int, other: int) -> nn.Module:
            if trim.token_trimmer == "random":
                return RandomTokenTrimmer()
            return TokenTrimmer(width, width, other, dim(width), trim.token_trimmer, init)

        h, vw, th = cfg.hidden_size, cfg.vision_width, cfg.text_hidden
        trim_vision, trim_text, trim_heads = (trim.token_target_vision < 1, trim.token_target_text < 1,
                                              trim.head_target < 1)
        self.vision_tokens = nn.ModuleDict({str(i): token(vw, th) for i in vision_layers if trim_vision})
        self.image_tokens = nn.ModuleDict({str(i): token(h, h) for i in cross_layers if trim_vision})
        self.text_tokens = nn.ModuleDict({str(i): token(h, h) for i in cross_layers if trim_text})
        vision_heads = trim_heads and trim.vision_head_trim
        self.vision_heads = nn.ModuleDict({str(i): HeadTrimmer(vw, cfg.vision_heads, dim(vw), init)
                                           for i in range(cfg.vision_layers) if vision_heads})
        cross_heads = range(cfg.cross_layers) if trim_heads and trim.cross_head_trim else ()
        for stream in ("text", "image"):
            self.add_module(f"{stream}_msa_heads", nn.ModuleDict(
                {str(i): HeadTrimmer(h, cfg.cross_heads, dim(h), init) for i in cross_heads}))
            self.add_module(f"{stream}_mca_heads", nn.ModuleDict(
                {str(i): HeadTrimmer(2 * h, cfg.cross_heads, dim(h), init) for i in cross_heads}))

    def get(self, placement: str, layer: int) -> nn.Module | None:
        table: nn.ModuleDict = getattr(self, placement)
        return table[str(layer)] if str(layer) in table else None  # noqa: SIM401 (ModuleDict has no .get)

    def fused_guides(self, layer: int) -> FusedGuides | None:
        """Co-attention layer ``layer``'s guide networks as one ``FusedGuides`` (built once per weight version;
        call without gradients), None when it has fewer than two that fuse."""
        cache: dict[int, FusedGuides | None] = self.__dict__.setdefault("_fused", {})
        if layer in cache:
            fused = cache[layer]
            if fused is None or not fused.stale:
                return fused
        placements = (("text_tokens", "ab"), ("image_tokens", "ba"), ("text_msa_heads", "a"),
                      ("text_mca_heads", "ab"), ("image_msa_heads", "b"), ("image_mca_heads", "ba"))
        members = [(p, m, reads) for p, reads in placements if fusable(m := self.get(p, layer))]
        if len(members) < 2:
            cache[layer] = None
            return None
        _, first, reads = members[0]
        linear = first.mlp[0] if isinstance(first, HeadTrimmer) else first.global_mlp[0]
        width = linear.in_features // len(reads)  # the width of one [CLS] feature
        with torch.no_grad():
            cache[layer] = FusedGuides(members, width)
        return cache[layer]

    def set_random_rates(self, gamma: dict[str, float]) -> None:
        """Random token trimmers keep each token with r such that their chain's mean keep ratio is γ."""
        vision = [*self.vision_tokens.values(), *self.image_tokens.values()]
        for chain, group in ((vision, "vision_tokens"), (list(self.text_tokens.values()), "text_tokens")):
            rate = random_rate(gamma[group], len(chain))
            for trimmer in chain:
                if isinstance(trimmer, RandomTokenTrimmer):
                    trimmer.rate = rate


@dataclass
class SmartTrimOutput:
    """What ``SmartTrimModel.forward`` returns (B = instances; NLVR2 runs 2B image-text passes, retrieval groups
    of K texts per image B x K)."""

    logits: Tensor
    """(B, num_labels); retrieval: (B, K) ``rank_output`` scores of each image with each of its K texts (K = 1 for
    (B, T) input_ids: one pair per row)."""
    loss: Tensor | None = None
    """With labels: eq. 12's total loss in training, the task loss in evaluation."""
    loss_parts: dict[str, Tensor] = field(default_factory=dict)
    """``task``; in training also ``cost`` and, with self-distillation, ``sd`` = ``sd_task`` + ``sd_kl``."""
    keep: dict[str, Tensor] = field(default_factory=dict)
    """Trimmed module name -> (B,) fraction of its trimmable tokens (cumulative) or heads kept (NLVR2 / retrieval
    groups: the mean over the instance's image-text passes)."""
    keep_groups: dict[str, Tensor] = field(default_factory=dict)
    """Group (``vision_tokens``, ``text_tokens``, ``heads``) -> (B,) mean of its modules' ``keep``."""
    sizes: dict[str, Tensor] = field(default_factory=dict)
    """Trimmed module name -> (B,) tokens alive after it (prefix included) or heads kept."""
    text_hidden: Tensor | None = None
    """(B', Nt, h) final text-stream states (B' = B image-text passes; NLVR2 2B, retrieval groups B x K); rows of
    pruned tokens are meaningless (see ``text_keep``)."""
    text_keep: Tensor | None = None
    """(B', Nt) 0/1: which rows of ``text_hidden`` are kept tokens."""
    image_hidden: Tensor | None = None
    """(B', Ni, h) final image-stream states."""
    image_keep: Tensor | None = None
    """(B', Ni) 0/1."""
    image_positions: Tensor | None = None
    """(B', Ni) long: each row of ``image_hidden``'s position in the visual input (0 = [I_CLS], 1 + k = patch k in
    raster order); with ``image_keep``, which patches survived every visual token trimmer (what the image
    stream's last trimmer kept). Rows where ``image_keep`` is 0 (packing padding) hold no position."""
    text_positions: Tensor | None = None
    """(B', Nt) long: each row of ``text_hidden``'s position in the input text."""


@dataclass
class _Run:
    """Per-forward trimming context: how to decide, how to apply, and what was decided.

    ``records``: trimmed module name -> (group, kept count, denominator), each (B',) or, for a batch of one
    on the pruning path, a plain number (no tensor work on the hot path); ``SmartTrimModel._summarize``
    turns them into the output's keep ratios."""

    trimmers: TrimmerSet | None
    sample: bool
    prune: bool
    tau: float
    records: dict[str, tuple[str, Tensor | int, Tensor | int]] = field(default_factory=dict)

    def guides(self, layer: int, c_t: Tensor, c_i: Tensor) -> tuple[dict[str, Tensor], dict[str, list[bool]]]:
        """Inference: co-attention layer ``layer``'s guide networks computed at once (``TrimmerSet.fused_guides``);
        empty when not fused (training, the masking path, or nothing to fuse)."""
        if self.trimmers is None or not self.prune or self.sample or torch.is_grad_enabled():
            return {}, {}
        fused = self.trimmers.fused_guides(layer)
        return ({}, {}) if fused is None else fused(c_t, c_i)

    def tokens(self, stream: Stream, placement: str, layer: int, c_self: Tensor, c_other: Tensor, name: str,
               group: str, query: Tensor | None = None) -> Stream:
        trimmer = None if self.trimmers is None else self.trimmers.get(placement, layer)
        if trimmer is None:
            return stream
        scores = (trimmer(stream.x, c_self, c_other) if query is None  # (B, N)
                  else trimmer(stream.x, c_self, c_other, query))  # its global term computed by ``guides``
        if self.prune and not self.sample and stream.dense and scores.shape[0] == 1:
            stream = stream.select(scores[0] > 0)  # the hot path of single-instance inference
            self.records[name] = (group, stream.x.shape[1], stream.n0)
            return stream
        stream = stream.apply(decide(scores, self.tau, self.sample), self.prune)
        self.records[name] = (group, stream.keep.sum(1), stream.n0)  # the prefix counts in ``kept``, not ``n0``
        return stream

    def heads(self, placement: str, layer: int, guide: Tensor | tuple[Tensor, Tensor], name: str,
              scores: Tensor | None = None, flags: list[bool] | None = None) -> Heads | None:
        """``guide``: the trimmer's input ([CLS] features, concatenated when a tuple); ``scores`` / ``flags``: its
        output and host-side decisions when already computed (``guides``)."""
        trimmer = None if self.trimmers is None else self.trimmers.get(placement, layer)
        if trimmer is None:
            return None
        if scores is None:
            scores = trimmer(guide if isinstance(guide, Tensor) else torch.cat(guide, -1))  # (B, H)
        num_heads = scores.shape[1]
        if self.prune and not self.sample and scores.shape[0] == 1:  # single-instance inference: host decisions
            heads = Heads.from_flags(flags if flags is not None else (scores[0] > 0).tolist(), scores.device)
            self.records[name] = ("heads", num_heads if heads.key is None else len(heads.key), num_heads)
            return heads
        decision = decide(scores, self.tau, self.sample)
        self.records[name] = ("heads", decision.sum(1), num_heads)
        return Heads.from_decision(decision, self.prune)


def packs(run: _Run) -> bool:
    """Whether layers whose instances keep different numbers of tokens run on the packed kept tokens
    (``smarttrim.packed``): inference on the pruning path, fast paths on (``layers.reference_path`` turns them off)."""
    return run.prune and fast_paths() and not torch.is_grad_enabled()


class SmartTrimModel(nn.Module):
    """METER + SmartTrim. ``trim=None`` is the plain backbone (same backbone parameter names)."""

    def __init__(self, config: ModelConfig, trim: TrimConfig | None = None) -> None:
        super().__init__()
        self.config = config
        self.trim_config = trim
        self.backbone = METERBackbone(config)
        self.head = build_head(config)
        self.head.apply(_meter_init)
        # METER's IRTR score (``rank_output``): one logit per image-text pair on the pooled features, started from
        # the ITM head's match row; trained by the rank loss (the ITM head gets no gradient from it)
        self.rank_output: nn.Module = nn.Linear(2 * config.hidden_size, 1) if config.task == "retrieval" \
            else nn.Identity()
        self.reset_rank_output()
        self.trimmers = TrimmerSet(config, trim) if trim is not None else None
        self.progress = 0.0

    # ------------------------------------------------------------------ public API
    def set_progress(self, progress: float) -> None:
        """Training progress in [0, 1]; drives the curriculum scheduler of the cost loss targets γ."""
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress={progress!r}: must be in [0, 1]")
        self.progress = float(progress)

    def reset_rank_output(self) -> None:
        """Retrieval: set ``rank_output`` to METER's initialization from the ITM head (``rank_from_itm``), as METER
        starts IRTR fine-tuning from an ITM-pre-trained model; other tasks have no ``rank_output``."""
        if isinstance(self.rank_output, nn.Linear):
            weight, bias = rank_from_itm(self.head[0].weight, self.head[0].bias)
            with torch.no_grad():
                self.rank_output.weight.copy_(weight)
                self.rank_output.bias.copy_(bias)

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        """Save to a directory: ``model.safetensors`` + ``config.json`` (see ``smarttrim.io``)."""
        from smarttrim.io import save_pretrained

        save_pretrained(self, path)

    def backbone_state_dict(self) -> dict[str, Tensor]:
        """Backbone + head weights (no trimmers): loads into this model with or without trimming."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("trimmers.")}

    def load_backbone_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load backbone (+ head) weights; only trimmer parameters may be missing."""
        result = self.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("trimmers.")]
        if missing or result.unexpected_keys:
            raise ValueError(f"backbone state dict mismatch: missing {missing[:20]}, "
                             f"unexpected {list(result.unexpected_keys)[:20]}")

    def dummy_batch(self, batch_size: int = 2, seed: int = 0, with_labels: bool = True,
                    false_texts: int = 2) -> dict[str, Tensor]:
        """Valid random inputs (and labels) for this model's config and task. Retrieval with labels: groups of
        1 + ``false_texts`` texts per image (``input_ids`` (B, K, T), the true text first, labels 0); without
        labels one text per image (B, T)."""
        cfg = self.config
        if cfg.task == "retrieval" and with_labels:
            k = 1 + false_texts
            texts = self.dummy_batch(batch_size * k, seed, with_labels=False)
            pixels = self.dummy_batch(batch_size, seed + 1, with_labels=False)["pixel_values"]
            return {"pixel_values": pixels, "input_ids": texts["input_ids"].view(batch_size, k, -1),  # (B, K, T)
                    "attention_mask": texts["attention_mask"].view(batch_size, k, -1),
                    "labels": torch.zeros(batch_size, dtype=torch.long)}
        g = torch.Generator().manual_seed(seed)
        images = (batch_size, 2) if cfg.task == "nlvr2" else (batch_size,)
        pixel_values = torch.randn(*images, 3, cfg.image_size, cfg.image_size, generator=g)
        lengths = torch.randint(3, cfg.max_text_len + 1, (batch_size,), generator=g)
        lengths[0] = cfg.max_text_len  # the longest fixes the padded width
        input_ids = torch.full((batch_size, cfg.max_text_len), cfg.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(batch_size, cfg.max_text_len, dtype=torch.long)
        low = max(cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) + 1
        for b, n in enumerate(lengths.tolist()):
            input_ids[b, :n] = torch.randint(low, cfg.vocab_size, (n,), generator=g)
            input_ids[b, 0], input_ids[b, n - 1] = cfg.bos_token_id, cfg.eos_token_id
            attention_mask[b, :n] = 1
        batch = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}
        if with_labels:
            if cfg.task == "vqa":  # soft VQA scores: min(1, 0.3 * #annotators who gave the answer)
                counts = torch.randint(0, 4, (batch_size, cfg.num_labels), generator=g)
                counts *= torch.rand(batch_size, cfg.num_labels, generator=g) < 3.0 / cfg.num_labels
                batch["labels"] = torch.clamp(0.3 * counts.float(), max=1.0)
            else:
                batch["labels"] = torch.randint(0, cfg.num_labels, (batch_size,), generator=g)
        return batch

    def text_features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, h) uni-modal text feature: the text [CLS] after ``cross_modal_text_transform``, i.e. the text
        stream's input to the co-attention layers without the (constant) token-type embedding. The text
        encoder is never trimmed. Runs in the current train/eval mode."""
        text = roberta_forward(self.backbone.text, input_ids, attention_mask)
        return self.backbone.cross_modal_text_transform(text[:, 0])

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """(B, h) uni-modal image feature of (B, 3, H, W) images: the image [CLS] after
        ``cross_modal_image_transform`` (without the token-type embedding), from the *untrimmed* visual
        encoder: its token trimmers are guided by a text, which a uni-modal feature has none of. Equals the
        co-attention input of ``forward`` when nothing is trimmed. Runs in the current train/eval mode."""
        no_guide = pixel_values.new_zeros(pixel_values.shape[0], self.config.text_hidden)  # read by no trimmer
        image = self._encode_image(pixel_values, no_guide, _Run(None, sample=False, prune=False, tau=1.0))
        return self.backbone.cross_modal_image_transform(image.x[:, 0])

    def forward(self, batch: dict[str, Tensor], path: str | None = None) -> SmartTrimOutput:
        """Run the model on a batch dict (``pixel_values``, ``input_ids``, ``attention_mask``[, ``labels``]).

        Retrieval: ``input_ids`` / ``attention_mask`` are (B, T), one text per image, or (B, K, T), K texts per image
        (METER's IRTR training: the true text and K - 1 false ones): every image-text pair is one pass through the
        whole model (the visual encoder's trimmers read the text), its score ``rank_output`` of the pooled features;
        ``labels`` (B,) index each image's true text and the task loss is the softmax cross-entropy over its K
        scores (METER's ``compute_irtr``: the true text is class 0).

        path: ``"mask"`` (training path: fixed shapes, masks) or ``"prune"`` (inference path: tokens and
        heads removed). Default: mask in ``train()`` mode, prune in ``eval()`` mode. Decisions are sampled
        (eq. 8) in train mode and deterministic (σ(π) > 0.5) in eval mode, on either path.
        """
        if path is None:
            path = "mask" if self.training else "prune"
        if path not in ("mask", "prune"):
            raise ValueError(f"path={path!r}: must be 'mask' or 'prune'")
        pixel_values, input_ids, attention_mask, labels = self._check_batch(batch)
        cfg, trim = self.config, self.trim_config
        batch_size = input_ids.shape[0]
        passes = 2 if cfg.task == "nlvr2" else 1  # image-text passes per instance
        if input_ids.dim() == 3:  # retrieval groups: every image with each of its K texts
            passes = input_ids.shape[1]
            input_ids, attention_mask = input_ids.flatten(0, 1), attention_mask.flatten(0, 1)  # (B x K, T)
            pixel_values = pixel_values.repeat_interleave(passes, 0)  # (B x K, 3, H, W)
        gamma = trim.gamma(self.progress if self.training else 1.0) if trim is not None else {}
        if self.trimmers is not None and trim is not None and trim.token_trimmer == "random":
            self.trimmers.set_random_rates(gamma)

        text = roberta_forward(self.backbone.text, input_ids, attention_mask)
        if cfg.task == "nlvr2":  # two image-text passes per instance, image token types 1 and 2
            pixel_values = pixel_values.flatten(0, 1)  # (2B, 3, H, W)
            text, attention_mask = text.repeat_interleave(2, 0), attention_mask.repeat_interleave(2, 0)
            image_type = torch.arange(2 * batch_size, device=text.device) % 2 + 1
        else:
            image_type = torch.ones(batch_size * passes, dtype=torch.long, device=text.device)

        tau = trim.tau if trim is not None else 1.0
        run = _Run(self.trimmers, sample=self.training, prune=path == "prune", tau=tau)
        pooled, t, i = self._fuse(pixel_values, text, attention_mask, image_type, run)
        logits = self._logits(pooled, batch_size)
        out = SmartTrimOutput(logits=logits, text_hidden=t.x, text_keep=t.keep, image_hidden=i.x,
                              image_keep=i.keep, image_positions=i.positions(), text_positions=t.positions())
        self._summarize(run, batch_size, passes, out)
        if labels is None:
            return out

        parts = {"task": task_loss(cfg.task, logits, labels)}
        loss = parts["task"]
        if self.training and self.trimmers is not None and trim is not None:
            if out.keep_groups:
                parts["cost"] = cost_loss(out.keep_groups, gamma)
                loss = loss + trim.lambda_cost * parts["cost"]
            if trim.self_distill:  # eq. 11: full-capacity forward f(x, ∅) on the same inputs
                full = _Run(None, sample=False, prune=False, tau=tau)
                full_logits = self._logits(self._fuse(pixel_values, text, attention_mask, image_type, full)[0],
                                           batch_size)
                parts["sd_task"] = task_loss(cfg.task, full_logits, labels)
                parts["sd_kl"] = distill_kl(cfg.task, logits, full_logits)
                parts["sd"] = parts["sd_task"] + parts["sd_kl"]
                loss = loss + trim.lambda_sd * parts["sd"]
        out.loss, out.loss_parts = loss, parts
        return out

    # ------------------------------------------------------------------ internals
    def _logits(self, pooled: Tensor, batch_size: int) -> Tensor:
        """Task logits from the (B', 2h) pooled features of the B' image-text passes: retrieval (B, K) pair scores,
        NLVR2 the head on each instance's two passes side by side (B, 2 x 2h), else (B, num_labels)."""
        if self.config.task == "retrieval":
            return self.rank_output(pooled).view(batch_size, -1)
        return self.head(pooled.view(batch_size, -1))

    def _check_batch(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        cfg = self.config
        for key in ("pixel_values", "input_ids", "attention_mask"):
            if key not in batch:
                raise KeyError(f"batch is missing {key!r} (has {sorted(batch)})")
        pv, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
        image = (3, cfg.image_size, cfg.image_size)
        want = (ids.shape[0], 2, *image) if cfg.task == "nlvr2" else (ids.shape[0], *image)
        if tuple(pv.shape) != want:
            raise ValueError(f"batch['pixel_values'] has shape {tuple(pv.shape)}, expected {want} "
                             f"(task {cfg.task!r}, image_size {cfg.image_size})")
        dims = (2, 3) if cfg.task == "retrieval" else (2,)
        if ids.dim() not in dims or mask.shape != ids.shape:
            shapes = "(B, T) or, retrieval groups, (B, K, T)" if cfg.task == "retrieval" else "(B, T)"
            raise ValueError(f"batch['input_ids'] {tuple(ids.shape)} and batch['attention_mask'] "
                             f"{tuple(mask.shape)} must both be {shapes}")
        if ids.shape[-1] > cfg.text_max_positions - cfg.pad_token_id - 1:
            raise ValueError(f"batch['input_ids'] has {ids.shape[-1]} tokens; the text encoder takes at most "
                             f"{cfg.text_max_positions - cfg.pad_token_id - 1}")
        if not bool(mask[..., 0].all()):
            raise ValueError("batch['attention_mask'][..., 0] must be 1: the first token is the [CLS] prefix")
        labels = batch.get("labels")
        if labels is not None and cfg.task == "retrieval" and ids.dim() == 2:
            raise ValueError("batch['labels'] of a retrieval batch index each image's true text among its K texts: "
                             f"input_ids must be (B, K, T) groups, got {tuple(ids.shape)}")
        if labels is not None:
            want_labels = (ids.shape[0], cfg.num_labels) if cfg.task == "vqa" else (ids.shape[0],)
            if tuple(labels.shape) != want_labels:
                raise ValueError(f"batch['labels'] has shape {tuple(labels.shape)}, expected {want_labels} "
                                 f"for task {cfg.task!r}")
        return pv, ids, mask, labels

    def _encode_image(self, pixel_values: Tensor, text_cls: Tensor, run: _Run) -> Stream:
        """Visual encoder with token trimmers guided by the text [CLS]. -> Stream after the final norm."""
        vit = self.backbone.vision
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(pixel_values))))  # (B, 1+P, Dv)
        b, n = x.shape[:2]
        s = Stream(x, keep=x.new_ones(b, n), n0=n - 1, dense=True)  # every patch is a real token
        for layer, block in enumerate(vit.blocks):
            s = run.tokens(s, "vision_tokens", layer, s.x[:, 0], text_cls, f"vision.{layer}.tokens",
                           "vision_tokens")
            heads = run.heads("vision_heads", layer, s.x[:, 0], f"vision.{layer}.heads")
            keys = s.key_mask()
            if keys is not None and packs(run):  # instances kept different numbers of tokens
                s = s.with_x(vit_block_packed(block, s.x, keys, heads))
            else:
                s = s.with_x(vit_block_forward(block, s.x, keys, heads))
        return s.with_x(vit.norm(s.x))

    def _fuse(self, pixel_values: Tensor, text: Tensor, text_mask: Tensor, image_type: Tensor,
              run: _Run) -> tuple[Tensor, Stream, Stream]:
        """Visual encoder + co-attention layers + poolers -> ((B', 2h) pooled features, text, image)."""
        return self._cross(self._encode_image(pixel_values, text[:, 0], run), text, text_mask, image_type, run)

    def _cross(self, image: Stream, text: Tensor, text_mask: Tensor, image_type: Tensor,
               run: _Run) -> tuple[Tensor, Stream, Stream]:
        """Co-attention layers + poolers on an encoded image stream and encoded texts (B', T, Dt) ->
        ((B', 2h) pooled features, text stream, image stream). Pre-training reuses one image encoding for
        several texts through this (no trimmer reads the text in the visual encoder there)."""
        bb = self.backbone
        keep_t = text_mask.to(text.dtype)
        unpadded = bool(text_mask.all())
        n0 = text.shape[1] - 1 if unpadded else keep_t.sum(1) - 1  # trimmable text tokens
        t = Stream(bb.cross_modal_text_transform(text) + bb.token_type_embeddings.weight[0], keep=keep_t, n0=n0,
                   dense=unpadded)
        i = image.with_x(bb.cross_modal_image_transform(image.x) + bb.token_type_embeddings(image_type)[:, None])
        for layer, (text_layer, image_layer) in enumerate(zip(bb.cross_modal_text_layers,
                                                              bb.cross_modal_image_layers, strict=True)):
            c_t, c_i = t.x[:, 0], i.x[:, 0]  # previous-layer [CLS] of each stream
            g, f = run.guides(layer, c_t, c_i)  # inference: every guide network of the layer at once
            t = run.tokens(t, "text_tokens", layer, c_t, c_i, f"cross.text.{layer}.tokens", "text_tokens",
                           g.get("text_tokens"))
            i = run.tokens(i, "image_tokens", layer, c_i, c_t, f"cross.image.{layer}.tokens", "vision_tokens",
                           g.get("image_tokens"))
            t_msa = run.heads("text_msa_heads", layer, c_t, f"cross.text.{layer}.msa_heads",
                              g.get("text_msa_heads"), f.get("text_msa_heads"))
            t_mca = run.heads("text_mca_heads", layer, (c_t, c_i), f"cross.text.{layer}.mca_heads",
                              g.get("text_mca_heads"), f.get("text_mca_heads"))
            i_msa = run.heads("image_msa_heads", layer, c_i, f"cross.image.{layer}.msa_heads",
                              g.get("image_msa_heads"), f.get("image_msa_heads"))
            i_mca = run.heads("image_mca_heads", layer, (c_i, c_t), f"cross.image.{layer}.mca_heads",
                              g.get("image_mca_heads"), f.get("image_mca_heads"))
            t_keys, i_keys = t.key_mask(), i.key_mask()
            packed = packs(run)
            if packed and t_keys is not None:  # the text stream's instances keep different numbers of tokens
                x_t = cross_layer_packed(text_layer, t.x, i.x, t_keys, i_keys, t_msa, t_mca)
            else:
                x_t = text_layer(t.x, i.x, t_keys, i_keys, t_msa, t_mca)
            if packed and i_keys is not None:
                x_i = cross_layer_packed(image_layer, i.x, t.x, i_keys, t_keys, i_msa, i_mca)
            else:
                x_i = image_layer(i.x, t.x, i_keys, t_keys, i_msa, i_mca)
            t, i = t.with_x(x_t), i.with_x(x_i)
        pooled = torch.cat([bb.cross_modal_text_pooler(t.x), bb.cross_modal_image_pooler(i.x)], dim=-1)
        return pooled, t, i

    def _summarize(self, run: _Run, batch_size: int, passes: int, out: SmartTrimOutput) -> None:
        """Per-module and per-group keep ratios per instance (the mean of its ``passes`` image-text passes: NLVR2's
        two, a retrieval group's K), for every module at once: token modules count their trimmable tokens (the
        prefix excluded), head modules their heads."""
        out.keep, out.sizes, out.keep_groups = {}, {}, {}
        if not run.records:
            return
        names = list(run.records)
        rows = batch_size * passes
        groups = [run.records[n][0] for n in names]
        if not any(isinstance(v, Tensor) for n in names for v in run.records[n][1:]):  # plain numbers: one op
            recs = [run.records[n] for n in names]
            frac = [(kept - (g != "heads")) / max(den, 1) for g, kept, den in recs]  # type: ignore[operator]
            order = list(dict.fromkeys(groups))
            means = [sum(f for f, g in zip(frac, groups, strict=True) if g == group) / groups.count(group)
                     for group in order]
            sizes = [float(kept) for _, kept, _ in recs]
            values = torch.tensor([*frac, *sizes, *means], dtype=torch.float32)[:, None].expand(-1, batch_size)
            rows_out, r = values.unbind(0), len(names)
            out.keep = dict(zip(names, rows_out[:r], strict=True))
            out.sizes = dict(zip(names, rows_out[r:2 * r], strict=True))
            out.keep_groups = dict(zip(order, rows_out[2 * r:], strict=True))
            return
        kept = _stack_rows([run.records[n][1] for n in names], rows)  # (R, B')
        denominator = _stack_rows([run.records[n][2] for n in names], rows)
        prefix = torch.tensor([0.0 if g == "heads" else 1.0 for g in groups], device=kept.device)[:, None]
        fraction = ((kept - prefix) / denominator.clamp(min=1)).view(len(names), batch_size, -1).mean(2)  # (R, B)
        sizes = kept.view(len(names), batch_size, -1).mean(2)
        for i, name in enumerate(names):
            out.keep[name], out.sizes[name] = fraction[i], sizes[i]
        for group in dict.fromkeys(groups):
            index = [i for i, g in enumerate(groups) if g == group]
            out.keep_groups[group] = fraction[index].mean(0)


def _stack_rows(values: list[Tensor | int], width: int) -> Tensor:
    """(R, width) float rows from (width,) tensors and plain numbers (broadcast); one op when all are numbers."""
    if not any(isinstance(v, Tensor) for v in values):
        return torch.tensor(values, dtype=torch.float32)[:, None].expand(-1, width)
    device = next(v.device for v in values if isinstance(v, Tensor))
    return torch.stack([v.float().reshape(-1).expand(width) if isinstance(v, Tensor)  # 0-d: a traced size
                        else torch.full((width,), float(v), device=device) for v in values])


def build_model(preset: str | ModelConfig = "meter-tiny", task: str = "vqa", num_labels: int | None = None,
                trim: TrimConfig | None = None, **overrides: object) -> SmartTrimModel:
    """Build a randomly initialized model from a preset (``meter-base``, ``meter-tiny``) or a ModelConfig.

    ``overrides`` replace preset fields (e.g. ``dropout=0.0``, ``image_size=384``).
    """
    if isinstance(preset, ModelConfig):
        cfg = dataclasses.replace(preset, **overrides) if overrides else preset
    else:
        cfg = model_config(preset, task=task, num_labels=num_labels, **overrides)
    return SmartTrimModel(cfg, trim)


__all__ = ["GROUPS", "METERBackbone", "SmartTrimModel", "SmartTrimOutput", "TrimmerSet", "build_model",
           "rank_from_itm"]
