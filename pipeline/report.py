"""The pipeline's report: ``results.json`` (one entry per trained model, plus each task's answer priors),
``report.md`` (the paper-style tables) and ``pareto.png`` (task metric against MMACs).

FLOPs follow the paper's (torchprofile's) convention: multiply-accumulates (MACs) of one unpadded instance on the
inference path, averaged over the profiled subset. The tables, the plot and MLflow (``mmacs``) give them in millions,
MMACs (the paper's "GFLOPs" x 1000), with four significant digits: the tiny models' GFLOPs would all read 0.003;
``results.json`` has both ``mmacs_mean`` and ``gflops_mean``. ``flops_ratio`` is relative to the backbone of the same
task on the same instances; the FLOPs reduction in the tables is its inverse. Speedups are the profile
stage's side-by-side ratios: each model timed interleaved with its own untrimmed backbone (same weights,
instances and threads), never two absolute times from different runs. Every number sits next to what it
means: the answer priors (majority answer, best answer per question text), the metric with permuted images
(does the model look?) and, for the built-in data, how much of what the visual trimmers keep lies on the
objects the text names (does the text guide the trimming?).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from smarttrim.atomic import atomic_write

KIND_ORDER = {"prior": 0, "backbone": 1, "smarttrim": 2, "baseline": 3, "ablation": 4}
PRIORS = {"majority": "majority answer", "text_only": "text-only (best answer per question text)"}


def model_entry(meta: dict[str, Any], evaluation: dict[str, Any], profile: dict[str, Any], model_dir: str,
                mlflow_run_id: str | None, test: dict[str, Any] | None = None,
                test_dir: str | None = None) -> dict[str, Any]:
    """One ``results.json`` entry from a model's evaluate and profile summaries (and, when the task has a test
    split, that evaluation's summary ``test`` written in ``test_dir``: ``entry["test"]``)."""
    flops = profile["flops"]
    permuted = evaluation.get("permuted_images") or {}
    focus = evaluation.get("focus") or {}
    speedup = profile.get("speedup") or {}
    return {
        "name": f"{meta['task']}/{meta['name']}", "kind": meta["kind"], "task": meta["task"],
        "target": meta.get("target"), "start": meta.get("start"), "start_from": meta.get("start_from"),
        "metric_name": evaluation["metric_name"], "metric": evaluation["metric"],
        "permuted_metric": permuted.get("metric"), "permuted_changed": permuted.get("changed"),
        "focus": {k: focus[k] for k in ("precision", "chance", "lift", "recall", "kept_patches") if k in focus}
        or None,
        "mmacs_mean": flops["mean"] / 1e6, "gflops_mean": flops["mean"] / 1e9, "flops_ratio": None,
        "latency_ms_bs1": profile["latency_ms_bs1"]["median"],
        "throughput": profile["throughput"]["instances_per_s"],
        "speedup": {k: speedup[k] for k in ("latency_bs1", "throughput", "flops", "latency_efficiency",
                                            "throughput_efficiency") if k in speedup} or None,
        "keep": evaluation.get("keep", {}), "model_dir": model_dir, "mlflow_run_id": mlflow_run_id,
        "by_kind": evaluation.get("by_kind") or None,
        "test": None if test is None else {
            "split": test["split"], "metric": test["metric"],
            "instances": test["instances"] if "instances" in test else test.get("images"),  # retrieval: images
            "results_file": f"{str(test_dir).rstrip('/')}/{test['results_file']}"  # a path or a storage URI
            if test.get("results_file") else None},
    }


def prior_entries(task: str, shard_summary: dict[str, Any], split: str, metric_name: str) -> list[dict[str, Any]]:
    """The answer-prior baselines of a task on its evaluation split, from the shard stage's manifest summary."""
    out = []
    for name, key in (("majority", "majority_baseline"), ("text_only", "text_only_baseline")):
        score = ((shard_summary.get(key) or {}).get("score") or {}).get(split)
        if score is not None:
            out.append({"name": f"{task}/{name}", "kind": "prior", "task": task, "target": None, "start": None,
                        "metric_name": metric_name, "metric": score, "mmacs_mean": None, "gflops_mean": None,
                        "flops_ratio": None,
                        "latency_ms_bs1": None, "throughput": None, "speedup": None, "keep": {},
                        "permuted_metric": None, "permuted_changed": None, "focus": None, "by_kind": None,
                        "model_dir": None, "mlflow_run_id": None})
    return out


def finalize(entries: list[dict[str, Any]], priors: list[dict[str, Any]]) -> dict[str, Any]:
    """Fill ``flops_ratio`` against each task's backbone, add the answer priors, sort."""
    backbone = {e["task"]: e["gflops_mean"] for e in entries if e["kind"] == "backbone"}
    for e in entries:
        if e["task"] in backbone and e["gflops_mean"] is not None:
            e["flops_ratio"] = e["gflops_mean"] / backbone[e["task"]]
    entries = entries + priors
    entries.sort(key=lambda e: (e["task"], KIND_ORDER[e["kind"]], -(e["flops_ratio"] or 0), e["name"]))
    by_task: dict[str, dict[str, float]] = {}
    for p in priors:
        by_task.setdefault(p["task"], {})[p["name"].split("/", 1)[1]] = p["metric"]
    return {"majority_baseline": {t: v["majority"] for t, v in by_task.items() if "majority" in v},
            "text_only_baseline": {t: v["text_only"] for t, v in by_task.items() if "text_only" in v},
            "results": entries}


