"""Official-format readers: tiny fixture directories in the official layouts, read back record by record."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from smarttrim.data.readers import (
    READERS,
    read_karpathy_coco,
    read_karpathy_flickr30k,
    read_nlvr2,
    read_nocaps,
    read_snli_ve,
    read_vqa_v2,
    splits_of,
    vqa_image_dir,
)
from smarttrim.data.records import BadRecord, DataError, Sample
from smarttrim.data.vqa_normalize import answer_vocabulary, normalize_answer, vqa_soft_score, vqa_soft_scores

KEY = re.compile(r"[A-Za-z0-9_-]+")


# ------------------------------------------------------------------------------------------------- helpers


def image(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path)
    return path


def write_json(path: Path, content: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return path


def write_lines(path: Path, lines: Iterable[Any]) -> Path:
    """JSON lines; a str is written as is (to make malformed lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def split_items(items: Iterable[Sample | BadRecord]) -> tuple[list[Sample], list[DataError]]:
    samples, bad = [], []
    for item in items:
        if isinstance(item, Sample):
            samples.append(item)
        else:
            assert isinstance(item, BadRecord)
            bad.append(item.error)
    keys = [s.key for s in samples]
    assert len(set(keys)) == len(keys), keys
    assert all(KEY.fullmatch(k) for k in keys), keys
    return samples, bad


def by_record(errors: list[DataError]) -> dict[str | int | None, DataError]:
    out = {e.record: e for e in errors}
    assert len(out) == len(errors), [str(e) for e in errors]
    return out


def assert_bad(error: DataError, file: Path, field: str | None, *words: str) -> None:
    assert error.file == str(file)
    assert error.field == field, str(error)
    for word in words:
        assert word in str(error), str(error)


# ------------------------------------------------------------------------------------------------- normalization


@pytest.mark.parametrize(("raw", "expected"), [
    ("Two", "2"), ("a dog.", "dog"), ("isnt", "isn't"), ("yes!", "yes"), ("Yes", "yes"), ("no.", "no"),
    ("The Cat", "cat"), ("an apple", "apple"), ("none", "0"), ("ten", "10"), ("one-way", "1 way"),
    ("1,000", "1000"), ("3.5", "3.5"), ("3.5.", "3.5"), ("red, white", "red white"), ("hot-dog", "hot dog"),
    ("hot - dog", "hot dog"), ("dont", "don't"), ("I dont know", "i don't know"), ("youd've", "you'd've"),
    ('"red"', "red"), ("(no)", "no"), ("  yes\n", "yes"), ("wait...", "wait"), ("Im", "im"), ("cat's", "cat's"),
    ("12:30", "12:30"), ("a", ""),
])
def test_normalize_answer_like_official_eval(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_answer_vocabulary_threshold_and_order() -> None:
    answers = ["yes"] * 9 + ["no"] * 10 + ["2"] * 8 + ["blue"] * 9
    answers = answers[9:19] + answers[:9] + answers[19:]  # "no" first
    assert answer_vocabulary(answers, min_count=9) == ["no", "yes", "blue"]
    assert answer_vocabulary(answers, min_count=8) == ["no", "yes", "2", "blue"]
    # per-question answer lists count every occurrence
    assert answer_vocabulary([("a", "a", "b"), ("a", "c"), "b"], min_count=2) == ["a", "b"]
    with pytest.raises(ValueError):
        answer_vocabulary(["x"], min_count=0)


def test_vqa_soft_scores() -> None:
    assert [vqa_soft_score(n) for n in range(7)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0, 1.0]
    vocab = {"yes": 0, "no": 1, "2": 2, "blue": 3}
    answers = ["yes"] * 5 + ["no"] * 2 + ["maybe"] * 2 + ["2"]
    assert vqa_soft_scores(answers, vocab) == {0: 1.0, 1: 0.6, 2: 0.3}
    assert vqa_soft_scores(["2", "2", "2"], vocab) == {2: 0.9}
    assert vqa_soft_scores(["maybe"], vocab) == {}


# ------------------------------------------------------------------------------------------------- VQA v2


def vqa_answers(*answers: str) -> list[dict[str, Any]]:
    assert len(answers) == 10
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]


def write_vqa(root: Path, split: str, questions: list[Any], annotations: list[Any] | None,
              image_ids: Iterable[int]) -> None:
    write_json(root / f"v2_OpenEnded_mscoco_{split}_questions.json",
               {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {},
                "data_subtype": split, "questions": questions})
    if annotations is not None:
        write_json(root / f"v2_mscoco_{split}_annotations.json",
                   {"info": {}, "license": {}, "data_subtype": split, "annotations": annotations})
    folder = vqa_image_dir(split)
    for image_id in image_ids:
        image(root / folder / f"COCO_{folder}_{image_id:012d}.jpg")


def annotation(question_id: int, image_id: int, answers: list[dict[str, Any]], mc: str) -> dict[str, Any]:
    return {"question_id": question_id, "image_id": image_id, "answers": answers, "multiple_choice_answer": mc,
            "answer_type": "other", "question_type": "what"}


def test_vqa_v2_train(tmp_path: Path) -> None:
    questions = [
        {"image_id": 9, "question": "How many dogs?", "question_id": 9000},
        {"image_id": 9, "question": "Is it sunny?", "question_id": 9001},
        {"image_id": 458752, "question": "What is this?", "question_id": 458752000},
    ]
    annotations = [
        annotation(9001, 9, vqa_answers(*["yes"] * 8, "Yes!", "no"), "yes"),
        annotation(9000, 9, vqa_answers("Two", "2", "two", "2.", "2", "2", "2", "3", "two dogs", "2"), "Two"),
        annotation(458752000, 458752, vqa_answers(*["a dog."] * 5, *["The Dog"] * 3, "puppy", "isnt"), "a dog"),
    ]
    write_vqa(tmp_path, "train2014", questions, annotations, [9, 458752])
    samples, bad = split_items(read_vqa_v2(tmp_path, "train2014"))
    assert bad == []
    assert [s.key for s in samples] == ["train2014-9000", "train2014-9001", "train2014-458752000"]
    first = samples[0]
    assert first.texts == ("How many dogs?",)
    assert first.answers == ("2", "2", "2", "2", "2", "2", "2", "3", "2 dogs", "2")
    assert first.images == (tmp_path / "train2014" / "COCO_train2014_000000000009.jpg",)
    assert first.label is None
    assert first.meta == {"question_id": 9000, "image_id": 9, "answer_type": "other", "question_type": "what",
                          "multiple_choice_answer": "2"}
    assert samples[1].answers == ("yes",) * 9 + ("no",)
    assert samples[2].answers == ("dog",) * 8 + ("puppy", "isn't")
    assert samples[2].images == (tmp_path / "train2014" / "COCO_train2014_000000458752.jpg",)
    # METER/ViLT vocabulary from the multiple-choice answers, soft scores from the 10 answers
    vocab = {a: i for i, a in enumerate(answer_vocabulary([s.meta["multiple_choice_answer"] for s in samples], 1))}
    assert vocab == {"2": 0, "yes": 1, "dog": 2}
    assert vqa_soft_scores(list(samples[0].answers), vocab) == {0: 1.0}
    assert vqa_soft_scores(list(samples[2].answers), vocab) == {2: 1.0}


def test_vqa_v2_unannotated_test_split(tmp_path: Path) -> None:
    questions = [{"image_id": 1, "question": "What color?", "question_id": 10},
                 {"image_id": 2, "question": "Where?", "question_id": 20}]
    write_vqa(tmp_path, "test-dev2015", questions, None, [1, 2])
    assert vqa_image_dir("test-dev2015") == "test2015" and vqa_image_dir("val2014") == "val2014"
    samples, bad = split_items(read_vqa_v2(tmp_path, "test-dev2015"))
    assert bad == []
    assert [s.key for s in samples] == ["test-dev2015-10", "test-dev2015-20"]
    assert all(s.answers == () and s.label is None for s in samples)
    assert samples[1].images == (tmp_path / "test2015" / "COCO_test2015_000000000002.jpg",)
    assert samples[1].meta == {"question_id": 20, "image_id": 2}
    assert splits_of("vqa_v2", tmp_path) == ["test-dev2015"]


def test_vqa_v2_bad_records(tmp_path: Path) -> None:
    ok = vqa_answers(*["yes"] * 10)
    questions = [
        {"image_id": 1, "question": "Good?", "question_id": 1},
        {"image_id": 1, "question_id": 2},                           # no question
        {"image_id": 1, "question": "   ", "question_id": 3},        # empty question
        {"image_id": 404, "question": "Image?", "question_id": 4},   # missing image file
        {"image_id": 1, "question": "Annotation?", "question_id": 5},  # no annotation
        {"image_id": 1, "question": "Other image?", "question_id": 6},
        {"image_id": 1, "question": "No answers?", "question_id": 7},
        {"image_id": 1, "question": "Again", "question_id": 1},      # repeated question_id
        {"image_id": "1", "question": "Typed?", "question_id": 8},   # image_id not an integer
        {"image_id": 1, "question": "Also good", "question_id": 9},
    ]
    annotations = [annotation(q, 1, ok, "yes") for q in (1, 2, 3, 8, 9)]
    annotations += [annotation(4, 404, ok, "yes"), annotation(6, 2, ok, "yes"), annotation(7, 1, [], "yes"),
                    annotation(77, 1, ok, "yes"),                     # no question with this id
                    {"image_id": 1, "answers": ok}]                   # no question_id (index 9)
    write_vqa(tmp_path, "val2014", questions, annotations, [1, 2])
    questions_file = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    annotations_file = tmp_path / "v2_mscoco_val2014_annotations.json"
    samples, bad = split_items(read_vqa_v2(tmp_path, "val2014"))
    assert [s.key for s in samples] == ["val2014-1", "val2014-9"]
    assert samples[1].texts == ("Also good",)
    errors = {(e.file, e.record, e.field): e for e in bad}
    assert len(errors) == len(bad) == 10, [str(e) for e in bad]
    q, a = str(questions_file), str(annotations_file)
    assert set(errors) == {
        (a, 9, "question_id"), (q, 2, "question"), (q, 3, "question"), (q, 4, "image"), (q, 5, "annotation"),
        (a, 6, "image_id"), (a, 7, "answers"), (q, 1, "question_id"), (q, 8, "image_id"), (a, 77, "question_id"),
    }
    assert "COCO_val2014_000000000404.jpg" in str(errors[(q, 4, "image")])
    assert "empty" in str(errors[(q, 3, "question")]) and "missing" in str(errors[(q, 2, "question")])
    assert "duplicate" in str(errors[(q, 1, "question_id")])


def test_vqa_v2_whole_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="v2_OpenEnded_mscoco_train2014_questions.json"):
        read_vqa_v2(tmp_path, "train2014")
    write_vqa(tmp_path, "train2014", [{"image_id": 1, "question": "Q?", "question_id": 1}], None, [1])
    with pytest.raises(DataError, match="v2_mscoco_train2014_annotations.json.*not found"):
        read_vqa_v2(tmp_path, "train2014")
    (tmp_path / "v2_mscoco_train2014_annotations.json").write_text('{"annotations": [')
    with pytest.raises(DataError, match="v2_mscoco_train2014_annotations.json.*not valid JSON") as info:
        read_vqa_v2(tmp_path, "train2014")
    assert info.value.file == str(tmp_path / "v2_mscoco_train2014_annotations.json")
    write_json(tmp_path / "v2_mscoco_train2014_annotations.json", [])
    with pytest.raises(DataError, match="'annotations'"):
        read_vqa_v2(tmp_path, "train2014")
    with pytest.raises(ValueError):
        read_vqa_v2(tmp_path, "../train2014")


