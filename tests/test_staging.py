"""A staged ``runs_dir`` (``pipeline.storage``, ``stages.staging``): stage directories stored through pyarrow (here a
``file://`` store, the same code path as ``s3://`` or ``gs://``) and worked on in node-local copies; what is fetched
when, what a second node or driver sees, and that stage keys do not depend on where the copy is. The pipeline run
end to end on a staged store is ``tests/test_paper_config.py``."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.plan import build_plan
from pipeline.storage import CACHE_ENV, is_staged, mirror_for, runs_dir_problem
from stages.staging import MIRROR_ENV, Mirror, StorageError, localize

ROOT = Path(__file__).resolve().parents[1]


def _node(store: Path, cache: Path) -> Mirror:
    """The run ``x`` stored under ``store`` as the node whose cache is ``cache`` works on it."""
    return Mirror(remote=f"{store.as_uri()}/x", local=str(cache / "x"))


def _stage(m: Mirror, marker: dict, weights: str = "w1") -> Path:
    """A finished fine-tuning stage in ``m``'s local copy, published: metrics, curves, weights in ``model/``."""
    out = Path(m.local) / "finetune" / "a-0123"
    (out / "model").mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({"steps": 8}))
    (out / "history.jsonl").write_text("{}\n")
    (out / "model" / "model.safetensors").write_text(weights)
    m.publish(out, json.dumps(marker))
    return out


def test_publish_stores_the_directory_then_its_marker_and_pull_fetches_it_on_another_node(tmp_path: Path) -> None:
    a, b = _node(tmp_path / "store", tmp_path / "node-a"), _node(tmp_path / "store", tmp_path / "node-b")
    out = _stage(a, {"id": "finetune/a", "seconds": 1.0})
    stored = tmp_path / "store" / "x" / "finetune"
    assert (stored / "a-0123" / "model" / "model.safetensors").read_text() == "w1"
    assert json.loads((stored / "a-0123.done.json").read_text())["seconds"] == 1.0
    theirs = Path(b.local) / "finetune" / "a-0123"
    assert b.is_file(theirs.with_name("a-0123.done.json")) and not theirs.exists()

    b.pull(theirs, top_only=True)  # the driver: metrics and curves, never weights
    assert sorted(p.name for p in theirs.iterdir()) == ["history.jsonl", "metrics.json"]
    b.pull(theirs)  # a node that evaluates the model: everything
    assert (theirs / "model" / "model.safetensors").read_text() == "w1"
    assert json.loads(theirs.with_name("a-0123.done.json").read_text())["id"] == "finetune/a"

    (theirs / "model" / "model.safetensors").write_text("touched")
    b.pull(theirs)  # the copy is the stored one (same marker): not fetched again
    assert (theirs / "model" / "model.safetensors").read_text() == "touched"
    _stage(a, {"id": "finetune/a", "seconds": 2.0}, weights="w2")  # recomputed elsewhere (--force): a new marker
    b.pull(theirs)
    assert (theirs / "model" / "model.safetensors").read_text() == "w2", "a stale copy is fetched again"
    b.pull(theirs, top_only=True)
    assert (theirs / "model").is_dir(), "a full copy serves a top-only pull"
    assert out.is_dir()


def test_a_stage_that_is_not_stored_is_an_error_naming_it_and_delete_forgets_it(tmp_path: Path) -> None:
    a = _node(tmp_path / "store", tmp_path / "node-a")
    missing = Path(a.local) / "evaluate" / "e-1"
    with pytest.raises(StorageError, match=r"x/evaluate/e-1: not in storage \(its stage is not done\)"):
        a.pull(missing)
    out = _stage(a, {"id": "finetune/a"})
    a.delete(out.with_name("a-0123.done.json"))
    a.delete(out)
    assert not (tmp_path / "store" / "x" / "finetune" / "a-0123").exists()
    assert not (tmp_path / "store" / "x" / "finetune" / "a-0123.done.json").exists() and not out.exists()


