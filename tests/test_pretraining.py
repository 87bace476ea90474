"""Pre-training (METER's MLM + ITM with hard negatives): the batches, the model, its export and how task models
start from it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import tiny

import smarttrim
from smarttrim.checkpoints import load_pretrained, pretrained_config
from smarttrim.data import shapes
from smarttrim.data.loader import LoaderConfig, make_loader
from smarttrim.data.tokenizer import load_tokenizer
from smarttrim.model import _Run
from smarttrim.pretraining import IGNORE, ObjectHead, PretrainModel, save_pretrain
from stages.finetune_config import FinetuneConfig, build_initial_model
from stages.pretrain import evaluate_pretraining, load_pretrain_model
from stages.shard import ShardConfig
from stages.shard import run as shard

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def captions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "caption"
    shard(ShardConfig(source="shapes", task="caption", out=str(out), shapes_sizes=(64, 32, 4), shard_size=16))
    return out


def _batches(shards: Path, split: str = "train", train: bool = True, n: int = 4) -> list[dict]:
    tok = load_tokenizer(shards / "tokenizer")
    cfg = LoaderConfig(batch_size=16, image_size=32, max_text_len=24, train=train, objective="pretrain")
    out = []
    for batch in make_loader(shards, split, tok, cfg):
        out.append(batch)
        if len(out) == n:
            break
    return out


def squash(text: str) -> str:
    """A text without case and spaces (decoding joins punctuation differently from the source)."""
    return text.lower().replace(" ", "")


def test_pretrain_batches_pair_hard_negatives_and_mask_captions(captions: Path) -> None:
    tok = load_tokenizer(captions / "tokenizer")
    texts = {}
    for line in json.loads((captions / "manifest.json").read_text())["splits"]["train"]["shards"]:
        assert line["samples"] > 0
    import webdataset as wds

    for sample in wds.WebDataset(sorted(str(p) for p in captions.glob("train-*.tar")), shardshuffle=False):
        texts[sample["__key__"]] = json.loads(sample["json"])["texts"]
    batches = _batches(captions)
    labels = torch.cat([b["labels"] for b in batches])
    assert set(labels.tolist()) == {0, 1} and 0.3 < float(labels.float().mean()) < 0.7
    special = set(tok.all_special_ids)
    masked_total = 0
    for b in batches:
        itm = [squash(t) for t in tok.batch_decode(b["input_ids"], skip_special_tokens=True)]
        for key, text, label in zip(b["keys"], itm, b["labels"].tolist(), strict=True):
            own = [squash(t) for t in texts[key]]
            if label == 1:
                assert text in own
            else:  # a hard negative: another image's caption, never one of this image's own
                assert text not in own and any(text in [squash(t) for t in texts[k]] for k in b["keys"] if k != key)
        ids, masked, lab = b["mlm_input_ids"], b["mlm_input_ids"], b["mlm_labels"]
        predicted = lab != IGNORE
        assert bool(predicted.any(1).all()), "at least one masked token per caption"
        assert not any(int(t) in special for t in lab[predicted]), "special tokens are never masked"
        assert int((masked[predicted] == tok.mask_token_id).sum()) > 0.5 * int(predicted.sum())
        assert torch.equal(ids[~predicted], b["mlm_input_ids"][~predicted])
        masked_total += int(predicted.sum())
        real = int(b["mlm_attention_mask"].sum() - 2 * len(b["keys"]))  # minus <s> and </s>
        assert 0.05 < int(predicted.sum()) / real < 0.4
    assert masked_total > 0
    again = _batches(captions)
    for a, b in zip(batches, again, strict=True):  # seeded by the samples' keys: the same batches
        assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels", "mlm_input_ids", "mlm_labels"))


def test_pretrain_model_learns_both_objectives(captions: Path) -> None:
    torch.manual_seed(0)
    cfg = smarttrim.model_config("meter-tiny", task="retrieval", dropout=0.0)
    model = PretrainModel(cfg).train()
    batches = _batches(captions, n=4)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    first = None
    for _step in range(15):
        for b in batches:
            out = model(b)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            first = first or {k: float(v) for k, v in out.loss_parts.items()}
    last = {k: float(v) for k, v in model(batches[0]).loss_parts.items()}
    assert set(last) == {"itm", "mlm"} and model(batches[0]).keep_groups == {}
    assert last["mlm"] < 0.6 * first["mlm"], (first, last)


def test_pretrain_batches_of_shapes_scenes_carry_their_object_labels(captions: Path) -> None:
    import webdataset as wds

    scenes = {s["__key__"]: json.loads(s["json"])["meta"]["scene"]
              for s in wds.WebDataset(sorted(str(p) for p in captions.glob("train-*.tar")), shardshuffle=False)}
    for batch in _batches(captions, n=2):
        hot = batch["object_labels"]
        assert hot.shape == (16, len(shapes.OBJECT_LABELS))
        for row, key in enumerate(batch["keys"]):
            objects = scenes[key]["objects"]
            expected = {f"{o['color']} {o['shape']}" for o in objects} | {f"{o['size']} {o['shape']}" for o in objects}
            assert {shapes.OBJECT_LABELS[i] for i in hot[row].nonzero()[:, 0].tolist()} == expected


def test_object_head_pools_regions_not_cls() -> None:
    head = ObjectHead(4, 6)
    tokens = torch.randn(2, 5, 4)
    tokens[:, 0] = 1e4  # the [CLS] token is not a region: never read
    manual = torch.stack([head.proj(tokens[b, 1:]).max(0).values for b in range(2)])
    torch.testing.assert_close(head(tokens), manual)


def test_vision_objective_trains_the_visual_encoder(tmp_path: Path, captions: Path) -> None:
    """With ``vision_weight`` the loss has a third part, the object labels' cross-entropy, that reaches the patch
    embedding; without it the model is METER's (no object head); a batch without labels is an error."""
    cfg = smarttrim.model_config("meter-tiny", task="retrieval", dropout=0.0)
    assert PretrainModel(cfg).object_head is None
    with pytest.raises(ValueError, match="vision_weight"):
        PretrainModel(cfg, vision_weight=-1.0)
    with pytest.raises(ValueError, match="vision_weight"):
        FinetuneConfig(shards=str(captions), out="x", vision_weight=1.0)  # objective 'task'
    torch.manual_seed(0)
    model = PretrainModel(cfg, vision_weight=2.0).train()
    batches = _batches(captions, n=2)
    out = model(batches[0])
    assert set(out.loss_parts) == {"itm", "mlm", "objects"}
    parts = out.loss_parts
    torch.testing.assert_close(out.loss, parts["itm"] + parts["mlm"] + 2.0 * parts["objects"])
    run = _Run(None, sample=False, prune=False, tau=1.0)  # the term alone, recomputed: it reaches the stem
    tokens = model.vlm._encode_image(batches[0]["pixel_values"], torch.zeros(16, cfg.text_hidden), run).x
    objects = torch.nn.functional.binary_cross_entropy_with_logits(model.object_head(tokens),
                                                                   batches[0]["object_labels"])
    torch.testing.assert_close(objects, parts["objects"])
    stem = model.vlm.backbone.vision.patch_embed.proj.weight
    assert float(torch.autograd.grad(objects, stem)[0].abs().sum()) > 0
    with pytest.raises(ValueError, match="object_labels"):
        model({k: v for k, v in batches[0].items() if k != "object_labels"})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = float(parts["objects"])
    for _step in range(10):
        for b in batches:
            model(b).loss.backward()
            opt.step()
            opt.zero_grad()
    assert float(model(batches[0]).loss_parts["objects"]) < 0.7 * first
    out_dir = save_pretrain(model, tmp_path / "pre")  # the export is the backbone; it says how it was trained
    assert json.loads((out_dir / "config.json").read_text())["pretraining"] == "mlm+itm+objects"


