"""The shard stage: round trips, manifest, bad input in fail/skip modes, atomicity, idempotent reruns."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from stages.shard import ShardConfig, SplitResult, main, majority_baseline, run, text_only_baseline

ROOT = Path(__file__).resolve().parents[1]


def _jpeg(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), color).save(buf, format="JPEG")
    return buf.getvalue()


def snli_ve_fixture(root: Path, bad: str | None = None) -> Path:
    """An SNLI-VE directory in the official layout with 4 good records, plus one bad record of kind ``bad``."""
    (root / "flickr30k_images").mkdir(parents=True)
    lines = []
    for i, label in enumerate(["entailment", "neutral", "contradiction", "entailment"]):
        (root / "flickr30k_images" / f"{100 + i}.jpg").write_bytes(_jpeg((40 * i, 80, 120)))
        lines.append(json.dumps({"Flickr30K_ID": str(100 + i), "sentence2": f"a photo number {i}",
                                 "gold_label": label, "pairID": f"p{i}"}))
    bad_line = {"Flickr30K_ID": "200", "sentence2": "a bad one", "gold_label": "neutral", "pairID": "bad"}
    if bad == "truncated_image":
        (root / "flickr30k_images" / "200.jpg").write_bytes(_jpeg((1, 2, 3))[:60])
    elif bad != "missing_image":
        (root / "flickr30k_images" / "200.jpg").write_bytes(_jpeg((1, 2, 3)))
    if bad == "malformed_line":
        lines.insert(2, '{"Flickr30K_ID": "200", "sentence2": ')
    elif bad is not None:
        if bad == "missing_field":
            del bad_line["sentence2"]
        elif bad == "bad_label":
            bad_line["gold_label"] = "maybe"
        elif bad == "empty_text":
            bad_line["sentence2"] = "  "
        lines.insert(2, json.dumps(bad_line))
    (root / "snli_ve_train.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _members(tar: Path) -> list[str]:
    with tarfile.open(tar) as t:
        return t.getnames()


def test_shapes_round_trip_and_manifest(tmp_path: Path) -> None:
    cfg = ShardConfig(source="shapes", task="vqa", out=str(tmp_path / "s"), shapes_sizes=(50, 20, 20),
                      shard_size=16)
    result = run(cfg)
    m = result.manifest
    assert not result.reused and m["source"] == "shapes" and m["task"] == "vqa"
    assert {s: v["samples"] for s, v in m["splits"].items()} == {"train": 50, "val": 20, "test": 20}
    assert [len(v["shards"]) for v in m["splits"].values()] == [4, 2, 2]
    assert sum(s["samples"] for s in m["splits"]["train"]["shards"]) == 50
    assert m["labels"] and m["skipped"] == [] and (tmp_path / "s" / m["tokenizer"]).is_dir()
    assert 0 < m["majority_baseline"]["score"]["val"] < 1
    files = sorted(p.name for p in (tmp_path / "s").glob("*.tar"))
    assert files[0] == "test-000000.tar" and "train-000003.tar" in files
    # read back: every sample has its json and one image, keys unique, counts match the manifest
    import hashlib
    keys = []
    for shard in m["splits"]["train"]["shards"]:
        path = tmp_path / "s" / shard["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
        names = _members(path)
        assert len(names) == 2 * shard["samples"]
        keys += [n.split(".")[0] for n in names if n.endswith(".json")]
    assert len(keys) == len(set(keys)) == 50
    assert not list(tmp_path.glob(".s.*")), "no temporary directories left behind"


def test_text_only_baseline_is_the_best_answer_per_question_text() -> None:
    train = SplitResult("train", questions=["what color ?", "What  color ?", "what shape ?", "what shape ?"],
                        label_scores=[{"0": 1.0}, {"0": 0.6, "1": 0.3}, {"2": 1.0}, {"1": 1.0, "2": 0.3}])
    val = SplitResult("val", questions=["what color ?", "what shape ?", "how many ?"],
                      label_scores=[{"1": 1.0}, {"2": 0.9}, {"0": 1.0}])
    base = text_only_baseline([val, train])  # fitted on the train split whatever the order
    assert base["fitted_on"] == "train" and base["distinct_texts"] == 2  # case and spaces normalized
    # "what color" -> 0 (1.6 vs 0.3), "what shape" -> 2 (1.3 vs 1.0), unseen "how many" -> the majority label
    majority = majority_baseline([val, train])
    assert majority["label_id"] == 0 and majority["fitted_on"] == "train"  # 0: 1.6, 2: 1.3, 1: 1.3
    assert base["score"]["val"] == pytest.approx((0.0 + 0.9 + 1.0) / 3)
    assert base["score"]["train"] == pytest.approx((1.0 + 0.6 + 1.0 + 0.3) / 4)
    assert base["coverage"] == {"train": 1.0, "val": pytest.approx(2 / 3)}
    assert "by_kind" not in base, "no kinds named, no breakdown"


def test_text_only_baseline_per_question_kind() -> None:
    """The same prior, scored per kind (``records.question_kind``); instances without a kind are left out."""
    train = SplitResult("train", questions=["what color ?", "is there a cube ?", "is there a cube ?"],
                        label_scores=[{"0": 1.0}, {"1": 1.0}, {"1": 1.0}], kinds=["other", "yes/no", "yes/no"])
    val = SplitResult("val", questions=["what color ?", "what color ?", "is there a cube ?", "why ?"],
                      label_scores=[{"0": 1.0}, {"2": 1.0}, {"0": 0.3}, {"1": 1.0}],
                      kinds=["other", "other", "yes/no", None])
    base = text_only_baseline([train, val])
    assert base["by_kind"]["val"] == {"other": {"score": 0.5, "instances": 2},
                                      "yes/no": {"score": 0.0, "instances": 1}}
    assert base["by_kind"]["train"] == {"other": {"score": 1.0, "instances": 1},
                                        "yes/no": {"score": 1.0, "instances": 2}}
    assert base["score"]["val"] == pytest.approx((1.0 + 0.0 + 0.0 + 1.0) / 4), "the unseen text gets the majority"


def test_shapes_manifest_records_both_baselines_and_one_tokenizer(tmp_path: Path) -> None:
    vqa = run(ShardConfig(source="shapes", task="vqa", out=str(tmp_path / "v"), shapes_sizes=(300, 100, 4),
                          shard_size=100)).manifest
    text_only, majority = vqa["text_only_baseline"]["score"]["val"], vqa["majority_baseline"]["score"]["val"]
    assert majority < text_only < 0.7, "the question narrows the answer; only the image decides it"
    kinds = vqa["text_only_baseline"]["by_kind"]["val"]
    assert sum(k["instances"] for k in kinds.values()) == 100 and "attribute/color" in kinds and "exists" in kinds
    cap = run(ShardConfig(source="shapes", task="caption", out=str(tmp_path / "c"), shapes_sizes=(4, 4, 4))).manifest
    assert cap["text_only_baseline"] == {} and cap["majority_baseline"] == {}
    a = json.loads((tmp_path / "v" / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    b = json.loads((tmp_path / "c" / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    assert a == b, "every shapes flavor gets the same tokenizer (a model pre-trained on captions reads questions)"


def test_official_source_round_trip(tmp_path: Path) -> None:
    root = snli_ve_fixture(tmp_path / "snli")
    result = run(ShardConfig(source="snli_ve", root=str(root), out=str(tmp_path / "out"), splits=("train",)))
    m = result.manifest
    assert m["splits"]["train"]["samples"] == 4 and m["labels"] == ["entailment", "neutral", "contradiction"]
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as t:
        infos = [json.loads(t.extractfile(n).read()) for n in t.getnames() if n.endswith(".json")]
        images = [t.extractfile(n).read() for n in t.getnames() if n.endswith(".jpg")]
    assert sorted(i["label_id"] for i in infos) == [0, 0, 1, 2]
    assert images[0] == (root / "flickr30k_images" / "100.jpg").read_bytes(), "image bytes stored as they are"
    assert m["majority_baseline"]["score"]["train"] == pytest.approx(2 / 4)


def test_official_source_without_a_tokenizer_trains_one_on_its_training_split(tmp_path: Path) -> None:
    from conftest import bench_module

    from smarttrim.data.tokenizer import load_tokenizer

    oo = bench_module("one_object")  # VQA v2 files as the official release names them
    root = tmp_path / "vqa_v2"
    oo.write_split(root, "train2014", 6, seed=0)
    oo.write_split(root, "val2014", 2, seed=0)
    questions = json.loads((root / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())
    questions["questions"][0]["question"] = "which zebra is it ?"  # words only the evaluation split has
    (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(questions))
    m = run(ShardConfig(source="vqa_v2", root=str(root), out=str(tmp_path / "out"), vqa_min_count=1,
                        tokenizer_vocab=64)).manifest
    assert m["tokenizer"] == "tokenizer" and set(m["splits"]) == {"train2014", "val2014"}
    tok = load_tokenizer(tmp_path / "out" / "tokenizer")
    vocab = tok.get_vocab()
    assert len(vocab) <= 64 and {"color", "shape", "object"} <= set(vocab), "trained on train2014's questions"
    assert "zebra" not in vocab, "no evaluation text in the tokenizer's corpus"
    assert tok.unk_token_id not in tok("what color is the object ?")["input_ids"]
    with pytest.raises(ValueError, match=r"tokenizer_split='train': not a split of .* \['train2014', 'val2014'\]"):
        run(ShardConfig(source="vqa_v2", root=str(root), out=str(tmp_path / "o2"), tokenizer_split="train"))


BAD_KINDS = {  # kind -> (file the error must name, field it must name)
    "truncated_image": ("200.jpg", "image"),
    "missing_image": ("200.jpg", "image"),
    "malformed_line": ("snli_ve_train.jsonl", None),
    "missing_field": ("snli_ve_train.jsonl", "sentence2"),
    "bad_label": ("snli_ve_train.jsonl", "gold_label"),
    "empty_text": ("snli_ve_train.jsonl", "sentence2"),
}


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_bad_input_fail_mode(tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    root = snli_ve_fixture(tmp_path / "snli", bad=kind)
    out = tmp_path / "out"
    code = main(["--source", "snli_ve", "--root", str(root), "--out", str(out), "--splits", "train"])
    err = capsys.readouterr().err
    file, field = BAD_KINDS[kind]
    assert code == 1 and file in err and "record" in err, err
    if field:
        assert field in err, err
    assert not out.exists() and not list(tmp_path.glob(".out*")), "nothing half-written"


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_bad_input_skip_mode(tmp_path: Path, kind: str) -> None:
    root = snli_ve_fixture(tmp_path / "snli", bad=kind)
    m = run(ShardConfig(source="snli_ve", root=str(root), out=str(tmp_path / "out"), splits=("train",),
                        on_error="skip")).manifest
    assert m["splits"]["train"]["samples"] == 4, "the good records are intact"
    (skipped,) = m["skipped"]
    file, field = BAD_KINDS[kind]
    assert file in skipped["file"] + skipped["reason"] and skipped["split"] == "train" and skipped["reason"]
    if field:
        assert skipped["field"] == field


def test_rerun_is_a_no_op_and_changes_rebuild(tmp_path: Path) -> None:
    cfg = ShardConfig(source="shapes", task="nlvr2", out=str(tmp_path / "s"), shapes_sizes=(12, 4, 4), shard_size=5)
    first = run(cfg)
    stamp = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s").iterdir()}
    again = run(cfg)
    assert again.reused and again.manifest == first.manifest
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s").iterdir()} == stamp
    changed = run(ShardConfig(**{**cfg.__dict__, "shapes_sizes": (10, 4, 4)}))
    assert not changed.reused and changed.manifest["splits"]["train"]["samples"] == 10
    with tarfile.open(tmp_path / "s" / "train-000000.tar") as t:
        assert sum(n.endswith(".png") for n in t.getnames()) == 2 * 5, "NLVR2 samples carry two images"


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="task"):
        ShardConfig(source="shapes", out=str(tmp_path))
    with pytest.raises(ValueError, match="root"):
        ShardConfig(source="vqa_v2", out=str(tmp_path))
    with pytest.raises(ValueError, match="on_error"):
        ShardConfig(source="shapes", task="vqa", out=str(tmp_path), on_error="ignore")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        run(ShardConfig(source="nlvr2", root=str(tmp_path / "nowhere"), out=str(tmp_path / "o")))


def test_cli_help_documents_the_stage() -> None:
    out = subprocess.run([sys.executable, "-m", "stages.shard", "--help"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    for flag in ("--source", "--task", "--root", "--out", "--shard-size", "--on-error", "--limit", "--seed"):
        assert flag in out
    assert "manifest.json" in out


def test_read_back_equals_written(tmp_path: Path) -> None:
    """Every shard member is exactly the generator's sample: texts, answers, meta and the image bytes."""
    from smarttrim.data import shapes

    out = tmp_path / "s"
    run(ShardConfig(source="shapes", task="vqa", out=str(out), shapes_sizes=(9, 3, 3), shard_size=4, seed=5))
    written = {s.key: s for s in shapes.generate("vqa", "train", 9, seed=5)}
    read = {}
    for tar in sorted(out.glob("train-*.tar")):
        with tarfile.open(tar) as t:
            for name in t.getnames():
                key, ext = name.split(".", 1)
                read.setdefault(key, {})[ext] = t.extractfile(name).read()
    assert set(read) == set(written)
    for key, sample in written.items():
        info = json.loads(read[key]["json"])
        assert info["texts"] == list(sample.texts) and info["answers"] == list(sample.answers)
        assert info["meta"] == json.loads(json.dumps(sample.meta))
        assert read[key]["img0.png"] == sample.images[0]
