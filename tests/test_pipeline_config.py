"""Pipeline configs: every YAML in the repo loads, and bad configs fail before any work with the field's path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import PipelineConfig, load_config
from pipeline.plan import build_plan, stage_key
from pipeline.preflight import check_inputs, input_problems
from pipeline.run import select
from pipeline.sweep import pareto_front
from smarttrim.data import shapes

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
    ("", ["tasks.0.eval_split=dev"], r"tasks\[0\]: eval_split='dev': the shapes source has splits"),
    ("", ["tasks.0.data.source=nocaps", "tasks.0.data.root=/x"], r"train_split: source 'nocaps' has no training"),
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
    shard_inputs = {"generator": shapes.GENERATOR_VERSION}  # the built-in generator's version keys its shards
    assert stage_key("shard", plan["shard/a"].config, shard_inputs) in plan["shard/a"].out.name
    ids = [s.id for s in select(list(plan.values()), "finetune")]
    assert ids == ["shard/a", "finetune/a/backbone", "finetune/a/smarttrim-2x"]


def test_smarttrim_start_baselines_and_pretraining_in_the_graph(tmp_path: Path) -> None:
    """SmartTrim starts from the pre-trained model by default (beside the backbone, not after it); with
    ``smarttrim_start: backbone`` from the fine-tuned backbone; baselines are trained like SmartTrim; a
    ``pretrain`` section without ``model.pretrained`` puts pre-training at the root of the graph."""
    pre = tmp_path / "pre"
    from smarttrim.pretraining import PretrainModel, save_pretrain

    save_pretrain(PretrainModel(__import__("smarttrim").model_config("meter-tiny", task="retrieval")), pre)
    (pre / "tokenizer").mkdir()
    path = _write(tmp_path, BASE + f"model: {{preset: meter-tiny, pretrained: {pre}}}\n"
                  "baselines: {target: 2x, variants: [local]}\n")
    plan = {s.id: s for s in build_plan(load_config(path), root=tmp_path / "runs")}
    st, bb, local = plan["finetune/a/smarttrim-2x"], plan["finetune/a/backbone"], plan["finetune/a/local-2x"]
    assert st.deps == bb.deps == ("shard/a",) and st.meta["start"] == "pretrained" == bb.meta["start"]
    assert st.config.pretrained == bb.config.pretrained == str(pre.resolve()) and st.config.init is None
    assert local.meta["kind"] == "baseline" and local.config.trim.token_trimmer == "local"
    assert plan["shard/a"].config.tokenizer == str((pre / "tokenizer").resolve()), "the model's own tokenizer"
    other = {s.id: s for s in build_plan(load_config(path, ["smarttrim_start=backbone"]), root=tmp_path / "runs")}
    st2 = other["finetune/a/smarttrim-2x"]
    assert st2.deps == ("shard/a", "finetune/a/backbone") and st2.meta["start"] == "backbone"
    for sid in ("evaluate/a/smarttrim-2x", "profile/a/backbone"):  # they read the shards too (--force shard)
        assert plan[sid].deps == ("shard/a", f"finetune/a/{sid.rsplit('/', 1)[1]}"), sid
    assert st2.config.init == str(bb.out / "model") and st2.config.pretrained is None
    assert other["finetune/a/backbone"].out == bb.out
    (pre / "model.safetensors").write_bytes((pre / "model.safetensors").read_bytes() + b" ")  # new weights
    moved = {s.id: s for s in build_plan(load_config(path), root=tmp_path / "runs")}
    assert moved["finetune/a/backbone"].out != bb.out, "another pre-trained model, other fine-tunings"
    with pytest.raises(ValueError, match="smarttrim_start"):
        load_config(path, ["smarttrim_start=scratch"])

    own = _write(tmp_path, BASE + "pretrain: {data: {source: shapes, task: caption}, train: {max_steps: 3}}\n")
    plan = {s.id: s for s in build_plan(load_config(own), root=tmp_path / "runs")}
    assert plan["pretrain/model"].deps == ("shard/pretrain",) and plan["pretrain/model"].config.objective == "pretrain"
    assert plan["finetune/a/backbone"].config.pretrained == str(plan["pretrain/model"].out / "model")
    assert "pretrain/model" in plan["finetune/a/backbone"].deps and "pretrain/model" in plan["shard/a"].deps
    with pytest.raises(ValueError, match="pretrain.data.task"):
        load_config(own, ["pretrain.data.task=vqa"])
    assert plan["pretrain/model"].config.vision_weight == 0.0  # METER's objectives unless asked
    seen = {s.id: s for s in build_plan(load_config(own, ["pretrain.vision_weight=1.0"]), root=tmp_path / "runs")}
    assert seen["pretrain/model"].config.vision_weight == 1.0
    assert seen["pretrain/model"].out != plan["pretrain/model"].out
    with pytest.raises(ValueError, match="vision_weight"):
        load_config(own, ["pretrain.vision_weight=1.0", "pretrain.data.source=karpathy_coco",
                          f"pretrain.data.root={tmp_path}"])


def test_pareto_front_by_hand() -> None:
    points = [{"metric": 0.5, "gflops": 1.0}, {"metric": 0.6, "gflops": 2.0}, {"metric": 0.55, "gflops": 2.5},
              {"metric": 0.6, "gflops": 3.0}, {"metric": 0.7, "gflops": 4.0}]
    assert pareto_front(points) == [points[0], points[1], points[4]]


def test_report_says_where_each_model_started() -> None:
    from pipeline.report import _start_line

    def row(kind: str, start: str | None, source: str | None) -> dict:
        return {"kind": kind, "start": start, "start_from": source}

    same = [row("prior", None, None), row("backbone", "pretrained", "p/m"), row("smarttrim", "pretrained", "p/m")]
    want = "Start: every model is fine-tuned once from the pre-trained model `p/m` (the paper's recipe)."
    assert _start_line(same) == want
    mixed = [row("backbone", "pretrained", "p/m"), row("smarttrim", "backbone", "runs/b/model"),
             row("ablation", "backbone", "runs/b/model")]
    line = _start_line(mixed)
    assert "the backbone is fine-tuned from the pre-trained model `p/m`" in line
    assert "SmartTrim and its variants from the fine-tuned backbone `runs/b/model`" in line


def test_report_table_per_question_kind() -> None:
    from pipeline.report import _kind_table

    def model(name: str, by_kind: dict) -> dict:
        return {"name": f"t/{name}", "kind": "backbone", "by_kind": by_kind}

    a = model("backbone", {"exists": {"instances": 10, "metric": 0.61, "text_only_baseline": 0.6,
                                      "permuted_metric": 0.6},
                           "attribute/color": {"instances": 5, "metric": 0.9, "text_only_baseline": 0.2,
                                               "permuted_metric": 0.25}})
    b = model("smarttrim-2x", {"exists": {"instances": 10, "metric": 0.5, "text_only_baseline": 0.6}})
    lines = _kind_table("t", "vqa_score", [a, b])
    assert lines[1].startswith("## t: vqa_score per question kind")
    assert "| kind | instances | text-only | backbone | smarttrim-2x |" in lines
    assert "| attribute/color | 5 | 0.200 | 0.900 / 0.250 |  |" in lines, "kinds sorted; a model without it: empty"
    assert "| exists | 10 | 0.600 | 0.610 / 0.600 | 0.500 |" in lines
    assert _kind_table("t", "vqa_score", []) == []


def test_task_splits_default_to_the_official_files_names(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, BASE), [
        "tasks=[{name: a, data: {source: vqa_v2, task: vqa, root: /v}},"
        " {name: b, data: {source: nlvr2, task: nlvr2, root: /n}},"
        " {name: c, data: {source: snli_ve, task: snli_ve, root: /s}, eval_split: test},"
        " {name: d, data: {source: karpathy_flickr30k, task: retrieval, root: /f}, train_split: val},"
        " {name: e, data: {source: shapes, task: vqa}}]"])
    got = [(t.train_split, t.eval_split, t.test_split) for t in cfg.tasks]
    assert got == [("train2014", "val2014", None), ("train", "dev", "test1"), ("train", "test", "test"),
                   ("val", "val", "test"), ("train", "val", None)]
    plan = build_plan(cfg, tmp_path / "runs")
    by_id = {s.id: s for s in plan}
    assert by_id["finetune/a/backbone"].config.train_split == "train2014"
    assert by_id["finetune/a/backbone"].config.val_split == "val2014"
    assert by_id["evaluate/a/smarttrim-2x"].config.split == by_id["profile/a/backbone"].config.split == "val2014"
    assert by_id["finetune/d/smarttrim-2x"].config.train_split == "val"
    # official sources without a tokenizer train one on the task's training split; shapes has its built-in one
    assert (by_id["shard/a"].config.tokenizer_split, by_id["shard/a"].config.tokenizer_vocab) == ("train2014", 512)
    assert by_id["shard/e"].config.tokenizer_split is None


def _vqa_files(root: Path, *splits: str) -> Path:
    """The annotation files by which ``readers.splits_of`` finds VQA v2 splits (official names; content unread)."""
    root.mkdir(parents=True)
    for split in splits:
        (root / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text("{}")
    return root


def test_preflight_names_every_missing_input_before_any_work(tmp_path: Path) -> None:
    root = _vqa_files(tmp_path / "vqa", "train2014", "val2014", "test-dev2015")
    good = load_config(_write(tmp_path, BASE), ["tasks.0.data.source=vqa_v2", f"tasks.0.data.root={root}",
                                                "tasks.0.test_split=test-dev2015"])
    assert input_problems(good) == []
    bad = load_config(_write(tmp_path, BASE), [
        f"tasks=[{{name: a, data: {{source: vqa_v2, task: vqa, root: {root}}}, train_split: train}},"
        f" {{name: b, data: {{source: nlvr2, task: nlvr2, root: {tmp_path / 'none'}}}}},"
        f" {{name: c, data: {{source: shapes, task: vqa, tokenizer: {tmp_path / 'tok'}}}}}]"])
    problems = input_problems(bad)
    assert problems == [
        f"tasks[0].train_split='train': {root} has no vqa_v2 split 'train' (its annotation files give "
        "['train2014', 'val2014', 'test-dev2015'])",
        f"tasks[1].data.root: {tmp_path / 'none'}: no such directory",
        f"tasks[2].data.tokenizer: {tmp_path / 'tok'}: no such directory"]
    with pytest.raises(ValueError, match=r"3 problem\(s\)"):
        check_inputs(bad)
    # an official METER checkpoint reads RoBERTa's tokens: a task without a tokenizer is refused up front
    ckpt = tmp_path / "meter.ckpt"
    ckpt.write_bytes(b"")
    meter = load_config(_write(tmp_path, BASE), ["tasks.0.data.source=vqa_v2", f"tasks.0.data.root={root}",
                                                 f"model.pretrained={ckpt}"])
    assert [p.split(":")[0] for p in input_problems(meter)] == ["tasks[0].data.tokenizer"]
    missing = load_config(_write(tmp_path, BASE), [f"model.pretrained={tmp_path / 'gone.ckpt'}"])
    assert input_problems(missing) == [f"model.pretrained: {tmp_path / 'gone.ckpt'}: no such file or directory"]


def test_the_command_line_stops_on_bad_inputs_before_starting_ray(tmp_path: Path) -> None:
    root = _vqa_files(tmp_path / "vqa", "train2014", "val2014")
    config = _write(tmp_path, BASE)
    out = subprocess.run([sys.executable, "-m", "pipeline.run", "all", "--config", str(config),
                          f"runs_dir={tmp_path / 'runs'}", "tasks.0.data.source=vqa_v2", f"tasks.0.data.root={root}",
                          "tasks.0.eval_split=val"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "tasks[0].eval_split='val'" in out.stderr and "['train2014', 'val2014']" in out.stderr
    assert not (tmp_path / "runs").exists(), "nothing ran"
