"""Measurement: the n-gram contamination rule (loramix.contamination) on the real data.

For every domain of the real QA data (``../shared/data``) and each ``n``:

* ``FP``: false positives, the records that collide with *other* records of
  the same domain (leave-one-out: each record against all the others' fields),
  by the chosen rule (question and answer both seen) and, for comparison, by
  "any field seen" among question and answer (``any``) and among question,
  answer and context (``any+ctx``);
* ``caught``: of ``--sample`` records, how many the rule finds in templated
  copies of them (``chat``: SmolLM2-135M-Instruct's chat template, system turn
  and all; ``lower``: lower-cased; ``punct``: every punctuation mark removed;
  ``spaced``: every punctuation mark a space; ``reworded``: the middle word of
  the question and of the answer replaced; ``qa``: a plain-text file of
  ``Q: ... A: ...`` paragraphs; ``embed``: the answer inside a longer reply),
  with, in brackets, how many of them the exact rule finds.

Then the time of :func:`~loramix.contamination.contaminated` on the largest
domain against itself: process CPU time (user + system) of this process,
the steadier figure on a shared machine.

    python benchmarks/bench_contamination.py [--n 8 13] [--sample 500]
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import sys
import tempfile
from pathlib import Path

import numpy as np

from loramix.contamination import _both_seen, _concat, _Values, _windows, contaminated, words
from loramix.data import QARecord, load_records

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)


def smol_chat(r: QARecord) -> QARecord:
    """``r`` as SmolLM2-Instruct's chat template renders it (the GGUF's
    ``tokenizer.chat_template``), the prompt as question, the reply as answer."""
    user = f"Context: {r.context}\nQuestion: {r.question}" if r.context else r.question
    return QARecord(
        f"{SYSTEM}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n", f"{r.answer}<|im_end|>\n"
    )


def _reword(t: str) -> str:
    """``t`` with its middle word replaced (a light rewording)."""
    ws = t.split()
    return " ".join(ws[: len(ws) // 2] + ["something"] + ws[len(ws) // 2 + 1 :])


COPIES = {
    "chat": smol_chat,
    "lower": lambda r: QARecord(r.question.lower(), r.answer.lower(), r.context and r.context.lower()),
    "punct": lambda r: QARecord(
        *(re.sub(r"[^\w\s]", "", t) if t else t for t in (r.question, r.answer, r.context))
    ),
    "spaced": lambda r: QARecord(
        *(re.sub(r"[^\w\s]", " ", t) if t else t for t in (r.question, r.answer, r.context))
    ),
    "reworded": lambda r: QARecord(_reword(r.question), _reword(r.answer), r.context),
    "embed": lambda r: QARecord(
        r.question, f"Sure! Here is what I found. {r.answer} I hope this helps.", r.context
    ),
}


def leave_one_out(recs: list[QARecord], n: int) -> dict[str, int]:
    """How many records collide with *other* records of their own data set:
    by the rule (one other record holds a gram of the question and one of
    the answer), and for comparison by "any gram of the question or answer
    seen in another record" (``any``) and the same with the context
    (``any+ctx``), all by either reading of punctuation."""
    val = _Values()
    rule = _both_seen(recs, recs, n, val, False, others=True) | _both_seen(
        recs, recs, n, val, True, others=True
    )
    seen = _loo_seen(recs, n, False) | _loo_seen(recs, n, True)
    return {"records": len(recs), "rule": int(rule.sum()), "any": int(seen[:, :2].any(1).sum()),
            "any+ctx": int(seen.any(1).sum())}  # fmt: skip


def _loo_seen(recs: list[QARecord], n: int, joined: bool) -> np.ndarray:
    """(R, 3): a gram of the record's question / answer / context is held by
    another record (at least two distinct records hold it as a window)."""
    val = _Values()
    fields = [val(words(t, joined)) for r in recs for t in (r.question, r.answer, r.context)]
    lens = np.array([len(f) for f in fields])
    first = np.cumsum(lens) - lens  # each field's first position
    x, end = _concat(fields)
    field_of = np.repeat(np.arange(len(fields)), lens)
    owner = (field_of // 3).astype(np.uint64)
    seen = np.zeros(len(fields), dtype=bool)
    for m, h, starts in _windows(x, end, n):
        order = np.lexsort((owner[starts], h))
        hs, ow = h[order], owner[starts][order]
        new = np.ones(len(hs), dtype=bool)
        new[1:] = (hs[1:] != hs[:-1]) | (ow[1:] != ow[:-1])  # one window per (gram, record)
        u, counts = np.unique(hs[new], return_counts=True)
        other = np.isin(h, u[counts >= 2])
        if m == n:
            seen[np.unique(field_of[starts[other]])] = True
        short = np.flatnonzero(lens == m) if m < n else np.array([], dtype=np.int64)
        seen[short] = other[np.searchsorted(starts, first[short])]
    return seen.reshape(-1, 3)


def caught(recs: list[QARecord], n: int, tmp: Path) -> dict[str, str]:
    out = {}
    for name, f in COPIES.items():
        res = contaminated(recs, [f(r) for r in recs], n)
        # caught (of them by the exact rule)
        out[name] = f"{sum(x is not None for x in res)} ({sum(x == 'exact' for x in res)})"
    # plain text: one paragraph per record, the file read as loramix reads it
    txt = tmp / "qa.txt"
    txt.write_text("".join(f"Q: {r.question}\nA: {r.answer}\n\n" for r in recs))
    res = contaminated(recs, load_records(txt), n)
    out["qa"] = f"{sum(x is not None for x in res)} ({sum(x == 'exact' for x in res)})"
    return out


def cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[8, 13])
    ap.add_argument("--sample", type=int, default=500)
    ap.add_argument("--domains", nargs="*")
    args = ap.parse_args()
    if not (DATA / "math.jsonl").is_file():
        print(f"real QA data not found at {DATA}", file=sys.stderr)
        return 2
    names = args.domains or sorted(p.stem for p in DATA.glob("*.jsonl"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            recs = load_records(DATA / f"{name}.jsonl")
            short = {n: sum(len(words(r.question)) < n for r in recs) for n in args.n}
            for n in args.n:
                fp = leave_one_out(recs, n)
                c = caught(recs[: args.sample], n, Path(tmp))
                rows.append({"domain": name, "n": n, "short_q": short[n], **fp, **c})
                print(json.dumps(rows[-1]), flush=True)
    big = max(names, key=lambda d: (DATA / f"{d}.jsonl").stat().st_size)
    recs = load_records(DATA / f"{big}.jsonl")
    for n in args.n:
        t0 = cpu()
        res = contaminated(recs, recs, n)
        print(f"time: {big} ({len(recs)} records, {sum(len(words(t)) for r in recs for t in (r.question, r.answer, r.context))} "
              f"words) against itself, n={n}: {cpu() - t0:.2f} s CPU (user+sys); {sum(x is not None for x in res)} flagged")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