def test_export_round_trips_and_starts_task_models(tmp_path: Path, captions: Path) -> None:
    torch.manual_seed(1)
    cfg = smarttrim.model_config("meter-tiny", task="retrieval", dropout=0.0)
    model = PretrainModel(cfg).eval()
    out = save_pretrain(model, tmp_path / "pre")
    load_tokenizer(captions / "tokenizer").save_pretrained(str(out / "tokenizer"))
    back = load_pretrain_model(out).eval()
    batch = _batches(captions, "val", train=False, n=1)[0]
    with torch.no_grad():
        torch.testing.assert_close(back(batch).mlm_logits, model(batch).mlm_logits)
    assert smarttrim.load_model(out).config.task == "retrieval"  # the export is an ITM model as it is
    itm = back.vlm.head[0]  # its retrieval score starts as METER's IRTR fine-tuning does: the ITM match row
    assert torch.equal(back.vlm.rank_output.weight, itm.weight[1:]) and torch.equal(back.vlm.rank_output.bias,
                                                                                   itm.bias[1:])
    ev = evaluate_pretraining(out, str(captions), "val", batch_size=16, threads=1)
    assert ev["samples"] == 32 and 0 <= ev["itm_accuracy"] <= 1 and ev["mlm_tokens"] > 0

    # a VQA model at another resolution starts from it: every backbone weight, the position grid resampled
    vqa = smarttrim.SmartTrimModel(pretrained_config(out, "vqa", 13, image_size=48), smarttrim.TrimConfig())
    head_before = vqa.head[0].weight.clone()
    report = load_pretrained(vqa, out)
    source = model.vlm.state_dict()
    for k, v in vqa.backbone_state_dict().items():
        if k.startswith("backbone.") and k != "backbone.vision.pos_embed":
            assert torch.equal(v, source[k]), k
    assert vqa.backbone.vision.pos_embed.shape[1] == 1 + (48 // 8) ** 2
    assert any("resampled" in n for n in report.notes) and report.head_loaded is False
    assert torch.equal(vqa.head[0].weight, head_before), "the VQA head is new"
    nlvr2 = smarttrim.SmartTrimModel(pretrained_config(out, "nlvr2", 2))
    load_pretrained(nlvr2, out)
    types = nlvr2.backbone.token_type_embeddings.weight
    assert types.shape[0] == 3 and torch.equal(types[2], types[1])
    with pytest.raises(ValueError, match="vision_width"):
        load_pretrained(tiny("vqa", vision_width=32, vision_heads=2), out)


def test_finetune_config_takes_a_pretrained_directory(tmp_path: Path, captions: Path) -> None:
    out = save_pretrain(PretrainModel(smarttrim.model_config("meter-tiny", task="retrieval")), tmp_path / "pre")
    manifest = {"task": "vqa", "labels": [str(i) for i in range(7)]}
    model = build_initial_model(FinetuneConfig(shards="x", out="y", pretrained=str(out), image_size=48), manifest)
    assert model.config.image_size == 48 and model.config.num_labels == 7 and model.config.name == "meter-tiny"
    with pytest.raises(ValueError, match="preset"):
        build_initial_model(FinetuneConfig(shards="x", out="y", preset="meter-small", pretrained=str(out)), manifest)
    pre = build_initial_model(FinetuneConfig(shards=str(captions), out="y", objective="pretrain"),
                              {"task": "caption", "labels": []})
    assert isinstance(pre, PretrainModel)
    with pytest.raises(ValueError, match="trim must be None"):
        FinetuneConfig(shards="x", out="y", objective="pretrain", trim=smarttrim.TrimConfig())


def test_pretrains_on_a_karpathy_coco_caption_corpus(tmp_path: Path, captions: Path) -> None:
    """A real caption corpus in its official layout (``dataset_coco.json`` + COCO images) shards as retrieval
    data and feeds the pre-training objectives: hard negatives from other images' captions, masked captions."""
    from test_readers import image, karpathy_image, write_json

    root = tmp_path / "coco"
    captions_of = {i: [f"a {c} {s} on a table .", f"the {s} is {c} ."] for i, (c, s) in enumerate(
        [("red", "cup"), ("blue", "cup"), ("red", "plate"), ("green", "bowl"), ("blue", "plate"), ("green", "cup")])}
    rows = []
    for i, texts in captions_of.items():
        name = f"COCO_train2014_{i + 1:012d}.jpg"
        rows.append(karpathy_image(i, name, "train" if i < 4 else "val", texts, filepath="train2014", cocoid=i + 1))
        image(root / "train2014" / name, color=(40 * i, 200 - 30 * i, 90))
    write_json(root / "dataset_coco.json", {"dataset": "coco", "images": rows})
    out = tmp_path / "shards"
    shard(ShardConfig(source="karpathy_coco", task="retrieval", root=str(root), out=str(out), shard_size=2,
                      tokenizer=str(captions / "tokenizer")))
    tok = load_tokenizer(captions / "tokenizer")
    loader = make_loader(out, "train", tok, LoaderConfig(batch_size=4, image_size=32, max_text_len=24, train=True,
                                                         objective="pretrain"))
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and sorted(batch["labels"].tolist()) == [0, 0, 1, 1]
    assert bool((batch["mlm_labels"] != IGNORE).any(1).all()), "every caption has a masked token"
    torch.manual_seed(0)
    model = PretrainModel(smarttrim.model_config("meter-tiny", task="retrieval", dropout=0.0,
                                                 vocab_size=tok.vocab_size)).train()
    out_ = model(batch)
    out_.loss.backward()
    assert set(out_.loss_parts) == {"itm", "mlm"} and torch.isfinite(out_.loss)
