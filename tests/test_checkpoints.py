"""Loading external weights: Hugging Face CLIP vision / RoBERTa directories and official METER checkpoints.

Every checkpoint is written by the test itself (tiny sizes, no hub). The METER layout is produced by an
inverse mapping written here, independently of ``smarttrim.checkpoints``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
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
    load_roberta,
)
from smarttrim.model import SmartTrimModel

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
_BLOCK_PARTS = (("attn.qkv.weight", "attn.in_proj_weight"), ("attn.qkv.bias", "attn.in_proj_bias"),
                ("attn.proj.", "attn.out_proj."), ("norm1.", "ln_1."), ("norm2.", "ln_2."),
                ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."))


def _meter_vision_name(name: str) -> str:
    """Our timm name -> OpenAI CLIP name (METER's vit_model), below the prefix."""
    top = {"patch_embed.proj.weight": "conv1.weight", "norm_pre.weight": "ln_pre.weight",
           "norm_pre.bias": "ln_pre.bias", "norm.weight": "ln_post.weight", "norm.bias": "ln_post.bias"}
    if name in top:
        return top[name]
    m = re.fullmatch(r"blocks\.(\d+)\.(.*)", name)
    assert m, name
    rest = m.group(2)
    for ours, theirs in _BLOCK_PARTS:
        rest = rest.replace(ours, theirs)
    return f"transformer.resblocks.{m.group(1)}.{rest}"


def _to_meter(model: SmartTrimModel, head: str | None, vit: str = "vit_model.visual.") -> dict[str, Tensor]:
    """``model``'s weights in the official METER layout; ``head``: METER's head prefix (None: no head)."""
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        value = value.clone()
        if key.startswith("backbone.vision."):
            name = key[len("backbone.vision."):]
            if name == "cls_token":
                out[vit + "class_embedding"] = value.reshape(-1)
            elif name == "pos_embed":
                out[vit + "positional_embedding"] = value[0]
            else:
                out[vit + _meter_vision_name(name)] = value
        elif key.startswith("backbone.text."):
            out["text_transformer." + key[len("backbone.text."):]] = value
        elif key.startswith("backbone."):
            out[key[len("backbone."):]] = value
        elif key.startswith("head.") and head is not None:
            out[head + key[len("head."):]] = value
    # what real METER checkpoints also hold
    d = model.config.hidden_size
    out["text_transformer.pooler.dense.weight"] = torch.randn(d, d)
    out["text_transformer.embeddings.position_ids"] = torch.arange(model.config.text_max_positions)[None]
    out["mlm_score.bias"] = torch.randn(model.config.vocab_size)
    out["mlm_score.transform.dense.weight"] = torch.randn(d, d)
    if head != "itm_score.fc.":
        out["itm_score.fc.weight"], out["itm_score.fc.bias"] = torch.randn(2, 2 * d), torch.randn(2)
    if head != "snli_classifier.":
        out["snli_classifier.3.bias"] = torch.randn(3)
    if vit == "vit_model.visual.":  # METER's CLIP wrapper keeps CLIP's text embeddings
        out["vit_model.token_embedding.weight"] = torch.randn(100, 32)
        out["vit_model.positional_embedding"] = torch.randn(77, 32)
        out["vit_model.ln_final.weight"] = torch.randn(32)
    else:
        out[vit + "proj"] = torch.randn(model.config.vision_width, 32)
    return out


def _assert_same_weights(model: SmartTrimModel, ref: SmartTrimModel, prefixes: tuple[str, ...]) -> None:
    theirs = ref.state_dict()
    checked = 0
    for key, value in model.state_dict().items():
        if key.startswith(prefixes):
            assert torch.equal(value, theirs[key]), key
            checked += 1
    assert checked > 0


def _logits(model: SmartTrimModel) -> Tensor:
    model.eval()
    with torch.no_grad():
        return model(model.dummy_batch(2, seed=0)).logits


@pytest.mark.parametrize(("vit", "wrapped"), [("vit_model.visual.", True), ("vit_model.", False)])
def test_meter_vqa_checkpoint_roundtrip(tmp_path: Path, vit: str, wrapped: bool) -> None:
    source = _model()
    _perturb(source, seed=3)
    sd = _to_meter(source, "vqa_classifier.", vit=vit)
    path = tmp_path / "meter_vqa.ckpt"
    torch.save({"state_dict": sd, "epoch": 3} if wrapped else sd, path)
    model = _model()
    report = load_meter_checkpoint(model, path)
    assert report.head_loaded is True
    dropped = {"mlm_score.bias", "itm_score.fc.weight", "text_transformer.pooler.dense.weight"}
    assert dropped <= set(report.dropped)
    _assert_same_weights(model, source, ("backbone.", "head."))
    torch.testing.assert_close(_logits(model), _logits(source), atol=ATOL, rtol=0)


def test_meter_nlvr2_expands_token_types(tmp_path: Path) -> None:
    source = _model("nlvr2")
    _perturb(source, seed=4)
    with torch.no_grad():  # what the load must produce from a 2-row table: row 2 = row 1
        source.backbone.token_type_embeddings.weight[2] = source.backbone.token_type_embeddings.weight[1]
    sd = _to_meter(source, "nlvr2_classifier.")
    sd["token_type_embeddings.weight"] = sd["token_type_embeddings.weight"][:2].clone()
    torch.save({"state_dict": sd}, tmp_path / "nlvr2.ckpt")
    model = _model("nlvr2")
    report = load_meter_checkpoint(model, tmp_path / "nlvr2.ckpt")
    assert any("2 -> 3 rows" in note for note in report.notes)
    _assert_same_weights(model, source, ("backbone.", "head."))
    torch.testing.assert_close(_logits(model), _logits(source), atol=ATOL, rtol=0)


def test_meter_pretraining_checkpoint_keeps_initialized_head(tmp_path: Path) -> None:
    source = _model()
    _perturb(source, seed=5)
    torch.save({"state_dict": _to_meter(source, head=None)}, tmp_path / "pretrain.ckpt")
    model = _model()
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    with pytest.warns(UserWarning, match="random initialization"):
        report = load_meter_checkpoint(model, tmp_path / "pretrain.ckpt")
    assert report.head_loaded is False
    _assert_same_weights(model, source, ("backbone.",))
    assert all(torch.equal(v, head_before[k]) for k, v in model.head.state_dict().items())

    retrieval = _model("retrieval")  # the same kind of checkpoint carries the retrieval (ITM) head
    _perturb(retrieval, seed=6)
    torch.save({"state_dict": _to_meter(retrieval, "itm_score.fc.")}, tmp_path / "itm.ckpt")
    fresh = _model("retrieval")
    assert load_meter_checkpoint(fresh, tmp_path / "itm.ckpt").head_loaded is True
    _assert_same_weights(fresh, retrieval, ("backbone.", "head."))


def test_meter_checkpoint_into_trimmed_model(tmp_path: Path) -> None:
    source = _model()
    _perturb(source, seed=7)
    torch.save({"state_dict": _to_meter(source, "vqa_classifier.")}, tmp_path / "vqa.ckpt")
    model = _model(trim=smarttrim.TrimConfig())
    trimmers_before = {k: v.clone() for k, v in model.trimmers.state_dict().items()}
    load_meter_checkpoint(model, tmp_path / "vqa.ckpt")
    _assert_same_weights(model, source, ("backbone.", "head."))
    assert all(torch.equal(v, trimmers_before[k]) for k, v in model.trimmers.state_dict().items())
    # stable init keeps everything on the deterministic path: the logits are the backbone's
    torch.testing.assert_close(_logits(model), _logits(source), atol=ATOL, rtol=0)


def test_meter_position_grid_resampled() -> None:
    source = _model()
    _perturb(source, seed=8)
    config = smarttrim.model_config("meter-tiny", task="vqa", num_labels=5, image_size=48)
    conv = convert_meter_checkpoint(_to_meter(source, "vqa_classifier."), config)
    expected = _bicubic(source.backbone.vision.pos_embed.detach(), 4, 6)
    torch.testing.assert_close(conv.state_dict["backbone.vision.pos_embed"], expected, atol=1e-6, rtol=0)
    model = _model(image_size=48)
    model.load_backbone_state_dict(conv.state_dict)  # every other tensor fits too


@pytest.mark.parametrize(("corrupt", "expect"), [
    ("rename", r"cross_modal_text_layers\.0\.attention\.self\.querry\.weight"),
    ("shape", r"backbone\.cross_modal_image_transform\.weight \(checkpoint key cross_modal_image_transform"),
    ("depth", r"2 vision blocks but config\.vision_layers=3"),
])
def test_meter_checkpoint_errors_name_file_and_key(tmp_path: Path, corrupt: str, expect: str) -> None:
    sd = _to_meter(_model(), "vqa_classifier.")
    if corrupt == "rename":
        sd["cross_modal_text_layers.0.attention.self.querry.weight"] = sd.pop(
            "cross_modal_text_layers.0.attention.self.query.weight")
    elif corrupt == "shape":
        sd["cross_modal_image_transform.weight"] = sd["cross_modal_image_transform.weight"][:, :32].clone()
    else:
        for key in [k for k in sd if ".resblocks.2." in k]:
            del sd[key]
    path = tmp_path / "bad.ckpt"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + expect):
        load_meter_checkpoint(_model(), path)


def test_meter_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.ckpt"))):
        load_meter_checkpoint(_model(), tmp_path / "nope.ckpt")