# ------------------------------------------------------------------------------------------------- NLVR2


def nlvr2_record(identifier: str, sentence: str, label: Any, **extra: Any) -> dict[str, Any]:
    return {"identifier": identifier, "sentence": sentence, "label": label, "left_url": "http://x/l.png",
            "right_url": "http://x/r.png", "synset": "dog", "query": "dogs", **extra}


def nlvr2_pair(folder: Path, pair: str) -> None:
    image(folder / f"{pair}-img0.png", (10, 10, 10))
    image(folder / f"{pair}-img1.png", (20, 20, 20))


def test_nlvr2_dev_flat_layout(tmp_path: Path) -> None:
    write_lines(tmp_path / "dev.json", [
        nlvr2_record("dev-850-0-0", "There are two dogs.", "True"),
        nlvr2_record("dev-850-0-1", "There is one dog.", "False"),
        nlvr2_record("dev-12-3-0", "The left image has a cat.", "True"),
    ])
    nlvr2_pair(tmp_path / "images" / "dev", "dev-850-0")
    nlvr2_pair(tmp_path / "images" / "dev", "dev-12-3")
    samples, bad = split_items(read_nlvr2(tmp_path, "dev"))
    assert bad == []
    assert [s.key for s in samples] == ["dev-850-0-0", "dev-850-0-1", "dev-12-3-0"]
    assert [s.label for s in samples] == ["True", "False", "True"]
    assert samples[1].texts == ("There is one dog.",)
    folder = tmp_path / "images" / "dev"
    assert samples[0].images == (folder / "dev-850-0-img0.png", folder / "dev-850-0-img1.png")
    assert samples[1].images == samples[0].images
    assert samples[2].images == (folder / "dev-12-3-img0.png", folder / "dev-12-3-img1.png")
    assert samples[0].meta == {"identifier": "dev-850-0-0"}