def _fmt(v: float | None, spec: str) -> str:
    return "" if v is None else format(v, spec)


def significant(v: float | None, digits: int = 4) -> str:
    """``v`` with ``digits`` significant digits and no exponent (3.012, 48.31, 51234); "" for None."""
    if v is None:
        return ""
    if v == 0 or not math.isfinite(v):
        return str(v)
    return f"{v:.{max(0, digits - 1 - math.floor(math.log10(abs(v))))}f}"


def _keep(keep: dict[str, float]) -> str:
    order = ("vision_tokens", "text_tokens", "heads")
    return " / ".join(f"{keep[g]:.2f}" if g in keep else "1" for g in order) if keep else "all"


def _short(e: dict[str, Any]) -> str:
    name = e["name"].split("/", 1)[1]
    return PRIORS.get(name, name) if e["kind"] == "prior" else name


def _x(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}x"


def _start_line(rows: list[dict[str, Any]]) -> str:
    starts = {(e["kind"], e.get("start"), e.get("start_from")) for e in rows if e["kind"] != "prior"}
    backbone = next((s for s in starts if s[0] == "backbone"), None)
    trimmed = {(s[1], s[2]) for s in starts if s[0] != "backbone"}
    if backbone is not None and trimmed == {(backbone[1], backbone[2])}:  # one start for every model
        return f"Start: every model is fine-tuned once from {_origin(backbone[1], backbone[2])}."
    parts = []
    if backbone is not None:
        parts.append(f"the backbone is fine-tuned from {_origin(backbone[1], backbone[2])}")
    for start, source in sorted(trimmed, key=str):
        parts.append(f"SmartTrim{' and its variants' if len(starts) > 2 else ''} from {_origin(start, source)}")
    return "Start: " + "; ".join(parts) + "." if parts else ""


def _origin(start: str | None, source: str | None) -> str:
    if start == "pretrained":
        return f"the pre-trained model `{source}` (the paper's recipe)"
    if start == "backbone":
        return f"the fine-tuned backbone `{source}`"
    return "scratch (random initialization)"


def _kind_table(task: str, metric: str, models: list[dict[str, Any]]) -> list[str]:
    """Per question kind: each model's metric / the metric with permuted images, next to the kind's text-only
    baseline (empty when no model has a per-kind breakdown)."""
    if not models:
        return []
    kinds = sorted({k for e in models for k in e["by_kind"]})
    lines = ["", f"## {task}: {metric} per question kind (does each kind use the image?)", "",
             "Each cell: the metric / the metric with permuted images. A kind whose metric equals its permuted "
             "metric and its text-only baseline is answered from the question alone.", "",
             "| kind | instances | text-only | " + " | ".join(_short(e) for e in models) + " |",
             "|---|---|---|" + "---|" * len(models)]
    for kind in kinds:
        first = next(e["by_kind"][kind] for e in models if kind in e["by_kind"])
        cells = []
        for e in models:
            k = e["by_kind"].get(kind)
            cells.append("" if k is None else f"{k['metric']:.3f}" + (
                f" / {k['permuted_metric']:.3f}" if k.get("permuted_metric") is not None else ""))
        lines.append(f"| {kind} | {first['instances']} | {_fmt(first.get('text_only_baseline'), '.3f')} | "
                     + " | ".join(cells) + " |")
    return lines


