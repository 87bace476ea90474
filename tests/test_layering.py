"""Imports point one way (docs/ARCHITECTURE.md): smarttrim never loads ray, mlflow, deepspeed, stages or pipeline;
stages never load pipeline, and a stage's config validates without Ray or DeepSpeed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

FORBIDDEN = ("ray", "mlflow", "deepspeed", "stages", "pipeline")
ROOT = Path(__file__).resolve().parents[1]


def test_importing_smarttrim_loads_no_upper_layer() -> None:
    code = ("import sys, smarttrim, smarttrim.checkpoints, smarttrim.flops, smarttrim.io, smarttrim.training, "
            "smarttrim.data.loader, smarttrim.data.gallery; "
            f"print([m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def _imports(package: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for file in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{file.name}: {n}" for n in names if n.split(".")[0] in forbidden]
    return bad


def test_smarttrim_sources_import_no_upper_layer() -> None:
    assert not _imports("smarttrim", FORBIDDEN)


def test_stages_import_no_pipeline_and_configs_need_no_ray() -> None:
    assert not _imports("stages", ("pipeline", "mlflow"))
    code = ("import sys, stages.finetune_config, stages.evaluate, stages.profile, stages.shard; "
            "print([m for m in sys.modules if m.split('.')[0] in ('ray', 'deepspeed')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
