"""Loading external weights: Hugging Face CLIP vision / RoBERTa directories and official METER checkpoints.

Every checkpoint is written by the test itself (tiny sizes, no hub). METER checkpoints come from a mirror of
METER's own modules (their names, types and shapes), not from our parameter names.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaModel,
)

import smarttrim
from smarttrim.checkpoints import (
    convert_meter_checkpoint,
    load_clip_vision,
    load_meter_checkpoint,
    load_pretrained,
    load_roberta,
)
from smarttrim.layers import roberta_forward
from smarttrim.model import SmartTrimModel, _Run

ATOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models run ~100x faster on one thread than on two busy shared cores (OpenMP barriers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(task: str = "vqa", trim: smarttrim.TrimConfig | None = None,
           **overrides: object) -> SmartTrimModel:
    num_labels = 5 if task == "vqa" else None
    return smarttrim.build_model("meter-tiny", task=task, num_labels=num_labels, trim=trim,
                                 **{"dropout": 0.0, **overrides})


def _perturb(module: nn.Module, seed: int) -> None:
    """Add noise to every parameter: zero biases / unit LayerNorms would hide a mis-mapped tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _bicubic(table: Tensor, old: int, new: int) -> Tensor:
    """(1, 1+old^2, D) -> (1, 1+new^2, D): METER's adapt_position_encoding, written out."""
    grid = table[0, 1:].reshape(old, old, -1).permute(2, 0, 1)[None]
    grid = F.interpolate(grid, size=(new, new), mode="bicubic")[0].permute(1, 2, 0).reshape(1, new * new, -1)
    return torch.cat([table[:, :1], grid], dim=1)


# ---------------------------------------------------------------------- CLIP vision
def _clip_config(**overrides: object) -> CLIPVisionConfig:
    """meter-tiny's visual encoder as a Hugging Face CLIP vision config."""
    sizes = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                 intermediate_size=256, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    return CLIPVisionConfig(**{**sizes, **overrides})


def _save_clip(path: Path, kind: str = "vision", **overrides: object) -> nn.Module:
    """A perturbed CLIPVisionModel (or CLIPModel) saved to ``path``; returns its vision tower (eval)."""
    if kind == "vision":
        hf: nn.Module = CLIPVisionModel(_clip_config(**overrides))
    else:
        text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                    vocab_size=100, bos_token_id=0, eos_token_id=2, pad_token_id=1)
        hf = CLIPModel(CLIPConfig(vision_config=_clip_config(**overrides).to_dict(), text_config=text,
                                  projection_dim=16))
    _perturb(hf, seed=1)
    hf.save_pretrained(path)
    return getattr(hf, "vision_model", hf).eval()


@pytest.mark.parametrize("kind", ["vision", "clip"])
def test_clip_vision_matches_hf(tmp_path: Path, kind: str) -> None:
    tower = _save_clip(tmp_path, kind)
    model = _model().eval()
    report = load_clip_vision(model, tmp_path)
    assert report.loaded == len(model.backbone.vision.state_dict())
    if kind == "clip":
        assert "visual_projection.weight" in report.dropped
        assert any(k.startswith("text_model.") for k in report.dropped)
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tower.post_layernorm(tower(pixel_values=px).last_hidden_state)
        ours = model.backbone.vision.forward_features(px)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def test_clip_vision_resamples_position_grid(tmp_path: Path) -> None:
    tower = _save_clip(tmp_path, image_size=48)  # grid 6x6 -> meter-tiny's 4x4
    model = _model()
    report = load_clip_vision(model, tmp_path)
    pos = model.backbone.vision.pos_embed
    assert pos.shape == (1, 17, 64)
    expected = _bicubic(tower.embeddings.position_embedding.weight[None].detach(), 6, 4)
    torch.testing.assert_close(pos.detach(), expected, atol=1e-6, rtol=0)
    assert any("6x6 -> 4x4" in note for note in report.notes)


