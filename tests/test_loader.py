"""The streaming loader: batches the model takes, every sample once, disjoint ranks x workers, seeded shuffles."""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

import smarttrim
from smarttrim.data.gallery import read_gallery
from smarttrim.data.loader import LoaderConfig, make_loader, plan_epoch, read_manifest
from smarttrim.data.tokenizer import load_tokenizer
from stages.shard import ShardConfig, run

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def vqa_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "vqa"
    run(ShardConfig(source="shapes", task="vqa", out=str(out), shapes_sizes=(40, 30, 10), shard_size=7))
    return out


def _tokenizer(shards: Path):  # noqa: ANN202
    return load_tokenizer(shards / read_manifest(shards)["tokenizer"])


def _keys(loader: torch.utils.data.DataLoader) -> list[str]:
    return [k for batch in loader for k in batch["keys"]]


def test_eval_batches_feed_the_model_and_see_every_sample_once(vqa_shards: Path) -> None:
    manifest = read_manifest(vqa_shards)
    tok = _tokenizer(vqa_shards)
    cfg = LoaderConfig(batch_size=8, image_size=32, max_text_len=24)
    batches = list(make_loader(vqa_shards, "val", tok, cfg))
    keys = [k for b in batches for k in b["keys"]]
    assert len(keys) == len(set(keys)) == manifest["splits"]["val"]["samples"] == 30
    b = batches[0]
    assert b["pixel_values"].shape == (8, 3, 32, 32) and b["pixel_values"].dtype == torch.float32
    assert b["input_ids"].shape == b["attention_mask"].shape and b["input_ids"].shape[1] <= 24
    assert bool((b["input_ids"][:, 0] == 0).all()), "texts start with <s> (id 0), the model's [CLS] prefix"
    assert b["labels"].shape == (8, len(manifest["labels"])) and float(b["labels"].max()) <= 1.0
    assert bool((b["labels"].sum(1) > 0).all()), "every shapes question has a scored answer"
    model = smarttrim.build_model("meter-tiny", task="vqa", num_labels=len(manifest["labels"]))
    out = model(b)
    assert out.logits.shape == (8, len(manifest["labels"])) and torch.isfinite(out.loss)


def test_reads_shards_from_a_url(vqa_shards: Path) -> None:
    """Any URL WebDataset opens works as the shard location (here file://)."""
    url = f"file://{vqa_shards}"
    cfg = LoaderConfig(batch_size=16, image_size=32)
    assert len(_keys(make_loader(url, "val", _tokenizer(vqa_shards), cfg))) == 30
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        read_manifest(f"file://{vqa_shards}/missing")


def test_ranks_and_workers_see_disjoint_complete_data(vqa_shards: Path) -> None:
    """Two simulated ranks x two DataLoader workers (real worker processes): a partition of the split."""
    tok = _tokenizer(vqa_shards)
    seen = {}
    for rank in range(2):
        cfg = LoaderConfig(batch_size=4, image_size=32, rank=rank, world_size=2, num_workers=2)
        seen[rank] = _keys(make_loader(vqa_shards, "train", tok, cfg))
    counts = Counter(seen[0] + seen[1])
    assert len(counts) == 40 and set(counts.values()) == {1}, "each training sample exactly once overall"
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])


def test_training_shuffle_is_seeded_and_still_a_partition(vqa_shards: Path) -> None:
    tok = _tokenizer(vqa_shards)

    def order(rank: int, seed: int, epoch: int) -> list[str]:
        cfg = LoaderConfig(batch_size=2, image_size=32, train=True, seed=seed, epoch=epoch, shuffle_buffer=16,
                           rank=rank, world_size=2, num_workers=1)
        return _keys(make_loader(vqa_shards, "train", tok, cfg))

    assert order(0, seed=1, epoch=0) == order(0, seed=1, epoch=0)
    assert order(0, seed=1, epoch=0) != order(0, seed=1, epoch=1)
    for epoch in range(2):
        a, b = order(0, 1, epoch), order(1, 1, epoch)
        assert not set(a) & set(b), "the shard permutation is shared by all ranks"
    unshuffled = _keys(make_loader(vqa_shards, "train", tok, LoaderConfig(batch_size=2, image_size=32)))
    assert order(0, 1, 0) + order(1, 1, 0) != unshuffled[: len(order(0, 1, 0) + order(1, 1, 0))]


