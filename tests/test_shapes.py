"""The built-in ``shapes`` data set and the tokenizers: determinism, valid records, answers that follow from the
scene (recomputed here from the texts and the scene description, independently of the generator), balance,
baselines, speed, tokenizer round trip. Nothing touches a model hub."""

from __future__ import annotations

import io
import json
import os
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from smarttrim.data import NLVR2_LABELS, SNLI_VE_LABELS, TASK_FLAVORS, Sample, shapes  # noqa: E402
from smarttrim.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_tokenizer  # noqa: E402


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    try:
        import huggingface_hub.constants as hub_constants
    except ImportError:
        return
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True, raising=False)


def _gen(task: str, n: int, split: str = "train", seed: int = 0, **kw: Any) -> list[Sample]:
    return list(shapes.generate(task, split, n, seed=seed, **kw))


# ------------------------------------------------------------------ an independent reader of texts and scenes

NUMBERS = {w: i for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six"))}
PLURALS = {"circles": "circle", "squares": "square", "triangles": "triangle", "crosses": "cross"}
REL = r"(?P<rel>left of|right of|above|below)"


def parse_desc(text: str) -> dict[str, str]:
    """'small red circle' / 'red objects' / 'large thing' -> the attributes it names."""
    *mods, noun = text.split()
    props: dict[str, str] = {}
    for w in mods:
        attr = "size" if w in shapes.SIZES else "color" if w in shapes.COLORS else None
        assert attr is not None and attr not in props, f"bad description {text!r}"
        props[attr] = w
    noun = PLURALS.get(noun, noun)
    if noun in shapes.SHAPES:
        props["shape"] = noun
    else:
        assert noun in ("object", "objects", "thing", "things"), f"bad noun in {text!r}"
    return props


def matching(objects: list[dict[str, Any]], desc: str) -> list[dict[str, Any]]:
    props = parse_desc(desc)
    return [o for o in objects if all(o[k] == v for k, v in props.items())]


def the(objects: list[dict[str, Any]], desc: str) -> dict[str, Any]:
    found = matching(objects, desc)
    assert len(found) == 1, f"'the {desc}' must name exactly one object, found {len(found)}"
    return found[0]


def holds(a: dict[str, Any], rel: str, b: dict[str, Any]) -> bool:
    """Plain center comparison (image y grows downwards)."""
    return {"left of": a["x"] < b["x"], "right of": a["x"] > b["x"], "above": a["y"] < b["y"],
            "below": a["y"] > b["y"]}[rel]


def vqa_answer(question: str, objs: list[dict[str, Any]]) -> str:
    """The answer to a shapes question, from the question text and the scene's objects alone."""
    yn = lambda b: "yes" if b else "no"  # noqa: E731
    q = question
    if m := re.fullmatch(rf"what (?P<q>color|shape) is (?:the (?:object|thing) )?{REL} the (?P<b>.+) \?", q) or \
            re.fullmatch(rf"which (?P<q>color) has the (?:object|thing) {REL} the (?P<b>.+) \?", q):
        ref = the(objs, m["b"])
        side = [o for o in objs if o is not ref and holds(o, m["rel"], ref)]
        assert len(side) == 1, f"{q!r}: {len(side)} objects {m['rel']} the reference"
        return side[0][m["q"]]
    if m := re.fullmatch(rf"is the (?P<a>.+?) (?:located )?{REL} the (?P<b>.+) \?", q):
        return yn(holds(the(objs, m["a"]), m["rel"], the(objs, m["b"])))
    if m := re.fullmatch(r"is the (?P<d>.+) small or large \?", q):
        return the(objs, m["d"])["size"]
    if m := re.fullmatch(r"how big is the (?P<d>.+) \?", q):
        return the(objs, m["d"])["size"]
    if m := (re.fullmatch(r"what (?P<q>color|shape|size) is the (?P<d>.+) \?", q)
             or re.fullmatch(r"what is the (?P<q>color|shape) of the (?P<d>.+) \?", q)
             or re.fullmatch(r"which (?P<q>color|shape) does the (?P<d>.+) have \?", q)):
        return the(objs, m["d"])[m["q"]]
    if m := re.fullmatch(r"(?:how many|what number of) (?P<d>.+?) (?:are there|are in the image|can you see) \?", q):
        return str(len(matching(objs, m["d"])))
    if m := (re.fullmatch(r"(?:is there|does the image contain) an? (?P<d>.+) \?", q)
             or re.fullmatch(r"are there any (?P<d>.+) \?", q)):
        return yn(bool(matching(objs, m["d"])))
    raise AssertionError(f"unknown question form {q!r}")


def nlvr2_label(statement: str, left: list[dict[str, Any]], right: list[dict[str, Any]]) -> str:
    s = statement
    n = lambda objs, d: len(matching(objs, d))  # noqa: E731
    count = r"(?P<k>one|two|three|four|five|six) (?P<d>.+?)"
    rules: list[tuple[str, Any]] = [
        (r"the left image contains more (?P<d>.+) than the right image", lambda nl, nr, k: nl > nr),
        (r"there are more (?P<d>.+) in the left image than in the right image", lambda nl, nr, k: nl > nr),
        (r"the right image contains more (?P<d>.+) than the left image", lambda nl, nr, k: nr > nl),
        (r"there are more (?P<d>.+) in the right image than in the left image", lambda nl, nr, k: nr > nl),
        (r"both images contain an? (?P<d>.+)", lambda nl, nr, k: nl > 0 and nr > 0),
        (r"each image contains at least one (?P<d>.+)", lambda nl, nr, k: nl > 0 and nr > 0),
        (r"(?:exactly one image|only one of the two images) contains an? (?P<d>.+)",
         lambda nl, nr, k: (nl > 0) != (nr > 0)),
        (r"neither image contains an? (?P<d>.+)", lambda nl, nr, k: nl == 0 and nr == 0),
        (r"there is no (?P<d>.+) in either image", lambda nl, nr, k: nl == 0 and nr == 0),
        (r"(?:the two images contain|both images have) the same number of (?P<d>.+)", lambda nl, nr, k: nl == nr),
        (rf"the left image contains exactly {count}", lambda nl, nr, k: nl == k),
        (rf"there (?:is|are) exactly {count} in the left image", lambda nl, nr, k: nl == k),
        (rf"the right image contains exactly {count}", lambda nl, nr, k: nr == k),
        (rf"there (?:is|are) exactly {count} in the right image", lambda nl, nr, k: nr == k),
        (rf"there (?:is|are) exactly {count} in the two images", lambda nl, nr, k: nl + nr == k),
        (rf"the two images contain {count} in total", lambda nl, nr, k: nl + nr == k),
    ]
    for pattern, rule in rules:
        if m := re.fullmatch(pattern, s):
            k = NUMBERS[m["k"]] if "k" in m.groupdict() else 0
            return "True" if rule(n(left, m["d"]), n(right, m["d"]), k) else "False"
    raise AssertionError(f"unknown statement form {s!r}")


def snli_ve_label(hyp: str, objs: list[dict[str, Any]], occluder: bool) -> str:
    """Visible facts decide; what the occluder box may hide makes a hypothesis undecidable (neutral)."""
    E, N, C = "entailment", "neutral", "contradiction"
    count = r"(?P<k>one|two|three|four|five|six) (?P<d>.+)"
    if m := re.fullmatch(rf"the (?P<a>.+?) (?:is|sits) {REL} the (?P<b>.+)", hyp):
        a, b = matching(objs, m["a"]), matching(objs, m["b"])
        assert len(a) <= 1 and len(b) <= 1
        if a and b:
            return E if holds(a[0], m["rel"], b[0]) else C
        return N if occluder else C
    if m := re.fullmatch(rf"(?:there (?:is|are)|the image shows) exactly {count}", hyp):
        v, k = len(matching(objs, m["d"])), NUMBERS[m["k"]]
        return C if v > k else N if occluder else E if v == k else C
    if m := re.fullmatch(rf"(?:there (?:is|are)|the image shows) at least {count}", hyp):
        v, k = len(matching(objs, m["d"])), NUMBERS[m["k"]]
        return E if v >= k else N if occluder else C
    if m := (re.fullmatch(r"there is no (?P<d>.+)", hyp) or re.fullmatch(r"the image shows no (?P<d>.+)", hyp)
             or re.fullmatch(r"no (?P<d>.+) can be seen", hyp)):
        return C if matching(objs, m["d"]) else N if occluder else E
    if m := (re.fullmatch(r"(?:there is|the image shows) an? (?P<d>.+)", hyp)
             or re.fullmatch(r"an? (?P<d>.+) can be seen", hyp)):
        return E if matching(objs, m["d"]) else N if occluder else C
    raise AssertionError(f"unknown hypothesis form {hyp!r}")


def caption_true(caption: str, scene: dict[str, Any]) -> bool:
    objs = scene["objects"]
    if m := re.fullmatch(r"(?P<n>\w+) objects? on a (?P<tone>dark|light) (?P<look>plain|shaded|noisy) background",
                         caption):
        look = {"solid": "plain", "gradient": "shaded", "noise": "noisy"}[scene["background"]["kind"]]
        return (NUMBERS[m["n"]] == len(objs) and m["tone"] == scene["background"]["tone"] and m["look"] == look)
    if m := re.fullmatch(rf"an? (?P<a>.+?) {REL} an? (?P<b>.+)", caption):
        return any(holds(a, m["rel"], b) for a in matching(objs, m["a"]) for b in matching(objs, m["b"]))
    if re.match(r"(one|two|three|four|five) ", caption):  # exact counts: "two red objects and one blue object"
        parts = [p.split(" ", 1) for p in caption.split(" and ")]
        return all(len(matching(objs, d)) == NUMBERS[k] for k, d in parts)
    body = re.sub(r"^(a picture of|an image with) ", "", caption)  # a list of some objects
    items = [re.sub(r"^an? ", "", p) for p in re.split(r" , | and ", body)]
    return all(matching(objs, d) for d in items)


# ------------------------------------------------------------------ determinism


@pytest.mark.parametrize("task", TASK_FLAVORS)
def test_same_seed_identical_bytes_other_seed_or_split_differs(task: str) -> None:
    a, b = _gen(task, 12, seed=3), _gen(task, 12, seed=3)
    assert a == b  # keys, PNG bytes, texts, labels, answers, meta
    other_seed, other_split = _gen(task, 12, seed=4), _gen(task, 12, split="val", seed=3)
    for other in (other_seed, other_split):
        assert sum(x.images == y.images for x, y in zip(a, other, strict=True)) == 0
        assert sum(x.texts == y.texts for x, y in zip(a, other, strict=True)) < 6
    # sample i does not depend on start or n (resumable / shardable streams)
    assert list(shapes.generate(task, "train", 4, seed=3, start=5)) == a[5:9]


def test_image_size_changes_pixels_only() -> None:
    small, large = _gen("snli_ve", 9, image_size=32), _gen("snli_ve", 9, image_size=64)
    for s, t in zip(small, large, strict=True):
        assert (s.key, s.texts, s.label, s.meta) == (t.key, t.texts, t.label, t.meta)
        assert Image.open(io.BytesIO(s.images[0])).size == (32, 32)


# ------------------------------------------------------------------ valid records


@pytest.mark.parametrize("task", TASK_FLAVORS)
def test_samples_are_valid(task: str) -> None:
    samples = _gen(task, 60, image_size=48)
    keys = [s.key for s in samples]
    assert len(set(keys)) == len(keys)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", k) for k in keys)
    for s in samples:
        assert len(s.images) == (2 if task == "nlvr2" else 1)
        for img in s.images:
            assert isinstance(img, bytes) and img.startswith(b"\x89PNG\r\n\x1a\n")
            im = Image.open(io.BytesIO(img))
            im.load()
            assert im.size == (48, 48) and im.mode == "RGB"
        json.dumps(s.meta)  # JSON-serializable
        assert s.texts and all(t == t.strip().lower() and "  " not in t and len(t.split()) <= 20 for t in s.texts)
        if task == "vqa":
            assert len(s.texts) == 1 and s.label is None
            assert len(s.answers) == 10 and set(s.answers) <= set(shapes.answer_vocabulary("vqa"))
            assert Counter(s.answers).most_common(1)[0] == (s.meta["answer"], Counter(s.answers)[s.meta["answer"]])
            assert s.answers.count(s.meta["answer"]) >= 7
        elif task == "nlvr2":
            assert len(s.texts) == 1 and s.label in NLVR2_LABELS and not s.answers
        elif task == "snli_ve":
            assert len(s.texts) == 1 and s.label in SNLI_VE_LABELS and not s.answers
        else:
            assert 3 <= len(s.texts) <= 5 and len(set(s.texts)) == len(s.texts)
            assert s.label is None and not s.answers


def test_arguments_are_checked_eagerly() -> None:
    for kwargs in ({"task": "gqa"}, {"split": "dev"}, {"n": -1}, {"seed": -2}, {"image_size": 8}, {"n": 1.5}):
        args = {"task": "vqa", "split": "train", "n": 3, **kwargs}
        with pytest.raises(ValueError, match=str(next(iter(kwargs.values())))):
            shapes.generate(**args)  # raises before the first sample is asked for


def test_generate_splits_sizes() -> None:
    splits = shapes.generate_splits("vqa", sizes={"train": 7, "val": 2}, seed=1, image_size=16)
    assert set(splits) == set(shapes.SHAPES_SPLITS)
    got = {k: list(v) for k, v in splits.items() if k != "test"}
    assert {k: len(v) for k, v in got.items()} == {"train": 7, "val": 2}
    assert got["train"] == _gen("vqa", 7, seed=1, image_size=16)
    assert shapes.DEFAULT_SIZES["vqa"] == {"train": 6000, "val": 600, "test": 600}
    with pytest.raises(ValueError, match="dev"):
        shapes.generate_splits("vqa", sizes={"dev": 3})


def test_answer_vocabulary() -> None:
    vocab = shapes.answer_vocabulary("vqa")
    assert len(vocab) == len(set(vocab)) == 20
    assert {"yes", "no", "0", "5", "red", "circle", "small"} <= set(vocab)
    assert shapes.answer_vocabulary("nlvr2") == NLVR2_LABELS
    assert shapes.answer_vocabulary("snli_ve") == SNLI_VE_LABELS
    with pytest.raises(ValueError, match="retrieval"):
        shapes.answer_vocabulary("retrieval")


# ------------------------------------------------------------------ the texts say what the scene shows


def test_vqa_answers_follow_from_the_scene() -> None:
    samples = _gen("vqa", 400, split="val")
    for s in samples:
        objs = s.meta["scene"]["objects"]
        assert vqa_answer(s.texts[0], objs) == s.meta["answer"], (s.key, s.texts[0])
    types = Counter(s.meta["qtype"] for s in samples)
    assert set(types) == set(shapes.VQA_QUESTION_TYPES)
    yes_no = Counter(s.meta["answer"] for s in samples if s.meta["answer"] in ("yes", "no"))
    assert 0.4 < yes_no["yes"] / sum(yes_no.values()) < 0.6
    counts = Counter(s.meta["answer"] for s in samples if s.meta["qtype"] == "count")
    assert len(counts) >= 5  # counts 0..5, not mostly 0/1


def test_objects_are_drawn_where_and_as_described() -> None:
    palette = {c: np.array(rgb, dtype=float) for c, rgb in shapes.COLOR_RGB.items()}
    for s in _gen("vqa", 40) + _gen("snli_ve", 40):
        scene = s.meta["scene"]
        img = np.asarray(Image.open(io.BytesIO(s.images[0])).convert("RGB"), dtype=float)
        objs = scene["objects"]
        for o in objs:
            pixel = img[int(o["y"] * 64), int(o["x"] * 64)]
            nearest = min(palette, key=lambda c: np.abs(palette[c] - pixel).sum())
            assert nearest == o["color"], (s.key, o)
            assert o["r"] == shapes.SIZE_RADIUS[o["size"]]
        for i, a in enumerate(objs):  # no overlap
            for b in objs[i + 1:]:
                assert np.hypot(a["x"] - b["x"], a["y"] - b["y"]) > a["r"] + b["r"]
        assert shapes.MIN_OBJECTS <= len(objs) <= shapes.MAX_OBJECTS


def test_nlvr2_labels_follow_and_are_balanced() -> None:
    samples = _gen("nlvr2", 300, split="test")
    for s in samples:
        left, right = (sc["objects"] for sc in s.meta["scenes"])
        assert nlvr2_label(s.texts[0], left, right) == s.label, (s.key, s.texts[0])
    labels = [s.label for s in samples]
    assert Counter(labels) == {"True": 150, "False": 150}
    assert all(labels[i] != labels[i + 1] for i in range(0, 300, 2))  # balanced in every block of two
    templates = Counter(s.meta["statement"]["template"] for s in samples)
    assert set(templates) == set(shapes.NLVR2_TEMPLATES)
    # the statement is drawn before the label: each template takes both labels
    for t in templates:
        assert {s.label for s in samples if s.meta["statement"]["template"] == t} == {"True", "False"}


def test_snli_ve_labels_follow_and_are_balanced() -> None:
    samples = _gen("snli_ve", 300)
    for s in samples:
        scene = s.meta["scene"]
        assert snli_ve_label(s.texts[0], scene["objects"], scene["occluder"] is not None) == s.label, \
            (s.key, s.texts[0], s.label)
        if s.label == "neutral":
            assert scene["occluder"] is not None
    assert Counter(s.label for s in samples) == dict.fromkeys(SNLI_VE_LABELS, 100)
    for family in shapes.SNLI_VE_FAMILIES:  # no family gives its label away
        assert {s.label for s in samples if s.meta["hypothesis"]["family"] == family} == set(SNLI_VE_LABELS)
    with_box = [s.label for s in samples if s.meta["scene"]["occluder"] is not None]
    assert Counter(with_box)["neutral"] < 0.7 * len(with_box)  # a box alone does not mean neutral


@pytest.mark.parametrize("task", ["retrieval", "caption"])
def test_captions_are_true(task: str) -> None:
    samples = _gen(task, 100)
    for s in samples:
        for c in s.texts:
            assert caption_true(c, s.meta["scene"]), (s.key, c)
    assert len({s.texts for s in samples}) == len(samples)


# ------------------------------------------------------------------ baselines, scores


def test_vqa_score_matches_the_official_metric() -> None:
    assert [round(shapes.vqa_score("a", ["a"] * k + ["b"] * (10 - k)), 4) for k in range(6)] == \
        [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]


def test_majority_baseline() -> None:
    train, val = _gen("vqa", 600, image_size=16), _gen("vqa", 300, split="val", image_size=16)
    base = shapes.majority_baseline(train, val)
    assert base.prediction in ("yes", "no") and base.n == 300
    assert 0.05 < base.score < 0.3  # guessing is far from a good model's ~1.0
    truth = np.mean([s.meta["answer"] == base.prediction for s in val])
    assert truth <= base.score < truth + 0.1  # plus the credit of noisy annotators who gave that answer
    nl = _gen("nlvr2", 100, image_size=16)
    assert shapes.majority_baseline(nl).score == 0.5
    ve = _gen("snli_ve", 99, image_size=16)
    assert shapes.majority_baseline(ve[:60], ve).score == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="retrieval"):
        shapes.majority_baseline(_gen("retrieval", 3, image_size=16))


