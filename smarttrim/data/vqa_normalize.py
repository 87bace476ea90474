"""VQA answer normalization and the METER/ViLT answer vocabulary and soft scores.

``normalize_answer`` follows the procedure of the official VQA evaluation (``vqaEval.py`` of the VQA API):

1. newlines and tabs become spaces, the answer is stripped;
2. punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when the answer has that
   character next to a space (``"p "`` or ``" p"``) or has a digit-comma-digit group anywhere (``"1,000"``),
   and otherwise replaced by a space; then every ``.`` that is not followed by a digit is deleted (``"3.5"``
   keeps its point; the official script removes at most 32 such periods, a side effect of passing
   ``re.UNICODE`` as the ``count`` argument of ``re.sub``, reproduced here);
3. the answer is lower-cased and split on whitespace; number words ``none``/``zero`` .. ``ten`` become digits,
   the articles ``a``/``an``/``the`` are dropped, and words of the contractions table get their apostrophe
   back (``isnt`` -> ``isn't``); the words are joined by single spaces.

The contractions table is the official one, quirks included: its keys with capitals (``Im``, ``Ive``,
``Id've``) never match because words are lower-cased first, and ``somebody'd`` maps to ``somebodyd``.
Apostrophes and colons are not punctuation for the official script and are kept.

The official script applies all three steps to the predicted answer; to the ground truth it applies only the
punctuation step, and only for questions whose annotators disagree. METER and ViLT (and these readers) apply the
full procedure to every annotator answer, so that ground truth and predictions are compared in the same form.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["answer_vocabulary", "normalize_answer", "vqa_soft_score", "vqa_soft_scores"]

_PUNCTUATION: tuple[str, ...] = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                                 "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# the official pattern is r"(?!<=\d)(\.)(?!\d)": its first group is a lookahead (a typo for a lookbehind) that
# always succeeds before a '.', so the pattern is "a period not followed by a digit"
_PERIOD = re.compile(r"\.(?!\d)")
_OFFICIAL_PERIOD_LIMIT = 32  # re.UNICODE == 32, passed as re.sub's count by the official script

_NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})


def _contractions() -> dict[str, str]:
    """The official contractions table: written-without-apostrophe form -> form with apostrophe(s)."""
    table: dict[str, str] = {}
    # most entries map a word written without its apostrophe to the word
    simple = ("ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's how'd how'll "
              "how's isn't it'd it'll ma'am mightn't might've mustn't must've needn't not've o'clock oughtn't shan't "
              "should've shouldn't somebody'll somebody's someone'd someone'll someone's something'd something'll "
              "that's there'd there're there's they'd they'll they're they've wasn't we've weren't what'll what're "
              "what's what've when's where'd where's where've who'd who'll who's who've won't would've wouldn't "
              "y'all you'd you'll you're you've")
    for word in simple.split(" "):
        table[word.replace("'", "")] = word
    table["twas"] = "'twas"
    # two-apostrophe forms, reachable from spellings that keep one of the two apostrophes
    for full, spellings in (
        ("couldn't've", ("couldn'tve", "couldnt've")),
        ("hadn't've", ("hadnt've", "hadn'tve")),
        ("he'd've", ("hed've", "he'dve")),
        ("I'd've", ("Id've", "I'dve")),
        ("it'd've", ("itd've", "it'dve")),
        ("mightn't've", ("mightnt've", "mightn'tve")),
        ("she'd've", ("shed've", "she'dve")),
        ("shouldn't've", ("shouldnt've", "shouldn'tve")),
        ("somebody'd've", ("somebodyd've", "somebody'dve")),
        ("someone'd've", ("someoned've", "someone'dve")),
        ("something'd've", ("somethingd've", "something'dve")),
        ("there'd've", ("thered've", "there'dve")),
        ("they'd've", ("theyd've", "they'dve")),
        ("we'd've", ("wed've", "we'dve")),
        ("who'd've", ("whod've", "who'dve")),
        ("wouldn't've", ("wouldnt've", "wouldn'tve")),
        ("y'all'll", ("yall'll", "y'allll")),
        ("y'all'd've", ("yall'd've", "y'alld've", "y'all'dve")),
        ("you'd've", ("youd've", "you'dve")),
    ):
        for spelling in spellings:
            table[spelling] = full
    # entries of the official table that are not "apostrophes removed" (kept for exactness)
    table.update({"Im": "I'm", "Ive": "I've", "let's": "let's", "she's": "she's", "somebody'd": "somebodyd",
                  "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "whyll": "why'll",
                  "whyre": "why're", "whys": "why's"})
    return table


CONTRACTIONS: dict[str, str] = _contractions()


def _punctuation(text: str) -> str:
    """Step 2 of the official procedure (``processPunctuation``)."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _PUNCTUATION:
        # the official test looks at the original answer, not at the partly processed one
        out = out.replace(p, "" if delete_all or (p + " ") in text or (" " + p) in text else " ")
    return _PERIOD.sub("", out, count=_OFFICIAL_PERIOD_LIMIT)


def _digits_articles(text: str) -> str:
    """Step 3 of the official procedure (``processDigitArticle``)."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(answer: str) -> str:
    """An answer normalized as the official VQA evaluation does (see the module docstring).

    >>> [normalize_answer(a) for a in ("Two", "a dog.", "isnt", "yes!", "1,000", "3.5")]
    ['2', 'dog', "isn't", 'yes', '1000', '3.5']
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(text))


def answer_vocabulary(answers: Iterable[str | Sequence[str]], min_count: int = 9) -> list[str]:
    """The answers seen at least ``min_count`` times, in order of first appearance.

    Each element of ``answers`` is either one answer (a string, counted once) or the answers of one question
    (a list or tuple of strings, each occurrence counted). Answers are counted as given: pass normalized ones.

    METER and ViLT (whose 3129-answer VQA v2 vocabulary this reproduces) count one answer per question, its
    ``multiple_choice_answer`` (the most common of the 10), normalized, over the train2014 and val2014
    questions, with ``min_count=9``; ``read_vqa_v2`` keeps it, normalized, as ``meta["multiple_choice_answer"]``.
    Counting all 10 annotator answers instead (pass ``sample.answers``) gives a different, larger vocabulary.
    The order of first appearance is ViLT's label order when the answers come in the order of the files.
    """
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}")
    counts: Counter[str] = Counter()
    for item in answers:
        if isinstance(item, str):
            counts[item] += 1
        else:
            counts.update(item)
    return [answer for answer, n in counts.items() if n >= min_count]


def vqa_soft_score(count: int) -> float:
    """The METER/ViLT score of an answer given by ``count`` annotators: 0, 0.3, 0.6, 0.9, then 1.0 from 4 up."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return (0.0, 0.3, 0.6, 0.9)[count] if count < 4 else 1.0


def vqa_soft_scores(answers: Sequence[str], vocab: Mapping[str, int]) -> dict[int, float]:
    """The soft target of one question: vocabulary index -> score, for every answer of ``answers`` (the
    annotators' answers, normalized) that is in ``vocab`` (answer -> index); answers outside it are dropped.

    ViLT counts the raw annotator answers against the normalized vocabulary; here both sides are normalized, so
    an answer spelled differently by annotators ("Two" and "2") is counted together, as the evaluation does.
    """
    scores: dict[int, float] = {}
    for answer, n in Counter(answers).items():
        index = vocab.get(answer)
        if index is not None:
            scores[index] = vqa_soft_score(n)
    return scores
