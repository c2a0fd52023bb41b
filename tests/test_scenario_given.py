"""A study of adapters trained elsewhere (``[domains.NAME] adapter = "PATH"``):
PEFT LoRA adapters trained with ``peft`` itself on a tiny base, studied
without training, checked against PEFT's own merge; and the refusals."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import pytest
import torch

from loramix.cli import main
from tests.factories import make_peft_adapter, one_line_error, save_base, tiny_gpt2, tiny_llama

DOMAINS = ("arith", "units", "dates")
TARGETS = ["c_attn", "c_proj", "c_fc"]


def _train_peft(base: Path, folder: Path, domain: str, seed: int) -> Path:
    """A PEFT LoRA trained by ``peft`` on ``domain``'s synthetic records (a few
    AdamW steps: its own domain's perplexity drops below the base's)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loramix.data import load_records

    tok = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=8, target_modules=TARGETS, fan_in_fan_out=True))
    texts = [f"{r.question} {r.answer}" for r in load_records(f"synthetic:{domain}?n=32&seed=7")]
    enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=48)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
    pm.train()
    for _ in range(12):
        opt.zero_grad()
        pm(**enc, labels=labels).loss.backward()
        opt.step()
    pm.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def given(tmp_path_factory):
    """A tiny base built by loramix and three PEFT adapters trained on it."""
    from loramix.basebuild import build_base

    root = tmp_path_factory.mktemp("given")
    base = root / "base"
    build_base(["synthetic:arith?n=64"], out=base, steps=2, device="cpu", progress=False)
    ads = {d: _train_peft(base, root / f"peft-{d}", d, i) for i, d in enumerate(DOMAINS)}
    return root, base, ads


def _scenario(folder: Path, base: Path, ads: dict, extra: str = "", name: str = "given") -> Path:
    text = f'name = "{name}"\n{extra}\n[base]\npath = "{base}"\n'
    for d in DOMAINS:
        text += f'\n[domains.{d}]\ndata = "synthetic:{d}"\neval = 8\n'
        if ads.get(d) is not None:
            text += f'adapter = "{ads[d]}"\n'
        else:
            text += "train = 8\n"
    text += '\n[merge]\nmethods = ["sum", "ties", "svd"]\nties = { density = 0.5 }\nsvd = { rank = 2 }\n\n[eval]\nbatch = 8\nmax_len = 48\n'
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


def _log(report: Path) -> list[dict]:
    with open(report / "cache_log.csv") as f:
        return list(csv.DictReader(f))