def test_a_republished_stage_leaves_no_stale_files_and_shards_stay_out_of_top_only_pulls(tmp_path: Path) -> None:
    a, b = _node(tmp_path / "store", tmp_path / "node-a"), _node(tmp_path / "store", tmp_path / "node-b")
    out = Path(a.local) / "shard" / "s-1"
    out.mkdir(parents=True)
    for name in ("manifest.json", "train-000000.tar", "old.txt"):
        (out / name).write_text(name)
    a.publish(out, "{}")
    (out / "old.txt").unlink()
    a.publish(out, '{"again": 1}')
    assert not (tmp_path / "store" / "x" / "shard" / "s-1" / "old.txt").exists()
    theirs = b.pull(Path(b.local) / "shard" / "s-1", top_only=True)
    assert sorted(p.name for p in theirs.iterdir()) == ["manifest.json"]
    b.pull(theirs)  # a stage that reads the shards: all of them (a directory of files only)
    assert sorted(p.name for p in theirs.iterdir()) == ["manifest.json", "train-000000.tar"]


def test_the_run_directorys_own_files_are_stored_and_fetched(tmp_path: Path) -> None:
    a, b = _node(tmp_path / "store", tmp_path / "node-a"), _node(tmp_path / "store", tmp_path / "node-b")
    (Path(a.local) / "mlflow-artifacts" / "run1").mkdir(parents=True)
    (Path(a.local) / "mlflow-artifacts" / "run1" / "metrics.json").write_text("{}")
    (Path(a.local) / "pipeline.log").write_text("line\n")
    for name in ("mlflow-artifacts", "pipeline.log"):
        a.push(Path(a.local) / name)
    assert b.fetch(Path(b.local) / "mlflow-artifacts") and b.fetch(Path(b.local) / "pipeline.log")
    assert (Path(b.local) / "mlflow-artifacts" / "run1" / "metrics.json").is_file()
    assert (Path(b.local) / "pipeline.log").read_text() == "line\n" and not b.fetch(Path(b.local) / "mlflow.db")


def test_concurrent_pulls_on_one_node_fetch_once(tmp_path: Path) -> None:
    a, b = _node(tmp_path / "store", tmp_path / "node-a"), _node(tmp_path / "store", tmp_path / "node-b")
    _stage(a, {"id": "finetune/a"})
    theirs = Path(b.local) / "finetune" / "a-0123"
    errors: list[BaseException] = []

    def pull() -> None:
        try:
            b.pull(theirs)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=pull) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and (theirs / "model" / "model.safetensors").read_text() == "w1"
    assert not [p for p in theirs.parent.iterdir() if ".tmp-" in p.name], "no temporary copies left"


def test_localize_fetches_the_stage_a_path_lies_in_and_ignores_other_paths(tmp_path: Path, monkeypatch) -> None:
    a, b = _node(tmp_path / "store", tmp_path / "node-a"), _node(tmp_path / "store", tmp_path / "node-b")
    _stage(a, {"id": "finetune/a"})
    model = Path(b.local) / "finetune" / "a-0123" / "model"
    localize(model, tmp_path / "users-data", None, mirror=b.to_env())  # a Ray Train worker, told by its payload
    assert (model / "model.safetensors").is_file() and not (tmp_path / "users-data").exists()
    monkeypatch.setenv(MIRROR_ENV, b.to_env())
    (model / "model.safetensors").unlink()
    _stage(a, {"id": "finetune/a", "again": True})
    localize(model)  # a stage's own process, told by its Ray task's environment
    assert (model / "model.safetensors").is_file()
    monkeypatch.delenv(MIRROR_ENV)
    localize(tmp_path / "nothing")  # not a staged run: nothing to do


