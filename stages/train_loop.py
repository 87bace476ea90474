"""The training worker of ``stages.finetune``: runs inside each Ray Train worker process.

One call of ``train_loop`` per worker: build the model (same init on every rank), wrap it in a DeepSpeed
engine (AdamW with METER's parameter groups, warmup + decay, gradient accumulation, clipping, fp32/bf16,
ZeRO stage from the JSON config), resume from the latest Ray checkpoint if there is one, then train over
planned epochs of the WebDataset shards, driving SmartTrim's curriculum with ``set_progress``.

Every ``checkpoint_every`` steps and at the end, all ranks write a DeepSpeed checkpoint plus this rank's RNG
states into a local directory and report it with ``ray.train.report`` (Ray uploads it to run storage and
keeps the last K). Rank 0 adds ``trainer_state.json`` (step, curves, resumes, config fingerprint); the final
checkpoint also holds ``model/``, the exported fp32 model. A resumed run replays exactly: the epoch plan and
``LoaderConfig.skip_batches`` put the data at the same batch, the RNG states are restored, so its loss
curve continues the interrupted one.

Rank 0 prints every logged row and validation as ``[finetune <label>] step 8/16 ... ETA 1m20s`` (the label names the
model, e.g. ``shapes-vqa/smarttrim-2x``; the ETA is this attempt's wall time per step so far, checkpoints and
validations included, times the steps left) and hands them to the payload's ``MetricsSink``, if any, as they are
measured (the pipeline's logs them to the model's MLflow run).

Before each step the ranks all-reduce the loss parts; a NaN/inf on any rank stops every rank before the
bad step is applied, and rank 0 returns ``{"status": "nonfinite", ...}`` (a return value, not an
exception: Ray would retry an exception from the last checkpoint and meet the same NaN again).
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smarttrim.data.loader import LoaderConfig, make_loader, read_manifest, shard_tokenizer
from smarttrim.io import save_pretrained
from smarttrim.model import GROUPS, SmartTrimModel
from smarttrim.pretraining import PretrainModel, pretrain_accuracy, save_pretrain
from smarttrim.training import lr_lambda, param_groups
from stages.common import instance_scores, to_device
from stages.finetune_config import FinetuneConfig, build_initial_model, deepspeed_config, epoch_schedule
from stages.progress import MetricsSink, eta, say
from stages.staging import localize

CHECKPOINT_TAG = "deepspeed"
STATE_FILE = "trainer_state.json"
EXPORT_DIR = "model"


@dataclass
class TrainerState:
    """What rank 0 writes into every checkpoint besides DeepSpeed's files."""

    step: int = 0
    fingerprint: str = ""
    world_size: int = 1
    history: list[dict[str, float]] = field(default_factory=list)
    resumes: list[dict[str, Any]] = field(default_factory=list)
    samples: int = 0
    """Training samples consumed over all ranks (steps x global batch)."""
    train_seconds: float = 0.0
    """Wall time spent in training steps (not in checkpointing), summed over attempts."""


def step_position(steps_per_epoch: list[int], step: int, accum: int) -> tuple[int, int]:
    """(epoch, micro-batches of that epoch already done) of global ``step`` given each epoch's steps."""
    for epoch, n in enumerate(steps_per_epoch):
        if step < n:
            return epoch, step * accum
        step -= n
    raise ValueError(f"step {step} is past the planned epochs")


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(values)
        values /= torch.distributed.get_world_size()
    return values


def _to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Tensors to ``device``; images to the engine's dtype (bf16 weights need bf16 inputs)."""
    out = to_device(batch, device)
    out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


@dataclass
class _Window:
    """Sums of the all-reduced per-micro-batch values over one logging window of optimizer steps."""

    sums: dict[str, float] = field(default_factory=dict)
    micro: int = 0
    samples: int = 0
    seconds: float = 0.0

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.micro += 1

    def row(self, step: int, epoch: int, lrs: dict[str, float], gamma: dict[str, float]) -> dict[str, float]:
        """The window's curve point (means per micro-batch), then an empty window."""
        row = {"step": step, "epoch": epoch, **{k: v / max(1, self.micro) for k, v in self.sums.items()},
               **{f"lr/{k}": v for k, v in lrs.items()}, **{f"gamma/{k}": v for k, v in gamma.items()},
               "samples_per_s": self.samples / self.seconds if self.seconds else 0.0}
        self.sums, self.micro, self.samples, self.seconds = {}, 0, 0, 0.0
        return row


