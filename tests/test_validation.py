"""Problems a user trips on are refused before any work, with the file and dotted path and no traceback: YAML 1.1's
``1e-4`` string, unknown presets, misspelt splits, missing roots and checkpoints, override paths that do not exist,
unknown ``--force`` ids; ``--force`` reaches every stage downstream; a dead Ray address fails within the bound and a
stale ``ray_current_cluster`` file does not hang; outputs get normal file modes; evaluation and profiling reserve
GPUs; ``runs_dir`` may be a ``file://`` URI; ``--help`` does not import torch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.dag import stage_gpus
from pipeline.plan import build_plan, forced
from pipeline.preflight import input_problems
from pipeline.run import forget_outside, main, plan_lines, select
from pipeline.storage import resolve_runs_dir
from smarttrim.atomic import atomic_write
from stages.common import apply_overrides, load_yaml, write_outputs

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "pipeline" / "configs" / "quickstart.yaml"


def _config(tmp_path: Path, *overrides: str):
    return load_config(QUICKSTART, [f"runs_dir={tmp_path / 'runs'}", *overrides])


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """``pipeline.run`` with ``argv`` fails with exit 1 and one ``pipeline: error:`` message (no traceback)."""
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("pipeline: error: ") and "Traceback" not in err, err
    return err


# --------------------------------------------------------------------------------------------- config values
def test_exponent_floats_are_numbers_in_files_and_overrides(tmp_path: Path) -> None:
    """YAML 1.1 (PyYAML) reads ``1e-4`` as a string, which ended in "'>' not supported between str and int"."""
    assert load_yaml("lr: 1e-4\nb: 5E3\nc: 3\nd: x1e4\ne: 1.0e-5") == {"lr": 1e-4, "b": 5000.0, "c": 3, "d": "x1e4",
                                                                      "e": 1e-5}
    cfg = _config(tmp_path, "tasks.0.backbone.lr=1e-4")
    assert cfg.tasks[0].backbone.lr == pytest.approx(1e-4)
    path = tmp_path / "exp.yaml"
    path.write_text(QUICKSTART.read_text().replace("backbone: {max_steps: 300, batch_size: 32, lr: 2.0e-4",
                                                   "backbone: {max_steps: 300, batch_size: 32, lr: 2e-4"))
    assert "lr: 2e-4" in path.read_text()
    assert load_config(path).tasks[0].backbone.lr == pytest.approx(2e-4)


def test_unknown_preset_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``meter-huge`` used to fail inside the Ray Train worker, retried 3 times (37 s, 104 log lines)."""
    err = _error(["plan", "--config", str(QUICKSTART), f"runs_dir={tmp_path}", "model.preset=meter-huge"], capsys)
    assert "model: preset='meter-huge': unknown; known presets are ['meter-base', 'meter-small', 'meter-tiny']" in err
    from stages.finetune_config import FinetuneConfig

    with pytest.raises(ValueError, match="preset='meter-huge'"):  # the stage alone: refused before Ray Train starts
        FinetuneConfig(shards="s", out="o", preset="meter-huge")
    assert not list(tmp_path.iterdir()), "nothing was written"


