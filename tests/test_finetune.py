"""The fine-tune stage on a local Ray cluster: 2 DeepSpeed workers (CPU, gloo), an export the evaluate and
profile stages consume, recovery from a killed worker and from a killed driver (both continue the loss curve
of an uninterrupted run), and a clean stop on a non-finite loss."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from safetensors.torch import load_file

import smarttrim
from smarttrim.training import TrainConfig
from stages.evaluate import EvaluateConfig
from stages.evaluate import run as evaluate
from stages.finetune import FinetuneError, run
from stages.finetune_config import FinetuneConfig
from stages.profile import ProfileConfig
from stages.profile import run as profile
from stages.shard import ShardConfig
from stages.shard import run as shard
from stages.train_loop import CHECKPOINT_TAG

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
STEPS = 24


@pytest.fixture(scope="module")
def ray_cluster() -> Any:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "shapes-vqa"
    shard(ShardConfig(source="shapes", task="vqa", out=str(out), shapes_sizes=(320, 40, 8), shard_size=40))
    return out


def _config(shards: Path, out: Path, **overrides: Any) -> FinetuneConfig:
    """2 workers, SmartTrim (all losses on), 24 steps over 2 epochs, checkpoints every 6 steps."""
    train = TrainConfig(max_steps=STEPS, batch_size=8, lr=1e-3, log_every=3, seed=1)
    return FinetuneConfig(shards=str(shards), out=str(out), trim=smarttrim.TrimConfig(token_target_vision=0.5),
                          train=train, num_workers=2, checkpoint_every=6, keep_checkpoints=2, **overrides)


def _checkpoint_steps(cfg: FinetuneConfig) -> list[int]:
    """Steps of the checkpoints Ray Train has registered (its snapshot; files alone may be mid-report)."""
    snapshot = Path(cfg.storage_path) / cfg.name / "checkpoint_manager_snapshot.json"
    try:
        results = json.loads(snapshot.read_text())["checkpoint_results"]
    except (OSError, json.JSONDecodeError):  # not written yet, or being replaced
        return []
    return sorted(r["metrics"]["step"] for r in results)


def _wait_for_checkpoint(cfg: FinetuneConfig, min_step: int, timeout: float = 240.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = _checkpoint_steps(cfg)
        if steps and steps[-1] >= min_step:
            return steps[-1]
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint at step >= {min_step} within {timeout} s")


def _train_workers(parent: psutil.Process) -> list[psutil.Process]:
    found = []
    for p in parent.children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found


def _curve(out: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["keep/vision_tokens"]) for r in rows]


def _assert_same_curve(resumed: Path, reference: Path) -> None:
    a, b = _curve(resumed), _curve(reference)
    assert [s for s, *_ in a] == [s for s, *_ in b] == list(range(3, STEPS + 1, 3)), "every step logged once"
    for (step, loss_a, keep_a), (_, loss_b, keep_b) in zip(a, b, strict=True):
        assert loss_a == pytest.approx(loss_b, rel=1e-4), f"loss at step {step}"
        assert keep_a == pytest.approx(keep_b, abs=1e-4), f"vision keep ratio at step {step}"


@pytest.fixture(scope="module")
def reference(ray_cluster: Any, shards: Path, tmp_path_factory: pytest.TempPathFactory) -> FinetuneConfig:
    """An uninterrupted 2-worker run: the other tests compare their curves with it."""
    cfg = _config(shards, tmp_path_factory.mktemp("reference") / "smarttrim")
    run(cfg)
    return cfg


def test_two_worker_run_exports_a_model_that_evaluate_and_profile_consume(reference: FinetuneConfig,
                                                                          shards: Path, tmp_path: Path) -> None:
    out = Path(reference.out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == STEPS and metrics["world_size"] == 2 and metrics["resumes"] == []
    # 320 samples in 8 shards of 40: 4 shards per rank, 5 batches of 8 per shard -> 20 steps per epoch
    assert metrics["steps_per_epoch"] == [20, 20] and metrics["samples"] == STEPS * 8 * 2
    final = metrics["final"]
    assert {"loss", "task", "cost", "sd", "keep/vision_tokens", "keep/text_tokens", "keep/heads"} <= set(final)
    assert final["loss"] == pytest.approx(final["task"] + 20.0 * final["cost"] + 1.0 * final["sd"], rel=1e-4)
    assert final["samples_per_s"] > 0 and final["lr/trimmer/decay"] == pytest.approx(0.0)
    assert (out / "curves.png").stat().st_size > 10_000
    assert len(_checkpoint_steps(reference)) == 2, "keep_checkpoints=2 (the last two)"

    # the export equals the final DeepSpeed checkpoint's weights and loads without Ray or DeepSpeed
    model = smarttrim.load_model(out / "model")
    assert model.trim_config == reference.trim and model.config.task == "vqa"
    final_ckpt = Path(metrics["checkpoint"]) / CHECKPOINT_TAG / "mp_rank_00_model_states.pt"
    ds_state = torch.load(final_ckpt, map_location="cpu", weights_only=False)["module"]
    exported = load_file(out / "model" / "model.safetensors")
    assert set(ds_state) == set(exported)
    for name, tensor in ds_state.items():
        assert torch.equal(tensor.float(), exported[name]), name

    ev = evaluate(EvaluateConfig(model=str(out / "model"), shards=str(shards), out=str(tmp_path / "eval"),
                                 threads=1)).metrics
    assert ev["instances"] == 40 and 0.0 <= ev["metric"] <= 1.0 and set(ev["keep"]) == set(model.trim_config.targets)
    prof = profile(ProfileConfig(model=str(out / "model"), shards=str(shards), out=str(tmp_path / "profile"),
                                 threads=1, instances=4, batch_size=4, warmup=1)).metrics
    assert prof["flops"]["mean"] > 0 and prof["flops"]["ratio_to_backbone"] <= 1.0

    mtime = (out / "metrics.json").stat().st_mtime_ns
    start = time.monotonic()
    run(reference)  # same configuration: a no-op
    assert time.monotonic() - start < 5 and (out / "metrics.json").stat().st_mtime_ns == mtime


def test_killed_worker_resumes_from_the_last_checkpoint(reference: FinetuneConfig, shards: Path,
                                                        tmp_path: Path) -> None:
    cfg = _config(shards, tmp_path / "smarttrim")
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(out=run(cfg)))
    thread.start()
    step = _wait_for_checkpoint(cfg, 6)
    workers = _train_workers(psutil.Process())
    assert len(workers) == 2
    assert step < STEPS, "the kill must land mid-run"
    workers[-1].send_signal(signal.SIGKILL)
    thread.join(timeout=400)
    assert not thread.is_alive() and "out" in result
    metrics = result["out"].metrics
    assert metrics["steps"] == STEPS
    assert len(metrics["resumes"]) == 1 and 6 <= metrics["resumes"][0]["step"] < STEPS
    _assert_same_curve(tmp_path / "smarttrim", Path(reference.out))


def test_restarted_driver_resumes_and_continues_the_loss_curve(reference: FinetuneConfig, shards: Path,
                                                               tmp_path: Path, ray_cluster: Any) -> None:
    cfg = _config(shards, tmp_path / "smarttrim")
    args = [sys.executable, "-m", "stages.finetune", "--shards", str(shards), "--out", cfg.out, "--trim",
            "smarttrim", "--set", "trim.token_target_vision=0.5", "--max-steps", str(STEPS), "--batch-size", "8",
            "--lr", "1e-3", "--seed", "1", "--set", "train.log_every=3", "--num-workers", "2",
            "--checkpoint-every", "6", "--set", "keep_checkpoints=2"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    driver = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        step = _wait_for_checkpoint(cfg, 6)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    assert step < STEPS
    deadline = time.monotonic() + 60  # the run's actors die with their driver
    while _train_workers(psutil.Process()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not (Path(cfg.out) / "metrics.json").exists()
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((Path(cfg.out) / "metrics.json").read_text())
    assert metrics["steps"] == STEPS and len(metrics["resumes"]) == 1
    assert metrics["resumes"][0]["step"] >= step
    _assert_same_curve(Path(cfg.out), Path(reference.out))


def test_non_finite_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(ray_cluster: Any, shards: Path,
                                                                          tmp_path: Path) -> None:
    # lr 1e30: after the first update the weights are ~1e30 and the next forward overflows to inf/NaN
    cfg = dataclasses.replace(_config(shards, tmp_path / "nan"), num_workers=1, checkpoint_every=1,
                              train=TrainConfig(max_steps=10, batch_size=8, lr=1e30, warmup=0.0, log_every=1))
    with pytest.raises(FinetuneError, match=r"non-finite loss at step \d+") as err:
        run(cfg)
    assert "last good checkpoint" in str(err.value)
    steps = _checkpoint_steps(cfg)
    assert steps and steps[-1] < 10, "checkpoints up to the last finite step stay"
    assert not Path(cfg.out).exists(), "no export of a diverged run"


def test_bf16_zero2_with_accumulation_exports_the_fp32_master_weights(ray_cluster: Any, shards: Path,
                                                                      tmp_path: Path) -> None:
    train = TrainConfig(max_steps=6, batch_size=8, grad_accum=2, lr=1e-3, log_every=3, precision="bf16")
    cfg = dataclasses.replace(_config(shards, tmp_path / "bf16"), deepspeed="zero2", train=train, checkpoint_every=3)
    metrics = run(cfg).metrics
    # 4 shards of 40 per rank: 20 micro-batches -> 10 steps an epoch; 6 steps x 2 micro x 8 x 2 ranks samples
    assert metrics["steps"] == 6 and metrics["steps_per_epoch"] == [10] and metrics["samples"] == 6 * 2 * 8 * 2
    assert metrics["deepspeed"]["bf16"] == {"enabled": True} and metrics["deepspeed"]["zero_optimization"]["stage"] == 2
    assert [r["step"] for r in json.loads("[" + ",".join((tmp_path / "bf16" / "history.jsonl").read_text()
                                                         .splitlines()) + "]")] == [3, 6]
    exported = load_file(tmp_path / "bf16" / "model" / "model.safetensors")
    ds_state = torch.load(Path(metrics["checkpoint"]) / CHECKPOINT_TAG / "mp_rank_00_model_states.pt",
                          map_location="cpu", weights_only=False)["module"]
    name = "backbone.cross_modal_text_layers.0.attention.self.query.weight"
    assert ds_state[name].dtype == torch.bfloat16 and exported[name].dtype == torch.float32
    assert not torch.equal(exported[name], ds_state[name].float()), "the export holds fp32 masters, not bf16 copies"
    assert torch.allclose(exported[name].bfloat16().float(), ds_state[name].float(), rtol=0, atol=0), \
        "the bf16 working weights are the rounded fp32 masters"
    smarttrim.load_model(tmp_path / "bf16" / "model")


def test_errors_no_retry_can_fix_are_raised_before_ray_train(shards: Path, tmp_path: Path) -> None:
    """A start model of another task, a missing tokenizer, a bad image size: refused on the driver, before any Ray
    Train worker (which would retry each ``max_failures`` times, leaving a ``.ray/`` directory behind)."""
    other = tmp_path / "nlvr2-model"
    smarttrim.build_model("meter-tiny", task="nlvr2").save_pretrained(other)
    bad = {"init": (dict(init=str(other)), "model is nlvr2 with 2 labels, the shards are vqa"),
           "tokenizer": (dict(tokenizer=str(tmp_path / "no-tokenizer")), "no-tokenizer"),
           "image_size": (dict(image_size=30), "image_size")}
    for name, (overrides, message) in bad.items():
        cfg = _config(shards, tmp_path / name, **overrides)
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            run(cfg)
        assert not Path(cfg.storage_path).exists(), name
