"""``pipeline/configs/paper.yaml`` as a user runs it: only the data roots, the tokenizer and the METER checkpoint are
the user's, everything else is the file's (tasks, splits, targets, ablations, recipes, GPU settings), shrunk to tiny
sizes and steps; ``runs_dir`` and Ray Train's ``compute.storage`` are ``file://`` URIs, and ``runs_dir`` is staged as an
object store is (``runs_dir_mode: staged``: stages work in node-local copies, results stored through pyarrow; a second
driver with an empty cache then plans, reports and re-evaluates from the store alone). The data are small sets in
the four sources' official layouts, the checkpoint carries the key names of an official METER pre-training
checkpoint (``tests/test_checkpoints.py``'s mirror of METER's modules)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from official_data import write_flickr30k, write_nlvr2, write_snli_ve, write_vqa_v2
from test_checkpoints import _meter_mirror, _meter_state, _save

import smarttrim
from pipeline.config import load_config
from pipeline.storage import CACHE_ENV
from smarttrim.data.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

TINY = ["model.preset=meter-tiny", "compute.num_workers=1", "compute.use_gpu=false", "compute.cpus_per_worker=1",
        "compute.threads=1", "compute.checkpoint_every=2", "evaluate.threads=1",
        "evaluate.batch_size=16", "profile.instances=4", "profile.batch_size=4", "profile.cpus=1",
        "ablations.variants=[no_self_distill]"]
"""Sizes and steps only: a 2-core machine instead of 8 GPUs (the file's bf16 under ZeRO-2 stays), meter-tiny instead of
meter-base, and one of the file's three ablations (each is SmartTrim with one switch off, as the quickstart's tests
cover; 20 fine-tunings instead of 28 keep the suite's time)."""


def test_paper_config_runs_with_only_the_users_paths(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_vqa_v2(data / "vqa_v2", train=60, val=12)
    nlvr2 = write_nlvr2(data / "nlvr2", {"train": 24, "dev": 6, "test1": 5})
    snli = write_snli_ve(data / "snli_ve", {"train": 24, "dev": 6, "test": 5})
    flickr = write_flickr30k(data / "flickr30k", {"train": 16, "val": 5, "test": 4})
    corpus = [json.loads(line)["sentence"] for line in (data / "nlvr2" / "train.json").read_text().splitlines()]
    corpus += [c for captions in flickr["train"] for c in captions] + ["what color is the object ?",
                                                                       "what shape is the object ?"]
    tokenizer = train_tokenizer(corpus, tmp_path / "roberta-base", vocab_size=512)  # stands in for RoBERTa's
    mirror = _meter_mirror("pretrain", smarttrim.model_config("meter-tiny", task="vqa", num_labels=3))
    checkpoint = _save(_meter_state(mirror), tmp_path / "meter_clip16_288_roberta_pretrain.ckpt")

    cfg = load_config(ROOT / "pipeline/configs/paper.yaml")
    roots = {"vqa": "vqa_v2", "nlvr2": "nlvr2", "snli-ve": "snli_ve", "flickr30k": "flickr30k"}
    storage = tmp_path / "checkpoints"  # Ray Train's storage as a URI, through pyarrow as for s3:// or gs://
    paths = [f"model.pretrained={checkpoint}", f"runs_dir={(tmp_path / 'runs').as_uri()}",  # file:///...
             "runs_dir_mode=staged", f"compute.storage={storage.as_uri()}"]
    steps = []
    for i, task in enumerate(cfg.tasks):
        paths += [f"tasks.{i}.data.root={data / roots[task.name]}", f"tasks.{i}.data.tokenizer={tokenizer}"]
        steps += [f"tasks.{i}.data.shard_size=40"] + [
            f"tasks.{i}.{recipe}.{k}={v}" for recipe in ("backbone", "smarttrim")
            for k, v in (("max_steps", 2), ("batch_size", 8), ("grad_accum", 1), ("log_every", 1))]
    def pipeline(command: str, cache: str, *extra: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
        env[CACHE_ENV] = str(tmp_path / cache)  # this "node's" local copies
        done = subprocess.run([sys.executable, "-m", "pipeline.run", command, "--config", "pipeline/configs/paper.yaml",
                               *paths, *TINY, *steps, *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=1800)
        assert done.returncode == 0, done.stderr[-4000:]
        return done

    pipeline("all", "cache-a")

    report = json.loads((tmp_path / "runs" / "paper" / "results.json").read_text())
    models = [e for e in report["results"] if e["kind"] != "prior"]
    assert cfg.ablations.variants == ("no_stable_init", "no_curriculum", "no_self_distill") and \
        cfg.ablations.target == "2x", "the file's ablations (the run trains the last one)"
    variants = {"backbone", "smarttrim-1.5x", "smarttrim-2x", "smarttrim-2.5x", "no_self_distill-2x"}
    assert {e["name"] for e in models} == {f"{t}/{v}" for t in roots for v in variants}
    assert all(e["start"] == "pretrained" and e["start_from"] == str(checkpoint) for e in models)
    priors = {e["name"]: e["metric"] for e in report["results"] if e["kind"] == "prior"}
    assert set(priors) == {f"{t}/{p}" for t in ("vqa", "nlvr2", "snli-ve") for p in ("majority", "text_only")}
    for task, labels, split in (("nlvr2", nlvr2, "dev"), ("snli-ve", snli, "dev")):
        train = labels["train"]
        majority = max(sorted(set(train)), key=lambda y: (train.count(y), -train.index(y)))
        assert priors[f"{task}/majority"] == pytest.approx(
            sum(y == majority for y in labels[split]) / len(labels[split])), task
    splits: dict[str, set[str]] = {}
    for marker in (tmp_path / "runs" / "paper" / "evaluate").glob("*.done.json"):  # evaluate/ and test/ stages
        splits.setdefault(marker.name.split("-")[0], set()).add(json.loads(marker.read_text())["metrics"]["split"])
    runs = {p.name for p in storage.iterdir()}
    assert len(runs) == len(models) and all(r.startswith(tuple(roots)) for r in runs), runs
    assert not list((tmp_path / "runs" / "paper" / "finetune").glob("*.ray")), "no checkpoints beside the outputs"
    devices = {json.loads(m.read_text())["metrics"]["device"] for kind in ("evaluate", "profile")
               for m in (tmp_path / "runs" / "paper" / kind).glob("*.done.json")}
    assert devices == {"cpu"}, "the file's device: auto runs on CPU on a machine without GPUs"
    assert splits == {"vqa": {"val2014"}, "nlvr2": {"dev", "test1"}, "snli": {"dev", "test"},
                      "flickr30k": {"test"}}, "the official files' splits; Flickr30K on Karpathy test as reported"
    tested = {e["name"].split("/")[0]: e["test"] for e in models if e["test"]}
    assert set(tested) == {"nlvr2", "snli-ve"} and tested["nlvr2"]["instances"] == len(nlvr2["test1"])
    retrieval = [e for e in models if e["task"] == "flickr30k"]
    assert all(e["metric_name"] == "mean_recall" for e in retrieval)

    assert all(e["model_dir"].startswith(str(tmp_path / "runs" / "paper" / "finetune")) for e in models), \
        "the report names the stored models"

    # a second driver, nothing local: the store alone says what is done, and gives the report its numbers
    plan = pipeline("plan", "cache-b").stdout
    assert f"{len(list((tmp_path / 'runs' / 'paper').glob('*/*.done.json')))} cached, 0 run" in plan, plan[:300]
    (tmp_path / "runs" / "paper" / "results.json").unlink()
    pipeline("report", "cache-b")
    assert json.loads((tmp_path / "runs" / "paper" / "results.json").read_text())["results"] == report["results"]
    fetched = [p for p in (tmp_path / "cache-b").rglob("*") if p.is_file()]
    assert not [p for p in fetched if p.suffix in (".tar", ".safetensors") or "model" in p.parts], \
        "the driver fetched metrics and curves, not weights or shards"
    # a forced evaluation on that driver's node fetches its model and shards; the first copy is then stale
    evaluation = "evaluate/snli-ve/smarttrim-2x"
    before = next(m for m in (tmp_path / "runs" / "paper" / "evaluate").glob("snli-ve-smarttrim-2x-*.done.json")
                  if json.loads(m.read_text())["id"] == evaluation)  # not test/snli-ve/smarttrim-2x's
    old = json.loads(before.read_text())
    pipeline("evaluate", "cache-b", "--force", evaluation)
    new = json.loads(before.read_text())
    assert new["seconds"] != old["seconds"] and new["metrics"]["metric"] == old["metrics"]["metric"]
    assert list((tmp_path / "cache-b").rglob("snli-ve-smarttrim-2x-*/model/model.safetensors"))
    pipeline("report", "cache-a")
    copy = next((tmp_path / "cache-a").rglob(before.name))
    assert json.loads(copy.read_text()) == new, "the first driver's stale copy was fetched again"
