"""The n-gram contamination rule (loramix.contamination): templated and
reworded copies of records are found, unrelated records of the real data are
not, short records follow the stated rule."""

from __future__ import annotations

import re

import pytest

from loramix.contamination import N, contaminated, words
from loramix.data import QARecord, load_records

from .factories import SHARED_DATA

SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)


def smol_chat(r: QARecord) -> QARecord:
    """SmolLM2-135M-Instruct's chat template (its GGUF's), prompt and reply."""
    user = f"Context: {r.context}\nQuestion: {r.question}" if r.context else r.question
    return QARecord(
        f"{SYSTEM}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n", f"{r.answer}<|im_end|>\n"
    )


def _each(f):
    return lambda r: QARecord(*(f(t) if t else t for t in (r.question, r.answer, r.context)))


COPIES = {
    "chat": smol_chat,
    "lower": _each(str.lower),
    "upper": _each(str.upper),
    "no punctuation": _each(lambda t: re.sub(r"[^\w\s]", "", t)),
    "punctuation as spaces": _each(lambda t: re.sub(r"[^\w\s]", " ", t)),
    "extra white space": _each(lambda t: "  " + t.replace(" ", " \n\t ") + "\n"),
    "answer embedded": lambda r: QARecord(
        r.question, f"Sure! Here is what I found: {r.answer} Hope it helps.", r.context
    ),
    "Q: A:": lambda r: QARecord(f"Q: {r.question}", f"A: {r.answer}"),
    "one field": lambda r: QARecord("Answer the question.", f"Q: {r.question}\nA: {r.answer}"),
}


def test_words_drop_case_punctuation_and_white_space():
    assert words("  What's 2+2?\n") == ["what", "s", "2", "2"]
    assert words("What's 2+2?", joined=True) == ["whats", "22"]
    assert words("ＦＵＬＬ width") == ["full", "width"]  # NFKC


@pytest.mark.parametrize("copy", list(COPIES))
def test_a_templated_or_reworded_copy_is_found(copy):
    recs = [
        QARecord("Who wrote Hamlet?", "Shakespeare"),
        QARecord("What's the boiling point of water at sea level, in Celsius?", "100 °C."),
        QARecord("How many legs does a spider have?", "Eight", "Spiders are arachnids, not insects."),
        QARecord(
            "Find all *.txt files under the current directory and delete them",
            "find . -name '*.txt' -type f -exec rm {} \\;",
        ),
    ]
    got = contaminated(recs, [COPIES[copy](r) for r in recs])
    assert all(g is not None for g in got), (copy, got)
    # the rule before: white space only
    assert ([g == "exact" for g in got] == [True] * 4) == (copy == "extra white space")


def test_short_records_need_every_word_of_the_question_and_answer():
    """A field shorter than n words is seen only when all its words occur, in
    order and contiguous, in one training text; question and answer both."""
    rec = [QARecord("Who wrote Hamlet?", "William Shakespeare")]
    assert contaminated(
        rec, [QARecord("Quiz: who wrote HAMLET", "It was william shakespeare, of course.")]
    ) == ["ngram"]
    assert contaminated(rec, [QARecord("Who wrote Hamlet?", "Christopher Marlowe")]) == [None]
    assert contaminated(rec, [QARecord("Who wrote the play Hamlet?", "William Shakespeare")]) == [None]
    assert contaminated(rec, [QARecord("Who wrote Macbeth?", "Shakespeare, William")]) == [None]
    # one training record must hold both: not the question in one and the answer in another
    assert contaminated(rec, [QARecord("who wrote hamlet", "x"), QARecord("y", "william shakespeare")]) == [
        None
    ]
    assert contaminated(rec, [QARecord("y", "x"), QARecord("who wrote hamlet", "william shakespeare")]) == [
        "ngram"
    ]
    # an answer without words (only punctuation): the exact rule alone
    assert contaminated([QARecord("Which sign adds?", "+")], [QARecord("which sign adds", "+")]) == [None]
    assert contaminated([QARecord("Which sign adds?", "+")], [QARecord("Which  sign adds?", "+")]) == [
        "exact"
    ]
    # plain text (no question): its answer decides
    assert contaminated(
        [QARecord("", "A tale told by an idiot")], [QARecord("Q", "a tale told by an idiot!")]
    ) == ["ngram"]


def test_long_fields_need_one_shared_n_gram():
    q = "A train leaves the station at noon travelling east at sixty miles per hour toward the coast"
    a = "It arrives at four in the afternoon after covering two hundred and forty miles of track"
    rec = [QARecord(q, a)]
    # the last word changed in each: the other n-grams remain
    reworded = QARecord(q.replace("coast", "shore"), a.replace("track", "rail"))
    assert contaminated(rec, [reworded]) == ["ngram"]

    # every n-gram broken (a word changed every n - 1 words): not seen
    def every(t):
        ws = t.split()
        return " ".join(w + "X" if i % (N - 1) == 0 else w for i, w in enumerate(ws))

    assert contaminated(rec, [QARecord(every(q), every(a))]) == [None]
    assert contaminated(rec, [QARecord(every(q), a)]) == [None]
    assert contaminated(rec, [QARecord(" ".join(q.split()[:N]), a)]) == ["ngram"]  # its first n words
    assert contaminated(rec, [QARecord(" ".join(q.split()[: N - 1]), a)]) == [None]


def test_n_must_be_positive_and_empty_sets_are_clean():
    with pytest.raises(ValueError, match="n must be at least 1"):
        contaminated([QARecord("a", "b")], [QARecord("a", "b")], 0)
    assert contaminated([QARecord("a b", "c")], []) == [None]
    assert contaminated([], [QARecord("a b", "c")]) == []


@pytest.mark.realdata
@pytest.mark.parametrize("domain", ["nq_open", "medicine", "finance", "bash", "math", "sql"])
def test_real_templated_copies_are_found(domain):
    recs = load_records(SHARED_DATA / f"{domain}.jsonl", limit=200)
    for name, f in COPIES.items():
        got = contaminated(recs, [f(r) for r in recs])
        assert got.count(None) == 0, (name, [r for r, g in zip(recs, got) if g is None][:2])


@pytest.mark.realdata
@pytest.mark.parametrize(("domain", "most"), [("nq_open", 0.0), ("medicine", 0.04), ("finance", 0.005),
                                             ("bash", 0.01), ("math", 0.002), ("law", 0.005),
                                             ("math_geometry", 0.05)])  # fmt: skip
def test_unrelated_real_records_are_not_flagged(domain, most):
    """Half of a domain against its other half (distinct records): few flagged,
    the domain's own near duplicates (measured at n = 13: none of nq_open's
    1,500, 105 of medicine's 4,000, 15 of MATH geometry's 435, at most 9 of
    the others'; docs/scenarios.md); against another domain's records: none."""
    recs = load_records(SHARED_DATA / f"{domain}.jsonl")
    half = len(recs) // 2
    got = contaminated(recs[:half], recs[half:])  # medicine holds 8 exact duplicates across the halves
    assert got.count("ngram") <= most * half, got.count("ngram")
    other = load_records(SHARED_DATA / ("law.jsonl" if domain != "law" else "bash.jsonl"))
    assert contaminated(recs[:half], other).count(None) == half