def test_nlvr2_train_nested_layout(tmp_path: Path) -> None:
    write_lines(tmp_path / "train.json", [
        nlvr2_record("train-10171-0-0", "Two dogs.", "True", directory=58),
        nlvr2_record("train-10171-0-1", "No dogs.", False, directory=58),
        nlvr2_record("train-7-1-0", "A bird.", True),                       # no directory: found by search
    ])
    nlvr2_pair(tmp_path / "images" / "train" / "58", "train-10171-0")
    nlvr2_pair(tmp_path / "images" / "train" / "3", "train-7-1")
    samples, bad = split_items(read_nlvr2(tmp_path, "train"))
    assert bad == []
    assert [s.label for s in samples] == ["True", "False", "True"]
    assert samples[0].images[1] == tmp_path / "images" / "train" / "58" / "train-10171-0-img1.png"
    assert samples[0].meta == {"identifier": "train-10171-0-0", "directory": "58"}
    assert samples[2].images == (tmp_path / "images" / "train" / "3" / "train-7-1-img0.png",
                                 tmp_path / "images" / "train" / "3" / "train-7-1-img1.png")
    assert splits_of("nlvr2", tmp_path) == ["train"]


def test_nlvr2_bad_records(tmp_path: Path) -> None:
    file = write_lines(tmp_path / "test1.json", [
        nlvr2_record("test1-0-0-0", "Good one.", "True"),
        '{"identifier": "test1-0-0-1", "sentence": "broken", ',            # line 2: malformed
        nlvr2_record("test1-0-0-2", "Maybe.", "maybe"),                     # label outside True/False
        nlvr2_record("test1-0-0-3", "  ", "False"),                         # empty sentence
        {"sentence": "No identifier.", "label": "True"},                    # line 5: missing identifier
        nlvr2_record("test1-9-9-0", "Missing image.", "True"),
        {"identifier": "test1-0-0-4", "sentence": "Missing label."},
        "",                                                                 # blank line: skipped
        nlvr2_record("test1-0-0-5", "Also good.", "False"),
        nlvr2_record("test1-0-0-5", "Repeated.", "False"),
    ])
    nlvr2_pair(tmp_path / "images" / "test1", "test1-0-0")
    samples, bad = split_items(read_nlvr2(tmp_path, "test1"))
    assert [s.key for s in samples] == ["test1-0-0-0", "test1-0-0-5"]
    errors = by_record(bad[:-1])
    assert set(errors) == {"line 2", "test1-0-0-2", "test1-0-0-3", "line 5", "test1-9-9-0", "test1-0-0-4"}
    assert "malformed JSON" in str(errors["line 2"]) and errors["line 2"].file == str(file)
    assert_bad(errors["test1-0-0-2"], file, "label", "'maybe'")
    assert_bad(errors["test1-0-0-3"], file, "sentence", "empty")
    assert_bad(errors["line 5"], file, "identifier", "missing")
    assert_bad(errors["test1-9-9-0"], file, "image", str(tmp_path / "images" / "test1" / "test1-9-9-img0.png"))
    assert_bad(errors["test1-0-0-4"], file, "label", "missing")
    assert_bad(bad[-1], file, "identifier", "duplicate")
    assert bad[-1].record == "test1-0-0-5"