def _peft_sum_ppl(base: Path, paths: list[Path], records) -> float:
    """The perplexity loramix's evaluate gives the base with PEFT's own merge of
    ``paths`` (each merged into the weights in turn by ``merge_and_unload``)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loramix.perplexity import evaluate

    model = AutoModelForCausalLM.from_pretrained(base)
    for p in paths:
        model = PeftModel.from_pretrained(model, str(p)).merge_and_unload()
    df = evaluate((model.eval(), AutoTokenizer.from_pretrained(base)), data=[records], on="answer", max_len=48,
                  batch=8, device="cpu", progress=False)  # fmt: skip
    return float(df.iloc[0]["ppl"])


def test_a_study_of_given_peft_adapters(given, tmp_path, capsys):
    """No training; the report has the compose section; the naive sum's
    perplexity is PEFT's merge's; a rerun is all hits; new bytes in one
    adapter remake only what depends on it."""
    from loramix.scenario.config import load_scenario
    from loramix.scenario.plan import prepare_data
    from loramix.scenario.runner import run_scenario

    root, base, ads = given
    scen = _scenario(tmp_path, base, ads)
    assert main(["scenario", "check", str(scen), "--cache", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "3 given adapters (not trained" in out and "train" not in out.split("plan:")[1].split("\n")[0]
    report, cache = tmp_path / "report", tmp_path / "cache"
    rep = run_scenario(scen, out=report, cache_dir=cache, device="cpu", progress=False)
    assert rep["scenario"]["adapters"] == {"methods": ["lora"], "given": {d: str(p) for d, p in ads.items()}}
    md = (report / "report.md").read_text()
    assert "## Which adapters compose?" in md and "trained elsewhere" in md
    # the given base's parameter count, read from its headers (a built base's came from its build alone)
    from transformers import AutoModelForCausalLM

    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(base).parameters())
    assert rep["base"]["parameters"] == n and f"- Base model: `{base}`\n  — {n:,} parameters" in md
    assert "merged-data training" not in md and "Δppl % by merge method" not in md
    # the given step's row read 0.0 s, 0 made, 0 reused: its work is the scenario's loading
    assert "| given |" not in md and "The given adapters have no row: they are read and checked" in md
    assert "Modules in common" not in md  # the three adapt the same modules
    # nothing trained: no training seed is named (one adapter per domain)
    assert "first seed" not in md and "mean over seeds" not in md and "- Seed:" not in md
    assert (report / "composability.csv").is_file() and not (report / "fit.json").exists()
    assert {r["kind"] for r in _log(report)} == {"data", "eval", "merge"}  # no adapter made, none cached
    # a fresh cache: every step made (no empty training splits, one file for all domains, read as hits)
    assert {r["status"] for r in _log(report)} == {"miss"} and not any(
        r["label"].endswith("/train") for r in _log(report)
    )

    with open(report / "evaluations.csv") as f:
        rows = {(r["model"], r["domain"]): float(r["ppl"]) for r in csv.DictReader(f)}
    ev = prepare_data(load_scenario(scen))["arith"].eval
    want = _peft_sum_ppl(base, [ads["arith"], ads["units"]], ev)
    got = rows[("merge:sum:arith+units", "arith")]
    assert math.isclose(got, want, rel_tol=1e-5), (got, want)
    assert rows[("adapter:arith", "arith")] < rows[("base", "arith")]  # trained: the domain gained

    # the rerun from the command line: its closing lines give the verdicts, not an empty fit
    capsys.readouterr()
    assert (
        main(["scenario", "run", str(scen), "--out", str(report), "--cache", str(cache), "--device", "cpu"])
        == 0
    )
    out = capsys.readouterr().out
    verdicts = [r["verdict"] for r in rep["composability"]]
    assert f"  lora: {verdicts.count('composes')} compose, {verdicts.count('partly')} partly, " in out, out
    assert "delta_ppl% ~" not in out
    assert {r["status"] for r in _log(report)} == {"hit"}
    # no training split: the setup's domain table has no train columns
    assert "| domain | data | eval | eval tokens |" in (report / "report.md").read_text()

    # new bytes in one adapter's weights (its B doubled): only the steps that read it are made again
    from safetensors.torch import load_file, save_file

    wfile = ads["units"] / "adapter_model.safetensors"
    t = load_file(wfile)
    save_file({k: v * 2 if "lora_B" in k else v for k, v in t.items()}, wfile, metadata={"format": "pt"})
    run_scenario(scen, out=report, cache_dir=cache, device="cpu", progress=False)
    for r in _log(report):
        parts = r["label"].replace(" ", "/").replace("+", "/").split("/")
        reads = r["kind"] in ("eval", "merge") and "units" in parts
        assert (r["status"] == "miss") == reads, r


def test_given_adapters_with_predictors_and_plan(given, tmp_path):
    """``[predictors]`` (the retention target, calibrated on each domain's
    ``train`` records, not trained on) and ``[plan]`` on given adapters: the
    features, the leave-one-domain-out validation and the plan against random
    groupings all run, and the report has their sections; nothing is trained."""
    from loramix.scenario.runner import run_scenario

    root, base, ads = given
    ads = {**ads, "sort": _train_peft(base, tmp_path / "peft-sort", "sort", 3)}
    text = f'name = "given-plan"\n\n[base]\npath = "{base}"\n'
    for d, p in ads.items():
        text += f'\n[domains.{d}]\ndata = "synthetic:{d}"\ntrain = 8\neval = 8\nadapter = "{p}"\n'
    text += ('\n[merge]\nmethods = ["sum", "ties"]\nties = { density = 0.5 }\n\n[eval]\nbatch = 8\nmax_len = 48\n'
             '\n[predictors]\ntokens = 32\nmax_len = 32\ntarget = "retention"\n'
             '\n[plan]\nmax_size = 2\nbudget = 100\nrandom = 3\nmethods = ["sum"]\n')  # fmt: skip
    scen = tmp_path / "given-plan.toml"
    scen.write_text(text)
    report = tmp_path / "report"
    rep = run_scenario(scen, out=report, cache_dir=tmp_path / "cache", device="cpu", progress=False)
    kinds = {r["kind"] for r in _log(report)}
    assert "adapter" not in kinds and "features" in kinds, kinds  # the plan's merges: merge and eval steps
    md = (report / "report.md").read_text()
    assert "## Which adapters compose?" in md
    assert rep["validations"] and (report / "validation.csv").is_file()
    assert rep["plan_validation"]["by_method"], rep["plan_validation"]
    assert (
        report / "plan_validation.csv"
    ).is_file() and "## Does `loramix plan` beat random groupings?" in md


@pytest.mark.parametrize("target", ["worst", "delta_ppl"])
def test_given_adapters_take_the_worst_member_target_not_delta_ppl(given, tmp_path, capsys, target):
    """The worst member's loss, like retention, needs only the members' own
    adapters; Δppl % needs merged-data adapters, which given adapters lack."""
    root, base, ads = given
    text = f'name = "given-target"\n\n[base]\npath = "{base}"\n'
    for d, p in ads.items():
        text += f'\n[domains.{d}]\ndata = "synthetic:{d}"\ntrain = 8\neval = 8\nadapter = "{p}"\n'
    scen = tmp_path / "given-target.toml"
    scen.write_text(text + f'\n[predictors]\ntokens = 32\nmax_len = 32\ntarget = "{target}"\n')
    if target == "worst":
        assert main(["scenario", "check", str(scen)]) == 0
    else:
        one_line_error(capsys, ["scenario", "check", scen], "predictors.target", 'use "retention" or "worst"')


def test_the_records_an_adapter_was_trained_on_are_left_out_of_its_eval_split(given, tmp_path, capsys):
    """``domains.NAME.trained_on``: every record of ``data`` equal to one the
    adapter was trained on (white space runs as one space) is left out before
    the eval split is drawn; the check, report.json and the setup table count
    them; too few left is refused naming ``eval``; without ``adapter`` refused."""
    import json

    from loramix.data import load_records
    from loramix.scenario.config import load_scenario
    from loramix.scenario.plan import prepare_data
    from loramix.scenario.runner import run_scenario

    _, base, ads = given
    recs = [{"question": r.question, "answer": r.answer} for r in load_records("synthetic:arith?n=20&seed=3")]
    assert len({(r["question"], r["answer"]) for r in recs}) == 20
    (tmp_path / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    seen = [
        dict(r, question=r["question"].replace(" ", "  ") + " ") for r in recs[:5]
    ]  # re-wrapped white space
    (tmp_path / "seen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in seen))

    def scenario(eval_n: int, trained_on: bool = True, adapter: bool = True) -> Path:
        text = f'name = "left"\n\n[base]\npath = "{base}"\n'
        for d in DOMAINS:
            data = f"{tmp_path / 'all.jsonl'}" if d == "arith" else f"synthetic:{d}"
            text += f'\n[domains.{d}]\ndata = "{data}"\neval = {eval_n if d == "arith" else 8}\n'
            text += f'adapter = "{ads[d]}"\n' if adapter else "train = 8\n"
            if d == "arith" and trained_on:
                text += f'trained_on = "{tmp_path / "seen.jsonl"}"\n'
        path = tmp_path / "left.toml"
        path.write_text(text + "\n[eval]\nbatch = 8\nmax_len = 48\n")
        return path

    data = prepare_data(load_scenario(scenario(15)))["arith"]
    assert data.left_out == 5 and len(data.eval) == 15
    assert {r.question for r in data.eval} == {r["question"] for r in recs[5:]}
    assert main(["scenario", "check", str(scenario(15)), "--cache", str(tmp_path / "cache")]) == 0
    assert "(eval 15, 5 left out as trained on)" in capsys.readouterr().out
    rep = run_scenario(scenario(15), out=tmp_path / "report", cache_dir=tmp_path / "cache", device="cpu",
                       progress=False)  # fmt: skip
    assert rep["domains"]["arith"]["left_out"] == 5 and "left_out" not in rep["domains"]["units"]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| domain | data | eval | eval tokens | left out (trained on) |" in md
    line = one_line_error(capsys, ["scenario", "check", str(scenario(16))])
    assert "domains.arith.eval" in line and "15 records once the 5 it was trained on are left out" in line, (
        line
    )
    line = one_line_error(capsys, ["scenario", "check", str(scenario(8, adapter=False))])
    assert "domains.arith.trained_on" in line and "only with adapter" in line, line


def test_templated_copies_of_the_training_records_are_left_out_too(given, tmp_path, capsys):
    """``trained_on`` given a training file that templated its records (SmolLM2's
    chat template, lower case, ``Q: ... A: ...`` in one field): those records
    are left out too, found by n-gram overlap (loramix.contamination), and
    counted apart from the exact copies in the check, report.json and the
    setup table; the other records stay."""
    import json

    from loramix.data import load_records
    from loramix.scenario.config import load_scenario
    from loramix.scenario.plan import prepare_data
    from loramix.scenario.runner import run_scenario

    _, base, ads = given
    recs = load_records("synthetic:arith?n=24&seed=3")
    (tmp_path / "all.jsonl").write_text("".join(json.dumps({"question": r.question, "answer": r.answer}) + "\n"
                                                for r in recs))  # fmt: skip
    sys_turn = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    )
    seen = [{"question": f"{sys_turn}<|im_start|>user\n{r.question}<|im_end|>\n<|im_start|>assistant\n",
             "answer": f"{r.answer}<|im_end|>\n"} for r in recs[:3]]  # fmt: skip
    seen += [{"question": r.question.lower(), "answer": r.answer.lower().rstrip(".")} for r in recs[3:6]]
    seen += [{"question": "Solve it.", "answer": f"Q: {r.question}\nA: {r.answer}"} for r in recs[6:8]]
    seen += [{"question": recs[8].question, "answer": recs[8].answer}]  # an exact copy
    (tmp_path / "seen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in seen))
    text = f'name = "templated"\n\n[base]\npath = "{base}"\n'
    for d in DOMAINS:
        data = f"{tmp_path / 'all.jsonl'}" if d == "arith" else f"synthetic:{d}"
        text += (
            f'\n[domains.{d}]\ndata = "{data}"\neval = {15 if d == "arith" else 8}\nadapter = "{ads[d]}"\n'
        )
        if d == "arith":
            text += f'trained_on = "{tmp_path / "seen.jsonl"}"\n'
    scen = tmp_path / "templated.toml"
    scen.write_text(text + "\n[eval]\nbatch = 8\nmax_len = 48\n")

    data = prepare_data(load_scenario(scen))["arith"]
    assert (data.left_out, len(data.eval)) == (9, 15) and data.left_out_ngram == 8
    assert [r.question for r in data.eval] == [r.question for r in recs[9:]]
    assert main(["scenario", "check", str(scen), "--cache", str(tmp_path / "cache")]) == 0
    assert "(eval 15, 9 left out as trained on (8 near copies by 13-grams))" in capsys.readouterr().out
    rep = run_scenario(
        scen, out=tmp_path / "report", cache_dir=tmp_path / "cache", device="cpu", progress=False
    )
    arith = rep["domains"]["arith"]
    assert (arith["left_out"], arith["left_out_ngram"], arith["trained_on_ngram"]) == (9, 8, 13)
    assert "| 9 (8 near copies by 13-grams) |" in (tmp_path / "report" / "report.md").read_text()


def test_the_contamination_checks_n_is_a_key(tmp_path, capsys):
    """``domains.NAME.trained_on_ngram``: the check's n was fixed at 13
    (loramix.contamination.N). Another n changes what is left out (4: 18 of
    these 24 synthetic records, which share their templates' 4-grams, against
    the 3 lower-cased copies at 13); 13 given is the default's records and
    splits (so its cache keys); the n is in ``scenario check``'s line. Not a
    positive integer, or without ``trained_on``: one line naming the key, exit 2."""
    import json

    from loramix.data import load_records
    from loramix.scenario.config import load_scenario
    from loramix.scenario.plan import prepare_data

    recs = load_records("synthetic:arith?n=24&seed=3")
    (tmp_path / "all.jsonl").write_text("".join(json.dumps({"question": r.question, "answer": r.answer}) + "\n"
                                                for r in recs))  # fmt: skip
    seen = [{"question": r.question.lower(), "answer": r.answer.lower().rstrip(".")} for r in recs[:3]]
    (tmp_path / "seen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in seen))
    base = save_base(tiny_gpt2(), tmp_path / "base")
    ads = {d: make_peft_adapter(tiny_gpt2(), tmp_path / d, r=2, lora_alpha=4, seed=i)
           for i, d in enumerate(("arith", "units"))}  # fmt: skip

    def scenario(extra: str, trained_on: bool = True) -> Path:
        text = f'name = "ngram"\n\n[base]\npath = "{base}"\n'
        for d in ("arith", "units"):
            data = f"{tmp_path / 'all.jsonl'}" if d == "arith" else "synthetic:units"
            text += f'\n[domains.{d}]\ndata = "{data}"\neval = 4\nadapter = "{ads[d]}"\n'
            if d == "arith":
                text += (f'trained_on = "{tmp_path / "seen.jsonl"}"\n' if trained_on else "") + extra
        path = tmp_path / "ngram.toml"
        path.write_text(text + "\n[eval]\nbatch = 8\nmax_len = 48\n")
        return path

    default = prepare_data(load_scenario(scenario("")))["arith"]
    assert (default.left_out, default.ngram) == (3, 13)
    same = prepare_data(load_scenario(scenario("trained_on_ngram = 13\n")))["arith"]
    assert (same.left_out, same.ngram, same.sha256_eval) == (3, 13, default.sha256_eval)
    four = prepare_data(load_scenario(scenario("trained_on_ngram = 4\n")))["arith"]
    assert (four.ngram, four.left_out, four.left_out_ngram) == (4, 18, 18)
    assert (
        main(["scenario", "check", str(scenario("trained_on_ngram = 4\n")), "--cache", str(tmp_path / "c")])
        == 0
    )
    assert "left out as trained on (18 near copies by 4-grams)" in capsys.readouterr().out
    for bad in ("0", "-2", "2.5", "true", '"8"'):
        line = one_line_error(capsys, ["scenario", "check", str(scenario(f"trained_on_ngram = {bad}\n"))])
        assert "domains.arith.trained_on_ngram" in line, (bad, line)
    line = one_line_error(
        capsys, ["scenario", "check", str(scenario("trained_on_ngram = 8\n", trained_on=False))]
    )
    assert "domains.arith.trained_on_ngram" in line and "only with trained_on" in line, line


def test_given_adapters_that_only_the_torch_readers_read_are_checked_too(tmp_path, capsys):
    """Adapters on ``lm_head`` (PEFT saves the head's base copy beside the
    factors, which only the torch readers read) are read, checked against
    the base and studied under their kind's label like the others."""
    from loramix.scenario.config import load_scenario

    model = tiny_llama()
    base = save_base(model, tmp_path / "base")
    ads = {d: make_peft_adapter(model, tmp_path / d, target_modules=["q_proj", "lm_head"], r=2, seed=i)
           for i, d in enumerate(DOMAINS[:2])}  # fmt: skip
    text = f'name = "head"\n\n[base]\npath = "{base}"\n'
    for d, p in ads.items():
        text += f'\n[domains.{d}]\ndata = "synthetic:{d}"\neval = 4\nadapter = "{p}"\n'
    (tmp_path / "head.toml").write_text(text)
    sc = load_scenario(tmp_path / "head.toml")
    assert sc.adapters.methods == ("lora",), sc.adapters.methods
    assert main(["scenario", "check", str(tmp_path / "head.toml"), "--cache", str(tmp_path / "cache")]) == 0
    assert "lora: 2 given adapters" in capsys.readouterr().out


