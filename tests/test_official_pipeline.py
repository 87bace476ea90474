"""``pipeline.run all`` on data in an official layout, configured by its source and root alone: the task's splits
are the official files' (``train2014`` / ``val2014``), the shard stage trains the tokenizer the config leaves out,
the report's numbers are those of the fixture, and the hidden-answer test split gets the official results file.
NLVR2 and SNLI-VE run through ``tests/test_paper_config.py`` (paper.yaml on all four official layouts)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import bench_module
from official_data import write_flickr30k

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

CONFIG = """
name: official
model: {{preset: meter-tiny}}
tasks:
  - name: {name}
    data: {{source: {source}, task: {task}, root: {root}, shard_size: 40}}
    backbone: {{max_steps: 6, batch_size: 16, log_every: 3}}
    smarttrim: {{max_steps: 6, batch_size: 16, log_every: 3}}
targets: [{{name: 2x, token_target_vision: 0.3, token_target_text: 0.5, head_target: 0.4}}]
trim: {{vision_token_layers: null}}
compute: {{checkpoint_every: 6}}
profile: {{instances: 4, batch_size: 4, cpus: 1}}
runs_dir: {runs}
"""
"""A config that names a task's source and root only (the test overrides add what a test needs)."""


def _run_all(tmp_path: Path, name: str, source: str, task: str, root: Path, *overrides: str) -> Path:
    """``pipeline.run all`` on ``CONFIG`` in a fresh process; returns the run directory."""
    config = tmp_path / "official.yaml"
    config.write_text(CONFIG.format(name=name, source=source, task=task, root=root, runs=tmp_path / "runs"))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    done = subprocess.run([sys.executable, "-m", "pipeline.run", "all", "--config", str(config), *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return tmp_path / "runs" / "official"


def test_vqa_v2_runs_end_to_end_from_its_root_alone(tmp_path: Path) -> None:
    root = tmp_path / "vqa_v2"
    oo = bench_module("one_object")  # the official file names and fields of VQA v2
    oo.write_split(root, "train2014", 60, seed=0)
    oo.write_split(root, "val2014", 12, seed=0)
    oo.write_split(root, "test-dev2015", 5, seed=0)
    (root / "v2_mscoco_test-dev2015_annotations.json").unlink()  # the answers of the test splits are hidden
    (root / "test2015").mkdir()  # test-dev2015 asks about images of test2015, and the release stores them there
    for image in (root / "test-dev2015").iterdir():
        image.rename(root / "test2015" / image.name.replace("test-dev2015", "test2015"))
    (root / "test-dev2015").rmdir()
    run_dir = _run_all(tmp_path, "vqa", "vqa_v2", "vqa", root, "tasks.0.test_split=test-dev2015")
    entries = {e["name"]: e for e in json.loads((run_dir / "results.json").read_text())["results"]}
    assert set(entries) == {"vqa/backbone", "vqa/smarttrim-2x", "vqa/majority", "vqa/text_only"}
    # the baselines recomputed from the fixture's files: fitted on train2014, scored on val2014 (10 identical
    # annotator answers per question, so a prediction scores 1 or 0)
    def answers(split: str) -> list[str]:
        notes = json.loads((root / f"v2_mscoco_{split}_annotations.json").read_text())["annotations"]
        return [a["multiple_choice_answer"] for a in notes]

    train, val = answers("train2014"), answers("val2014")
    majority = Counter(train).most_common(1)[0][0]
    assert entries["vqa/majority"]["metric"] == pytest.approx(sum(a == majority for a in val) / len(val))
    questions = json.loads((root / "v2_OpenEnded_mscoco_train2014_questions.json").read_text())["questions"]
    best = {q: Counter(a for x, a in zip(questions, train, strict=True) if x["question"] == q).most_common(1)[0][0]
            for q in {x["question"] for x in questions}}
    val_questions = json.loads((root / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())["questions"]
    text_only = sum(best[q["question"]] == a for q, a in zip(val_questions, val, strict=True)) / len(val)
    assert entries["vqa/text_only"]["metric"] == pytest.approx(text_only)

    def stage_dir(kind: str, prefix: str) -> Path:
        (found,) = [p for p in (run_dir / kind).iterdir()
                    if p.is_dir() and re.fullmatch(rf"{prefix}-[0-9a-f]{{12}}", p.name)]
        return found

    shard_dir = stage_dir("shard", "vqa")
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    assert manifest["tokenizer"] == "tokenizer" and set(manifest["splits"]) == {"train2014", "val2014", "test-dev2015"}
    for name in ("backbone", "smarttrim-2x"):
        e = entries[f"vqa/{name}"]
        ev_dir = stage_dir("evaluate", f"vqa-{name}")
        metrics = json.loads((ev_dir / "metrics.json").read_text())
        rows = (ev_dir / "predictions.jsonl").read_text().splitlines()
        assert metrics["split"] == "val2014" and metrics["instances"] == len(rows) == len(val_questions), name
        assert e["metric"] == pytest.approx(sum(json.loads(r)["score"] for r in rows) / len(rows)), name
        labels = json.loads(Path(e["model_dir"], "config.json").read_text())["labels"]
        assert labels == manifest["labels"], "the model records the label vocabulary it was trained with"
        vocab = [json.loads(Path(d, "tokenizer.json").read_text())["model"]["vocab"]
                 for d in (Path(e["model_dir"], "tokenizer"), shard_dir / "tokenizer")]
        assert vocab[0] == vocab[1], "the model carries the tokenizer the shard stage trained"

        test = e["test"]
        assert test["split"] == "test-dev2015" and test["metric"] is None and test["instances"] == 10, name
        official = json.loads(Path(test["results_file"]).read_text())
        asked = json.loads((root / "v2_OpenEnded_mscoco_test-dev2015_questions.json").read_text())["questions"]
        assert Path(test["results_file"]).name == "vqa_OpenEnded_mscoco_test-dev2015_smarttrim_results.json"
        assert sorted(r["question_id"] for r in official) == sorted(q["question_id"] for q in asked), name
        assert {r["answer"] for r in official} <= set(manifest["labels"]), name
    assert "held-out test split (test-dev2015)" in (run_dir / "report.md").read_text()


def test_flickr30k_retrieval_runs_end_to_end_as_meter_trains_and_scores_it(tmp_path: Path) -> None:
    root = tmp_path / "flickr30k"
    captions = write_flickr30k(root, {"train": 16, "val": 5, "test": 4}, captions=2)
    run_dir = _run_all(tmp_path, "t", "karpathy_flickr30k", "retrieval", root, "tasks.0.false_texts=3")
    entries = {e["name"]: e for e in json.loads((run_dir / "results.json").read_text())["results"]}
    assert set(entries) == {"t/backbone", "t/smarttrim-2x"}, "retrieval has no answer priors"
    finetunes = [json.loads(p.read_text()) for p in (run_dir / "finetune").glob("*.done.json")]
    assert len(finetunes) == 2
    for name in ("backbone", "smarttrim-2x"):
        e = entries[f"t/{name}"]
        (ev_dir,) = [p for p in (run_dir / "evaluate").iterdir()
                     if p.is_dir() and re.fullmatch(rf"t-{name}-[0-9a-f]{{12}}", p.name)]
        m = json.loads((ev_dir / "metrics.json").read_text())
        images, texts = len(captions["val"]), sum(len(c) for c in captions["val"])
        assert m["split"] == "val" and (m["images"], m["texts"]) == (images, texts), name
        assert m["pairs_scored"] == m["pairs_total"] == images * texts, "every pair scored, as METER does"
        recalls = [m[k] for k in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10")]
        assert e["metric"] == pytest.approx(sum(recalls) / 6) and m["ir_r5"] == m["tr_r10"] == 1.0, \
            "5 images, 10 captions: a caption's image is always in the top 5, an image's captions in the top 10"
        assert e["test"]["split"] == "test" and e["test"]["instances"] == 4 and 0 <= e["test"]["metric"] <= 1, name