def test_nlvr2_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "dev.json"))):
        read_nlvr2(tmp_path, "dev")


# ------------------------------------------------------------------------------------------------- SNLI-VE


def snli_record(image_id: str, hypothesis: str, label: Any, pair: str) -> dict[str, Any]:
    return {"Flickr30K_ID": image_id, "sentence1": "A man plays a guitar.", "sentence2": hypothesis,
            "gold_label": label, "pairID": pair, "captionID": f"{image_id}.jpg#0"}


def test_snli_ve(tmp_path: Path) -> None:
    write_lines(tmp_path / "snli_ve_dev.jsonl", [
        snli_record("3416050480", "A person plays music.", "entailment", "3416050480.jpg#0r1e"),
        snli_record("3416050480", "A man sleeps.", "contradiction", "3416050480.jpg#0r1c"),
        snli_record("100", "The man is famous.", "neutral", "100.jpg#2r1n"),
    ])
    image(tmp_path / "flickr30k_images" / "3416050480.jpg")
    image(tmp_path / "flickr30k_images" / "100.jpg")
    samples, bad = split_items(read_snli_ve(tmp_path, "dev"))
    assert bad == []
    assert [s.key for s in samples] == ["dev-3416050480_jpg_0r1e", "dev-3416050480_jpg_0r1c", "dev-100_jpg_2r1n"]
    assert [s.label for s in samples] == ["entailment", "contradiction", "neutral"]
    assert samples[1].texts == ("A man sleeps.",)
    assert samples[2].images == (tmp_path / "flickr30k_images" / "100.jpg",)
    assert samples[2].meta == {"pairID": "100.jpg#2r1n", "flickr30k_id": "100", "captionID": "100.jpg#0"}
    assert splits_of("snli_ve", tmp_path) == ["dev"]