def test_speed() -> None:
    list(shapes.generate("vqa", "train", 50))  # warm up
    t = time.perf_counter()
    samples = list(shapes.generate("vqa", "train", 2000))
    elapsed = time.perf_counter() - t
    assert len(samples) == 2000
    assert elapsed < 5.0, f"2000 vqa samples took {elapsed:.2f} s"  # ~1 s on the 2 shared CPU cores


# ------------------------------------------------------------------ tokenizers


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return list(shapes.all_texts(seed=0, n_per_task=300))


def test_tokenizer_round_trip(tmp_path: Path, corpus: list[str]) -> None:
    from tokenizers import Tokenizer

    out = train_tokenizer(corpus, tmp_path / "tok", vocab_size=512)
    assert out == tmp_path / "tok" and (out / "tokenizer.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["tok"]  # no temporary left behind
    tok = load_tokenizer(out)
    assert len(tok) <= 512
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id) == (0, 1, 2)
    raw = Tokenizer.from_file(str(out / "tokenizer.json"))  # the trained tokenizer as saved
    held_out = [t for s in _gen("vqa", 30, split="test", image_size=16) + _gen("nlvr2", 30, image_size=16)
                for t in s.texts]
    for text in held_out:
        ids = tok(text)["input_ids"]
        assert ids[0] == 0 and ids[-1] == 2 and 3 not in ids  # <s> ... </s>, no <unk>
        assert ids == raw.encode(text).ids
        assert len(ids) <= 24  # fits meter-tiny's max_text_len
        assert len(ids) == len(text.split()) + 2  # one token per word
    batch = tok(held_out[:4], padding=True)
    width = max(len(x) for x in batch["input_ids"])
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
        assert ids[sum(mask):] == [1] * (width - sum(mask))  # padded with <pad> = 1
    assert tok("What Color?")["input_ids"] == tok("what color ?")["input_ids"]  # lowercased, punctuation split
    # an unseen word of seen letters: the longest known prefix, then '##' letters, no <unk>
    assert tok.convert_ids_to_tokens(tok("redness")["input_ids"]) == ["<s>", "red", "##n", "##e", "##s", "##s", "</s>"]

    # deterministic, and an existing directory is replaced
    first = (out / "tokenizer.json").read_text()
    (out / "stale.txt").write_text("from an earlier run")
    again = train_tokenizer(corpus, out, vocab_size=512)
    assert again == out and [p.name for p in tmp_path.iterdir()] == ["tok"]
    assert not (out / "stale.txt").exists()
    assert (out / "tokenizer.json").read_text() == first


