"""METER's pre-training objectives on image-caption pairs: masked language modelling (MLM) and image-text
matching (ITM) with hard negatives, for a backbone that is then fine-tuned (with or without SmartTrim).

* ``MLMHead``: METER's ``MLMHead`` (dense -> GELU -> LayerNorm -> decoder to the vocabulary + bias), applied to
  the cross-modal text stream's final states, so a masked word is predicted from the text *and* the image.
* ITM: the retrieval model's own ITM head (METER's ``itm_score``) on the pooled [text; image] features; half of
  the pairs are negatives whose caption is a *hard* one: the caption of another image of the batch that shares
  the most words with the true caption (``loader.Collate``, objective ``pretrain``), so matching cannot be
  decided from a few salient words and has to bind attributes to objects.
* Supervised visual pre-training (``ObjectHead``, weight ``vision_weight``; 0 = METER's objectives only): what
  the image shows, from the visual encoder alone: a per-token linear layer, max over the patch tokens, binary
  cross-entropy against the scene's ``object_labels`` (colour-shape and size-shape pairs; the built-in world's
  ``meta["scene"]``, which the ``pretrain`` collate turns into ``batch["object_labels"]``). METER starts its
  visual encoder from CLIP, which already sees (METER also tries ImageNet-supervised ViTs); the miniature has no
  CLIP, and the gradient that MLM and ITM send through the co-attention layers does not teach its ViT shapes
  (meter-small, ``bench/perception.py``: the ViT of 4000 MLM + ITM steps separates shapes no better than an
  untrained one, 0.48 against 0.45; MLM + ITM with the ``conv_context`` stem show no grounding after 800 steps,
  and a caption-words objective none after 600). This term is the stand-in for that visual pre-training:
  with it, the shipped start (2000 steps with MLM + ITM) reads the shape of one-object images at 0.96.
* ``PretrainModel``: the backbone (a ``SmartTrimModel`` with the retrieval task's ITM head, no trimmers) plus
  the MLM head (and the object head). One step encodes each image once and runs the co-attention layers twice
  (the ITM texts and the masked captions), as two METER forwards would compute. Loss = MLM + ITM (METER's equal
  weights) + ``vision_weight`` x objects.
* Export (``save_pretrain``): a model directory ``load_model`` reads (a working ITM / retrieval model) plus
  ``mlm_head.safetensors``; ``smarttrim.checkpoints.load_pretrained`` starts any task's model from it, as
  from an official METER pre-training checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from smarttrim.atomic import atomic_write
from smarttrim.config import ModelConfig
from smarttrim.data.shapes import OBJECT_LABELS
from smarttrim.io import save_pretrained
from smarttrim.layers import roberta_forward
from smarttrim.model import SmartTrimModel, _meter_init, _Run

MLM_HEAD_FILE = "mlm_head.safetensors"
IGNORE = -100
"""Label of a text position that is not predicted (not masked, or padding)."""


class MLMHead(nn.Module):
    """METER's MLM head: transform (dense, GELU, LayerNorm) then a decoder to the vocabulary plus a bias."""

    def __init__(self, hidden: int, vocab_size: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.decoder = nn.Linear(hidden, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self.apply(_meter_init)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, h) text-stream states -> (B, T, V) vocabulary logits."""
        return self.decoder(self.LayerNorm(F.gelu(self.dense(x)))) + self.bias


class ObjectHead(nn.Module):
    """What an image shows, from its visual tokens: a per-token linear layer to the labels, max over the patch
    tokens (a label is present if some region shows it: multiple-instance pooling)."""

    def __init__(self, width: int, num_labels: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, num_labels)
        self.apply(_meter_init)

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, 1 + N, D) visual encoder tokens ([CLS] first) -> (B, L) label logits."""
        return self.proj(tokens[:, 1:]).amax(1)


@dataclass
class PretrainOutput:
    """What ``PretrainModel.forward`` returns (the training loop reads ``loss``, ``loss_parts``, ``keep_groups``)."""

    loss: Tensor
    loss_parts: dict[str, Tensor]
    itm_logits: Tensor
    """(B, 2): no match / match."""
    mlm_logits: Tensor
    """(B, T, V) over the masked captions."""
    keep_groups: dict[str, Tensor] = field(default_factory=dict)
    """Always empty: pre-training trims nothing."""


class PretrainModel(nn.Module):
    """A METER backbone with its ITM head (``vlm``, task ``retrieval``) and an MLM head, trained on both objectives."""

    def __init__(self, config: ModelConfig, vision_weight: float = 0.0) -> None:
        super().__init__()
        if config.task != "retrieval":
            raise ValueError(f"task={config.task!r}: pre-training builds the retrieval (ITM) model")
        if not vision_weight >= 0.0:
            raise ValueError(f"vision_weight={vision_weight!r}: must be >= 0")
        self.vlm = SmartTrimModel(config, None)
        self.mlm_head = MLMHead(config.hidden_size, config.vocab_size, config.layer_norm_eps)
        self.vision_weight = float(vision_weight)
        self.object_head = ObjectHead(config.vision_width, len(OBJECT_LABELS)) if vision_weight > 0 else None

    # what the training loop expects of a model
    @property
    def config(self) -> ModelConfig:
        return self.vlm.config

    @property
    def trim_config(self) -> None:
        return None

    def set_progress(self, progress: float) -> None:
        """No curriculum in pre-training (the loop calls it for every model)."""

    def forward(self, batch: dict[str, Tensor]) -> PretrainOutput:
        """``batch`` from the ``pretrain`` collate: ``pixel_values``; ``input_ids`` / ``attention_mask`` / ``labels``
        (ITM pairs, label 1 = match); ``mlm_input_ids`` / ``mlm_attention_mask`` / ``mlm_labels`` (the true
        captions with masked tokens, labels ``IGNORE`` where nothing is predicted)."""
        vlm = self.vlm
        run = _Run(None, sample=False, prune=False, tau=1.0)
        pixels = batch["pixel_values"]
        b = pixels.shape[0]
        image = vlm._encode_image(pixels, pixels.new_zeros(b, vlm.config.text_hidden), run)  # once, no guide
        image_type = torch.ones(b, dtype=torch.long, device=pixels.device)
        outputs = []
        for ids, mask in ((batch["input_ids"], batch["attention_mask"]),
                          (batch["mlm_input_ids"], batch["mlm_attention_mask"])):
            text = roberta_forward(vlm.backbone.text, ids, mask)
            outputs.append(vlm._cross(image, text, mask, image_type, run))
        itm_logits = vlm.head(outputs[0][0])  # (B, 2)
        mlm_logits = self.mlm_head(outputs[1][1].x)  # (B, T, V)
        itm = F.cross_entropy(itm_logits, batch["labels"])
        mlm = F.cross_entropy(mlm_logits.flatten(0, 1), batch["mlm_labels"].flatten(), ignore_index=IGNORE)
        loss, parts = itm + mlm, {"itm": itm.detach(), "mlm": mlm.detach()}
        if self.object_head is not None:
            if "object_labels" not in batch:
                raise ValueError(f"batch of {batch.get('keys', ['?'])[0]}...: no 'object_labels' (the scene "
                                 "description of the built-in shapes data); vision_weight > 0 needs them")
            logits = self.object_head(image.x).float()
            objects = F.binary_cross_entropy_with_logits(logits, batch["object_labels"].to(logits))
            loss, parts["objects"] = loss + self.vision_weight * objects, objects.detach()
        return PretrainOutput(loss=loss, loss_parts=parts, itm_logits=itm_logits, mlm_logits=mlm_logits)


def pretrain_accuracy(out: PretrainOutput, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Sums over a batch (for exact means over a split): ITM pairs right, masked tokens predicted right, and
    their counts (keys ``itm_correct``, ``itm_pairs``, ``mlm_correct``, ``mlm_tokens``)."""
    labels = batch["mlm_labels"].to(out.mlm_logits.device)
    predicted = labels != IGNORE
    return {"itm_correct": (out.itm_logits.argmax(-1) == batch["labels"].to(out.itm_logits.device)).sum(),
            "itm_pairs": torch.tensor(len(batch["labels"])),
            "mlm_correct": ((out.mlm_logits.argmax(-1) == labels) & predicted).sum(),
            "mlm_tokens": predicted.sum()}


def save_pretrain(model: PretrainModel, path: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> Path:
    """The backbone with its ITM head as a model directory (``save_pretrained``) plus ``mlm_head.safetensors``.

    Pre-training never trains the retrieval score ``rank_output``: it is set from the trained ITM head first
    (``SmartTrimModel.reset_rank_output``, METER's start of IRTR fine-tuning), so the export ranks as its ITM head."""
    model.vlm.reset_rank_output()
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.mlm_head.state_dict().items()}
    atomic_write(out / MLM_HEAD_FILE, lambda tmp: save_file(state, tmp, metadata={"format": "smarttrim-mlm-head"}))
    objectives = "mlm+itm+objects" if model.object_head is not None else "mlm+itm"
    return save_pretrained(model.vlm, out, extra={"pretraining": objectives, **(extra or {})})  # config.json last


__all__ = ["IGNORE", "MLM_HEAD_FILE", "MLMHead", "ObjectHead", "PretrainModel", "PretrainOutput", "pretrain_accuracy",
           "save_pretrain"]