def test_runs_dir_forms_and_modes() -> None:
    assert runs_dir_problem("s3://bucket/runs") is None and is_staged("s3://bucket/runs")
    assert runs_dir_problem("gs://bucket/runs") is None and is_staged("gs://bucket/runs", "auto")
    assert not is_staged("/mnt/shared/runs") and is_staged("/mnt/shared/runs", "staged")
    assert "cannot be written in place" in runs_dir_problem("s3://bucket/runs", "direct")
    assert "names a bucket" in runs_dir_problem("s3:///runs")
    assert "not a storage this pipeline reaches" in runs_dir_problem("ftp://host/runs")
    assert "runs_dir_mode='sometimes'" in runs_dir_problem("runs", "sometimes")
    assert runs_dir_problem("file:///abs/runs", "staged") is None


def test_an_object_store_runs_dir_validates_and_plans_without_reaching_the_store(tmp_path: Path, monkeypatch) -> None:
    """``runs_dir: s3://...`` (no network here): the config validates, the run directory is this node's cache
    copy, every stage carries the mirror, Ray Train's checkpoints go to the store, and no stage key depends on
    where the cache is (a driver on another machine plans the same stages)."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache-1"))
    cfg = load_config(ROOT / "pipeline/configs/quickstart.yaml", ["runs_dir=s3://bucket/smarttrim"])
    assert cfg.mirror == mirror_for("s3://bucket/smarttrim", "quickstart")
    assert cfg.mirror.remote == "s3://bucket/smarttrim/quickstart"
    assert cfg.run_dir.is_relative_to(tmp_path / "cache-1") and cfg.run_dir.name == "quickstart"
    plan = build_plan(cfg)
    assert all(s.mirror == cfg.mirror for s in plan)
    finetunes = [s for s in plan if s.kind == "finetune"]
    assert finetunes and all(s.config.storage == "s3://bucket/smarttrim/quickstart/checkpoints" for s in finetunes)
    evaluate = next(s for s in plan if s.kind == "evaluate")
    assert set(evaluate.inputs) == {str(next(s for s in plan if s.id == d).out) for d in evaluate.deps}
    assert cfg.mirror.uri(evaluate.out) == f"s3://bucket/smarttrim/quickstart/evaluate/{evaluate.out.name}"

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "elsewhere" / "cache-2"))
    other = build_plan(load_config(ROOT / "pipeline/configs/quickstart.yaml", ["runs_dir=s3://bucket/smarttrim"]))
    assert [s.out.name for s in other] == [s.out.name for s in plan], "keys do not depend on the cache's place"
    here, there = (build_plan(load_config(ROOT / "pipeline/configs/quickstart.yaml", [f"runs_dir={tmp_path / d}"]))
                   for d in ("runs", "moved/runs"))
    assert [s.out.name for s in here] == [s.out.name for s in there], "nor on where a runs_dir is"
    assert all(s.mirror is None for s in here)
    with pytest.raises(ValueError, match="runs_dir_mode: staged"):
        load_config(ROOT / "pipeline/configs/quickstart.yaml", ["runs_dir=s3://bucket/x", "runs_dir_mode=direct"])


def test_unreachable_storage_is_an_error_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """HDFS without a JVM fails at once here; an unreachable bucket fails the same way, after the network timeout."""
    from pipeline.run import main

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    local = Path(mirror_for("hdfs://nohost:1/x", "quickstart").local)
    local.mkdir(parents=True)
    (local / "pipeline.log").write_text("an earlier run's log, which the end of a command would store\n")

    broken = Mirror(remote="hdfs://nohost:1/x", local=str(tmp_path / "x"))
    with pytest.raises(StorageError, match=r"hdfs://nohost:1/x: cannot reach the storage"):
        broken.is_file(tmp_path / "x" / "a.done.json")
    for command in ("plan", "report"):  # report also fetches and stores the run's own files
        assert main([command, "--config", str(ROOT / "pipeline/configs/quickstart.yaml"),
                     "runs_dir=hdfs://nohost:1/x"]) == 1
        err = capsys.readouterr().err
        assert "pipeline: error: hdfs://nohost:1/x/quickstart: cannot reach the storage" in err, command
        assert "Traceback" not in err, command