def test_a_study_of_given_dora_adapters(given, tmp_path):
    """Two PEFT DoRA adapters (``use_dora``) given: the study's label is
    ``dora``, its similarity compares the effective deltas (DoRA's depends on
    the base), and the sum is measured and judged. Random, untrained, they
    beat the base on neither domain: "no gain to keep", whose figures
    report.json writes as null, and the report's section then raised
    TypeError (np.isfinite(None)) instead of rendering."""
    from transformers import AutoModelForCausalLM

    from loramix.scenario.runner import run_scenario

    _, base, _ = given
    model = AutoModelForCausalLM.from_pretrained(base)
    ads = {d: make_peft_adapter(model, tmp_path / d, target_modules=TARGETS, r=2, use_dora=True,
                                fan_in_fan_out=True, seed=i)
           for i, d in enumerate(DOMAINS[:2])}  # fmt: skip
    text = f'name = "dora"\n\n[base]\npath = "{base}"\n'
    for d, p in ads.items():
        text += f'\n[domains.{d}]\ndata = "synthetic:{d}"\neval = 4\nadapter = "{p}"\n'
    (tmp_path / "dora.toml").write_text(text + "\n[eval]\nbatch = 4\nmax_len = 48\n")
    rep = run_scenario(tmp_path / "dora.toml", out=tmp_path / "report", cache_dir=tmp_path / "cache", device="cpu",
                       progress=False)  # fmt: skip
    assert rep["scenario"]["adapters"]["methods"] == ["dora"]
    row = next(r for r in rep["results"] if r["merge_method"] == "sum")
    assert row["composition"] == "arith+units" and math.isfinite(row["ppl_merge"])
    assert row["rms_cosine_effective"] is not None and math.isfinite(row["rms_cosine_effective"])
    assert [r["verdict"] for r in rep["composability"]] == ["no gain to keep"]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Which adapters compose?" in md and "no gain to keep" in md


