"""The pipeline's command line: raw data -> fine-tuned backbone -> SmartTrim at each target -> ablations ->
evaluation -> profiling -> report, as a Ray DAG with cached, resumable stages and MLflow tracking.

    python -m pipeline.run all --config pipeline/configs/quickstart.yaml [key=value ...] [--force KIND|ID]
    ray job submit --working-dir . -- python -m pipeline.run all --config pipeline/configs/quickstart.yaml

Commands: ``shard``, ``finetune`` (backbone and SmartTrim targets), ``ablate``, ``evaluate``, ``profile``
(each with the stages it depends on), ``all`` (everything, then the report), ``report`` (from finished
stages only), ``sweep`` (Ray Tune over targets and loss weights, see ``pipeline.sweep``), ``pretrain``
(shard the ``pretrain`` section's caption data, pre-train with METER's MLM + ITM objectives, and copy the
export to ``pretrain.publish`` with a ``PRETRAINING.json`` record: how the shipped checkpoint is made).

Connects to the cluster ``RAY_ADDRESS`` names, else starts a local Ray instance (only when some stage has
to run). Every stage writes a content-addressed directory under ``runs/<name>/`` and a marker when done: a
rerun skips finished stages, a killed run resumes (a fine-tuning resumes from its last checkpoint), and
``--force`` recomputes a stage kind (``finetune``) or one stage id (``finetune/shapes-vqa/smarttrim-2x``).
Outputs: ``runs/<name>/results.json``, ``report.md``, ``pareto.png`` and the MLflow store ``mlflow.db``
(``MLFLOW_TRACKING_URI`` overrides; browse with ``mlflow ui --backend-store-uri sqlite:///runs/<name>/mlflow.db``).
``key=value`` overrides use dotted paths into the YAML (``tasks.0.backbone.max_steps=50``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig, load_config
from pipeline.dag import PipelineError, execute
from pipeline.plan import Stage, build_plan, pretrain_stages
from pipeline.preflight import check_inputs
from pipeline.report import finalize, model_entry, prior_entries, write_report

COMMANDS = ("all", "shard", "pretrain", "finetune", "ablate", "evaluate", "profile", "report", "sweep")


def select(stages: list[Stage], command: str) -> list[Stage]:
    """The stages a command runs: its own kind of stage and everything they depend on, in plan order."""
    def wanted(s: Stage) -> bool:
        if command in ("all", "report"):
            return True
        if command == "finetune":
            return s.kind == "finetune" and s.meta.get("kind") not in ("ablation", "baseline")
        if command == "ablate":
            return s.kind == "finetune" and s.meta.get("kind") == "ablation"
        return s.kind == command

    by_id = {s.id: s for s in stages}
    keep: set[str] = set()
    todo = [s.id for s in stages if wanted(s)]
    while todo:
        sid = todo.pop()
        if sid not in keep:
            keep.add(sid)
            todo += list(by_id[sid].deps)
    return [s for s in stages if s.id in keep]


def _ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS when set, else a local instance


def report(cfg: PipelineConfig, stages: list[Stage]) -> dict[str, Any]:
    """Track every model in MLflow (idempotent) and write results.json / report.md / pareto.png."""
    from pipeline.tracking import Tracker

    missing = [s.id for s in stages if not s.done()]
    if missing:
        raise ValueError(f"report: stages not done yet: {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                         "(run `pipeline.run all`)")
    markers = {s.id: json.loads(s.marker.read_text()) for s in stages}
    models: list[tuple[Stage, dict[str, Any]]] = []
    for s in stages:
        if s.kind == "finetune":
            ev = markers[f"evaluate/{s.meta['task']}/{s.meta['name']}"]["metrics"]
            pr = markers[f"profile/{s.meta['task']}/{s.meta['name']}"]["metrics"]
            test = markers.get(f"test/{s.meta['task']}/{s.meta['name']}")
            models.append((s, model_entry(s.meta, ev, pr, str(s.out / "model"), None,
                                          test and test["metrics"], test and test["out"])))
    priors = []
    for task in cfg.tasks:
        metric_name = next(e["metric_name"] for _, e in models if e["task"] == task.name)
        priors += prior_entries(task.name, markers[f"shard/{task.name}"]["metrics"], task.eval_split, metric_name)
    result = finalize([e for _, e in models], priors)  # fills flops_ratio in the entries

    tracker = Tracker(cfg.run_dir, cfg.mlflow_experiment, cfg.key(), cfg.name, cfg.to_dict())
    for s, entry in models:
        ev_out = Path(markers[f"evaluate/{s.meta['task']}/{s.meta['name']}"]["out"])
        pr_out = Path(markers[f"profile/{s.meta['task']}/{s.meta['name']}"]["out"])
        history = [json.loads(line) for line in (s.out / "history.jsonl").read_text().splitlines()]
        metrics = {"metric": entry["metric"], entry["metric_name"]: entry["metric"], "gflops": entry["gflops_mean"],
                   "flops_ratio": entry["flops_ratio"], "latency_ms_bs1": entry["latency_ms_bs1"],
                   "throughput": entry["throughput"], "train_seconds": markers[s.id]["metrics"]["train_seconds"],
                   "permuted_metric": entry["permuted_metric"], "permuted_changed": entry["permuted_changed"],
                   "test_metric": (entry["test"] or {}).get("metric"),
                   **{f"speedup_{k}": v for k, v in (entry["speedup"] or {}).items()},
                   **{f"focus_{k}": v for k, v in (entry["focus"] or {}).items()},
                   **{f"keep_{g}": v for g, v in entry["keep"].items()},
                   **{f"kind/{k}/{name}": v[name] for k, v in (entry["by_kind"] or {}).items()
                      for name in ("metric", "permuted_metric") if v.get(name) is not None}}
        entry["mlflow_run_id"] = tracker.log_model(
            s.out.name, entry["name"], {"model": s.meta, "finetune": s.config.to_dict()}, metrics, history,
            [s.out / "metrics.json", s.out / "curves.png", pr_out / "flops_hist.png", ev_out / "metrics.json",
             *([Path(entry["test"]["results_file"])] if (entry["test"] or {}).get("results_file") else [])])
    result["mlflow"] = {"tracking_uri": tracker.uri, "parent_run_id": tracker.parent_id,
                        "experiment": cfg.mlflow_experiment}
    result["config"] = cfg.to_dict()
    write_report(cfg.run_dir, result, f"SmartTrim pipeline: {cfg.name}")
    tracker.finish({}, [cfg.run_dir / "results.json", cfg.run_dir / "report.md", cfg.run_dir / "pareto.png"])
    return result


def pretrain(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    """``pipeline.run pretrain``: shard the caption data, pre-train (``cfg.pretrain``), publish the export."""
    from pipeline.publish import publish

    if cfg.pretrain is None:
        raise ValueError(f"{args.config}: has no pretrain section")
    stages = pretrain_stages(cfg, cfg.run_dir.resolve())
    if not all(s.done() for s in stages) or args.force:
        _ensure_ray()
    markers = execute(stages, force=tuple(args.force))
    shard, pre = stages
    ev = markers[pre.id]["metrics"]["evaluation"]
    print(f"[pipeline] pre-trained model: {pre.out / 'model'} ({ev['split']}: ITM accuracy {ev['itm_accuracy']:.4f}, "
          f"MLM accuracy {ev['mlm_accuracy']:.4f})")
    if cfg.pretrain.publish:
        command = " ".join(["python -m pipeline.run pretrain --config", args.config, *args.overrides])
        dest = publish(cfg, shard, pre, Path(cfg.pretrain.publish), command)
        print(f"[pipeline] published to {dest} (see {dest / 'PRETRAINING.json'})")
    return 0


def main(argv: list[str] | None = None) -> int:
    first, _, rest = (__doc__ or "").partition("\n\n")
    parser = argparse.ArgumentParser(prog="python -m pipeline.run", description=first, epilog=rest,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("--config", required=True, help="pipeline YAML (e.g. pipeline/configs/quickstart.yaml)")
    parser.add_argument("--force", action="append", default=[], metavar="KIND|ID",
                        help="recompute a stage kind or one stage id (repeatable)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)
    start = time.perf_counter()
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command != "report":
            check_inputs(cfg, tasks=args.command != "pretrain")  # before any work: roots, splits, tokenizers
        if args.command == "sweep":
            from pipeline.sweep import run_sweep

            _ensure_ray()
            run_sweep(cfg)
            return 0
        if args.command == "pretrain":
            return pretrain(cfg, args)
        stages = select(build_plan(cfg), args.command)
        if args.command != "report":
            if not all(s.done() for s in stages) or args.force:
                _ensure_ray()
            execute(stages, profile_cpus=cfg.profile.cpus, force=tuple(args.force))
        if args.command in ("all", "report"):
            result = report(cfg, stages)
            print(f"[pipeline] wrote {cfg.run_dir / 'results.json'}, report.md, pareto.png "
                  f"({len(result['results'])} entries; MLflow: {result['mlflow']['tracking_uri']})")
    except (ValueError, FileNotFoundError, PipelineError) as err:
        print(f"pipeline: error: {err}", file=sys.stderr)
        return 1
    print(f"[pipeline] {args.command} finished in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