def test_clip_vision_truncates_deeper_checkpoint_on_request(tmp_path: Path) -> None:
    tower = _save_clip(tmp_path, num_hidden_layers=4)
    model = _model().eval()
    with pytest.raises(ValueError, match=r"num_hidden_layers=4.*vision_layers.*truncate_layers"):
        load_clip_vision(model, tmp_path)
    report = load_clip_vision(model, tmp_path, truncate_layers=True)
    assert any(k.startswith("encoder.layers.3.") for k in report.dropped)
    px = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # METER's choice: the first 3 blocks, then the final LayerNorm
        ref = tower.post_layernorm(tower(pixel_values=px, output_hidden_states=True).hidden_states[3])
        ours = model.backbone.vision.forward_features(px)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def test_clip_vision_errors(tmp_path: Path) -> None:
    _save_clip(tmp_path / "narrow", hidden_size=32, intermediate_size=128)
    model = _model()
    expect = re.escape(str(tmp_path / "narrow")) + r".*hidden_size=32.*vision_width=64"
    with pytest.raises(ValueError, match=expect):
        load_clip_vision(model, tmp_path / "narrow")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "absent"))):
        load_clip_vision(model, tmp_path / "absent")


# ---------------------------------------------------------------------- RoBERTa
def _roberta_config(**overrides: object) -> RobertaConfig:
    """meter-tiny's text encoder (see ``smarttrim.model.build_text``)."""
    sizes = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128, max_position_embeddings=40, type_vocab_size=1, layer_norm_eps=1e-5,
                 pad_token_id=1, bos_token_id=0, eos_token_id=2)
    return RobertaConfig(**{**sizes, **overrides})


@pytest.mark.parametrize("kind", ["model", "masked_lm", "masked_lm_bin"])
def test_roberta_matches_hf(tmp_path: Path, kind: str) -> None:
    cls = RobertaModel if kind == "model" else RobertaForMaskedLM
    hf: nn.Module = cls(_roberta_config())
    _perturb(hf, seed=2)
    if kind == "masked_lm_bin":  # the older pytorch_model.bin format, keys with the roberta. prefix
        hf.config.save_pretrained(tmp_path)
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    else:
        hf.save_pretrained(tmp_path)
    model = _model().eval()
    report = load_roberta(model, tmp_path)
    assert any(k.startswith("pooler." if kind == "model" else "lm_head.") for k in report.dropped)
    batch = model.dummy_batch(2, seed=0)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    encoder = getattr(hf, "roberta", hf).eval()
    with torch.no_grad():
        ref = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = model.backbone.text(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=ATOL, rtol=0)


def test_roberta_errors(tmp_path: Path) -> None:
    RobertaModel(_roberta_config(vocab_size=600)).save_pretrained(tmp_path / "big")
    model = _model()
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "big")) + r".*vocab_size=600"):
        load_roberta(model, tmp_path / "big")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "absent"))):
        load_roberta(model, tmp_path / "absent")


# ---------------------------------------------------------------------- METER checkpoints
# The fixture is a mirror of METER's modules (``meter/modules/meter_module.py``, ``heads.py``, ``clip_model.py``,
# ``bert_model.py`` upstream): the same attribute names, types and shapes, so its ``state_dict()`` has exactly the
# keys of an official checkpoint, independently of our parameter names. Which modules a checkpoint holds follows
# ``METERTransformerSS.__init__`` for its ``loss_names``; widths differ per encoder so a transposed or misplaced
# tensor cannot load.
METER_SIZES: dict[str, object] = dict(vision_width=48, text_hidden=32, text_intermediate=64)
"""meter-tiny with three different widths: vision 48, text 32, cross-modal 64."""
METER_KINDS = ("pretrain", "vqa", "nlvr2", "snli_ve", "retrieval")
"""Official METER checkpoints: pre-training (mlm + itm), VQA, NLVR2, SNLI-VE, Flickr30K/COCO IRTR (itm + irtr)."""


class _Module(nn.Module):
    """A named bag of sub-modules and parameters: the attribute tree of one METER module."""

    def __init__(self, /, **children: nn.Module | nn.Parameter) -> None:
        super().__init__()
        for name, child in children.items():
            setattr(self, name, child)


class _QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def _meter_clip(cfg: smarttrim.ModelConfig) -> nn.Module:
    """``vit_model``: METER's ``clip_model.CLIP``, the visual transformer plus the CLIP text embeddings it keeps."""
    w, grid = cfg.vision_width, cfg.image_size // cfg.patch_size

    def block() -> nn.Module:
        mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(w, 4 * w), gelu=_QuickGELU(), c_proj=nn.Linear(4 * w, w)))
        return _Module(attn=nn.MultiheadAttention(w, cfg.vision_heads, batch_first=True), ln_1=nn.LayerNorm(w),
                       mlp=mlp, ln_2=nn.LayerNorm(w))

    visual = _Module(conv1=nn.Conv2d(3, w, cfg.patch_size, cfg.patch_size, bias=False),
                     class_embedding=nn.Parameter(torch.randn(w) * w ** -0.5),
                     positional_embedding=nn.Parameter(torch.randn(grid * grid + 1, w) * w ** -0.5),
                     ln_pre=nn.LayerNorm(w), transformer=_Module(resblocks=nn.Sequential(
                         *(block() for _ in range(cfg.vision_layers)))), ln_post=nn.LayerNorm(w))
    return _Module(visual=visual, token_embedding=nn.Embedding(100, 32), positional_embedding=nn.Parameter(
        torch.randn(77, 32)), ln_final=nn.LayerNorm(32))


