"""The study as a plan, and executors: a DAG whose keys are the cache's, and
serial, process and Ray runs that give byte-identical results."""

from __future__ import annotations

import csv
import json
import multiprocessing as mp
import time
from pathlib import Path

import pytest

from loramix.cli import main
from loramix.errors import UsageError
from loramix.scenario.cache import Cache, make_key
from loramix.scenario.config import load_scenario
from loramix.scenario.executors import make_executor, threads_per_job
from loramix.scenario.plan import plan

from .test_scenario import CI_SCENARIO

# The end-to-end study of test_scenario with one seed: two adapter kinds (so the
# effective-delta similarity and kind-specific merges are planned) and every
# kind of merge step (on the fly, low-rank, dense).
TINY = CI_SCENARIO.replace("seeds = [0, 1]", "seeds = [0]").replace('name = "ci"', 'name = "plan-ci"')

# Files whose every byte is a number of the study (report.md and report.json
# also hold timings and dates).
RESULT_FILES = [
    "results.csv",
    "evaluations.csv",
    "similarity_per_module.csv",
    "composability.csv",
    "fit.json",
]


def _run(root: Path, name: str, *extra: str) -> Path:
    out, cache = root / name / "out", root / name / "cache"
    scen = root / "tiny.toml"
    rc = main(["scenario", "run", str(scen), "--out", str(out), "--cache", str(cache), "--quiet", *extra])
    assert rc == 0
    return out


def _numbers(out: Path) -> dict[str, bytes]:
    files = {f: (out / f).read_bytes() for f in RESULT_FILES if f != "fit.json"}
    import json

    fit = json.loads((out / "fit.json").read_text())
    files["fit.json"] = json.dumps(fit["fits"], sort_keys=True).encode()  # without its creation date
    return files


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    (root / "tiny.toml").write_text(TINY)
    return root, _run(root, "serial")


def test_plan_is_a_dag_whose_keys_the_run_used(serial):
    root, out = serial
    sc = load_scenario(root / "tiny.toml")
    steps = plan(sc)
    ids = [st.id for st in steps]
    assert len(set(ids)) == len(ids)
    seen = set()
    for st in steps:
        assert set(st.deps) <= seen, (st.id, set(st.deps) - seen)  # dependencies come first
        seen.add(st.id)
        if st.cache_kind:
            assert st.key == make_key(st.cache_kind, st.spec)
    # Every planned artifact is a lookup of the run, in plan order, and nothing else is.
    log = list(csv.DictReader(open(out / "cache_log.csv")))
    assert [(e["kind"], e["key"]) for e in log] == [(st.cache_kind, st.key) for st in steps if st.cache_kind]
    assert all(e["status"] == "miss" for e in log)
    # An adapter's spec names its base and its data split by their cache folders.
    by_id = {st.id: st for st in steps}
    ad = by_id["adapter/lora/0/arith"]
    assert ad.spec["base"] == by_id["base"].key[:24]
    assert ad.spec["data"] == [by_id["data/arith/train"].key[:24]]
    assert {"base", "data/arith/train"} == set(ad.deps)
    kinds = {st.kind for st in steps}
    assert kinds == {"data", "base", "adapter", "merged-data", "similarity", "eval", "merge"}
    # svd is planned for LoRA only, d2-signed for D2-LoRA only; the sum is never written.
    assert "merge/lora/0/svd/arith+units" in by_id and "merge/d2lora/0/svd/arith+units" not in by_id
    assert (
        "merge/d2lora/0/d2-signed/arith+units" in by_id and "merge/lora/0/d2-signed/arith+units" not in by_id
    )
    assert not [i for i in ids if i.startswith("merge/") and "/sum/" in i]


def test_jobs_2_is_byte_identical_to_serial(serial):
    root, out = serial
    par = _run(root, "jobs2", "--jobs", "2")
    assert _numbers(par) == _numbers(out)
    log = list(csv.DictReader(open(par / "cache_log.csv")))
    ref = list(csv.DictReader(open(out / "cache_log.csv")))
    assert [(e["kind"], e["key"], e["status"]) for e in log] == [
        (e["kind"], e["key"], e["status"]) for e in ref
    ]
    assert not [p for p in (root / "jobs2" / "cache").rglob("*") if ".tmp-" in p.name]
    # the timing table's rows in plan order whichever group finished first
    by_kind = [list(json.loads((o / "report.json").read_text())["timings"]["by_kind"]) for o in (par, out)]
    assert by_kind[0] == by_kind[1], by_kind


def test_a_d2lora_rerun_reads_the_effective_similarity_back_without_torch(serial):
    """The effective deltas' cosine of a D2-LoRA study takes the base's
    weights in torch: it is a cache entry (``similarity``) now, so a rerun of
    the finished study imports no torch (it loaded torch, transformers and
    the base every time) and writes the same numbers."""
    from .test_startup import imported_modules

    root, out = serial
    again = root / "serial" / "again"
    rc, mods, err = imported_modules("scenario", "run", str(root / "tiny.toml"), "--out", str(again), "--cache",
                                     str(root / "serial" / "cache"), "--quiet", cwd=root)  # fmt: skip
    assert rc == 0, err
    assert not {"torch", "transformers"} & mods
    assert _numbers(again) == _numbers(out)
    assert (
        json.loads((again / "report.json").read_text())["similarity"]
        == json.loads((out / "report.json").read_text())["similarity"]
    )
    log = list(csv.DictReader(open(again / "cache_log.csv")))
    assert ("similarity", "hit") in {(e["kind"], e["status"]) for e in log}