def _check_args(tmp_path: Path, base: Path, ads: dict, over: dict | None = None, extra: str = "") -> list:
    return ["scenario", "check", _scenario(tmp_path, base, {**ads, **(over or {})}, extra)]


def test_given_adapters_refused_in_one_line(given, tmp_path, capsys):
    """Each problem: exit 2, one line naming the key and the adapter's file."""
    _, base, ads = given
    scen = tmp_path / "given.toml"
    dora = make_peft_adapter(_load(base), tmp_path / "dora", use_dora=True, r=2, target_modules=TARGETS)
    narrow = make_peft_adapter(tiny_gpt2(n_embd=32), tmp_path / "narrow", r=2)
    llama = make_peft_adapter(tiny_llama(), tmp_path / "llama", r=2)
    run = tmp_path / "run"  # a Trainer's output_dir: an adapter per checkpoint-N, none at its top
    for step in (5, 10):
        shutil.copytree(ads["units"], run / f"checkpoint-{step}")
    capsys.readouterr()  # transformers' loading bars
    cases = [
        ({"over": {"dates": None}}, "domains.dates.adapter", "every domain its adapter or none"),
        ({"over": {"units": dora}}, "domains.units.adapter", f"{dora} is a dora adapter"),
        ({"over": {"units": narrow}}, "domains.units.adapter", f"{narrow} does not fit the base"),
        ({"over": {"units": llama}}, "domains.units.adapter", f"{llama} does not fit the base"),
        ({"over": {"units": tmp_path / "nowhere"}}, "domains.units.adapter", "no such adapter folder"),
        ({"over": {"units": run}}, "domains.units.adapter", f"e.g. the last, {run / 'checkpoint-10'}"),
        ({"extra": "seeds = [0, 1]"}, "seeds", "one seed"),
        ({"extra": 'merged_data = "all"'}, "merged_data", "unknown"),
    ]
    for kw, key, needle in cases:
        one_line_error(capsys, _check_args(tmp_path, base, ads, **kw), f"{scen}: {key}", needle)
    # an adapter folder given as the base: said so
    one_line_error(capsys, ["scenario", "check", str(_scenario(tmp_path, ads["arith"], ads))],
                   f"{scen}: base.path", "it holds an adapter (adapter_config.json), not its base")  # fmt: skip
    # a held-out file smaller than eval: the key written (eval), not train, which a given study has none of
    small = tmp_path / "dates.jsonl"
    small.write_text("".join(f'{{"question": "q{i}", "answer": "a{i}"}}\n' for i in range(3)))
    scen = _scenario(tmp_path, base, ads)
    scen.write_text(scen.read_text().replace('data = "synthetic:dates"', f'data = "{small}"'))
    one_line_error(capsys, ["scenario", "check", str(scen)], f"{scen}: domains.dates.eval",
                   f"{small} has 3 records, fewer than eval=8")  # fmt: skip


