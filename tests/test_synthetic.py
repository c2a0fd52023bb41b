"""loramix.synthetic: determinism, computed answers (checked independently), distinct domains, overlap."""

from __future__ import annotations

import calendar
import datetime as dt
import re

import pytest

from loramix.data import QARecord
from loramix.synthetic import generate, synthetic_domains

MONTHS = {m: i for i, m in enumerate(calendar.month_name) if m}
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
# conversion factors to a base unit, written out independently of loramix
FACTORS = {"millimeter": 1e-3, "centimeter": 1e-2, "meter": 1, "kilometer": 1e3, "milligram": 1e-3, "gram": 1,
           "kilogram": 1e3, "milliliter": 1e-3, "liter": 1, "second": 1, "minute": 60, "hour": 3600,
           "day": 86400, "byte": 1, "kilobyte": 1024, "megabyte": 1024**2, "gigabyte": 1024**3}  # fmt: skip


def _date(s: str) -> dt.date:
    m, d, y = re.fullmatch(r"(\w+) (\d+), (\d+)", s).groups()
    return dt.date(int(y), MONTHS[m], int(d))


def _unit(word: str) -> str:
    return word[:-1] if word.endswith("s") and word[:-1] in FACTORS else word


def ok_arith(r: QARecord) -> bool:
    m = re.fullmatch(r"([\d +\-*/]+) = (\d+), so the answer is (\d+)\.", r.answer)
    if not m or m[2] != m[3]:
        return False
    expr = m[1]
    nums_q = set(re.findall(r"\d+", r.question)) | {"25", "10"}
    return set(re.findall(r"\d+", expr)) <= nums_q and eval(expr) == int(m[2])  # noqa: S307 (digits and + - * / only)


def ok_units(r: QARecord) -> bool:
    m = re.fullmatch(r"([\d.]+) kilometers per hour is ([\d.]+) meters per second\.", r.answer)
    if m:
        return abs(float(m[1]) / 3.6 - float(m[2])) < 1e-4 and m[1] in r.question
    m = re.fullmatch(r"([\d.]+) (\w+) is ([\d.]+) (\w+)\.", r.answer)
    if not m or _unit(m[2]) not in FACTORS or _unit(m[4]) not in FACTORS:
        return False
    x, y = float(m[1]), float(m[3])
    want = x * FACTORS[_unit(m[2])] / FACTORS[_unit(m[4])]
    return m[1] in r.question and _unit(m[2]) in r.question and abs(y - want) <= 1e-6 * max(1, want)


def ok_dates(r: QARecord) -> bool:
    a = r.answer
    if m := re.fullmatch(r"(\w+ \d+, \d+) was a (\w+)\.", a):
        return WEEKDAYS[_date(m[1]).weekday()] == m[2] and m[1] in r.question
    if m := re.fullmatch(r"(\d+) days (after|before) (\w+ \d+, \d+) is (\w+ \d+, \d+)\.", a):
        k = int(m[1]) if m[2] == "after" else -int(m[1])
        return _date(m[3]) + dt.timedelta(days=k) == _date(m[4]) and m[3] in r.question
    if m := re.fullmatch(r"From (\w+ \d+, \d+) to (\w+ \d+, \d+) is (\d+) days\.", a):
        return (_date(m[2]) - _date(m[1])).days == int(m[3])
    if m := re.fullmatch(r"(\d+) months after (\w+) comes (\w+)\.", a):
        return (MONTHS[m[2]] - 1 + int(m[1])) % 12 == MONTHS[m[3]] - 1
    if m := re.fullmatch(r"(Yes|No), (\d+) has (365|366) days\.", a):
        leap = calendar.isleap(int(m[2]))
        return (m[1] == "Yes") == leap and int(m[3]) == (366 if leap else 365) and m[2] in r.question
    return False


def ok_sort(r: QARecord) -> bool:
    if ": " not in r.question:
        return False
    items = r.question.rsplit(": ", 1)[1].rstrip(".").split(", ")
    if m := re.fullmatch(r"smallest (\d+), largest (\d+)", r.answer):
        xs = [int(x) for x in items]
        return (int(m[1]), int(m[2])) == (min(xs), max(xs))
    out = r.answer.split(", ")
    if sorted(out) != sorted(items):
        return False
    if "smallest to largest" in r.question:
        return [int(x) for x in out] == sorted(int(x) for x in items)
    if "largest to smallest" in r.question:
        return [int(x) for x in out] == sorted((int(x) for x in items), reverse=True)
    rev = "reverse alphabetical" in r.question
    return out == sorted(items, key=str.lower, reverse=rev)


CHECK = {"arith": ok_arith, "units": ok_units, "dates": ok_dates, "sort": ok_sort}


def test_domains_listed():
    assert set(synthetic_domains()) == set(CHECK) and len(synthetic_domains()) >= 3


@pytest.mark.parametrize("domain", sorted(CHECK))
def test_answers_are_correct(domain):
    recs = generate(domain, 400, seed=11)
    bad = [r for r in recs if not CHECK[domain](r)]
    assert not bad, bad[:3]
    # every template is used and questions vary
    assert len({r.question for r in recs}) > 350


@pytest.mark.parametrize("domain", sorted(CHECK))
def test_deterministic_by_seed(domain):
    a = generate(domain, 50, seed=1)
    assert a == generate(domain, 50, seed=1)
    assert a != generate(domain, 50, seed=2)
    assert generate(domain, 20, seed=1) == a[:20]  # a prefix of a longer run


def test_domains_have_distinct_vocabulary_and_answers():
    vocab = {d: {w.lower() for r in generate(d, 300, seed=0) for w in re.findall(r"[A-Za-z]+", r.question)}
             for d in CHECK}  # fmt: skip
    for a in CHECK:
        for b in CHECK:
            if a < b:
                jac = len(vocab[a] & vocab[b]) / len(vocab[a] | vocab[b])
                assert jac < 0.2, (a, b, jac, vocab[a] & vocab[b])
    # no record of one domain passes another domain's checker
    for d in CHECK:
        for other in CHECK:
            if other != d:
                assert not any(CHECK[other](r) for r in generate(d, 200, seed=0))


@pytest.mark.parametrize("f", [0.0, 0.25, 0.5, 1.0])
def test_overlap_shares_that_fraction_of_templates(f):
    n = 200
    pure = generate("arith", n, seed=5)
    mixed = generate("arith", n, seed=5, overlap=f, overlap_with="units")
    from_units = [i for i, r in enumerate(mixed) if ok_units(r)]
    assert len(from_units) == round(f * n)
    assert all(ok_arith(r) for i, r in enumerate(mixed) if i not in set(from_units))
    # the records that keep their own templates are unchanged
    assert all(mixed[i] == pure[i] for i in range(n) if i not in set(from_units))
    # shared records are new draws from the other domain's templates, not copies of its records
    # (the units domain is small, so a few coincide by chance)
    units = generate("units", n, seed=5)
    assert sum(mixed[i] == units[i] for i in from_units) <= 0.1 * len(from_units)
    assert mixed == generate("arith", n, seed=5, overlap=f, overlap_with="units")


def test_overlap_bad_arguments():
    with pytest.raises(ValueError, match="overlap_with"):
        generate("arith", 5, seed=0, overlap=0.5)
    with pytest.raises(ValueError, match="unknown synthetic domain"):
        generate("arith", 5, seed=0, overlap=0.5, overlap_with="nope")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        generate("arith", 5, seed=0, overlap=1.5, overlap_with="units")
