"""Fine-tune stage: DeepSpeed training under Ray Train, checkpoints that survive failures, an exported model.

    python -m stages.finetune --shards data/shapes-vqa --out runs/x/backbone --max-steps 400
    python -m stages.finetune --shards data/shapes-vqa --out runs/x/smarttrim --init runs/x/backbone/model \\
        --trim smarttrim --target 0.5 --set train.lr_mult_trimmer=20 --num-workers 2

Runs a Ray Train V2 ``TorchTrainer`` (a local Ray instance unless ``RAY_ADDRESS`` names a cluster) whose
workers build the model, wrap it in DeepSpeed (``cluster/deepspeed/zero{0,1,2}.json``; gloo on CPU, NCCL
on GPU) and train on the WebDataset shards with METER's recipe (AdamW, learning-rate multipliers for the
cross-modal layers, head and trimmers, warmup + decay, gradient accumulation, fp32 or bf16). SmartTrim's
curriculum follows the training progress. Loss parts (task, cost, self-distillation), the keep ratio of
each trimmer group and throughput are logged every ``train.log_every`` steps.

Checkpoints (DeepSpeed's files + RNG states + curves) go to Ray run storage every ``checkpoint_every``
steps, the last ``keep_checkpoints`` kept. A worker failure restarts the worker group from the latest
checkpoint (up to ``max_failures`` times); a restarted driver with the same output directory (run name and
storage) resumes too, and a resumed run replays the exact batches and random draws of an uninterrupted one.
A NaN/inf loss stops the run with an error naming the step; the last good checkpoint stays.

Writes ``--out`` atomically: ``model/`` (weights + config + tokenizer, loadable with
``smarttrim.load_model`` without Ray or DeepSpeed), ``metrics.json``, ``history.jsonl`` (the curves) and
``curves.png``. A rerun with the same configuration is a no-op. ``--set key=value`` overrides any field of
the configuration (dotted for ``train.*`` and ``trim.*``; values are YAML: numbers, booleans, lists).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from smarttrim.config import TASK_NUM_LABELS, TrimConfig
from smarttrim.training import TrainConfig
from stages.common import StageOutputs, apply_overrides, stage_parser, write_outputs
from stages.finetune_config import FinetuneConfig, check_start, deepspeed_config
from stages.progress import MetricsSink, quiet_ray_logs, say
from stages.ray_connect import RayConnectError, connect
from stages.staging import MIRROR_ENV

# torch, Ray and the model load when a run starts, not with the module: --help is instant


class FinetuneError(RuntimeError):
    """Training did not produce a model (non-finite loss, failures beyond ``max_failures``, bad resume)."""


def _check_inputs(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fail before starting Ray: shards readable, task trainable, init model readable and matching, tokenizer
    loadable, model config valid. What fails inside a Ray Train worker is retried ``max_failures`` times (worker
    failures: a lost node, a killed process), so errors no retry can fix belong here."""
    from smarttrim.data.loader import PRETRAIN_TASKS, read_manifest, shard_tokenizer
    from smarttrim.io import read_config

    manifest = read_manifest(cfg.shards)
    if cfg.objective == "pretrain":
        if manifest["task"] not in PRETRAIN_TASKS:
            raise ValueError(f"{cfg.shards}: task {manifest['task']!r} holds no image-caption pairs to pre-train on "
                             f"(one of {PRETRAIN_TASKS})")
    elif manifest["task"] not in TASK_NUM_LABELS:
        raise ValueError(f"{cfg.shards}: task {manifest['task']!r} cannot be fine-tuned (one of "
                         f"{sorted(TASK_NUM_LABELS)})")
    if cfg.train_split not in manifest["splits"]:
        raise ValueError(f"{cfg.shards}: no split {cfg.train_split!r} (has {sorted(manifest['splits'])})")
    if cfg.init is not None:
        read_config(cfg.init)
    if cfg.pretrained is not None:
        if Path(cfg.pretrained).is_dir():
            read_config(cfg.pretrained)
        elif not Path(cfg.pretrained).is_file():
            raise FileNotFoundError(f"{cfg.pretrained}: no such model directory or METER checkpoint file")
    shard_tokenizer(cfg.shards, cfg.tokenizer)  # loads: a missing or broken tokenizer fails here
    check_start(cfg, manifest)  # the model config's own checks (no weights)
    return manifest