def export_state(engine: Any, bf16: bool) -> dict[str, torch.Tensor]:
    """The full fp32 state dict (collective under ZeRO: every rank must call it): with bf16 the parameters
    come from the optimizer's fp32 master copies, not the bf16 working weights."""
    state = {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}
    if bf16:
        from deepspeed.utils import safe_get_full_fp32_param

        for name, p in engine.module.named_parameters():
            full = safe_get_full_fp32_param(p)
            if full is None:
                raise RuntimeError(f"no fp32 master copy of parameter {name} (bf16 needs ZeRO stage >= 1)")
            state[name] = full.detach().float().cpu()
    return state


def export_model(module: SmartTrimModel | PretrainModel, weights: dict[str, torch.Tensor], path: Path,
                 labels: list[str] | None = None) -> None:
    """The exported model directory from the full fp32 state dict: a task model (``save_pretrained``; its
    ``config.json`` records ``labels``, the training shards' label vocabulary, which evaluation checks) or, for
    pre-training, the ITM model plus its MLM head (``save_pretrain``)."""
    if isinstance(module, PretrainModel):
        export = PretrainModel(module.config, vision_weight=module.vision_weight)
        export.load_state_dict(weights)  # the object head is not exported: fine-tuning starts from the backbone
        save_pretrain(export, path, extra={"tokenizer": "tokenizer"})
        return
    export = SmartTrimModel(module.config, module.trim_config)
    export.load_state_dict(weights)
    save_pretrained(export, path, extra={"tokenizer": "tokenizer", "labels": list(labels or [])})


@dataclass
class Validation:
    """The periodic validation of a fine-tuning (rank 0): a fixed subset of the validation split, the model in
    eval mode (the pruning path for SmartTrim), the task metric and keep ratios (pre-training: ITM and MLM
    accuracy) merged into the curve at that step as ``val/*``."""

    batches: list[dict[str, Any]]
    task: str
    every: int | None
    checkpoint_every: int

    @staticmethod
    def build(cfg: FinetuneConfig, manifest: dict[str, Any], tokenizer: Any,
              model: SmartTrimModel | PretrainModel) -> Validation | None:
        if cfg.val_split is None or cfg.val_split not in manifest["splits"]:
            return None
        batch_size = min(64, cfg.val_samples)
        if manifest["task"] == "retrieval" and cfg.objective == "task":  # false texts come from the batch's others
            used = min(cfg.val_samples, manifest["splits"][cfg.val_split]["samples"])
            if used < 2:
                return None
            if used % batch_size == 1:  # no one-image batch at the end
                batch_size = batch_size - 1 if batch_size > 2 else batch_size + 1
        loader = make_loader(cfg.shards, cfg.val_split, tokenizer, LoaderConfig(
            batch_size=batch_size, image_size=model.config.image_size,
            max_text_len=model.config.max_text_len, objective=cfg.objective, false_texts=cfg.false_texts, rank=0,
            world_size=1))
        batches, n = [], 0
        for batch in loader:
            batches.append(batch)
            n += len(batch["keys"])
            if n >= cfg.val_samples:
                break
        task = "pretrain" if cfg.objective == "pretrain" else manifest["task"]
        return Validation(batches, task, cfg.val_every, cfg.checkpoint_every) if batches else None

    def due(self, step: int, end: int) -> bool:
        return step == end or step % (self.every or self.checkpoint_every) == 0

    def record(self, state: TrainerState, engine: Any, epoch: int, prefix: str) -> dict[str, float]:
        """Validate at ``state.step``: merge the values into the curve, print them; returns them."""
        module = engine.module
        dtype = next(module.parameters()).dtype
        module.eval()
        sums: dict[str, float] = {}
        with torch.inference_mode():
            for batch in self.batches:
                out = module(_to_device(batch, engine.device, dtype))
                if self.task == "pretrain":
                    parts = {k: float(v) for k, v in pretrain_accuracy(out, batch).items()}
                else:
                    scores = instance_scores(self.task, out.logits.float().cpu(), batch["labels"])
                    parts = {"metric": float(scores.sum()), "n": float(len(scores)),
                             **{f"keep/{g}": float(v.float().sum()) for g, v in out.keep_groups.items()}}
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
        module.train()
        if self.task == "pretrain":
            values = {"val/itm_accuracy": sums["itm_correct"] / sums["itm_pairs"],
                      "val/mlm_accuracy": sums["mlm_correct"] / max(1.0, sums["mlm_tokens"])}
        else:
            values = {f"val/{k}": v / sums["n"] for k, v in sums.items() if k != "n"}
        if state.history and state.history[-1]["step"] == state.step:
            state.history[-1].update(values)
        else:
            state.history.append({"step": state.step, "epoch": epoch, **values})
        shown = " ".join(f"{k[4:]}={v:.4f}" for k, v in values.items())
        say(f"{prefix} step {state.step} validation ({sum(len(b['keys']) for b in self.batches)} samples): {shown}")
        return values