def test_snli_ve_bad_records(tmp_path: Path) -> None:
    file = write_lines(tmp_path / "snli_ve_train.jsonl", [
        snli_record("1", "Good.", "entailment", "1.jpg#0r1e"),
        snli_record("1", "No consensus.", "-", "1.jpg#0r1x"),               # gold_label outside the set
        "not json",                                                         # line 3
        {"Flickr30K_ID": "1", "gold_label": "neutral", "pairID": "1.jpg#0r2n"},  # no sentence2
        snli_record("1", "", "neutral", "1.jpg#0r3n"),                      # empty hypothesis
        snli_record("2", "Missing image.", "neutral", "2.jpg#0r1n"),
        snli_record("1", "Good too.", "contradiction", "1.jpg#0r1c"),
    ])
    image(tmp_path / "flickr30k_images" / "1.jpg")
    samples, bad = split_items(read_snli_ve(tmp_path, "train"))
    assert [s.texts for s in samples] == [("Good.",), ("Good too.",)]
    errors = by_record(bad)
    assert set(errors) == {"1.jpg#0r1x", "line 3", "1.jpg#0r2n", "1.jpg#0r3n", "2.jpg#0r1n"}
    assert_bad(errors["1.jpg#0r1x"], file, "gold_label", "'-'")
    assert_bad(errors["line 3"], file, None, "malformed JSON")
    assert_bad(errors["1.jpg#0r2n"], file, "sentence2", "missing")
    assert_bad(errors["1.jpg#0r3n"], file, "sentence2", "empty")
    assert_bad(errors["2.jpg#0r1n"], file, "image", str(tmp_path / "flickr30k_images" / "2.jpg"))