def _trainer(cfg: FinetuneConfig, label: str | None = None, sink: MetricsSink | None = None) -> Any:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from stages.train_loop import train_loop

    if not ray.is_initialized():
        connect()  # RAY_ADDRESS when set (a dead one fails within 30 s), else a local instance
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    return TorchTrainer(
        train_loop,
        train_loop_config={"config": cfg.to_dict(), "fingerprint": cfg.fingerprint(), "label": label, "sink": sink,
                           "mirror": os.environ.get(MIRROR_ENV)},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(name=cfg.name, storage_path=cfg.storage_path,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
    )


def _plot(history: list[dict[str, float]], path: Path) -> None:
    """The curves: loss parts, the periodic validation, keep ratios against γ (SmartTrim only), learning rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in history for k in r})

    def series(key: str) -> tuple[list[float], list[float]]:
        rows = [r for r in history if key in r]
        return [r["step"] for r in rows], [r[key] for r in rows]

    panels = ["loss"]
    if any(k.startswith("val/") and not k.startswith("val/keep/") for k in keys):
        panels.append("val")
    if any(k.startswith("keep/") for k in keys):
        panels.append("keep")
    panels.append("lr")
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "loss":
            for k in ("loss", "task", "cost", "sd", "itm", "mlm"):
                if k in keys:
                    ax.plot(*series(k), label=k)
            ax.set(title="loss parts (training)", xlabel="step", yscale="log")
        elif panel == "val":
            for k in (k for k in keys if k.startswith("val/") and not k.startswith("val/keep/")):
                ax.plot(*series(k), "o-", label=k[4:])
            ax.set(title="validation (fixed subset, eval mode)", xlabel="step")
        elif panel == "keep":
            for k in (k for k in keys if k.startswith("keep/")):
                line, = ax.plot(*series(k), label=f"{k[5:]} (train)")
                if f"gamma/{k[5:]}" in keys:
                    ax.plot(*series(f"gamma/{k[5:]}"), "--", color=line.get_color(), label=f"γ {k[5:]}")
                if f"val/{k}" in keys:
                    ax.plot(*series(f"val/{k}"), "o", color=line.get_color(), label=f"{k[5:]} (val, eval)")
            ax.set(title="keep ratio and target γ", xlabel="step", ylim=(0, 1.05))
        else:
            for k in (k for k in keys if k.startswith("lr/")):
                ax.plot(*series(k), label=k[3:])
            ax.set(title="learning rate", xlabel="step", yscale="log")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(cfg: FinetuneConfig, label: str | None = None, sink: MetricsSink | None = None) -> StageOutputs:
    """Train as configured (resuming the run's latest checkpoint if any) and export into ``cfg.out``.

    ``label`` names the model in the progress lines (``[finetune <label>] step 8/16 ...``; default: the run name);
    ``sink`` receives the curves while they are measured (``stages.progress.MetricsSink``; the pipeline's logs them
    to MLflow). Neither is part of the configuration: they change no fingerprint and no output."""
    from stages.train_loop import EXPORT_DIR

    out = Path(cfg.out)
    fingerprint = cfg.fingerprint()
    done = out / "metrics.json"
    previous = json.loads(done.read_text()) if done.is_file() else {}
    if previous.get("fingerprint") == fingerprint and previous.get("stop_at") == cfg.stop_at:
        say(f"[finetune {label or cfg.name}] {out}: already trained with this configuration, skipping")
        return StageOutputs(out, previous)
    manifest = _check_inputs(cfg)
    from ray.train import TrainingFailedError

    start = time.perf_counter()
    try:
        result = _trainer(cfg, label, sink).fit()
    except TrainingFailedError as err:
        raise FinetuneError(f"{cfg.name}: training failed (after up to {cfg.max_failures} restarts from the "
                            f"latest checkpoint in {cfg.storage_path}): {err}") from err
    ret = result.return_value or {}
    if ret.get("status") != "ok":
        where = f"; last good checkpoint: {result.checkpoint.path}" if result.checkpoint else ""
        raise FinetuneError(f"{cfg.name}: {ret.get('message', f'training ended with {ret!r}')}{where}")
    state = ret["state"]
    history = state["history"]
    metrics = {
        "task": manifest["task"], "fingerprint": fingerprint, "steps": state["step"],
        "total_steps": ret["total_steps"], "stop_at": cfg.stop_at,
        "epochs": len(ret["steps_per_epoch"]), "steps_per_epoch": ret["steps_per_epoch"],
        "samples": state["samples"], "train_seconds": state["train_seconds"],
        "samples_per_s": state["samples"] / state["train_seconds"] if state["train_seconds"] else 0.0,
        "final": history[-1] if history else {}, "resumes": state["resumes"], "world_size": state["world_size"],
        "checkpoint": result.checkpoint.path, "storage": cfg.storage_path, "run_name": cfg.name,
        "driver_seconds": time.perf_counter() - start, "config": cfg.to_dict(), "deepspeed": deepspeed_config(cfg),
    }
    with result.checkpoint.as_directory() as ckpt:
        export = Path(ckpt) / EXPORT_DIR
        if not export.is_dir():
            raise FinetuneError(f"{result.checkpoint.path}: the final checkpoint has no {EXPORT_DIR}/ export")
        write_outputs(out, {
            EXPORT_DIR: lambda p: shutil.copytree(export, p),
            "history.jsonl": lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in history)),
            "curves.png": lambda p: _plot(history, p),
            "metrics.json": lambda p: p.write_text(json.dumps(metrics, indent=2) + "\n"),
        })
    return StageOutputs(out, metrics)


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    train = {"seed": args.seed}
    for name in ("epochs", "max_steps", "batch_size", "lr", "grad_accum", "precision"):
        if getattr(args, name) is not None:
            train[name] = getattr(args, name)
    trim: dict[str, Any] | None = None
    if args.trim == "smarttrim":
        trim = TrimConfig().to_dict()
        if args.target is not None:
            trim.update(token_target_vision=args.target, token_target_text=args.target, head_target=args.target)
    elif args.target is not None:
        raise ValueError("--target needs --trim smarttrim")
    data = FinetuneConfig(shards=args.shards, out=args.out).to_dict()
    data.update(preset=args.preset, init=args.init, pretrained=args.pretrained, trim=trim,
                train={**data["train"], **train},
                num_workers=args.num_workers, use_gpu=args.use_gpu or args.device == "cuda",
                deepspeed=args.deepspeed,
                checkpoint_every=args.checkpoint_every, max_failures=args.max_failures, storage=args.storage,
                run_name=args.run_name, threads=args.threads)
    return FinetuneConfig.from_dict(apply_overrides(data, args.set))


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("python -m stages.finetune", __doc__ or "")
    parser.add_argument("--shards", required=True, help="shard directory or URL (stages.shard output)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--preset", default="meter-tiny", help="model preset when not starting from --init")
    parser.add_argument("--init", help="exported model to start from (backbone + head weights)")
    parser.add_argument("--pretrained", help="official METER .ckpt loaded into the preset model")
    parser.add_argument("--trim", choices=("none", "smarttrim"), default="none",
                        help="train the plain backbone or SmartTrim (TrimConfig defaults; see --target, --set)")
    parser.add_argument("--target", type=float, help="keep target of every SmartTrim group")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--batch-size", type=int, help="micro-batch per worker")
    parser.add_argument("--grad-accum", type=int)
    parser.add_argument("--lr", type=float, help="peak learning rate of the encoders")
    parser.add_argument("--precision", choices=("fp32", "bf16", "bf16-mixed"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=1, help="Ray Train workers")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cuda: one GPU per Ray Train worker (NCCL); cpu: gloo")
    parser.add_argument("--use-gpu", action="store_true", help=argparse.SUPPRESS)  # old spelling of --device cuda
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--deepspeed", default="zero0", help="cluster/deepspeed config name or JSON path")
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--max-failures", type=int, default=2)
    parser.add_argument("--storage", help="Ray Train storage (default: <out>.ray)")
    parser.add_argument("--run-name", help="Ray Train run name (default: the name of --out)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config field, e.g. train.lr_mult_head=50 trim.lambda_cost=20")
    args = parser.parse_args(argv)
    quiet_ray_logs()  # before Ray is imported
    try:
        result = run(config_from_args(args))
    except (ValueError, FileNotFoundError, FinetuneError, RayConnectError) as err:
        print(f"finetune: error: {err}", file=sys.stderr)
        return 1
    from stages.train_loop import EXPORT_DIR

    m = result.metrics
    final = m["final"]
    keep = " ".join(f"{k[5:]}={v:.2f}" for k, v in final.items() if k.startswith("keep/"))
    print(f"{result.out}: {m['steps']} steps, final loss {final.get('loss', float('nan')):.4f} {keep}, "
          f"{m['samples_per_s']:.1f} samples/s, model in {result.out / EXPORT_DIR}")
    return 0


__all__ = ["FinetuneConfig", "FinetuneError", "TrainConfig", "config_from_args", "main", "run"]


if __name__ == "__main__":
    sys.exit(main())