def train_loop(payload: dict[str, Any]) -> dict[str, Any]:
    """The Ray Train worker function. ``payload``: ``config`` (``FinetuneConfig.to_dict()``), ``fingerprint``, and
    optionally ``label`` (the name progress lines give the model, e.g. ``shapes-vqa/smarttrim-2x``; default: the run
    name), ``sink`` (a ``MetricsSink`` rank 0 logs every curve row and validation to, as they are measured) and
    ``mirror`` (a staged run's ``stages.staging.Mirror.to_env()``: where to fetch inputs from); none enters the
    fingerprint."""
    import ray.train

    sink: MetricsSink | None = payload.get("sink") if ray.train.get_context().get_world_rank() == 0 else None
    try:
        return _train(payload, sink)
    finally:
        if sink is not None:
            _tracked(sink.close)


def _tracked(call: Any, *args: Any) -> None:
    """A sink call that cannot fail the training (sinks should not raise; this makes sure)."""
    try:
        call(*args)
    except Exception as err:  # tracking is never worth a failed training
        say(f"[finetune] warning: metrics sink failed: {type(err).__name__}: {err}")


def _train(payload: dict[str, Any], sink: MetricsSink | None) -> dict[str, Any]:
    import deepspeed
    import ray.train
    import ray.train.torch

    cfg = FinetuneConfig.from_dict(payload["config"])
    # a staged run (pipeline.storage): the inputs on this worker's node
    localize(cfg.shards, cfg.init, cfg.pretrained, cfg.tokenizer, mirror=payload.get("mirror"))
    prefix = f"[{'pretrain' if cfg.objective == 'pretrain' else 'finetune'} {payload.get('label') or cfg.name}]"
    tcfg = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.threads)
    if cfg.use_gpu:  # DeepSpeed places the engine on the current device: the GPU Ray assigned this worker
        torch.cuda.set_device(ray.train.torch.get_device())
    torch.manual_seed(tcfg.seed)  # identical initialization on every rank
    manifest = read_manifest(cfg.shards)
    tokenizer = shard_tokenizer(cfg.shards, cfg.tokenizer)
    model = build_initial_model(cfg, manifest)
    base = LoaderConfig(batch_size=tcfg.batch_size, image_size=model.config.image_size,
                        max_text_len=model.config.max_text_len, train=True, seed=tcfg.seed,
                        num_workers=cfg.loader_workers, rank=rank, world_size=world, objective=cfg.objective,
                        false_texts=cfg.false_texts)
    validation = Validation.build(cfg, manifest, tokenizer, model) if rank == 0 else None
    plans, steps_per_epoch, total = epoch_schedule(cfg, manifest, base, world)

    groups = param_groups(model, tcfg)
    optimizer = torch.optim.AdamW(groups, betas=tcfg.betas, eps=tcfg.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg, total))
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=deepspeed_config(cfg))
    dtype = next(engine.module.parameters()).dtype
    module: SmartTrimModel = engine.module
    group_names = [g["name"] for g in groups]

    state = TrainerState(fingerprint=payload["fingerprint"], world_size=world)
    torch.manual_seed(tcfg.seed * 1000 + rank + 1)  # dropout and Gumbel noise differ between ranks
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            saved = TrainerState(**json.loads((Path(ckpt_dir) / STATE_FILE).read_text()))
            if saved.fingerprint != state.fingerprint or saved.world_size != world:
                return {"status": "mismatch", "message": (
                    f"checkpoint {checkpoint.path} was written by a different configuration "
                    f"(fingerprint {saved.fingerprint[:12]}, {saved.world_size} workers) than this run "
                    f"({state.fingerprint[:12]}, {world} workers); use another run name or output directory")}
            engine.load_checkpoint(ckpt_dir, tag=CHECKPOINT_TAG)
            _set_rng_state(torch.load(Path(ckpt_dir) / f"rng_rank{rank}.pt", weights_only=False))
            state = saved
            state.resumes.append({"step": saved.step, "checkpoint": checkpoint.path, "time": time.time()})
        if rank == 0:
            say(f"{prefix} resumed from step {state.step}/{total} ({checkpoint.path})")

    def save(final: bool) -> None:
        with tempfile.TemporaryDirectory(prefix="smarttrim-ckpt-") as tmp:
            engine.save_checkpoint(tmp, tag=CHECKPOINT_TAG)
            torch.save(_rng_state(), Path(tmp) / f"rng_rank{rank}.pt")
            weights = export_state(engine, tcfg.precision == "bf16") if final else None
            if rank == 0:
                (Path(tmp) / STATE_FILE).write_text(json.dumps(state.__dict__))
                if weights is not None:
                    export_model(module, weights, Path(tmp) / EXPORT_DIR, manifest.get("labels"))
                    tokenizer.save_pretrained(str(Path(tmp) / EXPORT_DIR / "tokenizer"))
            metrics = {"step": state.step, "final": final, **(state.history[-1] if state.history else {})}
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    window = _Window()
    keys: list[str] | None = None
    epoch, done_micro = step_position(steps_per_epoch, state.step, tcfg.grad_accum) if state.step < total \
        else (len(steps_per_epoch), 0)
    end = total if cfg.stop_at is None else min(total, cfg.stop_at)
    first_step, started = state.step, time.perf_counter()  # the ETA: this attempt's wall time per step so far
    engine.train()
    while state.step < end:
        micro_per_epoch = steps_per_epoch[epoch] * tcfg.grad_accum
        loader_cfg = replace(base, epoch=epoch, skip_batches=done_micro,
                             batches_per_worker=plans[epoch].batches_per_worker)
        micro = done_micro
        tick = time.perf_counter()
        for batch in make_loader(cfg.shards, cfg.train_split, tokenizer, loader_cfg):
            if micro == micro_per_epoch:
                break
            module.set_progress(state.step / total)
            out = engine(_to_device(batch, engine.device, dtype))
            parts = {"loss": out.loss.detach(), **{k: v.detach() for k, v in out.loss_parts.items()},
                     **{f"keep/{g}": v.detach().float().mean() for g, v in out.keep_groups.items()}}
            if keys is None:
                keys = sorted(parts)
            values = torch.stack([parts[k].float().reshape(()) for k in keys]).cpu()
            finite = torch.isfinite(values).all()
            values = _all_reduce_mean(torch.cat([torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0),
                                                 (~finite).float()[None]]))
            if float(values[-1]) > 0:  # a NaN/inf on some rank: every rank stops before the update
                bad = {k: float(parts[k]) for k in keys}
                return {"status": "nonfinite", "step": state.step, "rank_parts": bad, "message": (
                    f"non-finite loss at step {state.step + 1} (epoch {epoch}); loss parts on rank {rank}: "
                    f"{bad}; the last good checkpoint is kept, lower the learning rate or check the data")}
            engine.backward(out.loss)
            engine.step()
            window.add(dict(zip(keys, values[:-1].tolist(), strict=True)))
            micro += 1
            if micro % tcfg.grad_accum:
                continue
            state.step += 1
            n = tcfg.batch_size * tcfg.grad_accum * world
            state.samples += n
            window.samples += n
            now = time.perf_counter()
            window.seconds += now - tick
            state.train_seconds += now - tick
            if state.step % tcfg.log_every == 0 or state.step == end:
                lrs = dict(zip(group_names, scheduler.get_last_lr(), strict=True))
                gamma = module.trim_config.gamma(state.step / total) if module.trim_config is not None else {}
                row = window.row(state.step, epoch, lrs, {g: gamma[g] for g in GROUPS if g in gamma})
                state.history.append(row)
                if rank == 0:
                    per_step = (time.perf_counter() - started) / (state.step - first_step)
                    _print_row(row, total, keys, prefix, per_step * (end - state.step))
                    if sink is not None:
                        _tracked(sink.log_metrics, {k: v for k, v in row.items() if k not in ("step", "epoch")},
                                 state.step)
            if validation is not None and validation.due(state.step, end):
                values = validation.record(state, engine, epoch, prefix)
                if sink is not None:
                    _tracked(sink.log_metrics, values, state.step)
            if state.step % cfg.checkpoint_every == 0 and state.step < end:
                save(final=False)
            tick = time.perf_counter()
            if state.step == end:
                break
        epoch, done_micro = epoch + 1, 0
    save(final=True)  # with the export (also at a stop_at pause)
    return {"status": "ok", "state": state.__dict__, "total_steps": total, "steps_per_epoch": steps_per_epoch}


def _print_row(row: dict[str, float], total: int, keys: list[str], prefix: str, remaining_s: float) -> None:
    parts = " ".join(f"{k}={row[k]:.4f}" for k in keys if not k.startswith("keep/"))
    keep = " ".join(f"{k[5:]}={row[k]:.2f}" for k in keys if k.startswith("keep/"))
    say(f"{prefix} step {int(row['step'])}/{total} epoch {int(row['epoch'])} {parts}"
        f"{' keep ' + keep if keep else ''} {row['samples_per_s']:.1f} samples/s, ETA {eta(remaining_s)}")


__all__ = ["CHECKPOINT_TAG", "EXPORT_DIR", "STATE_FILE", "TrainerState", "export_state", "step_position",
           "train_loop"]