def test_snli_ve_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="snli_ve_test.jsonl"):
        read_snli_ve(tmp_path, "test")


# ------------------------------------------------------------------------------------------------- Karpathy


def karpathy_image(imgid: int, filename: str, split: str, captions: list[str], **extra: Any) -> dict[str, Any]:
    sentences = [{"tokens": c.lower().split(), "raw": c, "imgid": imgid, "sentid": imgid * 10 + i}
                 for i, c in enumerate(captions)]
    return {"filename": filename, "imgid": imgid, "split": split, "sentences": sentences,
            "sentids": [s["sentid"] for s in sentences], **extra}


def test_karpathy_flickr30k(tmp_path: Path) -> None:
    write_json(tmp_path / "dataset_flickr30k.json", {"dataset": "flickr30k", "images": [
        karpathy_image(0, "1000092795.jpg", "train", ["Two young guys.", "Two men outside. "]),
        karpathy_image(1, "10002456.jpg", "test", ["Workers on a building."]),
        karpathy_image(2, "1000268201.jpg", "restval", ["A child in pink."]),
        karpathy_image(3, "1000344755.jpg", "val", ["A man on a ladder.", "Someone cleans windows."]),
    ]})
    for name in ("1000092795.jpg", "10002456.jpg", "1000268201.jpg", "1000344755.jpg"):
        image(tmp_path / "flickr30k-images" / name)
    train, bad = split_items(read_karpathy_flickr30k(tmp_path, "train"))
    assert bad == []
    assert [s.key for s in train] == ["train-0", "train-2"]      # restval is train
    assert train[0].texts == ("Two young guys.", "Two men outside.")
    assert train[0].images == (tmp_path / "flickr30k-images" / "1000092795.jpg",)
    assert train[0].label is None and train[0].answers == ()
    assert train[1].meta == {"imgid": 2, "filename": "1000268201.jpg", "split": "restval"}
    val, _ = split_items(read_karpathy_flickr30k(tmp_path, "val"))
    test, _ = split_items(read_karpathy_flickr30k(tmp_path, "test"))
    assert [s.key for s in val] == ["val-3"] and val[0].texts == ("A man on a ladder.", "Someone cleans windows.")
    assert [s.key for s in test] == ["test-1"]
    assert splits_of("karpathy_flickr30k", tmp_path) == ["train", "val", "test"]
    with pytest.raises(ValueError, match="restval"):
        read_karpathy_flickr30k(tmp_path, "restval")


