"""loramix.data: file formats, bad-file errors, split, prompt template, encoding, batching."""

from __future__ import annotations

import json

import pytest
import torch

from loramix.cli import main
from loramix.data import (
    PROMPT_TEMPLATE,
    QARecord,
    batch_indices,
    encode_records,
    format_record,
    load_records,
    make_batches,
    parse_synthetic_spec,
    position_budget,
    split_records,
)
from loramix.errors import DataError, UsageError

from .factories import SHARED_DATA, write_jsonl

ROWS = [
    {"question": "What is 2 + 2?", "answer": "4"},
    {"question": "Revenue in 2019?", "answer": "120", "context": "Revenue was 120 in 2019."},
    {"question": "Capital of France?", "answer": "Paris", "context": None},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from loramix.basebuild import train_tokenizer
    from loramix.synthetic import generate

    texts = [f"Question: {r.question}\nAnswer: {r.answer}" for r in generate("arith", 300, seed=0)]
    return train_tokenizer(texts + [json.dumps(r) for r in ROWS], 400, 64)


def test_jsonl_json_csv_agree(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    (tmp_path / "d.csv").write_text(
        'question,answer,context\nWhat is 2 + 2?,4,\nRevenue in 2019?,120,"Revenue was 120 in 2019."\n'
        "Capital of France?,Paris,\n"
    )
    want = [
        QARecord("What is 2 + 2?", "4"),
        QARecord("Revenue in 2019?", "120", "Revenue was 120 in 2019."),
        QARecord("Capital of France?", "Paris"),
    ]
    for ext in ("jsonl", "json", "csv"):
        assert load_records(tmp_path / f"d.{ext}") == want, ext
        assert load_records(tmp_path / f"d.{ext}", limit=2) == want[:2], ext


def test_field_names_numbers_and_no_context(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"q": "x?", "a": 3, "ctx": "c"}, {"q": "y?", "a": "z"}])
    recs = load_records(tmp_path / "d.jsonl", question_field="q", answer_field="a", context_field="ctx")
    assert recs == [QARecord("x?", "3", "c"), QARecord("y?", "z")]
    assert (
        load_records(tmp_path / "d.jsonl", question_field="q", answer_field="a", context_field=None)[
            0
        ].context
        is None
    )


