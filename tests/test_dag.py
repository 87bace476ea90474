"""The DAG runner on a local Ray instance: a failing stage fails its dependents, independent branches still
finish and are cached for the rerun, and the error names every failed stage."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.dag import PipelineError, execute
from pipeline.plan import Stage
from stages.evaluate import EvaluateConfig
from stages.shard import ShardConfig

pytestmark = pytest.mark.slow


def test_a_failed_stage_fails_its_dependents_and_spares_the_rest(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    good = Stage("shard/good", "shard", ShardConfig(source="shapes", task="vqa", out=str(tmp_path / "good"),
                                                     shapes_sizes=(8, 4, 2), shard_size=8))
    bad = Stage("shard/bad", "shard", ShardConfig(source="vqa_v2", task="vqa", root=str(tmp_path / "missing"),
                                                   out=str(tmp_path / "bad")))
    downstream = Stage("evaluate/bad", "evaluate", EvaluateConfig(model=str(tmp_path / "m"), shards=str(bad.out),
                                                                  out=str(tmp_path / "ev")), deps=("shard/bad",))
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        with pytest.raises(PipelineError) as err:
            execute([good, bad, downstream])
        assert set(err.value.failed) == {"shard/bad", "evaluate/bad"}
        assert "missing" in err.value.failed["shard/bad"], err.value.failed
        assert good.done() and not bad.done() and not downstream.done()
        markers = execute([good])  # the finished branch is cached for the rerun
        assert markers["shard/good"]["metrics"]["samples"] == {"train": 8, "val": 4, "test": 2}
    finally:
        ray.shutdown()