def _load(base: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base)


def test_given_adapters_are_checked_without_torch(given, tmp_path):
    """Reading and checking the given adapters against the base, and the plan
    (their files hashed), read headers only: ``scenario check`` imports no torch."""
    import subprocess
    import sys

    _, base, ads = given
    scen = _scenario(tmp_path, base, ads)
    code = (f"import sys\nfrom loramix.scenario.config import load_scenario\nfrom loramix.scenario.plan import plan\n"
            f"plan(load_scenario({str(scen)!r}, import_gguf=False), import_gguf=False)\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'imported'\n")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_adapter_trained_on_another_base_is_noticed(given, tmp_path, capsys):
    """An adapter whose loramix provenance names another base (same shapes)
    is studied, with one warning line; the PEFT adapters (no provenance) and
    one trained by loramix on this base give none."""
    from loramix.basebuild import build_base
    from loramix.train import train_adapter

    _, base, ads = given
    other = build_base(["synthetic:units?n=64"], out=tmp_path / "other", steps=1, seed=1, device="cpu",
                       progress=False)["out"]  # fmt: skip
    kw = dict(rank=2, steps=1, batch=4, max_len=32, eval_size=0, device="cpu", progress=False)
    here = train_adapter(base, "synthetic:dates?n=8", out=tmp_path / "here", **kw)["out"]
    there = train_adapter(other, "synthetic:dates?n=8", out=tmp_path / "there", **kw)["out"]
    capsys.readouterr()
    for adapter, warned in ((here, False), (there, True)):
        scen = _scenario(tmp_path, base, {**ads, "dates": adapter})
        assert main(["scenario", "check", str(scen), "--cache", str(tmp_path / "cache")]) == 0
        err = capsys.readouterr().err
        line = f"loramix: warning: {scen}: domains.dates.adapter: {adapter} was trained on another base"
        assert (line in err) == warned and err.count("loramix: warning:") == warned, err
    # the run says it once too: its adapter-space merges (sum, svd) of the dates adapter with the PEFT
    # ones (on base) do not warn again per merge against their first adapter's base
    args = [
        "scenario",
        "run",
        scen,
        "--out",
        tmp_path / "report",
        "--cache",
        tmp_path / "cache",
        "--jobs",
        "1",
    ]
    assert main([str(a) for a in args]) == 0
    err = capsys.readouterr().err
    assert err.count("trained on another base") == 1 and line in err, err