def test_karpathy_coco(tmp_path: Path) -> None:
    write_json(tmp_path / "dataset_coco.json", {"dataset": "coco", "images": [
        karpathy_image(0, "COCO_val2014_000000391895.jpg", "test", ["A man on a bike."], filepath="val2014",
                       cocoid=391895),
        karpathy_image(1, "COCO_train2014_000000057870.jpg", "train", ["A restaurant.", "Tables."],
                       filepath="train2014", cocoid=57870),
        karpathy_image(2, "COCO_val2014_000000522418.jpg", "restval", ["A woman cutting cake."],
                       filepath="val2014", cocoid=522418),
    ]})
    image(tmp_path / "val2014" / "COCO_val2014_000000391895.jpg")
    image(tmp_path / "train2014" / "COCO_train2014_000000057870.jpg")
    image(tmp_path / "val2014" / "COCO_val2014_000000522418.jpg")
    train, bad = split_items(read_karpathy_coco(tmp_path, "train"))
    assert bad == []
    assert [s.key for s in train] == ["train-1", "train-2"]
    assert train[0].images == (tmp_path / "train2014" / "COCO_train2014_000000057870.jpg",)
    assert train[1].images == (tmp_path / "val2014" / "COCO_val2014_000000522418.jpg",)
    assert train[0].meta["cocoid"] == 57870 and train[0].texts == ("A restaurant.", "Tables.")
    test, _ = split_items(read_karpathy_coco(tmp_path, "test"))
    assert [s.key for s in test] == ["test-0"] and test[0].texts == ("A man on a bike.",)
    assert split_items(read_karpathy_coco(tmp_path, "val")) == ([], [])


def test_karpathy_bad_records(tmp_path: Path) -> None:
    file = write_json(tmp_path / "dataset_flickr30k.json", {"images": [
        karpathy_image(0, "0.jpg", "test", ["Good."]),
        karpathy_image(1, "1.jpg", "test", ["Fine.", "   "]),                  # an empty caption
        {"imgid": 2, "split": "test", "sentences": [{"raw": "No file name."}]},  # no filename
        karpathy_image(3, "3.jpg", "test", ["Missing image."]),
        karpathy_image(4, "4.jpg", "holdout", ["Unknown split."]),              # reported in every split read
        karpathy_image(5, "5.jpg", "test", []),                               # no sentences
        karpathy_image(6, "6.jpg", "train", [""]),                            # other split: not reported in test
        "not an object",                                                       # index 7
        karpathy_image(8, "8.jpg", "test", ["Good too."]),
    ]})
    for i in (0, 1, 2, 5, 6, 8):
        image(tmp_path / "flickr30k-images" / f"{i}.jpg")
    samples, bad = split_items(read_karpathy_flickr30k(tmp_path, "test"))
    assert [s.key for s in samples] == ["test-0", "test-8"]
    errors = by_record(bad)
    assert set(errors) == {1, 2, 3, 4, 5, 7}
    assert_bad(errors[1], file, "sentences", "sentence 1", "empty")
    assert_bad(errors[2], file, "filename", "missing")
    assert_bad(errors[3], file, "image", str(tmp_path / "flickr30k-images" / "3.jpg"))
    assert_bad(errors[4], file, "split", "'holdout'")
    assert_bad(errors[5], file, "sentences", "empty")
    assert errors[7].field is None and "JSON object" in str(errors[7])
    train_bad = by_record(split_items(read_karpathy_flickr30k(tmp_path, "train"))[1])
    assert set(train_bad) == {4, 6, 7}


def test_karpathy_whole_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dataset_coco.json.*not found"):
        read_karpathy_coco(tmp_path, "train")
    (tmp_path / "dataset_coco.json").write_text("{images: []}")
    with pytest.raises(DataError, match="dataset_coco.json.*not valid JSON"):
        read_karpathy_coco(tmp_path, "train")
    assert splits_of("karpathy_flickr30k", tmp_path) == []


# ------------------------------------------------------------------------------------------------- nocaps