def markdown(report: dict[str, Any], title: str) -> str:
    """The paper-style tables: main results per task (with the answer priors and the two sanity checks), the
    text guidance of the trimming (cross-modal vs local trimmer), then the ablations (Table 6)."""
    lines = [f"# {title}", "",
             "MMACs: millions of torchprofile multiply-accumulates of one unpadded instance on the inference path "
             "(the paper's GFLOPs x 1000), mean over the profiled subset; reduction = backbone MMACs / model MMACs. "
             "Speedups: the model timed interleaved with its own "
             "untrimmed backbone (same weights, instances, threads): bs1 = mean single-instance latency ratio, "
             "batched = throughput ratio. Permuted: the metric when each text gets another instance's image, and the "
             "share of predictions that change. Keep: eval-mode keep ratio of visual tokens / text tokens / heads.",
             ""]
    for task in sorted({e["task"] for e in report["results"]}):
        rows = [e for e in report["results"] if e["task"] == task]
        metric = rows[0]["metric_name"]
        start = _start_line(rows)
        lines += [f"## {task}: main results", ""] + ([start, ""] if start else []) + [
            f"| model | {metric} | MMACs | reduction | bs1 speedup | batched speedup | keep v / t / h | "
            f"permuted {metric} (changed) |", "|---|---|---|---|---|---|---|---|"]
        for e in rows:
            if e["kind"] == "ablation":
                continue
            sp = e.get("speedup") or {}
            red = _x(1 / e["flops_ratio"]) if e["flops_ratio"] else ""
            permuted = "" if e.get("permuted_metric") is None else \
                f"{e['permuted_metric']:.4f} ({e['permuted_changed']:.0%})"
            lines.append(f"| {_short(e)} | {e['metric']:.4f} | {significant(e['mmacs_mean'])} | {red} | "
                         f"{_x(sp.get('latency_bs1'))} | {_x(sp.get('throughput'))} | "
                         f"{_keep(e['keep']) if e['kind'] != 'prior' else ''} | {permuted} |")
        focused = [e for e in rows if e.get("focus") and e["kind"] in ("smarttrim", "baseline", "backbone")]
        if any(e["kind"] != "backbone" for e in focused):
            lines += ["", f"## {task}: does the text guide the trimming? (Fig. 5 as numbers)", "",
                      "Of the patches the last visual token trimmer keeps, the share on the objects the question "
                      "names (precision), against the share of all patches those objects cover (chance); lift = "
                      "precision / chance; recall = share of those objects' patches kept.", "",
                      f"| model | {metric} | reduction | precision | chance | lift | recall | kept patches |",
                      "|---|---|---|---|---|---|---|---|"]
            for e in focused:
                f = e["focus"]
                red = _x(1 / e["flops_ratio"]) if e["flops_ratio"] else ""
                lines.append(f"| {_short(e)} | {e['metric']:.4f} | {red} | {f['precision']:.3f} | {f['chance']:.3f} | "
                             f"{f['lift']:.2f} | {f['recall']:.3f} | {f['kept_patches']:.1f} |")
        lines += _kind_table(task, metric, [e for e in rows if e.get("by_kind") and e["kind"] != "ablation"])
        tested = [e for e in rows if e.get("test")]
        if tested:
            lines += ["", f"## {task}: held-out test split ({tested[0]['test']['split']})", "",
                      f"| model | {metric} | instances | official results file |", "|---|---|---|---|"]
            for e in tested:
                t = e["test"]
                score = "hidden answers" if t["metric"] is None else f"{t['metric']:.4f}"
                lines.append(f"| {_short(e)} | {score} | {t['instances']} | {t['results_file'] or ''} |")
        ablations = [e for e in rows if e["kind"] == "ablation"]
        if ablations:
            ref = next((e for e in rows if e["kind"] == "smarttrim" and e["target"] == ablations[0]["target"]), None)
            lines += ["", f"## {task}: ablations at target {ablations[0]['target']} (Table 6)", "",
                      f"| variant | {metric} | Δ vs SmartTrim | MMACs | reduction |", "|---|---|---|---|---|"]
            for e in ([ref] if ref else []) + ablations:
                delta = "" if ref is None or e is ref else f"{e['metric'] - ref['metric']:+.4f}"
                red = _x(1 / e["flops_ratio"]) if e["flops_ratio"] else ""
                lines.append(f"| {_short(e)} | {e['metric']:.4f} | {delta} | {significant(e['mmacs_mean'])} | {red} |")
        lines.append("")
    lines += ["![Pareto front](pareto.png)", ""]
    return "\n".join(lines)


def pareto_png(report: dict[str, Any], path: Path) -> None:
    """Task metric against mean MMACs per task: backbone, SmartTrim targets (a line), baselines, ablations and the
    answer priors (horizontal lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({e["task"] for e in report["results"]})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        rows = [e for e in report["results"] if e["task"] == task]
        smart = sorted((e for e in rows if e["kind"] == "smarttrim"), key=lambda e: e["mmacs_mean"])
        if smart:
            ax.plot([e["mmacs_mean"] for e in smart], [e["metric"] for e in smart], "o-", label="SmartTrim")
            for e in smart:
                ax.annotate(e["target"], (e["mmacs_mean"], e["metric"]), fontsize=8, xytext=(3, 3),
                            textcoords="offset points")
        for e in rows:
            if e["kind"] == "backbone":
                ax.plot(e["mmacs_mean"], e["metric"], "k*", markersize=12, label="backbone")
            elif e["kind"] in ("ablation", "baseline"):
                ax.plot(e["mmacs_mean"], e["metric"], "x" if e["kind"] == "ablation" else "s",
                        label=_short(e))
            elif e["kind"] == "prior":
                ax.axhline(e["metric"], color="gray", linestyle=":" if "majority" in e["name"] else "--",
                           label=_short(e))
        ax.set(title=task, xlabel="MMACs per instance (mean)", ylabel=rows[0]["metric_name"])
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def write_report(run_dir: Path, report: dict[str, Any], title: str) -> None:
    """``results.json``, ``report.md`` and ``pareto.png`` in ``run_dir`` (each written atomically)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2) + "\n"))
    atomic_write(run_dir / "report.md", lambda tmp: Path(tmp).write_text(markdown(report, title)))
    atomic_write(run_dir / "pareto.png", lambda tmp: pareto_png(report, Path(tmp)))


__all__ = ["KIND_ORDER", "PRIORS", "finalize", "markdown", "model_entry", "pareto_png", "prior_entries",
           "significant", "write_report"]