def test_nlvr2_batches_carry_two_images(tmp_path: Path) -> None:
    out = tmp_path / "nlvr2"
    run(ShardConfig(source="shapes", task="nlvr2", out=str(out), shapes_sizes=(6, 6, 6), shard_size=3))
    batch = next(iter(make_loader(out, "val", _tokenizer(out), LoaderConfig(batch_size=4, image_size=32))))
    assert batch["pixel_values"].shape == (4, 2, 3, 32, 32)
    assert batch["labels"].dtype == torch.long and set(batch["labels"].tolist()) <= {0, 1}
    model = smarttrim.build_model("meter-tiny", task="nlvr2")
    assert model(batch).logits.shape == (4, 2)


def test_loader_errors(tmp_path: Path, vqa_shards: Path) -> None:
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        make_loader(tmp_path, "train", None, LoaderConfig())
    with pytest.raises(ValueError, match="no split 'dev'"):
        make_loader(vqa_shards, "dev", None, LoaderConfig())
    with pytest.raises(ValueError, match="shards for 8 ranks"):
        make_loader(vqa_shards, "train", None, LoaderConfig(train=True, rank=0, world_size=8, num_workers=2))
    manifest = json.loads((vqa_shards / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] == 40


def test_shard_tokenizer_resolution(vqa_shards: Path) -> None:
    from smarttrim.data.loader import shard_tokenizer

    beside = shard_tokenizer(vqa_shards)
    assert beside("what color is the circle ?")["input_ids"] == _tokenizer(vqa_shards)(
        "what color is the circle ?")["input_ids"]
    assert shard_tokenizer(f"file://{vqa_shards}", override=vqa_shards / "tokenizer") is not None
    with pytest.raises(ValueError, match="pass a local one"):
        shard_tokenizer(f"file://{vqa_shards}")


@pytest.fixture(scope="module")
def retrieval_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Several captions per image and ITM negatives: collation makes random choices."""
    out = tmp_path_factory.mktemp("shards") / "retrieval"
    run(ShardConfig(source="shapes", task="retrieval", out=str(out), shapes_sizes=(40, 6, 3), shard_size=7))
    return out


def test_planned_epoch_gives_every_rank_the_same_number_of_batches(vqa_shards: Path) -> None:
    manifest, tok = read_manifest(vqa_shards), _tokenizer(vqa_shards)
    counts = [s["samples"] for s in manifest["splits"]["train"]["shards"]]
    assert counts == [7, 7, 7, 7, 7, 5]
    for epoch in (0, 1):
        base = LoaderConfig(batch_size=3, image_size=32, train=True, epoch=epoch, num_workers=2, shuffle_buffer=5)
        plan = plan_epoch(manifest, "train", base, world_size=2)
        # 6 shards over 2 ranks x 2 workers: the emptiest reader has one shard (5 or 7 samples) -> 1 or 2 batches
        assert plan.batches_per_worker in (1, 2) and plan.batches_per_rank == 2 * plan.batches_per_worker
        assert plan.samples_dropped == 40 - 2 * plan.batches_per_rank * 3
        seen: list[str] = []
        for rank in (0, 1):
            cfg = dataclasses.replace(base, rank=rank, world_size=2, batches_per_worker=plan.batches_per_worker)
            batches = list(make_loader(vqa_shards, "train", tok, cfg))
            assert len(batches) == plan.batches_per_rank and all(len(b["keys"]) == 3 for b in batches)
            seen += [k for b in batches for k in b["keys"]]
        assert len(seen) == len(set(seen)), "ranks read disjoint samples"
    with pytest.raises(ValueError, match="fewer than batch_size=8"):
        plan_epoch(manifest, "train", LoaderConfig(batch_size=8, train=True, num_workers=2), world_size=2)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skipping_batches_resumes_an_epoch_exactly(retrieval_shards: Path, num_workers: int) -> None:
    """A resumed epoch (skip k batches) yields exactly the uninterrupted epoch's batches from k on: same
    samples, same captions, same false texts."""
    manifest, tok = read_manifest(retrieval_shards), _tokenizer(retrieval_shards)
    base = LoaderConfig(batch_size=4, image_size=32, train=True, seed=3, epoch=1, num_workers=num_workers,
                        shuffle_buffer=10, false_texts=3)
    plan = plan_epoch(manifest, "train", base, world_size=1)
    cfg = dataclasses.replace(base, batches_per_worker=plan.batches_per_worker)
    full = list(make_loader(retrieval_shards, "train", tok, cfg))
    assert len(full) == plan.batches_per_rank >= 4
    for skip in (1, 3):
        resumed = list(make_loader(retrieval_shards, "train", tok, dataclasses.replace(cfg, skip_batches=skip)))
        assert len(resumed) == len(full) - skip
        for a, b in zip(full[skip:], resumed, strict=True):
            assert a["keys"] == b["keys"]
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
            assert torch.equal(a["pixel_values"], b["pixel_values"])
    with pytest.raises(ValueError, match="skip_batches needs batches_per_worker"):
        LoaderConfig(train=True, skip_batches=2)


def _ids(tok, text: str) -> tuple[int, ...]:  # noqa: ANN001
    return tuple(tok(text, truncation=True, max_length=24)["input_ids"])


def test_retrieval_training_batches_hold_the_true_text_then_n_false_ones(retrieval_shards: Path) -> None:
    """METER's IRTR batch (``compute_irtr``): per image its true caption first, then ``false_texts`` captions of other
    images (here drawn from the batch's), labels 0 (the true text's index); the model scores each image with all
    of them and trains a softmax over them."""
    tok = _tokenizer(retrieval_shards)
    gallery = read_gallery(retrieval_shards, "train", 32)
    captions = {key: [gallery.texts[t] for t in (gallery.text_image == i).nonzero()[:, 0].tolist()]
                for i, key in enumerate(gallery.keys)}
    cfg = LoaderConfig(batch_size=4, image_size=32, max_text_len=24, train=True, shuffle_buffer=10, false_texts=5)
    batches = list(make_loader(retrieval_shards, "train", tok, cfg))
    assert batches and all(b["input_ids"].shape[:2] == (4, 6) == b["attention_mask"].shape[:2] for b in batches)
    for batch in batches:
        assert batch["labels"].tolist() == [0, 0, 0, 0] and batch["pixel_values"].shape == (4, 3, 32, 32)
        for b, key in enumerate(batch["keys"]):
            own = {_ids(tok, c) for c in captions[key]}
            others = {_ids(tok, c) for k in batch["keys"] if k != key for c in captions[k]
                      if c.lower() not in {o.lower() for o in captions[key]}}
            rows = [tuple(r[m.bool()].tolist()) for r, m in zip(batch["input_ids"][b], batch["attention_mask"][b],
                                                                strict=True)]
            assert rows[0] in own, "the true caption first"
            assert all(r in others for r in rows[1:]), "false texts: captions of the batch's other images"
            assert len(set(rows[1:])) == 5, "drawn without replacement when the batch has enough"
    model = smarttrim.build_model("meter-tiny", task="retrieval", max_text_len=24, dropout=0.0).train()
    out = model(batches[0])
    assert out.logits.shape == (4, 6) and out.loss_parts["task"] > 0
    # without false texts (evaluation, profiling): one true caption per image, nothing to rank against
    plain = next(iter(make_loader(retrieval_shards, "val", tok, LoaderConfig(batch_size=3, image_size=32))))
    assert plain["input_ids"].dim() == 2 and "labels" not in plain
    with pytest.raises(ValueError, match="false_texts=-1"):
        LoaderConfig(false_texts=-1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_reading_an_epoch_leaves_the_global_torch_rng_alone(vqa_shards: Path, num_workers: int) -> None:
    """Dropout and Gumbel noise draw from the global RNG: a resumed run, which starts a loader mid-training,
    must see the same draws as an uninterrupted one."""
    cfg = LoaderConfig(batch_size=8, image_size=32, train=True, num_workers=num_workers, shuffle_buffer=5)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    assert len(list(make_loader(vqa_shards, "train", _tokenizer(vqa_shards), cfg))) > 0
    assert torch.equal(torch.rand(3), expected)
