"""Pipeline configs: every YAML in the repo loads, and bad configs fail before any work with the field's path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import PipelineConfig, load_config
from pipeline.plan import build_plan, stage_key
from pipeline.run import select
from pipeline.sweep import pareto_front

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "pipeline" / "configs").glob("*.yaml"))


def test_every_yaml_in_the_repo_loads() -> None:
    files = [p for p in ROOT.rglob("*.yaml") if ".venv" not in p.parts and "runs" not in p.parts]
    assert {p.name for p in CONFIGS} >= {"quickstart.yaml", "paper.yaml"}
    for path in files:
        data = yaml.safe_load(path.read_text())
        assert isinstance(data, dict), path
    for path in CONFIGS:
        cfg = load_config(path)
        assert isinstance(cfg, PipelineConfig) and build_plan(cfg, root=Path("/tmp/plan")), path


def test_paper_config_describes_the_paper_setting() -> None:
    cfg = load_config(ROOT / "pipeline" / "configs" / "paper.yaml")
    assert cfg.model.preset == "meter-base" and cfg.model.pretrained
    assert [t.data.task for t in cfg.tasks] == ["vqa", "nlvr2", "snli_ve", "retrieval"]
    assert cfg.trim.lambda_cost == 20.0 and cfg.trim.lambda_sd == 1.0
    assert set(cfg.ablations.variants) == {"no_stable_init", "no_curriculum", "no_self_distill"}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


BASE = """
name: t
tasks: [{name: a, data: {source: shapes, task: vqa}}]
targets: [{name: 2x, token_target_vision: 0.3, token_target_text: 0.5, head_target: 0.4}]
"""


@pytest.mark.parametrize(("extra", "overrides", "message"), [
    ("", ["tasks.0.backbone.lrr=1"], r"tasks\[0\]\.backbone\.lrr: unknown key"),
    ("compute: {num_gpus: 1}\n", [], r"compute\.num_gpus: unknown key"),
    ("", ["tasks.0.backbone.max_steps=abc"], r"tasks\[0\]\.backbone\.max_steps: expected int"),
    ("", ["tasks.0.backbone.warmup=1.5"], r"warmup=1.5: must be in \[0, 1\)"),
    ("", ["targets.0.head_target=0"], r"head_target=0.0: must be a keep ratio"),
    ("ablations: {target: 3x}\n", [], r"ablations.target='3x': not a target name"),
    ("ablations: {target: 2x, variants: [no_trimmers]}\n", [], r"'no_trimmers' is not one of"),
    ("sweep: {space: {lr: {grid: [1, 2]}}}\n", [], r"sweep.space.lr: not searchable"),
    ("", ["tasks.0.data.source=vqa_v2"], r"data.root: required for source 'vqa_v2'"),
    ("trim: {tau: 0}\n", [], r"tau"),
])
def test_bad_configs_fail_naming_the_field(tmp_path: Path, extra: str, overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(_write(tmp_path, BASE + extra), overrides)


def test_overrides_and_content_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, BASE)
    cfg = load_config(path, ["tasks.0.smarttrim.max_steps=7", "trim.lambda_cost=10"])
    assert cfg.tasks[0].smarttrim.max_steps == 7 and cfg.trim.lambda_cost == 10.0
    plan = {s.id: s for s in build_plan(cfg, root=tmp_path / "runs")}
    again = {s.id: s for s in build_plan(load_config(path, ["trim.lambda_cost=10", "tasks.0.smarttrim.max_steps=7"]),
                                         root=tmp_path / "runs")}
    assert {k: s.out for k, s in plan.items()} == {k: s.out for k, s in again.items()}, "keys are deterministic"
    other = {s.id: s for s in build_plan(load_config(path, ["tasks.0.smarttrim.max_steps=8"]), root=tmp_path / "runs")}
    assert other["finetune/a/backbone"].out == plan["finetune/a/backbone"].out, "upstream unchanged"
    assert other["finetune/a/smarttrim-2x"].out != plan["finetune/a/smarttrim-2x"].out
    assert other["evaluate/a/smarttrim-2x"].out != plan["evaluate/a/smarttrim-2x"].out, "changed input, changed key"
    assert stage_key("shard", plan["shard/a"].config) in plan["shard/a"].out.name
    ids = [s.id for s in select(list(plan.values()), "finetune")]
    assert ids == ["shard/a", "finetune/a/backbone", "finetune/a/smarttrim-2x"]


def test_pareto_front_by_hand() -> None:
    points = [{"metric": 0.5, "gflops": 1.0}, {"metric": 0.6, "gflops": 2.0}, {"metric": 0.55, "gflops": 2.5},
              {"metric": 0.6, "gflops": 3.0}, {"metric": 0.7, "gflops": 4.0}]
    assert pareto_front(points) == [points[0], points[1], points[4]]
