"""End to end through the data path: shapes/vqa -> shard stage -> streaming loader -> meter-tiny training
-> VQA score on the validation split, against the majority-answer baseline in the manifest."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import smarttrim
from smarttrim.data.loader import LoaderConfig, make_loader, read_manifest
from smarttrim.data.tokenizer import load_tokenizer
from stages.shard import ShardConfig, run

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def vqa_score(model: smarttrim.SmartTrimModel, loader: torch.utils.data.DataLoader) -> tuple[float, int]:
    """Mean soft score of the argmax answer over the loader (each sample once) and the sample count."""
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            pred = model(batch).logits.argmax(-1)
            total += float(batch["labels"].gather(1, pred[:, None]).sum())
            n += len(batch["keys"])
    return total / n, n


@pytest.mark.slow
def test_meter_tiny_trains_on_shapes_vqa_shards(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    shards = tmp_path / "shapes-vqa"
    manifest = run(ShardConfig(source="shapes", task="vqa", out=str(shards), shapes_sizes=(3000, 400, 10),
                               shard_size=500)).manifest
    tokenizer = load_tokenizer(shards / manifest["tokenizer"])
    model = smarttrim.build_model("meter-tiny", task="vqa", num_labels=len(manifest["labels"]), dropout=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    steps, epoch = 0, 0
    while steps < 300:
        cfg = LoaderConfig(batch_size=64, image_size=32, max_text_len=24, train=True, seed=0, epoch=epoch)
        model.train()
        for batch in make_loader(shards, "train", tokenizer, cfg):
            loss = model(batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if steps == 300:
                break
        epoch += 1
    score, n = vqa_score(model, make_loader(shards, "val", tokenizer, LoaderConfig(batch_size=128, image_size=32)))
    baseline = read_manifest(shards)["majority_baseline"]["score"]["val"]
    print(f"shapes/vqa val: VQA score {score:.3f} vs majority baseline {baseline:.3f} ({n} samples)")
    assert n == 400
    assert score > baseline + 0.1, (score, baseline)