def test_ray_is_byte_identical_to_serial(serial):
    pytest.importorskip("ray", reason="ray is not installed (pip install 'loramix[ray]')")
    root, out = serial
    par = _run(root, "ray", "--executor", "ray", "--jobs", "2")
    assert _numbers(par) == _numbers(out)


def test_executor_options_are_checked(serial, capsys):
    root, _ = serial
    for args, flag in [
        (["--jobs", "0"], "--jobs"),
        (["--executor", "serial", "--jobs", "2"], "--jobs"),
        (["--address", "10.0.0.1:6379"], "--address"),
    ]:
        rc = main(["scenario", "run", str(root / "tiny.toml"), "--out", str(root / "x"), "--quiet", *args])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and flag in err, err
    assert not (root / "x").exists()
    assert threads_per_job(1, 2) == 1 and threads_per_job(8, 2) == 4 and threads_per_job(3, 2) == 1


def test_ray_missing_is_one_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without ray gives
    with pytest.raises(UsageError, match=r"loramix\[ray\]"):
        make_executor("ray")


def _make_slowly(root: str, spec: dict, marker: str) -> str:
    def make(tmp):
        (tmp / "value.txt").write_text(marker)
        time.sleep(0.5)  # both processes are inside make() at once

    c = Cache(Path(root))
    return str(c.get_or_make("thing", spec, make, label=marker))


def test_two_processes_making_one_key(tmp_path):
    """Both finish; one artifact is in place, complete, and never replaced."""
    ctx = mp.get_context("spawn")
    spec = {"x": 1}
    with ctx.Pool(2) as pool:
        paths = pool.starmap(_make_slowly, [(str(tmp_path), spec, "a"), (str(tmp_path), spec, "b")])
    assert paths[0] == paths[1]
    folder = Path(paths[0])
    assert (folder / "value.txt").read_text() in ("a", "b")
    assert Cache(tmp_path).record("thing", folder)["label"] == (folder / "value.txt").read_text()
    assert [p.name for p in (tmp_path / "thing").iterdir()] == [folder.name]  # no tmp or old copy left


def test_docs_key_table_is_the_schema():
    from loramix.scenario.config import schema_markdown

    doc = (Path(__file__).resolve().parents[1] / "docs" / "scenarios.md").read_text()
    table = doc.split("<!-- schema:start -->\n")[1].split("\n<!-- schema:end -->")[0]
    assert table == schema_markdown()


def test_check_prints_the_plan(serial, capsys):
    root, _ = serial
    assert main(["scenario", "check", str(root / "tiny.toml")]) == 0
    out = capsys.readouterr().out
    steps = plan(load_scenario(root / "tiny.toml"))
    assert f"plan: {len(steps)} steps (" in out
    assert f"{sum(st.kind == 'adapter' for st in steps)} adapter" in out


def test_a_merged_data_adapter_on_the_top_layers_keys_the_prefix_rule(tmp_path):
    """With ``adapters.top_layers`` a merged-data adapter's prefix states are
    now its domains' own, batched per domain (loramix.train.PREFIX_PARTS),
    which changes its bits: its key names the rule, so one cached when the
    union was batched as a whole is trained again, not served as this one.
    A domain adapter's key, and any key of a study without top_layers, is
    as it was (their bits are)."""
    from loramix.train import PREFIX_PARTS

    def specs(text):
        (tmp_path / "s.toml").write_text(text)
        steps = plan(load_scenario(tmp_path / "s.toml"))
        return {k: [st.spec for st in steps if st.kind == k] for k in ("adapter", "merged-data")}

    top = specs(TINY.replace("[adapters]\n", "[adapters]\ntop_layers = 1\n"))
    assert top["merged-data"] and all(s["prefix_parts"] == PREFIX_PARTS for s in top["merged-data"])
    assert top["adapter"] and not any("prefix_parts" in s for s in top["adapter"])
    full = specs(TINY)
    assert full["merged-data"] and not any("prefix_parts" in s for a in full.values() for s in a)


def test_a_merged_data_adapter_on_the_top_layers_waits_for_its_domains(tmp_path):
    """With ``adapters.top_layers`` a union trains on its domains' cached
    prefix states, so its step waits for its domains' adapters (their
    training caches them): under ``--jobs > 1`` it started beside them and
    computed their states again. Waiting changes no key. Without top_layers
    there is nothing to share, and it waits for nothing more than its data."""

    def merged(text):
        (tmp_path / "s.toml").write_text(text)
        steps = plan(load_scenario(tmp_path / "s.toml"))
        return [st for st in steps if st.kind == "merged-data"]

    top = merged(TINY.replace("[adapters]\n", "[adapters]\ntop_layers = 1\n"))
    assert top
    for st in top:
        pre = "/".join(st.id.split("/")[1:3])
        own = {f"adapter/{pre}/{d}" for d in st.args["domains"]}
        assert own <= set(st.deps) and not {d for d in st.deps if d.startswith("adapter/")} - own, st.deps
    full = merged(TINY)
    assert full and not any(d.startswith("adapter/") for st in full for d in st.deps)
