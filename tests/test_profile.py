"""The profile stage on an exported model and shapes shards: FLOPs distribution, latency and throughput side by
side with the backbone, JSON + PNG."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import randomize_trimmers, tiny

import smarttrim
from stages.profile import ProfileConfig, interleaved_times, main, run, warm_up
from stages.shard import ShardConfig
from stages.shard import run as shard

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "vqa"
    shard(ShardConfig(source="shapes", task="vqa", out=str(out), shapes_sizes=(8, 24, 4), shard_size=10))
    return out


def _export(path: Path, trim: smarttrim.TrimConfig | None, num_labels: int) -> Path:
    model = tiny("vqa", trim=trim, num_labels=num_labels)
    if trim is not None:
        randomize_trimmers(model, seed=0, std=0.3)
    model.save_pretrained(path)
    return path


def test_profile_trimmed_model(tmp_path: Path, shards: Path) -> None:
    labels = len(json.loads((shards / "manifest.json").read_text())["labels"])
    model = _export(tmp_path / "model", smarttrim.TrimConfig(), labels)
    result = run(ProfileConfig(model=str(model), shards=str(shards), out=str(tmp_path / "prof"), instances=12,
                               batch_size=8, warmup=1, threads=1, repeats=2))
    m = json.loads((tmp_path / "prof" / "profile.json").read_text())
    assert m == json.loads(json.dumps(result.metrics))
    f = m["flops"]
    assert m["instances"] == 12 and len(f["per_instance"]) == 12
    assert f["min"] <= f["median"] <= f["max"] and f["mean"] < f["backbone_mean"]
    assert f["ratio_to_backbone"] == pytest.approx(f["mean"] / f["backbone_mean"]) and f["ratio_to_backbone"] < 1
    assert len(set(f["per_instance"].values())) > 1, "per-instance FLOPs differ (adaptive)"
    assert m["latency_ms_bs1"]["median"] > 0 and m["latency_ms_bs1"]["p90"] >= m["latency_ms_bs1"]["median"]
    assert m["throughput"]["instances_per_s"] > 0 and m["throughput"]["batch_size"] == 8
    assert m["device"] == "cpu" and m["threads"] == 1
    b = m["backbone_latency_ms_bs1"]
    assert 0 < b["median"] <= b["p90"] and b["mean"] > 0 and m["latency_ms_bs1"]["mean"] > 0
    assert m["backbone_throughput"]["instances_per_s"] > 0
    sp = m["speedup"]
    for key in ("latency_bs1", "latency_bs1_median", "throughput", "flops", "latency_efficiency",
                "throughput_efficiency"):
        assert sp[key] > 0 and math.isfinite(sp[key]), key
    assert sp["flops"] == pytest.approx(f["backbone_mean"] / f["mean"]) and sp["flops"] > 1
    assert sp["latency_bs1"] == pytest.approx(b["mean"] / m["latency_ms_bs1"]["mean"])
    assert sp["latency_efficiency"] == pytest.approx(sp["latency_bs1"] / sp["flops"])
    assert "interleaved" in sp["method"] and "2 passes" in sp["method"]
    faults = sp["page_faults_timed"]  # page faults paid inside the timed loops: counted, not assumed
    assert set(faults) == {"bs1", "batched"} and all(isinstance(v, int) and v >= 0 for v in faults.values())
    assert (tmp_path / "prof" / "flops_hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_backbone_is_its_own_reference(tmp_path: Path, shards: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    labels = len(json.loads((shards / "manifest.json").read_text())["labels"])
    model = _export(tmp_path / "model", None, labels)
    code = main(["--model", str(model), "--shards", str(shards), "--out", str(tmp_path / "prof"),
                 "--instances", "4", "--batch-size", "4", "--threads", "1", "--warmup", "1", "--repeats", "3"])
    m = json.loads((tmp_path / "prof" / "profile.json").read_text())
    assert code == 0 and m["flops"]["ratio_to_backbone"] == 1.0 and m["trim"] is None
    sp = m["speedup"]
    assert sp["flops"] == 1.0, "the backbone is its own FLOPs reference"
    # equal weights timed side by side: the noise floor, near 1 (loose: the test machine is shared)
    assert 0.5 < sp["latency_bs1_median"] < 2.0 and 0.5 < sp["latency_bs1"] < 2.0
    assert sp["throughput"] > 0 and math.isfinite(sp["throughput"])
    assert "fewer MACs" in capsys.readouterr().out


def test_interleaved_times_alternates_order() -> None:
    calls: list[tuple[str, int]] = []
    fns = [lambda x: calls.append(("model", x)), lambda x: calls.append(("backbone", x))]
    ticks = iter(range(1000))
    times = interleaved_times(fns, [0, 1, 2, 3], repeats=3, timer=lambda fn: (fn(), float(next(ticks)))[1])
    one_pass = [("model", 0), ("backbone", 0), ("backbone", 1), ("model", 1),
                ("model", 2), ("backbone", 2), ("backbone", 3), ("model", 3)]
    assert calls == one_pass * 3
    assert [len(t) for t in times] == [12, 12]
    # each function's times are its own calls, pass after pass, in input order
    assert times[0][:4] == [0.0, 3.0, 4.0, 7.0] and times[1][:4] == [1.0, 2.0, 5.0, 6.0]
    assert interleaved_times(fns, [], repeats=2, timer=lambda fn: 0.0) == [[], []]


def test_profile_errors(tmp_path: Path, shards: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", str(tmp_path / "none"), "--shards", str(shards), "--out", str(tmp_path / "p")]) == 1
    assert "none" in capsys.readouterr().err and not (tmp_path / "p").exists()
    with pytest.raises(ValueError, match="instances"):
        ProfileConfig(model="m", shards="s", out="o", instances=0)
    with pytest.raises(ValueError, match="repeats"):
        ProfileConfig(model="m", shards="s", out="o", repeats=0)


def test_cli_help() -> None:
    out = subprocess.run([sys.executable, "-m", "stages.profile", "--help"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert "--model" in out and "--shards" in out and "flops_hist.png" in out
    assert "--repeats" in out and "side by side" in out and "backbone_latency_ms_bs1" in out


def test_backbone_flops_per_text_length_equal_tracing_each_instance() -> None:
    from smarttrim.flops import count_flops, strip_padding
    from stages.profile import backbone_flops

    model = tiny("vqa", num_labels=5).eval()
    batch = model.dummy_batch(5, seed=3, with_labels=False)
    singles = [strip_padding({k: v[i:i + 1] for k, v in batch.items()}) for i in range(5)]
    singles.append(singles[0])  # a repeated length is not traced again
    assert backbone_flops(model, singles) == [count_flops(model, one) for one in singles]


def test_keep_freed_memory_takes_effect_on_glibc() -> None:
    """The timing processes' allocator setting reaches glibc's ``mallopt`` (Linux); elsewhere it says it did not."""
    import platform

    from stages.common import keep_freed_memory

    took = keep_freed_memory()
    assert took is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


def test_minor_faults_counts_first_touches_of_fresh_memory() -> None:
    """``minor_faults`` (what the timing loops report) grows by about one per fresh page written, and not when the
    same pages are written again."""
    import mmap

    from stages.common import minor_faults

    pages = 2048
    with mmap.mmap(-1, pages * mmap.PAGESIZE) as buf:  # anonymous memory: no page is backed before it is written
        start = minor_faults()
        for i in range(pages):
            buf[i * mmap.PAGESIZE] = 1
        first = minor_faults()
        for i in range(pages):
            buf[i * mmap.PAGESIZE] = 2
        again = minor_faults()
    assert start is not None and first is not None and again is not None
    assert pages * 0.9 <= first - start <= pages * 1.5
    assert again - first < pages * 0.1


def test_warm_up_stops_after_the_first_pass_without_page_faults() -> None:
    """A function that writes fresh memory on its first call only: pass 1 faults, pass 2 is quiet, so warm-up runs
    exactly two passes; one that faults on every call runs to the bound."""
    import mmap

    held: list[mmap.mmap] = []

    def fresh_pages(_: int) -> None:
        buf = mmap.mmap(-1, 2048 * mmap.PAGESIZE)  # 2048 never-touched pages, kept alive
        for i in range(2048):
            buf[i * mmap.PAGESIZE] = 1
        held.append(buf)

    calls = []

    def first_call_only(x: int) -> None:
        calls.append(x)
        if len(calls) == 1:
            fresh_pages(x)

    assert warm_up([first_call_only], [0, 1]) == 2 and calls == [0, 1, 0, 1]
    assert warm_up([fresh_pages], [0], max_passes=3) == 3
    for buf in held:
        buf.close()