def test_a_loramix_json_without_provenance_is_no_base_to_compare(given, tmp_path, capsys):
    """A ``loramix.json`` beside a PEFT adapter that records no ``inputs``
    (another tool's, or hand-written) names no base: the study goes on without
    a warning (it raised TypeError iterating None)."""
    import shutil

    _, base, ads = given
    name = next(iter(ads))
    copy = shutil.copytree(ads[name], tmp_path / "copy")
    for text in ('{"note": "mine"}', '{"inputs": null}', "[1, 2]"):
        (copy / "loramix.json").write_text(text)
        scen = _scenario(tmp_path, base, {**ads, name: copy})
        assert main(["scenario", "check", str(scen), "--cache", str(tmp_path / "cache")]) == 0
        assert "warning" not in capsys.readouterr().err


def test_adapters_on_other_modules_are_noted_by_the_similarity(given, tmp_path):
    """An adapter that adapts other modules than the rest (another PEFT
    ``target_modules``): its pairs' cosines are over the modules in common,
    which the similarity section says, naming the pairs and their coverage.
    It said nothing (a cosine over a quarter of the modules read as any other)."""
    from loramix.scenario.runner import run_scenario

    _, base, ads = given
    attn = make_peft_adapter(_load(base), tmp_path / "attn", r=2, target_modules=["c_attn"])
    report = tmp_path / "report"
    rep = run_scenario(_scenario(tmp_path, base, {**ads, "dates": attn}), out=report, cache_dir=tmp_path / "cache",
                       device="cpu", progress=False)  # fmt: skip
    cov = rep["similarity"][0]["coverage"]
    line = next(
        x for x in (report / "report.md").read_text().splitlines() if x.startswith("Modules in common")
    )
    assert f"arith+dates {cov[0][2]:.2f}, units+dates {cov[1][2]:.2f}." in line and "arith+units" not in line
    assert 0 < cov[0][2] < 1 and cov[0][1] == 1