def test_plain_text_paragraphs(tmp_path):
    (tmp_path / "t.txt").write_text("First para\ncontinues here.\n\n\n  \nSecond one.\n")
    assert load_records(tmp_path / "t.txt") == [
        QARecord("", "First para continues here."),
        QARecord("", "Second one."),
    ]
    assert format_record(QARecord("", "Second one.")) == ("", "Second one.")


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.jsonl", None, "no such file"),
        ("empty.jsonl", "\n\n", "empty file"),
        (
            "nofield.jsonl",
            '{"question": "a", "answer": "b"}\n{"question": "c"}\n',
            "line 2: missing field 'answer'",
        ),
        ("badjson.jsonl", '{"question": "a", "answer": "b"}\n{"question": \n', "line 2: invalid JSON"),
        ("notobj.jsonl", "[1, 2]\n", "line 1: expected a JSON object"),
        ("bad.json", "[{", "invalid JSON"),
        ("dict.json", '{"question": "a"}', "expected a JSON list"),
        (
            "rec.json",
            '[{"question": "a", "answer": "b"}, {"answer": "c"}]',
            "record 1: missing field 'question'",
        ),
        ("hdr.csv", "question,reply\na,b\n", "line 1: missing field 'answer'"),
        ("emptyans.csv", "question,answer\na,b\nc,\n", "line 3: field 'answer' is empty"),
        ("null.jsonl", '{"question": "a", "answer": null}\n', "missing field 'answer'"),
        ("x.parquet", "abc", "unsupported file type"),
        # a RecursionError, which the CLI's last resort reported naming no file
        (
            "deep.jsonl",
            '{"x": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
            "nested too deeply",
        ),
        ("deep.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
)
def test_bad_files_name_the_file_and_exit_2(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message) as e:
        load_records(path)
    assert str(path) in e.value.message and "\n" not in e.value.message
    # The same through the CLI: one line on stderr, exit code 2, before any model is loaded.
    assert main(["eval", "--base", str(tmp_path / "nobase"), "--data", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(path) in err and message.split(":")[-1].strip() in err


def test_fifo_refused_not_hung(tmp_path):
    """A FIFO given as data is refused naming it; reading it waited for a
    writer, for ever (a real process: the old code hung in it)."""
    import os
    import subprocess
    import sys

    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.Popen([sys.executable, "-m", "loramix", "eval", "--base", str(tmp_path / "nobase"), "--data",
                          str(fifo)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": repo})  # fmt: skip
    try:
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 2 and err.count("\n") == 1 and f"{fifo}: not a regular file" in err, err


def test_split_is_deterministic_and_disjoint():
    recs = [QARecord(f"q{i}", f"a{i}") for i in range(50)]
    tr, ev = split_records(recs, eval_size=0.2, seed=3)
    assert len(ev) == 10 and len(tr) == 40 and set(tr).isdisjoint(ev) and set(tr) | set(ev) == set(recs)
    assert (tr, ev) == split_records(recs, eval_size=0.2, seed=3)
    assert ev != split_records(recs, eval_size=0.2, seed=4)[1]
    assert tr == sorted(tr, key=recs.index)  # original order kept
    assert len(split_records(recs, eval_size=7, seed=0)[1]) == 7
    assert split_records(recs, eval_size=0, seed=0) == (recs, [])
    with pytest.raises(UsageError):
        split_records(recs, eval_size=50, seed=0)
    with pytest.raises(UsageError):
        split_records(recs, eval_size=1.5, seed=0)


def test_prompt_template():
    assert format_record(QARecord("Q?", "A")) == ("Question: Q?\nAnswer:", " A")
    assert format_record(QARecord("Q?", "A", "C")) == ("Context: C\nQuestion: Q?\nAnswer:", " A")
    assert PROMPT_TEMPLATE.format(question="Q?") == "Question: Q?\nAnswer:"


def test_encode_masks_prompt_and_appends_eos(tok):
    rec = QARecord("What is 2 + 2?", "4")
    (ex,) = encode_records(tok, [rec], max_len=64)
    p = tok("Question: What is 2 + 2?\nAnswer:", add_special_tokens=False)["input_ids"]
    a = tok(" 4", add_special_tokens=False)["input_ids"]
    assert ex["input_ids"] == p + a + [tok.eos_token_id]
    assert ex["labels"] == [-100] * len(p) + a + [tok.eos_token_id]
    (ex_all,) = encode_records(tok, [rec], max_len=64, on="all")
    assert ex_all["labels"] == ex_all["input_ids"] == ex["input_ids"]


def test_encode_truncates_prompt_from_the_left(tok):
    rec = QARecord("How many apples " * 10 + "in total?", "17 apples")
    (full,) = encode_records(tok, [rec], max_len=1000)
    (ex,) = encode_records(tok, [rec], max_len=16)
    assert len(ex["input_ids"]) == 16 and ex["input_ids"] == full["input_ids"][-16:]
    n_ans = sum(x != -100 for x in full["labels"])
    assert ex["labels"][-n_ans:] == full["labels"][-n_ans:]
    # an answer longer than max_len keeps its start and loses its EOS, but not the question:
    # the prompt keeps its end, half the room (it lost all of it, and the record was scored as
    # free text)
    rec = QARecord("How many apples " * 10 + "in total?", "seven " * 40)
    (full,) = encode_records(tok, [rec], max_len=1000)
    n_prompt = sum(x == -100 for x in full["labels"])
    stats: dict = {}
    (ex,) = encode_records(tok, [rec], max_len=16, stats=stats)
    assert ex["input_ids"] == full["input_ids"][n_prompt - 8 : n_prompt + 8] and stats == {"truncated": 1}
    assert ex["labels"] == [-100] * 8 + full["labels"][n_prompt : n_prompt + 8]
    assert tok.decode(ex["input_ids"][:8]).endswith(" total?\nAnswer:")  # the question's end, and the cue
    # a prompt shorter than half the room keeps all of itself; the answer takes the rest
    rec = QARecord("q", "seven " * 20)
    (ex,) = encode_records(tok, [rec], max_len=24, stats=stats)
    (full,) = encode_records(tok, [rec], max_len=1000)
    n_prompt = sum(x == -100 for x in full["labels"])
    assert (
        n_prompt < 12
        and ex["input_ids"] == full["input_ids"][:24]
        and ex["labels"][:n_prompt] == [-100] * n_prompt
    )
    assert ex["input_ids"][-1] != tok.eos_token_id and stats == {"truncated": 2}


def test_make_batches_padding_and_shuffle():
    ex = [
        {"input_ids": list(range(1, n + 1)), "labels": [-100] + list(range(2, n + 1))}
        for n in (3, 5, 2, 4, 6)
    ]
    bs = make_batches(ex, batch_size=2, pad_id=0)
    assert [b["input_ids"].shape for b in bs] == [(2, 5), (2, 4), (1, 6)]
    b = bs[0]
    assert b["input_ids"].dtype == torch.long
    assert b["input_ids"][0].tolist() == [1, 2, 3, 0, 0]
    assert b["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
    assert b["labels"][0].tolist() == [-100, 2, 3, -100, -100]
    s1 = make_batches(ex, batch_size=2, pad_id=0, shuffle=True, seed=1)
    s2 = make_batches(ex, batch_size=2, pad_id=0, shuffle=True, seed=1)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(s1, s2))
    sorted_b = make_batches(ex, batch_size=2, pad_id=0, sort_by_length=True)
    assert [b["attention_mask"].sum().item() for b in sorted_b] == [11, 7, 2]  # longest first


def test_make_batches_equal_the_per_example_construction():
    """The batches built from padded lists (one tensor per field) hold exactly
    what filling a padded tensor example by example gave: same values, dtype,
    order, for every way of drawing them."""
    import random

    rng = random.Random(0)
    ex = []
    for _ in range(75):
        n = rng.randint(1, 30)
        ids = [rng.randint(0, 999) for _ in range(n)]
        k = rng.randint(0, n)
        ex.append({"input_ids": ids, "labels": [-100] * k + ids[k:]})

    def reference(chunk, pad_id):
        width = max(len(e["input_ids"]) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for j, e in enumerate(chunk):
            n = len(e["input_ids"])
            ids[j, :n] = torch.tensor(e["input_ids"])
            mask[j, :n] = 1
            labels[j, :n] = torch.tensor(e["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    for kw in (
        {},
        {"shuffle": True, "seed": 3, "bucket": 2},
        {"sort_by_length": True},
        {"shuffle": True, "take": 3},
        {"sort_by_length": True, "max_tokens": 60},
        {"shuffle": True, "seed": 3, "bucket": 2, "max_tokens": 60},
    ):
        got = make_batches(ex, batch_size=8, pad_id=5, **kw)
        want = [reference([ex[i] for i in idx], 5) for idx in batch_indices(ex, batch_size=8, **{
            k: v for k, v in kw.items() if k != "take"})][: kw.get("take")]  # fmt: skip
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.keys() == w.keys()
            for k in w:
                assert g[k].dtype == w[k].dtype and torch.equal(g[k], w[k]), k


def test_a_position_cap_cuts_batches_where_the_long_records_are():
    """``max_tokens``: each batch of the sorted records holds at most that many
    positions (records x its longest) and ``batch_size`` records, a longer
    record alone; every record once, longest first. The default cap
    (``position_budget``: ``batch_size`` records of the mean length) leaves
    records of one length in full batches and splits a long tail."""
    lens = [3] * 10 + [4, 5, 9, 40]
    ex = [{"input_ids": [1] * n, "labels": [1] * n} for n in lens]
    chunks = batch_indices(ex, batch_size=4, sort_by_length=True, max_tokens=16)
    assert [[lens[i] for i in c] for c in chunks] == [[40], [9], [5, 4, 3], [3] * 4, [3] * 4, [3]]
    assert sorted(i for c in chunks for i in c) == list(range(len(ex)))
    assert [len(c) for c in batch_indices(ex, batch_size=4, sort_by_length=True)] == [4, 4, 4, 2]
    assert position_budget(ex, 4) == -(-4 * sum(lens) // len(lens)) == 26
    same = [{"input_ids": [1] * 7, "labels": [1] * 7}] * 10
    assert [len(c) for c in batch_indices(same, batch_size=4, sort_by_length=True,
                                          max_tokens=position_budget(same, 4))] == [4, 4, 2]  # fmt: skip
    widths = [b["input_ids"].shape for b in make_batches(ex, batch_size=4, pad_id=0, sort_by_length=True,
                                                         max_tokens=position_budget(ex, 4))]  # fmt: skip
    assert widths == [(1, 40), (2, 9), (4, 4), (4, 3), (3, 3)]


def test_synthetic_spec():
    spec = parse_synthetic_spec("synthetic:arith?n=20&seed=3&overlap=0.5&with=units")
    assert spec == {"domain": "arith", "n": 20, "seed": 3, "overlap": 0.5, "overlap_with": "units"}
    recs = load_records("synthetic:arith?n=20&seed=3")
    assert len(recs) == 20 and recs == load_records("synthetic:arith?n=20&seed=3")
    assert load_records("synthetic:arith?n=20&seed=3", limit=5) == recs[:5]
    for bad, msg in [("synthetic:nope", "unknown synthetic domain"), ("synthetic:arith?n=x", "not a valid int"),
                     ("synthetic:arith?size=3", "unknown parameter"), ("synthetic:arith?overlap=0.5", "overlap_with")]:  # fmt: skip
        with pytest.raises(DataError, match=msg):
            load_records(bad)


@pytest.mark.parametrize(
    "spec", ["synthetic:arith?n=5&n=6", "synthetic:arith?overlap=0.5&with=units&overlap_with=dates"]
)
def test_synthetic_spec_parameter_given_twice(capsys, tmp_path, spec):
    """A parameter given twice was taken from its last occurrence, silently."""
    from .factories import one_line_error

    with pytest.raises(DataError, match="given twice"):
        parse_synthetic_spec(spec)
    one_line_error(
        capsys, ["base", "build", "--data", spec, "--out", "unused", "--quiet"], spec, "given twice"
    )


@pytest.mark.realdata
def test_real_data_files_load():
    for name, has_context in [("math", False), ("medicine", False), ("finance", True)]:
        recs = load_records(SHARED_DATA / f"{name}.jsonl", limit=200)
        assert len(recs) == 200 and all(r.question and r.answer for r in recs)
        assert any(r.context for r in recs) == has_context
    math_recs = load_records(SHARED_DATA / "math.jsonl", limit=20)
    assert all("####" in r.answer for r in math_recs)


def test_csv_keeps_line_breaks_inside_quoted_fields(tmp_path):
    p = tmp_path / "qa.csv"
    p.write_text('question,answer\n"line one\nline two","a\u2028b"\nq2,a2\n', newline="")
    recs = load_records(p)
    assert [(r.question, r.answer) for r in recs] == [("line one\nline two", "a\u2028b"), ("q2", "a2")]


def test_data_names_tell_every_item_apart(tmp_path):
    """Each item by its stem where that is its own; every item sharing one by the
    shortest tail of its path that tells them apart (a spec by itself, ``union``
    taken by the pooled row), a record list as ``set<i>``; the same file twice is
    numbered, not given a longer path."""
    from loramix.data import data_names

    x, y = tmp_path / "x" / "a.jsonl", tmp_path / "y" / "a.jsonl"
    assert data_names([x, tmp_path / "b.jsonl"]) == ["a", "b"]
    assert data_names([x, y, tmp_path / "a.csv"]) == ["x/a.jsonl", "y/a.jsonl", "a.csv"]
    assert data_names([str(x), tmp_path / "a.csv"]) == ["a.jsonl", "a.csv"]
    assert data_names(["synthetic:arith?n=8", "synthetic:arith?n=9", "synthetic:units"]) == [
        "synthetic:arith?n=8", "synthetic:arith?n=9", "units"]  # fmt: skip
    assert data_names([tmp_path / "union.jsonl", tmp_path / "set2.csv", [object()]]) == [
        "union.jsonl", "set2.csv", "set2"]  # fmt: skip
    assert data_names([x, x, y]) == ["x/a.jsonl", "x/a.jsonl (2)", "y/a.jsonl"]


@pytest.mark.parametrize(
    "name, content, field",
    [
        ("qa.jsonl", '{"prompt": "1+1", "completion": "2"}\n', "question"),
        ("qa.json", '[{"question": "1+1", "reply": "2"}]', "answer"),
        ("qa.csv", "prompt,answer\n1+1,2\n", "question"),
    ],
)
def test_a_missing_field_names_the_files_fields_and_where_to_name_yours(
    tmp_path, capsys, name, content, field
):
    """A data file with other field names (a common first mistake) said only
    ``missing field 'question'``: the refusal now lists the fields the record
    has and names the flag (or scenario key) that takes the file's own, where
    the caller has one. Failed before the fix."""
    from .test_scenario import GOOD

    path = tmp_path / name
    path.write_text(content)
    has = {"qa.jsonl": "prompt, completion", "qa.json": "question, reply", "qa.csv": "prompt, answer"}[name]
    with pytest.raises(DataError) as e:
        load_records(path)  # base build: no flag to name a field, so none is named
    assert e.value.message.endswith(f"missing field {field!r} (its fields: {has})"), e.value.message
    for cmd in (["eval"], ["train", "--out", str(tmp_path / "ad")]):
        assert main([*cmd, "--base", str(tmp_path / "nobase"), "--data", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"(its fields: {has}; --{field}-field names yours)" in err, err
    scen = tmp_path / "s.toml"
    scen.write_text(GOOD.replace('data = "synthetic:units"', f'data = "{name}"'))
    assert main(["scenario", "check", str(scen), "--cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert f"(its fields: {has}; domains.b.{field} names yours)" in err and err.count("\n") == 1, err


def test_a_named_context_field_that_no_record_holds_is_refused(tmp_path, capsys):
    """``--context-field contxt`` (a misspelt name) over records whose
    passages are under ``passage`` dropped every passage silently, and the
    perplexity moved: a context field named (not the default) that no
    record of the files holds is refused in one line naming the file and
    where the name was given. A record without a passage, the default name
    over files without passages, and the right name stay accepted. Failed
    before the fix (eval and train went on; the scenario checked)."""
    from .test_scenario import GOOD

    path = tmp_path / "qa.jsonl"
    path.write_text(
        '{"question": "q1", "answer": "a1", "passage": "p1"}\n{"question": "q2", "answer": "a2"}\n'
    )
    bare = tmp_path / "bare.jsonl"
    bare.write_text('{"question": "q1", "answer": "a1"}\n{"question": "q2", "answer": "a2"}\n')
    for cmd in (["eval"], ["train", "--out", str(tmp_path / "ad")]):
        base = ["--base", str(tmp_path / "nobase")]
        assert main([*cmd, *base, "--data", str(path), "--context-field", "contxt"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(path) in err, err
        assert "no record here holds a passage under 'contxt' (--context-field names it)" in err, err
        for ok in (["--context-field", "passage"], []):  # the data pass: the base is the next problem
            assert main([*cmd, *base, "--data", str(path), *ok]) == 2
            assert "nobase" in capsys.readouterr().err
        assert (
            main([*cmd, *base, "--data", str(bare), "--data", str(path), "--context-field", "passage"]) == 2
        )
        assert "nobase" in capsys.readouterr().err  # one of two files holds it: fine
    from loramix.data import check_context_field

    with pytest.raises(DataError, match="no record of .*bare.jsonl, .*bare.jsonl holds"):
        check_context_field([(bare, load_records(bare))] * 2, "passage", "--{}-field")
    scen = tmp_path / "s.toml"
    scen.write_text(GOOD.replace('data = "synthetic:units"', f'data = "{path}"\ncontext = "contxt"'))
    assert main(["scenario", "check", str(scen), "--cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert "under 'contxt' (domains.b.context names it)" in err and err.count("\n") == 1, err
