"""The pipeline's command line: raw data -> fine-tuned backbone -> SmartTrim at each target -> ablations ->
evaluation -> profiling -> report, as a Ray DAG with cached, resumable stages and MLflow tracking.

    python -m pipeline.run all --config pipeline/configs/quickstart.yaml [key=value ...] [--force KIND|ID]
    ray job submit --working-dir . -- python -m pipeline.run all --config pipeline/configs/quickstart.yaml

Commands: ``plan`` (print every stage with its id and state, cached / run / rerun, and what ``--force``
would recompute; runs nothing), ``shard``, ``finetune`` (backbone and SmartTrim targets), ``ablate``,
``evaluate``, ``profile`` (each with the stages it depends on), ``all`` (everything, then the report), ``report``
(from finished stages only), ``sweep`` (Ray Tune over targets and loss weights, see ``pipeline.sweep``),
``pretrain`` (shard the ``pretrain`` section's caption data, pre-train with METER's MLM + ITM objectives, and
copy the export to ``pretrain.publish`` with a ``PRETRAINING.json`` record: how the shipped checkpoint is made).

Connects to the cluster ``RAY_ADDRESS`` names (a dead address fails within 30 s: ``stages.ray_connect``), else
starts a local Ray instance (only when some stage has to run). Every stage writes a content-addressed directory
under ``runs/<name>/`` and a marker when done: a rerun skips finished stages, a killed run resumes (a fine-tuning
resumes from its last checkpoint), and ``--force`` recomputes a stage kind (``finetune``) or one stage id
(``finetune/shapes-vqa/smarttrim-2x``) and everything downstream of it (its evaluations and profiles); an unknown
kind or id is refused with the list.
Outputs: ``runs/<name>/results.json``, ``report.md``, ``pareto.png`` and the MLflow store ``mlflow.db``
(``MLFLOW_TRACKING_URI`` overrides; browse with ``mlflow ui --backend-store-uri sqlite:///runs/<name>/mlflow.db``);
``runs_dir=s3://bucket/prefix`` (or ``gs://``) stores them in a bucket, stages working in node-local copies
(``pipeline.storage``).
``key=value`` overrides use dotted paths into the YAML (``tasks.0.backbone.max_steps=50``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the heavy imports (torch, Ray) wait until the arguments are parsed: --help is instant
    from pipeline.config import PipelineConfig
    from pipeline.plan import Stage

LOG = logging.getLogger("pipeline")
COMMANDS = ("all", "plan", "shard", "pretrain", "finetune", "ablate", "evaluate", "profile", "report", "sweep")


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


def _ensure_ray(cfg: PipelineConfig | None = None) -> None:
    """Connect to ``RAY_ADDRESS`` (bounded: a dead address fails within 30 s), else start a local instance; then
    check that every node sees ``cfg``'s run directory (``pipeline.storage.check_visible``)."""
    import os

    from pipeline.storage import check_visible
    from stages.ray_connect import connect

    LOG.info(f"[pipeline] Ray: {connect()}")
    if cfg is not None:
        nodes = check_visible(cfg.run_dir, mirror=cfg.mirror)
        if cfg.mirror is not None and nodes > 1 and not os.environ.get("MLFLOW_TRACKING_URI"):
            raise ValueError(f"runs_dir={cfg.runs_dir!r} is staged on {nodes} nodes, and the default MLflow store "
                             f"(a sqlite file in the run directory) is one node's file: set MLFLOW_TRACKING_URI to a "
                             f"tracking server every node reaches (ray_cluster.yaml starts one on the head)")


RUN_FILES = ("mlflow.db", "mlflow-artifacts", "pipeline.log", "results.json", "report.md", "pareto.png")
"""The run directory's own files (not a stage's), which a staged run keeps in storage too."""


def restore_run_files(cfg: PipelineConfig) -> None:
    """A staged run on a driver without a local copy: fetch the stored MLflow store and log (so a rerun continues
    them) before anything writes to them."""
    if cfg.mirror is not None:
        for name in RUN_FILES[:3]:
            if not (cfg.run_dir / name).exists():
                cfg.mirror.fetch(cfg.run_dir / name)