def test_tokenizer_small_vocab(tmp_path: Path, corpus: list[str]) -> None:
    out = train_tokenizer(corpus, tmp_path / "tiny", vocab_size=64)
    tok = load_tokenizer(out)
    assert len(tok) <= 64
    ids = tok("what color is the small red circle ?")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and max(ids) < 64
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(corpus, tmp_path / "bad", vocab_size=3)
    with pytest.raises(ValueError, match="no texts"):
        train_tokenizer([], tmp_path / "empty")


def test_load_tokenizer_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-tokenizer"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_tokenizer(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(empty))):
        load_tokenizer(empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(str(broken))):
        load_tokenizer(broken)


def test_load_local_roberta_tokenizer(tmp_path: Path) -> None:
    """A RoBERTa-format directory (vocab.json + merges.txt, byte-level BPE; 'Ġ' marks a leading space)."""
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for piece in [*"abcdefghijklmnopqrstuvwxyz?", "Ġ", "Ġt", "he", "Ġthe", "Ġc"]:
        vocab.setdefault(piece, len(vocab))
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ t\nh e\nĠt he\nĠ c\n")
    tok = load_tokenizer(tmp_path)
    ids = tok("a the cat")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "a", "Ġthe", "Ġc", "a", "t", "</s>"]
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id) == (0, 1, 2)
    with pytest.raises(ValueError, match="expected"):
        load_tokenizer(tmp_path, expect_ids={"pad_token_id": 0})