def _meter_visual_forward(visual: nn.Module, pixels: Tensor) -> Tensor:
    """METER's ``VisualTransformer.forward``, written out: (B, 3, H, W) -> (B, 1 + P, w) after ``ln_post``."""
    x = visual.conv1(pixels).flatten(2).transpose(1, 2)  # (B, P, w)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], 1) + visual.positional_embedding
    x = visual.ln_pre(x)
    for block in visual.transformer.resblocks:
        y = block.ln_1(x)
        x = x + block.attn(y, y, y, need_weights=False)[0]
        x = x + block.mlp(block.ln_2(x))
    return visual.ln_post(x)


def _bert_attention(h: int) -> nn.Module:
    qkv = {name: nn.Linear(h, h) for name in ("query", "key", "value")}
    return _Module(self=_Module(**qkv), output=_Module(dense=nn.Linear(h, h), LayerNorm=nn.LayerNorm(h, eps=1e-12)))


def _meter_cross_layer(h: int, intermediate: int) -> nn.Module:
    """METER's ``bert_model.BertCrossLayer``: self-attention, cross-attention, feed-forward."""
    return _Module(attention=_bert_attention(h), crossattention=_bert_attention(h),
                   intermediate=_Module(dense=nn.Linear(h, intermediate)),
                   output=_Module(dense=nn.Linear(intermediate, h), LayerNorm=nn.LayerNorm(h, eps=1e-12)))


def _classifier(in_dim: int, h: int, labels: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, 2 * h), nn.LayerNorm(2 * h), nn.GELU(), nn.Linear(2 * h, labels))


def _meter_mirror(kind: str, cfg: smarttrim.ModelConfig, seed: int = 0) -> nn.Module:
    """The ``METERTransformerSS`` modules of an official checkpoint of ``kind`` (``METER_KINDS``) at ``cfg``'s
    sizes, every parameter perturbed (zero biases and unit LayerNorms would hide a misplaced tensor); eval mode."""
    torch.manual_seed(seed)
    h, th = cfg.hidden_size, cfg.text_hidden
    text = RobertaModel(RobertaConfig(vocab_size=cfg.vocab_size, hidden_size=th, num_hidden_layers=cfg.text_layers,
                                      num_attention_heads=cfg.text_heads, intermediate_size=cfg.text_intermediate,
                                      max_position_embeddings=cfg.text_max_positions, type_vocab_size=1,
                                      layer_norm_eps=1e-5, pad_token_id=1), add_pooling_layer=True)
    modules: dict[str, nn.Module] = dict(
        cross_modal_text_transform=nn.Linear(th, h), cross_modal_image_transform=nn.Linear(cfg.vision_width, h),
        token_type_embeddings=nn.Embedding(3 if kind == "nlvr2" else 2, h), vit_model=_meter_clip(cfg),
        text_transformer=text,
        cross_modal_image_layers=nn.ModuleList(_meter_cross_layer(h, cfg.cross_intermediate)
                                               for _ in range(cfg.cross_layers)),
        cross_modal_text_layers=nn.ModuleList(_meter_cross_layer(h, cfg.cross_intermediate)
                                              for _ in range(cfg.cross_layers)),
        cross_modal_image_pooler=_Module(dense=nn.Linear(h, h)), cross_modal_text_pooler=_Module(dense=nn.Linear(h, h)))
    if kind == "pretrain":
        modules["mlm_score"] = _Module(transform=_Module(dense=nn.Linear(h, h), LayerNorm=nn.LayerNorm(h)),
                                       decoder=nn.Linear(h, cfg.vocab_size, bias=False),
                                       bias=nn.Parameter(torch.zeros(cfg.vocab_size)))
    if kind in ("pretrain", "retrieval"):
        modules["itm_score"] = _Module(fc=nn.Linear(2 * h, 2))  # heads.ITMHead
    if kind in ("vqa", "snli_ve"):
        modules[f"{kind.split('_')[0]}_classifier"] = _classifier(2 * h, h, cfg.num_labels)
    if kind == "nlvr2":
        modules["nlvr2_classifier"] = _classifier(4 * h, h, 2)
    mirror = _Module(**modules)
    if kind == "retrieval":  # declared nn.Linear(hs, 1), then its data replaced by the ITM head's match row
        rank = nn.Linear(h, 1)
        rank.weight, rank.bias = (nn.Parameter(p.detach()[1:].clone()) for p in (mirror.itm_score.fc.weight,
                                                                                 mirror.itm_score.fc.bias))
        mirror.rank_output = rank
    _perturb(mirror, seed)
    return mirror.eval()