def test_nocaps(tmp_path: Path) -> None:
    file = write_json(tmp_path / "nocaps_val_4500_captions.json", {
        "licenses": [], "info": {},
        "images": [
            {"id": 0, "file_name": "0013ea2087020901.jpg", "domain": "in-domain", "open_images_id": "0013ea2087020901",
             "height": 4, "width": 4},
            {"id": 1, "file_name": "0017b7a3ecb4ac1f.jpg", "domain": "out-domain", "height": 4, "width": 4},
            {"id": 2, "file_name": "missing.jpg", "domain": "near-domain"},       # missing image file
            {"id": 3, "file_name": "003a1b8a1d1c0d6e.jpg", "domain": "near-domain"},  # its only caption is empty
        ],
        "annotations": [
            {"image_id": 0, "id": 0, "caption": "A baby in a crib."},
            {"image_id": 1, "id": 1, "caption": "A kitchen."},
            {"image_id": 0, "id": 2, "caption": "A child sleeping. "},
            {"image_id": 2, "id": 3, "caption": "Something."},
            {"image_id": 3, "id": 4, "caption": ""},                              # empty caption
            {"image_id": 99, "id": 5, "caption": "Nobody's image."},              # unknown image
            {"image_id": 1, "id": 6},                                              # no caption
            {"image_id": 1, "id": 7, "caption": "A sink."},
        ]})
    for name in ("0013ea2087020901.jpg", "0017b7a3ecb4ac1f.jpg", "003a1b8a1d1c0d6e.jpg"):
        image(tmp_path / "validation" / name)
    samples, bad = split_items(read_nocaps(tmp_path, "val"))
    assert [s.key for s in samples] == ["val-0", "val-1"]
    assert samples[0].texts == ("A baby in a crib.", "A child sleeping.")
    assert samples[1].texts == ("A kitchen.", "A sink.")
    assert samples[0].images == (tmp_path / "validation" / "0013ea2087020901.jpg",)
    assert samples[0].meta == {"image_id": 0, "file_name": "0013ea2087020901.jpg", "domain": "in-domain",
                               "open_images_id": "0013ea2087020901"}
    errors = by_record(bad)
    assert set(errors) == {"annotation 4", "annotation 5", "annotation 6", "image 2", "image 3"}
    assert_bad(errors["annotation 4"], file, "caption", "empty")
    assert_bad(errors["annotation 5"], file, "image_id", "99")
    assert_bad(errors["annotation 6"], file, "caption", "missing")
    assert_bad(errors["image 2"], file, "image", str(tmp_path / "validation" / "missing.jpg"))
    assert_bad(errors["image 3"], file, "captions", "no valid caption")
    assert splits_of("nocaps", tmp_path) == ["val"]
    with pytest.raises(ValueError):
        read_nocaps(tmp_path, "test")


def test_nocaps_whole_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nocaps_val_4500_captions.json"):
        read_nocaps(tmp_path)
    write_json(tmp_path / "nocaps_val_4500_captions.json", {"images": []})
    with pytest.raises(DataError, match="'annotations'"):
        read_nocaps(tmp_path)


# ------------------------------------------------------------------------------------------------- registry


def test_registry_and_splits(tmp_path: Path) -> None:
    expected = {"vqa_v2": read_vqa_v2, "nlvr2": read_nlvr2, "snli_ve": read_snli_ve,
                "karpathy_flickr30k": read_karpathy_flickr30k, "karpathy_coco": read_karpathy_coco,
                "nocaps": read_nocaps}
    assert expected == READERS
    for name in ("v2_OpenEnded_mscoco_val2014_questions.json", "v2_OpenEnded_mscoco_test2015_questions.json",
                 "v2_OpenEnded_mscoco_train2014_questions.json", "snli_ve_test.jsonl", "snli_ve_train.jsonl",
                 "snli_ve_dev.jsonl", "dev.json", "test1.json", "train.json", "other.json"):
        (tmp_path / name).write_text("")
    assert splits_of("vqa_v2", tmp_path) == ["train2014", "val2014", "test2015"]
    assert splits_of("snli_ve", tmp_path) == ["train", "dev", "test"]
    assert splits_of("nlvr2", tmp_path) == ["train", "dev", "test1"]
    assert splits_of("nocaps", tmp_path) == []
    with pytest.raises(KeyError):
        splits_of("coco_captions", tmp_path)
