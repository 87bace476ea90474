"""Each stage CLI's ``--help`` is instant: it imports none of the heavy libraries (torch, Ray, ...)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLIS = ("stages.shard", "stages.finetune", "stages.evaluate", "stages.profile", "stages.pretrain")
HEAVY = ("torch", "timm", "transformers", "ray", "mlflow", "deepspeed", "webdataset")


def imported_modules(importtime: str) -> set[str]:
    """The module names of ``python -X importtime`` output (its last ``|``-separated column)."""
    return {line.rsplit("|", 1)[-1].strip() for line in importtime.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("module", CLIS)
def test_help_imports_no_heavy_module(module: str) -> None:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", module, "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout
    modules = imported_modules(proc.stderr)
    assert modules, "no importtime output"
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert not heavy, f"{module} --help imports {heavy[:10]}"