def _meter_state(mirror: nn.Module) -> dict[str, Tensor]:
    """The checkpoint's ``state_dict``, with the buffer transformers 4.6 (METER's pin) saved too."""
    state = {k: v.detach().clone() for k, v in mirror.state_dict().items()}
    positions = mirror.text_transformer.config.max_position_embeddings
    state.setdefault("text_transformer.embeddings.position_ids", torch.arange(positions)[None])
    return state


def _meter_model(task: str = "vqa", trim: smarttrim.TrimConfig | None = None, **overrides: object) -> SmartTrimModel:
    return _model(task, trim, **{**METER_SIZES, **overrides}).eval()


def _save(state: dict[str, Tensor], path: Path, wrapped: bool = True) -> Path:
    torch.save({"state_dict": state, "epoch": 3} if wrapped else state, path)
    return path


def _batch(model: SmartTrimModel, seed: int = 0) -> dict[str, Tensor]:
    return model.dummy_batch(2, seed=seed, with_labels=False)


def _pooled(model: SmartTrimModel, pixels: Tensor, batch: dict[str, Tensor], image_type: int) -> Tensor:
    """(B, 2h) [text; image] pooled features of one image-text pass with ``image_type`` (METER's ``cls_feats``)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    text = roberta_forward(model.backbone.text, ids, mask)
    types = torch.full((ids.shape[0],), image_type, dtype=torch.long)
    return model._fuse(pixels, text, mask, types, _Run(None, sample=False, prune=False, tau=1.0))[0]


def test_meter_clip_tower_matches_meters_visual_transformer(tmp_path: Path) -> None:
    """``vit_model.visual.*`` (OpenAI CLIP layout, fused in_proj) into timm's blocks: the towers compute the same."""
    model = _meter_model()
    mirror = _meter_mirror("vqa", model.config, seed=1)
    load_meter_checkpoint(model, _save(_meter_state(mirror), tmp_path / "vqa.ckpt"))
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.backbone.vision.forward_features(px),
                                   _meter_visual_forward(mirror.vit_model.visual, px), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", METER_KINDS)
@pytest.mark.parametrize(("vit", "wrapped"), [("vit_model.visual.", True), ("vit_model.", False)])
def test_every_meter_key_is_loaded_or_deliberately_dropped(tmp_path: Path, kind: str, vit: str,
                                                           wrapped: bool) -> None:
    """Each checkpoint into the model of its task (pre-training: a VQA model): every METER tensor lands under its
    own name (``vit_model``'s renamed), bit for bit, or is one of the keys METER holds and we do not use."""
    task = "vqa" if kind == "pretrain" else kind
    model = _meter_model(task)
    state = _meter_state(_meter_mirror(kind, model.config, seed=2))
    clip_text = {"vit_model.token_embedding.weight", "vit_model.positional_embedding", "vit_model.ln_final.weight",
                 "vit_model.ln_final.bias"}
    if vit == "vit_model.":  # a checkpoint whose CLIP tower sits right under vit_model (with CLIP's projection)
        state = {k.replace("vit_model.visual.", "vit_model."): v for k, v in state.items() if k not in clip_text}
        state["vit_model.proj"] = torch.randn(model.config.vision_width, 16)
        clip_text = {"vit_model.proj"}
    warns = pytest.warns(UserWarning, match="random initialization") if kind == "pretrain" else nullcontext()
    with warns:
        report = load_meter_checkpoint(model, _save(state, tmp_path / f"{kind}.ckpt", wrapped))
    unused = {"text_transformer.pooler.dense.weight", "text_transformer.pooler.dense.bias",
              "text_transformer.embeddings.position_ids", *clip_text}
    if kind == "pretrain":
        unused |= {k for k in state if k.startswith(("mlm_score.", "itm_score."))}
    assert set(report.dropped) == unused
    ours = model.state_dict()
    for key, value in state.items():
        if key in unused or key.startswith(vit):
            continue
        name = {"itm_score.fc.weight": "head.0.weight", "itm_score.fc.bias": "head.0.bias"}.get(key, key)
        for theirs, prefix in (("vqa_classifier.", "head."), ("nlvr2_classifier.", "head."),
                               ("snli_classifier.", "head."), ("text_transformer.", "backbone.text."),
                               ("cross_modal_", "backbone.cross_modal_"), ("token_type_", "backbone.token_type_")):
            name = prefix + name[len(theirs):] if name.startswith(theirs) else name
        assert torch.equal(ours[name], value), (key, name)
    assert report.loaded == len(state) - len(unused)
    assert report.head_loaded is (kind != "pretrain")


