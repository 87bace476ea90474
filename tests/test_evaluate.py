"""The evaluate stage: every sample once on the pruning path, metrics equal an independent recomputation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize_trimmers, tiny

import smarttrim
from smarttrim.data.loader import LoaderConfig, make_loader
from smarttrim.data.tokenizer import load_tokenizer
from smarttrim.flops import strip_padding
from stages.evaluate import EvaluateConfig, main, run
from stages.shard import ShardConfig
from stages.shard import run as shard

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def _shards(tmp: Path, task: str) -> Path:
    out = tmp / task
    shard(ShardConfig(source="shapes", task=task, out=str(out), shapes_sizes=(6, 21, 3), shard_size=8))
    return out


def _recompute(model_dir: Path, shards: Path) -> dict[str, float]:
    """Per-instance scores from batch-of-one forwards (no packing), independent of the stage's batching."""
    model = smarttrim.load_model(model_dir).eval()
    tok = load_tokenizer(shards / "tokenizer")
    scores = {}
    with torch.no_grad():
        for batch in make_loader(shards, "val", tok, LoaderConfig(batch_size=1, image_size=32, max_text_len=24)):
            one = strip_padding({k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})
            pred = int(model(one).logits.argmax(-1))
            truth = batch["labels"]
            scores[batch["keys"][0]] = float(truth[0, pred]) if truth.dim() == 2 else float(pred == int(truth[0]))
    return scores


@pytest.mark.parametrize("task", ["vqa", "nlvr2"])
def test_evaluate_matches_independent_recomputation(tmp_path: Path, task: str) -> None:
    shards = _shards(tmp_path, task)
    labels = json.loads((shards / "manifest.json").read_text())["labels"]
    model = tiny(task, trim=smarttrim.TrimConfig(), num_labels=len(labels) if task == "vqa" else None)
    randomize_trimmers(model, seed=1, std=0.3)
    model.save_pretrained(tmp_path / "model")
    result = run(EvaluateConfig(model=str(tmp_path / "model"), shards=str(shards), out=str(tmp_path / "eval"),
                                batch_size=8, threads=1))
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == len({r["key"] for r in rows}) == 21, "every val sample exactly once"
    expected = _recompute(tmp_path / "model", shards)
    assert {r["key"]: r["score"] for r in rows} == pytest.approx(expected)
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["metric"] == pytest.approx(sum(expected.values()) / 21) == pytest.approx(result.metrics["metric"])
    assert m["metric_name"] == ("vqa_score" if task == "vqa" else "accuracy")
    assert set(m["keep"]) == {"vision_tokens", "text_tokens", "heads"} and all(0 <= v <= 1 for v in m["keep"].values())
    assert all(r["prediction"] in labels for r in rows) and m["majority_baseline"] is not None


def test_evaluate_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shards = _shards(tmp_path, "nlvr2")
    tiny("snli_ve").save_pretrained(tmp_path / "snli")
    assert main(["--model", str(tmp_path / "snli"), "--shards", str(shards), "--out", str(tmp_path / "e")]) == 1
    assert "does not match" in capsys.readouterr().err and not (tmp_path / "e").exists()
    retrieval = tmp_path / "retrieval"
    shard(ShardConfig(source="shapes", task="retrieval", out=str(retrieval), shapes_sizes=(2, 2, 2)))
    with pytest.raises(ValueError, match="not evaluated yet"):
        run(EvaluateConfig(model=str(tmp_path / "snli"), shards=str(retrieval), out=str(tmp_path / "e")))


def test_cli_help() -> None:
    out = subprocess.run([sys.executable, "-m", "stages.evaluate", "--help"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert "--model" in out and "predictions.jsonl" in out