def test_object_patches_cover_the_object_and_nothing_far() -> None:
    grid = 12
    obj = {"x": 0.5, "y": 0.25, "r": 0.13}
    patches = shapes.object_patches(obj, grid).reshape(grid, grid)
    rows, cols = patches.nonzero()
    assert 6 <= patches.sum() <= 16
    centers_x, centers_y = (cols + 0.5) / grid, (rows + 0.5) / grid
    assert (np.hypot(centers_x - 0.5, centers_y - 0.25) < 0.13 + 0.5 / grid * 1.5).all()
    assert patches[3, 5] or patches[3, 6], "the patches around the center are on the object"
    tiny_obj = shapes.object_patches({"x": 0.52, "y": 0.52, "r": 0.01}, grid)
    assert tiny_obj.sum() == 0, "an object covering less than the coverage share of any patch has none"


def test_focus_patches_are_the_named_objects() -> None:
    sample = next(shapes.generate("vqa", "val", 1, image_size=96))
    scene, focus = sample.meta["scene"], sample.meta["focus"]
    patches = shapes.focus_patches(scene, focus, 12)
    union = np.zeros(144, dtype=bool)
    for i in focus:
        union |= shapes.object_patches(scene["objects"][i], 12)
    assert np.array_equal(patches, union) and patches.any()
    others = [i for i in range(len(scene["objects"])) if i not in focus]
    for i in others:
        assert not (shapes.object_patches(scene["objects"][i], 12) & patches).all()


