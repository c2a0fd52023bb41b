"""Contamination: which records of a data set a training set holds, exactly or templated.

A study of an adapter trained elsewhere must not score it on records it
learned (``domains.NAME.trained_on``, docs/scenarios.md). A training set
rarely holds them verbatim: a chat template wraps the question, case or
punctuation changed, the answer sits in a longer reply, a ``Q: ... A: ...``
layout joins them. As in the contamination literature (GPT-3's 13-gram
overlap; 8-grams on normalised text elsewhere), records are compared by their
word n-grams after normalising case, punctuation and white space.

Definitions
-----------
``words(t)``: the runs of word characters (``\\w+``) of ``t`` after Unicode
NFKC normalisation and case folding, so case and white space never count.
Punctuation is read two ways, and a gram seen by either counts: as a word
break (``"2>/dev/null"`` -> ``2, dev, null``; a template glued to the text,
``"Davis<|im_end|>"``, stays apart from it) and deleted (``"don't"`` ->
``dont``, ``"G.I."`` -> ``gi``: the copy that stripped its punctuation).

A training record's texts are its question, answer and context, each on its
own: a gram never spans two fields.

The *grams* of a field ``f`` with ``w = words(f)``:

- ``len(w) >= n``: its ``len(w) - n + 1`` n-grams (``n`` consecutive words);
- ``0 < len(w) < n`` (a short field): ``w`` itself, whole. A short field is
  thus seen only where all its words occur, in order and contiguous, in one
  training text: an exact normalised match, alone or inside a longer text;
- no words: none (never seen).

A training record *holds* a gram when one of its texts has it as
consecutive words. A record is

- ``"exact"``: its question, answer and context, each with white space runs
  made one space (:func:`record_key`), equal a training record's (the rule
  before n-grams, counted apart);
- else ``"ngram"``: one training record holds a gram of its question and a
  gram of its answer (for a record without question words, plain text: a
  gram of its answer);
- else clean (``None``).

The context is not compared: a passage, table or schema is shared by many
records of one data set by design, so every record sharing one would be
flagged. Question and answer must meet in one training record because one
field alone is weak evidence: a short answer (``"4"``, ``"True"``) occurs
everywhere and long answers share boilerplate ("These resources address the
diagnosis or management of ..."); a question with its answer is what an
adapter learns. ``n`` = :data:`N` = 13 (GPT-3's): measured on the real data
(docs/scenarios.md, "Contamination"; benchmarks/bench_contamination.py),
every templated copy is found at 8 and at 13, and 13 flags fewer of a data
set's own distinct records (at 8 up to a fifth of a LaTeX domain's, whose
records share Asymptote preambles and formula boilerplate).

Grams are compared by 64-bit hashes, ``h = sum_k v(w_k) B^(m-1-k) mod 2^64``
(``v``: a word's BLAKE2b-64 value, ``B`` odd): two different grams collide
with probability about ``2^-64``, far below one false match in any data set
loramix reads. Cost: ``O(n W)`` numpy operations and sorts for ``W``
training words, and one join over the (record, training record) pairs that
share a question gram (the largest real domain, 1.64 M words, against
itself: about 10 s of CPU time).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence

import numpy as np

#: the default n-gram length (module docstring)
N = 13

_WORD = re.compile(r"\w+")
_PUNCT = re.compile(r"[^\w\s]")
_B = np.uint64(0x9E3779B97F4A7C15)  # odd: every power of it is odd, no bit of a word is lost
_MASK = (1 << 64) - 1


def words(text: str | None, joined: bool = False) -> list[str]:
    """``text``'s ``\\w+`` runs after NFKC normalisation and case folding;
    ``joined``: every punctuation mark deleted first (``don't`` -> ``dont``,
    ``G.I.`` -> ``gi``, ``2>/dev/null`` -> ``2devnull``)."""
    t = unicodedata.normalize("NFKC", text or "").casefold()
    return _WORD.findall(_PUNCT.sub("", t) if joined else t)


def record_key(r) -> tuple[str, str, str]:
    """A record as compared exactly: its question, answer and context, each
    with runs of white space made one space (an export that re-wrapped a
    line is the same record)."""
    return tuple(" ".join((x or "").split()) for x in (r.question, r.answer, r.context))


class _Values(dict):
    """Each distinct word's 64-bit value (BLAKE2b), computed once."""

    def __missing__(self, w: str) -> int:
        v = self[w] = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
        return v

    def __call__(self, ws: list[str]) -> list[int]:
        return list(map(self.__getitem__, ws))


