"""The pipeline's report: ``results.json`` (one entry per trained model), ``report.md`` (the paper-style tables)
and ``pareto.png`` (task metric against GFLOPs).

GFLOPs follow the paper's (torchprofile's) convention: multiply-accumulates of one unpadded instance on the
inference path, averaged over the profiled subset. ``flops_ratio`` is relative to the backbone of the same
task on the same instances; the FLOPs reduction in the tables is its inverse.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from smarttrim.atomic import atomic_write

KIND_ORDER = {"baseline": 0, "backbone": 1, "smarttrim": 2, "ablation": 3}


def model_entry(meta: dict[str, Any], evaluation: dict[str, Any], profile: dict[str, Any], model_dir: str,
                mlflow_run_id: str | None) -> dict[str, Any]:
    """One ``results.json`` entry from a model's evaluate and profile summaries."""
    flops = profile["flops"]
    return {
        "name": f"{meta['task']}/{meta['name']}", "kind": meta["kind"], "task": meta["task"],
        "target": meta.get("target"), "metric_name": evaluation["metric_name"], "metric": evaluation["metric"],
        "gflops_mean": flops["mean"] / 1e9, "flops_ratio": None,
        "latency_ms_bs1": profile["latency_ms_bs1"]["median"],
        "throughput": profile["throughput"]["instances_per_s"], "keep": evaluation.get("keep", {}),
        "model_dir": model_dir, "mlflow_run_id": mlflow_run_id,
    }


def finalize(entries: list[dict[str, Any]], baselines: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Fill ``flops_ratio`` against each task's backbone, add the majority-answer baselines, sort."""
    backbone = {e["task"]: e["gflops_mean"] for e in entries if e["kind"] == "backbone"}
    for e in entries:
        if e["task"] in backbone and e["gflops_mean"] is not None:
            e["flops_ratio"] = e["gflops_mean"] / backbone[e["task"]]
    for task, base in baselines.items():
        entries.append({"name": f"{task}/majority", "kind": "baseline", "task": task, "target": None,
                        "metric_name": base["metric_name"], "metric": base["metric"], "gflops_mean": None,
                        "flops_ratio": None, "latency_ms_bs1": None, "throughput": None, "keep": {},
                        "model_dir": None, "mlflow_run_id": None})
    entries.sort(key=lambda e: (e["task"], KIND_ORDER[e["kind"]], -(e["flops_ratio"] or 0), e["name"]))
    majority = {t: b["metric"] for t, b in baselines.items()}
    return {"majority_baseline": majority, "results": entries}


def _fmt(v: float | None, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _keep(keep: dict[str, float]) -> str:
    order = ("vision_tokens", "text_tokens", "heads")
    return " / ".join(f"{keep[g]:.2f}" if g in keep else "1" for g in order) if keep else "all"


def markdown(report: dict[str, Any], title: str) -> str:
    """The paper-style tables: main results per task, then the ablations (Table 6)."""
    lines = [f"# {title}", "", "GFLOPs: torchprofile MACs of one unpadded instance on the inference path, mean "
             "over the profiled subset; reduction = backbone GFLOPs / model GFLOPs; keep: eval-mode keep ratio "
             "of visual tokens / text tokens / heads.", ""]
    for task in sorted({e["task"] for e in report["results"]}):
        rows = [e for e in report["results"] if e["task"] == task]
        metric = rows[0]["metric_name"]
        lines += [f"## {task}: main results", "",
                  f"| model | {metric} | GFLOPs | reduction | latency bs1 (ms) | throughput (/s) | keep v / t / h |",
                  "|---|---|---|---|---|---|---|"]
        for e in rows:
            if e["kind"] == "ablation":
                continue
            red = f"{1 / e['flops_ratio']:.2f}x" if e["flops_ratio"] else ""
            lines.append(f"| {e['name'].split('/', 1)[1]} | {e['metric']:.4f} | {_fmt(e['gflops_mean'], '.5f')} | "
                         f"{red} | {_fmt(e['latency_ms_bs1'], '.2f')} | {_fmt(e['throughput'], '.0f')} | "
                         f"{_keep(e['keep']) if e['kind'] != 'baseline' else ''} |")
        ablations = [e for e in rows if e["kind"] == "ablation"]
        if ablations:
            ref = next((e for e in rows if e["kind"] == "smarttrim" and e["target"] == ablations[0]["target"]), None)
            lines += ["", f"## {task}: ablations at target {ablations[0]['target']} (Table 6)", "",
                      f"| variant | {metric} | Δ vs SmartTrim | GFLOPs | reduction |", "|---|---|---|---|---|"]
            for e in ([ref] if ref else []) + ablations:
                delta = "" if ref is None or e is ref else f"{e['metric'] - ref['metric']:+.4f}"
                red = f"{1 / e['flops_ratio']:.2f}x" if e["flops_ratio"] else ""
                lines.append(f"| {e['name'].split('/', 1)[1]} | {e['metric']:.4f} | {delta} | "
                             f"{e['gflops_mean']:.5f} | {red} |")
        lines.append("")
    lines += ["![Pareto front](pareto.png)", ""]
    return "\n".join(lines)


def pareto_png(report: dict[str, Any], path: Path) -> None:
    """Task metric against mean GFLOPs per task: backbone, SmartTrim targets (a line), ablations, majority."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({e["task"] for e in report["results"]})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        rows = [e for e in report["results"] if e["task"] == task]
        smart = sorted((e for e in rows if e["kind"] == "smarttrim"), key=lambda e: e["gflops_mean"])
        if smart:
            ax.plot([e["gflops_mean"] for e in smart], [e["metric"] for e in smart], "o-", label="SmartTrim")
            for e in smart:
                ax.annotate(e["target"], (e["gflops_mean"], e["metric"]), fontsize=8, xytext=(3, 3),
                            textcoords="offset points")
        for e in rows:
            if e["kind"] == "backbone":
                ax.plot(e["gflops_mean"], e["metric"], "k*", markersize=12, label="backbone")
            elif e["kind"] == "ablation":
                ax.plot(e["gflops_mean"], e["metric"], "x", label=e["name"].split("/", 1)[1])
            elif e["kind"] == "baseline":
                ax.axhline(e["metric"], color="gray", linestyle=":", label="majority answer")
        ax.set(title=task, xlabel="GFLOPs per instance (mean)", ylabel=rows[0]["metric_name"])
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


__all__ = ["finalize", "markdown", "model_entry", "pareto_png", "write_report"]