@pytest.mark.parametrize("task", ["vqa", "nlvr2", "snli_ve", "retrieval"])
def test_meter_fine_tuned_heads_score_as_meters(tmp_path: Path, task: str) -> None:
    """The fine-tuned checkpoint of each task gives the scores of METER's own head modules on the pooled features:
    VQA / SNLI-VE ``<task>_classifier(cls_feats)``; NLVR2 ``nlvr2_classifier`` on the two passes' features side by
    side (``compute_nlvr2``: image 0 with token type 1, then image 1 with type 2); retrieval ``rank_output`` (what
    ``compute_irtr`` trains and ranks by) and the ITM head ``itm_score``."""
    model = _meter_model(task)
    mirror = _meter_mirror(task, model.config, seed=3)
    report = load_meter_checkpoint(model, _save(_meter_state(mirror), tmp_path / f"{task}.ckpt"))
    assert report.head_loaded is True
    batch = model.dummy_batch(3, seed=1, with_labels=False)
    with torch.no_grad():
        logits = model(batch).logits
        if task == "nlvr2":
            pairs = [_pooled(model, batch["pixel_values"][:, i], batch, i + 1) for i in (0, 1)]
            ref = mirror.nlvr2_classifier(torch.cat(pairs, -1))
        else:
            pooled = _pooled(model, batch["pixel_values"], batch, 1)
            ref = mirror.rank_output(pooled) if task == "retrieval" else getattr(
                mirror, f"{task.split('_')[0]}_classifier")(pooled)
        torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)
        if task == "retrieval":
            torch.testing.assert_close(model.head(pooled), mirror.itm_score.fc(pooled), atol=ATOL, rtol=0)
            assert not torch.allclose(mirror.rank_output(pooled)[:, 0], mirror.itm_score.fc(pooled)[:, 1]), \
                "the fine-tuned rank_output is not the ITM head's match row: the test tells them apart"


def test_meter_pretraining_checkpoint_starts_every_task(tmp_path: Path) -> None:
    """Pre-training (mlm + itm) into each task: the classifiers keep their initialization (with a warning); the
    retrieval model takes the ITM head and METER's start of ``rank_output`` (the ITM head's match row); NLVR2's
    token types get a third row copied from row 1 (METER's NLVR2 initialization)."""
    mirror = _meter_mirror("pretrain", _meter_model().config, seed=4)
    path = _save(_meter_state(mirror), tmp_path / "pretrain.ckpt")
    model = _meter_model()
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    with pytest.warns(UserWarning, match="random initialization"):
        report = load_meter_checkpoint(model, path)
    assert report.head_loaded is False
    assert all(torch.equal(v, head_before[k]) for k, v in model.head.state_dict().items())
    assert torch.equal(model.backbone.cross_modal_image_transform.weight, mirror.cross_modal_image_transform.weight)

    retrieval = _meter_model("retrieval")
    report = load_meter_checkpoint(retrieval, path)
    assert report.head_loaded is True and any(n.startswith("rank_output: from itm_score.fc") for n in report.notes)
    fc = mirror.itm_score.fc
    assert torch.equal(retrieval.head[0].weight, fc.weight) and torch.equal(retrieval.head[0].bias, fc.bias)
    assert torch.equal(retrieval.rank_output.weight, fc.weight[1:]) and torch.equal(retrieval.rank_output.bias,
                                                                                   fc.bias[1:])
    batch = _batch(retrieval)
    with torch.no_grad():  # its retrieval score starts as the ITM head's match logit
        torch.testing.assert_close(retrieval(batch).logits[:, 0], fc(_pooled(retrieval, batch["pixel_values"],
                                                                             batch, 1))[:, 1], atol=ATOL, rtol=0)

    nlvr2 = _meter_model("nlvr2")
    with pytest.warns(UserWarning, match="nlvr2_classifier"):
        report = load_meter_checkpoint(nlvr2, path)
    types, theirs = nlvr2.backbone.token_type_embeddings.weight, mirror.token_type_embeddings.weight
    assert torch.equal(types[:2], theirs) and torch.equal(types[2], theirs[1])
    assert any("2 -> 3 rows" in note for note in report.notes)