def test_vqa_mix_mostly_names_one_object() -> None:
    samples = _gen("vqa", 400, split="train")
    types = Counter(s.meta["qtype"] for s in samples)
    assert types["attribute"] / len(samples) > 0.45
    one = sum(len(s.meta["focus"]) == 1 for s in samples) / len(samples)
    assert one > 0.45, "most questions point at a single object"


def test_question_kind_of_every_flavor_and_of_vqa_v2() -> None:
    from smarttrim.data.records import question_kind

    vqa = _gen("vqa", 200, image_size=16)
    kinds = Counter(question_kind(s.meta) for s in vqa)
    attributes = {f"attribute/{a}" for a in shapes.ATTRIBUTES}
    assert set(kinds) == attributes | set(shapes.VQA_QUESTION_TYPES) - {"attribute"}
    assert all(question_kind(s.meta) == f"attribute/{s.meta['program']['query']}" for s in vqa
               if s.meta["qtype"] == "attribute")
    assert {question_kind(s.meta) for s in _gen("nlvr2", 60, image_size=16)} <= set(shapes.NLVR2_TEMPLATES)
    assert {question_kind(s.meta) for s in _gen("snli_ve", 60, image_size=16)} == set(shapes.SNLI_VE_FAMILIES)
    assert question_kind(_gen("caption", 1, image_size=16)[0].meta) is None
    # VQA v2 annotations name an answer type (the official evaluation's per-type breakdown)
    assert question_kind({"answer_type": "yes/no", "question_type": "is there a"}) == "yes/no"
    assert question_kind({"question_id": 1}) is None