def store_run_files(cfg: PipelineConfig) -> None:
    """A staged run: upload the run directory's own files (report, MLflow store, log) to storage."""
    if cfg.mirror is not None:
        for name in RUN_FILES:
            if (cfg.run_dir / name).exists():
                cfg.mirror.push(cfg.run_dir / name)


def forget_outside(plan: list[Stage], selected: list[Stage], rerun: set[str]) -> list[str]:
    """Clear the stages of ``rerun`` that this command does not run (``pipeline.run shard --force shard/x``: the
    fine-tunings and evaluations made from the old shards would otherwise stay cached); returns their ids. The
    ones it runs are cleared by ``execute``."""
    from pipeline.dag import clear

    ids = {s.id for s in selected}
    outside = [s for s in plan if s.id in rerun and s.id not in ids]
    for stage in outside:
        clear(stage)
    return [s.id for s in outside]


def plan_lines(stages: list[Stage], rerun: set[str]) -> list[str]:
    """``pipeline.run plan``: every stage of the command with its state: ``cached``, ``run`` (not done yet) or
    ``rerun`` (done, but ``--force`` recomputes it: named, or downstream of a named stage)."""
    width = max(len(s.id) for s in stages)
    states = ["rerun" if s.id in rerun and s.done() else "cached" if s.done() else "run" for s in stages]
    lines = [f"  {s.id:<{width}}  {state:<6}  {s.mirror.uri(s.out) if s.mirror is not None else s.out}"
             for s, state in zip(stages, states, strict=True)]
    counts = {k: states.count(k) for k in ("cached", "run", "rerun")}
    return [f"[plan] {len(stages)} stages: " + ", ".join(f"{v} {k}" for k, v in counts.items()), *lines]