@pytest.mark.parametrize(("override", "message"), [
    ("tasks.5.name=x", "override 'tasks.5.name=x': tasks is a list of 1 item(s); '5' is not an index in it (0..0)"),
    ("tasks.first.name=x", "'first' is not an index"),
    ("name.x=1", "name is a value ('quickstart'), not a section"),
    ("tasks.0.backbone.lrr=1", "tasks[0].backbone.lrr: unknown key"),
    ("tasks.0.eval_split=vall", "eval_split='vall': the shapes source has splits"),
    ("evaluate.device=gpu", "evaluate.device='gpu': must be one of ('cpu', 'cuda', 'auto')"),
    ("runs_dir=ftp://host/runs", "runs_dir='ftp://host/runs': ftp:// is not a storage this pipeline reaches"),
])
def test_bad_overrides_name_the_path(override: str, message: str, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(["plan", "--config", str(QUICKSTART), f"runs_dir={tmp_path}", override], capsys)
    assert message in err and str(QUICKSTART) in err, err


def test_stage_cli_overrides_are_numbers_and_bad_paths_are_errors(capsys: pytest.CaptureFixture[str]) -> None:
    """``stages.finetune --set train.lr=1e-4`` ended in a raw traceback."""
    from stages.finetune import main as finetune_main

    base = ["--shards", "s", "--out", "o"]
    assert apply_overrides({"train": {"lr": 1.0}}, ["train.lr=1e-4"])["train"]["lr"] == pytest.approx(1e-4)
    assert finetune_main([*base, "--set", "trian.lr=1e-4"]) == 1
    err = capsys.readouterr().err
    assert "finetune: error: override 'trian.lr=1e-4': unknown section 'trian'" in err and "Traceback" not in err
    assert finetune_main([*base, "--set", "train.lr.x=1"]) == 1
    assert "train.lr is a value" in capsys.readouterr().err


def test_missing_inputs_are_one_error_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing data root used to print 22 "failed" lines; a missing checkpoint was noticed after sharding."""
    cfg = _config(tmp_path, f"model.pretrained={tmp_path / 'nope'}", "tasks.0.data.source=nlvr2",
                  "tasks.0.data.task=nlvr2", f"tasks.0.data.root={tmp_path / 'nlvr2'}")
    problems = input_problems(cfg)
    assert problems == [f"model.pretrained: {tmp_path / 'nope'}: no such file or directory",
                        f"tasks[0].data.root: {tmp_path / 'nlvr2'}: no such directory"]
    err = _error(["all", "--config", str(QUICKSTART), f"runs_dir={tmp_path / 'runs'}",
                  f"model.pretrained={tmp_path / 'nope'}"], capsys)
    assert "1 problem(s)" in err and "model.pretrained" in err
    assert not (tmp_path / "runs").exists(), "nothing ran"


# ------------------------------------------------------------------------------------------------- --force
def test_unknown_force_is_refused_with_the_ids(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--force finetun`` (a typo) reran nothing and exited 0."""
    err = _error(["plan", "--config", str(QUICKSTART), f"runs_dir={tmp_path}", "--force", "finetun"], capsys)
    assert "--force 'finetun': not a stage kind (evaluate, finetune, profile, shard) or id" in err
    assert "finetune/shapes-vqa/smarttrim-2x" in err and "evaluate/shapes-vqa/backbone" in err


def _mark_done(stages) -> None:
    for s in stages:
        s.out.mkdir(parents=True, exist_ok=True)
        s.marker.write_text(json.dumps({"id": s.id, "out": str(s.out), "seconds": 0.0, "metrics": {}}))


def test_force_reaches_every_stage_downstream(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Forcing a fine-tuning used to leave its evaluation and profile cached, older than the new weights."""
    cfg = _config(tmp_path)
    plan = build_plan(cfg)
    model = "finetune/shapes-vqa/smarttrim-2x"
    assert forced(plan, [model]) == {model, "evaluate/shapes-vqa/smarttrim-2x", "profile/shapes-vqa/smarttrim-2x"}
    everything = forced(plan, ["shard"])
    assert everything == {s.id for s in plan}, "every stage reads the shards"
    assert forced(plan, ["evaluate"]) == {s.id for s in plan if s.kind == "evaluate"}

    _mark_done(plan)
    assert main(["plan", "--config", str(QUICKSTART), f"runs_dir={tmp_path / 'runs'}", "--force", model]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:]}
    assert {k for k, v in lines.items() if v == "rerun"} == forced(plan, [model])
    assert out.splitlines()[0] == f"[plan] {len(plan)} stages: {len(plan) - 3} cached, 0 run, 3 rerun"
    assert all(s.done() for s in plan), "plan runs nothing"

    # `pipeline.run finetune --force ...` does not run evaluations: they are forgotten, not left stale
    selected = select(plan, "finetune")
    assert forget_outside(plan, selected, forced(plan, [model])) == ["evaluate/shapes-vqa/smarttrim-2x",
                                                                    "profile/shapes-vqa/smarttrim-2x"]
    by_id = {s.id: s for s in plan}
    assert not by_id["evaluate/shapes-vqa/smarttrim-2x"].done()
    assert not by_id["profile/shapes-vqa/smarttrim-2x"].out.exists()
    assert by_id[model].done(), "the selected stage itself is cleared by execute, when it runs"
    assert by_id["evaluate/shapes-vqa/backbone"].done()
    assert "run" in plan_lines(list(by_id.values()), set())[3]


# --------------------------------------------------------------------------------------------------- Ray
def _dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # closed again: nothing listens there


def test_dead_ray_address_fails_within_the_bound() -> None:
    env = {**os.environ, "RAY_ADDRESS": _dead_address()}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", "from stages.ray_connect import connect; connect(timeout_s=3)"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and time.monotonic() - start < 60
    assert f"RAY_ADDRESS={env['RAY_ADDRESS']}: nothing answers there within 3 s" in done.stderr
    assert "RAY_ADDRESS=local" in done.stderr and "ray start --head" in done.stderr


@pytest.mark.slow
def test_stale_ray_current_cluster_starts_a_local_instance() -> None:
    """After a ``ray start --head`` whose processes died, ``ray_current_cluster`` still names the dead address and
    ``ray.init()`` retried it forever."""
    tmp = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))  # Ray's sockets need short paths
    (tmp / "ray").mkdir()
    dead = _dead_address()
    (tmp / "ray" / "ray_current_cluster").write_text(dead)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"RAY_TMPDIR": str(tmp)}
    code = ("import ray; from stages.ray_connect import connect; print('RESULT', connect()); "
            "print('NODES', len(ray.nodes())); ray.shutdown()")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RESULT started a local instance" in done.stdout and "was stale" in done.stdout
    assert f"names {dead}, which does not answer" in done.stderr


# -------------------------------------------------------------------------------------- files and storage
def test_outputs_get_normal_file_modes(tmp_path: Path) -> None:
    """``mkstemp``/``mkdtemp`` create 0600/0700: teammates could not read report.md."""
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "report.md", lambda p: Path(p).write_text("x"))
        write_outputs(tmp_path / "stage", {"metrics.json": lambda p: p.write_text("{}")})
    finally:
        os.umask(old)
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "stage").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "stage" / "metrics.json").stat().st_mode & 0o777 == 0o644


def test_runs_dir_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_runs_dir((tmp_path / "r").as_uri()) == tmp_path / "r"
    monkeypatch.setenv("SMARTTRIM_RUNS_ROOT", str(tmp_path / "shared"))
    assert resolve_runs_dir("runs") == tmp_path / "shared" / "runs"
    assert _config(tmp_path).run_dir == tmp_path / "runs" / "quickstart", "an absolute runs_dir is kept"
    monkeypatch.delenv("SMARTTRIM_RUNS_ROOT")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(QUICKSTART)
    assert cfg.run_dir == tmp_path / "runs" / "quickstart" and cfg.run_dir.is_absolute()
    with pytest.raises(ValueError, match="file:///abs/path"):
        resolve_runs_dir("file://relative/runs")


def test_measuring_stages_reserve_gpus(tmp_path: Path) -> None:
    plan = build_plan(_config(tmp_path, "evaluate.device=cuda", "profile.device=auto"))
    kinds = {s.kind: s for s in plan}
    assert stage_gpus(kinds["evaluate"], cluster_gpus=0) == 1
    assert stage_gpus(kinds["profile"], cluster_gpus=0) == 0 and stage_gpus(kinds["profile"], cluster_gpus=8) == 1
    assert stage_gpus(kinds["shard"], cluster_gpus=8) == 0
    assert kinds["evaluate"].config.device == "cuda" and kinds["profile"].config.device == "auto"


def test_help_does_not_import_torch() -> None:
    """``--help`` took 4-7 s: the heavy imports now wait until the arguments are parsed."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipeline.run", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "plan" in done.stdout
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "ray", "mlflow", "transformers"}, sorted(imported & {"torch", "ray"})


def test_forcing_a_training_deletes_only_its_own_run_storage(tmp_path: Path) -> None:
    """With a storage root shared by every fine-tuning (``compute.storage``), ``--force`` deletes the forced run's
    checkpoints only (a URI goes through pyarrow, as Ray Train's own storage does)."""
    from pipeline.dag import clear

    storage = tmp_path / "ckpt"
    plan = build_plan(_config(tmp_path, f"compute.storage={storage.as_uri()}"))
    trainings = [s for s in plan if s.kind == "finetune"]
    for s in trainings:
        assert s.config.storage == storage.as_uri()
        (storage / s.config.name / "checkpoint_000000").mkdir(parents=True)
    clear(trainings[1])
    left = sorted(s.config.name for s in trainings if s is not trainings[1])
    assert sorted(p.name for p in storage.iterdir()) == left
    default = build_plan(_config(tmp_path / "d"))[1]  # the default: <out>.ray beside the output, removed whole
    Path(default.config.run_storage).mkdir(parents=True)
    clear(default)
    assert not Path(default.config.storage_path).exists()