def test_meter_checkpoint_into_trimmed_model(tmp_path: Path) -> None:
    mirror = _meter_mirror("vqa", _meter_model().config, seed=5)
    path = _save(_meter_state(mirror), tmp_path / "vqa.ckpt")
    plain, model = _meter_model(), _meter_model(trim=smarttrim.TrimConfig())
    trimmers_before = {k: v.clone() for k, v in model.trimmers.state_dict().items()}
    load_meter_checkpoint(plain, path)
    load_meter_checkpoint(model, path)
    assert all(torch.equal(v, trimmers_before[k]) for k, v in model.trimmers.state_dict().items())
    batch = _batch(model)
    with torch.no_grad():  # stable init keeps everything on the deterministic path: the backbone's logits
        torch.testing.assert_close(model(batch).logits, plain(batch).logits, atol=ATOL, rtol=0)


def test_meter_position_grid_resampled() -> None:
    mirror = _meter_mirror("vqa", _meter_model().config, seed=6)
    config = smarttrim.model_config("meter-tiny", task="vqa", num_labels=5, image_size=48, **METER_SIZES)
    conv = convert_meter_checkpoint(_meter_state(mirror), config)
    expected = _bicubic(mirror.vit_model.visual.positional_embedding.detach()[None], 4, 6)
    torch.testing.assert_close(conv.state_dict["backbone.vision.pos_embed"], expected, atol=1e-6, rtol=0)
    _meter_model(image_size=48).load_backbone_state_dict(conv.state_dict)  # every other tensor fits too


@pytest.mark.parametrize(("corrupt", "expect"), [
    ("rename", r"cross_modal_text_layers\.0\.attention\.self\.querry\.weight"),
    ("shape", r"backbone\.cross_modal_image_transform\.weight \(checkpoint key cross_modal_image_transform"),
    ("depth", r"2 vision blocks but config\.vision_layers=3"),
])
def test_meter_checkpoint_errors_name_file_and_key(tmp_path: Path, corrupt: str, expect: str) -> None:
    sd = _meter_state(_meter_mirror("vqa", _meter_model().config))
    if corrupt == "rename":
        sd["cross_modal_text_layers.0.attention.self.querry.weight"] = sd.pop(
            "cross_modal_text_layers.0.attention.self.query.weight")
    elif corrupt == "shape":
        sd["cross_modal_image_transform.weight"] = sd["cross_modal_image_transform.weight"][:, :32].clone()
    else:
        for key in [k for k in sd if ".resblocks.2." in k]:
            del sd[key]
    path = _save(sd, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + expect):
        load_meter_checkpoint(_meter_model(), path)


def test_meter_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.ckpt"))):
        load_meter_checkpoint(_model(), tmp_path / "nope.ckpt")


def test_retrieval_model_directory_without_rank_output(tmp_path: Path) -> None:
    """A retrieval model saved with its ITM head only (pre-training exports made before ``rank_output`` existed,
    like the shipped start) loads with METER's start of ``rank_output``: the ITM head's match row."""
    source = _model("retrieval")
    _perturb(source, seed=7)
    source.save_pretrained(tmp_path / "itm")
    weights = tmp_path / "itm" / "model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if not k.startswith("rank_output.")}, weights)
    itm = source.head[0]
    loaded = smarttrim.load_model(tmp_path / "itm")
    assert torch.equal(loaded.rank_output.weight, itm.weight[1:]) and torch.equal(loaded.rank_output.bias, itm.bias[1:])
    fresh = _model("retrieval")
    report = load_pretrained(fresh, tmp_path / "itm")
    assert report.head_loaded is True and any(n.startswith("rank_output: from the ITM head") for n in report.notes)
    assert torch.equal(fresh.rank_output.weight, itm.weight[1:]) and torch.equal(fresh.head[0].weight, itm.weight)
