"""``pipeline.run sweep``: Ray Tune over SmartTrim's targets and loss weights, a Pareto front of the results.

The search space comes from ``sweep.space`` (``grid`` / ``choice`` / ``uniform`` per field). Each trial is a
driver function (``Tuner(driver_fn)``, not the deprecated ``Tuner(trainer)``): it fine-tunes SmartTrim from
the task's backbone through ``stages.finetune`` (its own ``TorchTrainer``, whose workers reserve their
CPUs/GPUs), then evaluates and profiles the export in its own process (1 CPU) and reports the task metric
and GFLOPs. With
``sweep.asha`` the trial trains in ``sweep.rungs`` stages (resuming its own checkpoint each time), reporting
the metric after each, and ASHA stops weak trials early. Trials run as many at once as the cluster's CPUs
(or GPUs) fit. Every trial is an MLflow child of the sweep's run; ``runs/<name>/sweep/pareto.json`` and
``pareto.png`` hold the accuracy-GFLOPs front.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.dag import execute
from pipeline.plan import build_plan
from smarttrim.atomic import atomic_write

TRIM_FIELDS = ("token_target_vision", "token_target_text", "head_target", "lambda_cost", "lambda_sd")


def search_space(cfg: PipelineConfig) -> dict[str, Any]:
    from ray import tune

    space = {}
    for name, spec in cfg.sweep.space.items():
        (kind, values), = spec.items()
        if kind == "grid":
            space[name] = tune.grid_search(list(values)) if cfg.sweep.search == "grid" else tune.choice(list(values))
        elif kind == "choice":
            space[name] = tune.choice(list(values))
        else:
            space[name] = tune.uniform(*values)
    return space


def pareto_front(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points no other point beats on both axes (higher ``metric``, lower ``gflops``), cheapest first."""
    front = [p for p in points if not any(q["metric"] >= p["metric"] and q["gflops"] <= p["gflops"]
                                          and (q["metric"] > p["metric"] or q["gflops"] < p["gflops"])
                                          for q in points)]
    return sorted(front, key=lambda p: p["gflops"])