def report(cfg: PipelineConfig, stages: list[Stage]) -> dict[str, Any]:
    """Complete every model's MLflow run (idempotent: what the stages logged live is not logged again, see
    ``pipeline.tracking``) and write results.json / report.md / pareto.png."""
    from pipeline.report import finalize, model_entry, prior_entries, write_report
    from pipeline.tracking import LiveTracking

    missing = [s.id for s in stages if not s.done()]
    if missing:
        raise ValueError(f"report: stages not done yet: {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                         "(run `pipeline.run all`)")
    from pipeline.dag import fetch_summary

    for s in stages:
        fetch_summary(s)  # a staged run: each stage's own files into the driver's copy (no weights)
    markers = {s.id: s.read_marker() for s in stages}
    by_id = {s.id: s for s in stages}

    def where(path: Path) -> str:  # what the report names: the stored place of a staged run's files
        return cfg.mirror.uri(path) if cfg.mirror is not None else str(path)

    models: list[tuple[Stage, dict[str, Any]]] = []
    for s in stages:
        if s.kind == "finetune":
            ev = markers[f"evaluate/{s.meta['task']}/{s.meta['name']}"]["metrics"]
            pr = markers[f"profile/{s.meta['task']}/{s.meta['name']}"]["metrics"]
            test_id = f"test/{s.meta['task']}/{s.meta['name']}"
            test = markers.get(test_id)
            models.append((s, model_entry(s.meta, ev, pr, where(s.out / "model"), None,
                                          test and test["metrics"], test and where(by_id[test_id].out))))
    priors = []
    for task in cfg.tasks:
        metric_name = next(e["metric_name"] for _, e in models if e["task"] == task.name)
        priors += prior_entries(task.name, markers[f"shard/{task.name}"]["metrics"], task.eval_split, metric_name)
    result = finalize([e for _, e in models], priors)  # fills flops_ratio in the entries

    tracking = LiveTracking.of(cfg, stages)
    for s, entry in models:  # the rest (metrics, curves, files) the stages logged as they finished
        entry["mlflow_run_id"] = tracking.summarize(s, markers, {"flops_ratio": entry["flops_ratio"]})
    tracker = tracking.tracker
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
    from pipeline.dag import execute
    from pipeline.plan import forced, pretrain_stages

    stages = pretrain_stages(cfg, cfg.run_dir.resolve())
    rerun = forced(stages, args.force)
    if not all(s.done() for s in stages) or rerun:
        _ensure_ray(cfg)
    markers = execute(stages, force=tuple(rerun))
    shard, pre = stages
    if pre.mirror is not None:  # publishing copies the export and reads the shards' manifest
        pre.mirror.pull(shard.out)
        pre.mirror.pull(pre.out)
    ev = markers[pre.id]["metrics"]["evaluation"]
    LOG.info(f"[pipeline] pre-trained model: {pre.out / 'model'} ({ev['split']}: ITM accuracy "
             f"{ev['itm_accuracy']:.4f}, MLM accuracy {ev['mlm_accuracy']:.4f})")
    if cfg.pretrain.publish:
        command = " ".join(["python -m pipeline.run pretrain --config", args.config, *args.overrides])
        dest = publish(cfg, shard, pre, Path(cfg.pretrain.publish), command)
        LOG.info(f"[pipeline] published to {dest} (see {dest / 'PRETRAINING.json'})")
    return 0


def main(argv: list[str] | None = None) -> int:
    first, _, rest = (__doc__ or "").partition("\n\n")
    parser = argparse.ArgumentParser(prog="python -m pipeline.run", description=first, epilog=rest,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("--config", required=True, help="pipeline YAML (e.g. pipeline/configs/quickstart.yaml)")
    parser.add_argument("--force", action="append", default=[], metavar="KIND|ID",
                        help="recompute a stage kind or one stage id, and everything downstream of it (repeatable)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)
    start = time.perf_counter()
    from pipeline.config import load_config
    from pipeline.dag import PipelineError, execute
    from pipeline.logs import setup_logging
    from pipeline.plan import build_plan, forced
    from pipeline.preflight import check_inputs
    from pipeline.storage import StorageError
    from pipeline.tracking import LiveTracking
    from stages.ray_connect import RayConnectError

    cfg = None
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command != "plan":
            restore_run_files(cfg)
        setup_logging(cfg.run_dir)  # console + runs/<name>/pipeline.log, before Ray is imported (pipeline.logs)
        if args.command != "report":
            check_inputs(cfg, tasks=args.command != "pretrain")  # before any work: roots, splits, tokenizers
        if args.command == "sweep":
            from pipeline.sweep import run_sweep

            _ensure_ray(cfg)
            run_sweep(cfg)
            return 0
        if args.command == "pretrain":
            return pretrain(cfg, args)
        plan = build_plan(cfg)
        rerun = forced(plan, args.force)  # validated against the whole plan: any command may force any stage
        stages = select(plan, "all" if args.command == "plan" else args.command)
        if args.command == "plan":
            print("\n".join(plan_lines(stages, rerun)))
            return 0
        forget_outside(plan, stages, rerun)
        if args.command != "report":
            if not all(s.done() for s in stages) or rerun:
                _ensure_ray(cfg)
            execute(stages, profile_cpus=cfg.profile.cpus, force=tuple(rerun), tracking=LiveTracking.of(cfg, stages))
        if args.command in ("all", "report"):
            result = report(cfg, stages)
            where = cfg.mirror.uri(cfg.run_dir) if cfg.mirror is not None else cfg.run_dir
            LOG.info(f"[pipeline] wrote {where}/results.json, report.md, pareto.png "
                     f"({len(result['results'])} entries; MLflow: {result['mlflow']['tracking_uri']})")
    except (ValueError, OSError, PipelineError, RayConnectError, StorageError) as err:  # OSError: storage
        print(f"pipeline: error: {err}", file=sys.stderr)
        return 1
    finally:
        if cfg is not None and args.command != "plan":
            try:
                store_run_files(cfg)  # a staged run: the report, MLflow store and log, also after a failure
            except (OSError, StorageError) as err:  # the storage itself failing: said once above, or now
                print(f"pipeline: warning: the run's files stay in {cfg.run_dir}: {err}", file=sys.stderr)
    LOG.info(f"[pipeline] {args.command} finished in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