def _concat(fields: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """``fields``' word values end to end, ``x`` (W,) uint64, and for each
    position the end of its field, ``end`` (W,) int64."""
    lens = np.array([len(f) for f in fields], dtype=np.int64)
    x = np.fromiter((v for f in fields for v in f), dtype=np.uint64, count=int(lens.sum()))
    return x, np.repeat(np.cumsum(lens), lens)


def _windows(x: np.ndarray, end: np.ndarray, max_m: int):
    """For ``m = 1 .. max_m``: ``(m, hashes, starts)`` of every ``m``-word
    window of ``x`` inside one field (``start + m <= end[start]``)."""
    h = x.copy()
    for m in range(1, max_m + 1):
        if m > 1:
            h = h[:-1] * _B + x[m - 1 :]  # uint64 arithmetic wraps: mod 2^64
        starts = np.flatnonzero(np.arange(len(h)) + m <= end[: len(h)])
        yield m, h[starts], starts


def _grams(fields: list[list[int]], n: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """The grams checked of each field (module docstring), by length ``m``:
    ``(hashes, field index)``; a field of ``>= n`` words gives its n-grams, a
    shorter one itself (``m`` = its length), a field without words none."""
    x, end = _concat(fields)
    lens = np.array([len(f) for f in fields], dtype=np.int64)
    first, field_of = np.cumsum(lens) - lens, np.repeat(np.arange(len(fields)), lens)
    out = {}
    for m, h, starts in _windows(x, end, n):
        if m == n:
            out[m] = (h, field_of[starts])
        elif (short := np.flatnonzero(lens == m)).size:
            out[m] = (h[np.searchsorted(starts, first[short])], short)
    return out


def _mix(h: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """One 64-bit key for a gram held by a training record."""
    return h * _B + owner.astype(np.uint64)


def _unique(a: np.ndarray) -> np.ndarray:
    """``a``'s distinct values, sorted (np.unique's hash table is far slower
    on uint64 keys than a sort)."""
    a = np.sort(a)
    return a[np.concatenate(([True], a[1:] != a[:-1]))] if len(a) else a


def _member(q: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``q[i]`` is in ``table`` (sorted). (Q,) bool."""
    if not len(table):
        return np.zeros(len(q), dtype=bool)
    return table[np.minimum(np.searchsorted(table, q), len(table) - 1)] == q


def _expand(lo: np.ndarray, cnt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ranges ``[lo_i, lo_i + cnt_i)``: each range's index ``i`` and each
    position in it, one entry per position."""
    i = np.repeat(np.arange(len(lo)), cnt)
    return i, np.repeat(lo - (np.cumsum(cnt) - cnt), cnt) + np.arange(int(cnt.sum()))


def _join(th: np.ndarray, to: np.ndarray, h: np.ndarray, rec: np.ndarray, others: bool) -> np.ndarray:
    """The ``(record, training record)`` pairs, (2, P), where the training
    record holds a gram ``h`` of the record (``th``, ``to``: the training
    grams and their records, sorted by gram); ``others``: not itself."""
    lo = np.searchsorted(th, h, "left")
    i, pos = _expand(lo, np.searchsorted(th, h, "right") - lo)
    pairs = np.stack([rec[i], to[pos]])
    return pairs[:, pairs[0] != pairs[1]] if others else pairs


def _both_seen(records: Sequence, train: Sequence, n: int, val: _Values, joined: bool,
               others: bool = False) -> np.ndarray:  # fmt: skip
    """``out[i]``: one training record holds a gram of record ``i``'s question
    and one of its answer (its answer alone for a question without words),
    reading punctuation as ``joined`` says (:func:`words`). ``others``:
    ``train`` is ``records`` and a record's own copy does not count (a data
    set's near duplicates; benchmarks/bench_contamination.py). (R,) bool."""
    qs = [val(words(r.question, joined)) for r in records]
    gq = _grams(qs, n)
    ga = _grams([val(words(r.answer, joined)) for r in records], n)
    texts = [(j, t) for j, r in enumerate(train) for t in (r.question, r.answer, r.context) if t]
    tw = [val(words(t, joined)) for _, t in texts]
    x, end = _concat(tw)
    owner_of = np.repeat(np.array([j for j, _ in texts], dtype=np.int64), [len(w) for w in tw])
    out = np.zeros(len(records), dtype=bool)
    no_question = np.array([not q for q in qs], dtype=bool)
    cand, keys = [], {}
    for m, h, starts in _windows(x, end, n):
        if m not in gq and m not in ga:
            continue
        order = np.argsort(h)
        th, to = h[order], owner_of[starts][order]
        if m in ga:
            keys[m] = _unique(_mix(th, to))
            ah, arec = ga[m]
            plain = no_question[arec]  # plain text: the answer seen in a training record
            out[_join(th, to, ah[plain], arec[plain], others)[0]] = True
        if m in gq:  # the (record, training record) pairs that share a question gram
            cand.append(_join(th, to, *gq[m], others))
    if not cand:
        return out
    pair = _unique(np.concatenate([c[0] * len(train) + c[1] for c in cand]))
    rec, own = pair // len(train), pair % len(train)
    for m, (ah, arec) in ga.items():  # ... of them, those whose training record holds an answer gram too
        order = np.argsort(arec, kind="stable")
        ah, arec = ah[order], arec[order]
        lo = np.searchsorted(arec, rec, "left")
        i, pos = _expand(lo, np.searchsorted(arec, rec, "right") - lo)
        hit = _member(_mix(ah[pos], own[i]), keys.get(m, np.empty(0, dtype=np.uint64)))
        out[rec[i[hit]]] = True
    return out


def contaminated(records: Sequence, train: Sequence, n: int = N) -> list[str | None]:
    """For each of ``records`` (:class:`~loramix.data.QARecord`): ``"exact"``,
    ``"ngram"`` or ``None``, by the training records ``train`` (module
    docstring: ``"exact"`` when :func:`record_key` matches, else ``"ngram"``
    when one training record holds its question and its answer, read with
    punctuation as white space or deleted)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    keys = {record_key(r) for r in train}
    val = _Values()
    seen = _both_seen(records, train, n, val, False) | _both_seen(records, train, n, val, True)
    return [
        "exact" if record_key(r) in keys else "ngram" if s else None
        for r, s in zip(records, seen, strict=True)
    ]