def _trial(config: dict[str, Any], base: dict[str, Any]) -> None:
    """One Tune trial (a driver function): fine-tune at the sampled values, evaluate, profile, report."""
    from ray import tune

    from stages.evaluate import EvaluateConfig
    from stages.evaluate import run as evaluate
    from stages.finetune import run as finetune
    from stages.finetune_config import FinetuneConfig
    from stages.profile import ProfileConfig
    from stages.profile import run as profile
    from stages.staging import MIRROR_ENV, Mirror, localize

    ft = FinetuneConfig.from_dict(base["finetune"])
    mirror = Mirror(**json.loads(base["mirror"])) if base.get("mirror") else None
    if mirror is not None:  # a staged run: the trial's inputs on this node, its Ray Train workers told where
        os.environ[MIRROR_ENV] = base["mirror"]
        localize(ft.shards, ft.init, ft.pretrained, ft.tokenizer, mirror=base["mirror"])
    trim = dataclasses.replace(ft.trim, **{k: config[k] for k in TRIM_FIELDS if k in config})
    key = hashlib.sha256(json.dumps(trim.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    out = Path(base["root"]) / f"trial-{key}"
    ft = dataclasses.replace(ft, trim=trim, out=str(out / "finetune"))
    total = ft.train.max_steps or 0
    rungs = base["rungs"] if base["asha"] and total else 1
    for rung in range(1, rungs + 1):
        stop = None if rung == rungs else max(1, total * rung // rungs)
        result = finetune(dataclasses.replace(ft, stop_at=stop)).metrics
        model = str(out / "finetune" / "model")
        ev = evaluate(EvaluateConfig(model=model, shards=ft.shards, out=str(out / f"evaluate-{rung}"),
                                     split=base["split"], threads=1)).metrics
        pr = profile(ProfileConfig(model=model, shards=ft.shards, out=str(out / f"profile-{rung}"),
                                   split=base["split"], threads=1, instances=base["instances"])).metrics
        if mirror is not None:
            mirror.push(out)  # the trial's model, evaluation and profile so far, in storage
        tune.report({"metric": ev["metric"], "gflops": pr["flops"]["mean"] / 1e9, "steps": result["steps"],
                     "latency_ms_bs1": pr["latency_ms_bs1"]["median"], "rung": rung, "trial_dir": str(out),
                     **{f"keep_{g}": v for g, v in ev["keep"].items()}})


def run_sweep(cfg: PipelineConfig) -> dict[str, Any]:
    """Run the sweep of ``cfg.sweep`` (its task's shards and backbone first, cached like ``all``)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from pipeline.tracking import Tracker

    if not cfg.sweep.space:
        raise ValueError("sweep.space: nothing to search")
    task = next(t for t in cfg.tasks if t.name == (cfg.sweep.task or cfg.tasks[0].name))
    plan = {s.id: s for s in build_plan(cfg)}
    first = plan[f"finetune/{task.name}/smarttrim-{cfg.targets[0].name}"]  # the trials vary its trim config
    needed: list[str] = []
    todo = list(first.deps)
    while todo:  # what the trials start from: shards, pre-training, the backbone when SmartTrim starts there
        sid = todo.pop()
        if sid not in needed:
            needed.append(sid)
            todo += list(plan[sid].deps)
    execute([s for s in plan.values() if s.id in needed])
    base_ft = dataclasses.replace(first.config, out="")
    key = hashlib.sha256(json.dumps({"sweep": dataclasses.asdict(cfg.sweep), "ft": base_ft.to_dict()},
                                    sort_keys=True, default=str).encode()).hexdigest()[:12]
    root = (cfg.run_dir / "sweep" / key).resolve()
    # a trial reserves 1 CPU for its own evaluation and profiling, its Ray Train workers reserve theirs
    per_trial = 1 + cfg.compute.num_workers * cfg.compute.cpus_per_worker
    concurrent = cfg.sweep.max_concurrent or max(1, int(ray.cluster_resources().get("CPU", 1)) // per_trial)
    scheduler = ASHAScheduler(max_t=cfg.sweep.rungs, grace_period=1, time_attr="rung") if cfg.sweep.asha else None
    mirror = cfg.mirror
    base = {"finetune": base_ft.to_dict(), "root": str(root), "split": task.eval_split, "asha": cfg.sweep.asha,
            "rungs": cfg.sweep.rungs, "instances": cfg.profile.instances,
            "mirror": mirror.to_env() if mirror is not None else None}
    tune_storage = mirror.uri(root / "tune") if mirror is not None else str(root / "tune")
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_trial, base=base), {"cpu": 1}),
        param_space=search_space(cfg),
        tune_config=tune.TuneConfig(metric="metric", mode="max", num_samples=cfg.sweep.num_samples,
                                    max_concurrent_trials=concurrent, scheduler=scheduler),
        run_config=tune.RunConfig(name=f"sweep-{key}", storage_path=tune_storage),
    )
    grid = tuner.fit()
    tracker = Tracker(cfg.run_dir, cfg.mlflow_experiment, f"sweep-{key}", f"{cfg.name}-sweep",
                      {"sweep": dataclasses.asdict(cfg.sweep), "finetune": base_ft.to_dict()})
    points = []
    for result in grid:
        if result.error is not None or not result.metrics:
            print(f"[sweep] trial {result.path}: failed ({result.error})", flush=True)
            continue
        m = result.metrics
        params = {k: v for k, v in result.config.items() if k in TRIM_FIELDS}
        run_id = tracker.log_model(Path(m["trial_dir"]).name, f"trial {params}", {"trial": params},
                                   {k: v for k, v in m.items() if isinstance(v, int | float)}, [], [])
        points.append({"params": params, "metric": m["metric"], "gflops": m["gflops"], "steps": m["steps"],
                       "rung": m["rung"], "mlflow_run_id": run_id, "trial_dir": m["trial_dir"]})
    if not points:
        raise ValueError("sweep: every trial failed")
    front = pareto_front(points)
    out = {"task": task.name, "metric_name": "metric", "trials": points, "pareto_front": front,
           "mlflow_parent_run_id": tracker.parent_id}
    atomic_write(root / "pareto.json", lambda tmp: Path(tmp).write_text(json.dumps(out, indent=2) + "\n"))
    atomic_write(root / "pareto.png", lambda tmp: _plot(points, front, Path(tmp)))
    tracker.finish({"pareto_points": len(front)}, [root / "pareto.json", root / "pareto.png"])
    if mirror is not None:
        for name in ("pareto.json", "pareto.png"):
            mirror.push(root / name)
    print(f"[sweep] {len(points)} trials, {len(front)} on the Pareto front: {root / 'pareto.json'}", flush=True)
    return out


def _plot(points: list[dict[str, Any]], front: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot([p["gflops"] for p in points], [p["metric"] for p in points], "o", alpha=0.5, label="trials")
    ax.plot([p["gflops"] for p in front], [p["metric"] for p in front], "r-o", label="Pareto front")
    ax.set(xlabel="GFLOPs per instance (mean)", ylabel="task metric", title="sweep")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


__all__ = ["pareto_front", "run_sweep", "search_space"]
