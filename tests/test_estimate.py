"""Run-time estimates: throughput recorded by `scenario run`, priced by `scenario check` (issue 14)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from loramix.cli import main
from loramix.scenario.config import load_scenario
from loramix.scenario.estimate import _wall, add_rates, duration, estimate, load_rates, machine
from loramix.scenario.plan import Step, plan
from tests.test_scenario import CI_SCENARIO, _write
from tests.test_study import STUDY

# Two synthetic domains, a tiny base built in 4 steps, one seed: 14 steps
# (4 data, the base, 2 adapters, 1 merged-data, the similarity, 5 evaluations).
EST = """
name = "est"
seeds = [0]

[base.build]
size = "tiny"
steps = 4

[domains.arith]
data = "synthetic:arith"
train = 16
eval = 4

[domains.units]
data = "synthetic:units"
train = 16
eval = 4

[adapters]
rank = 2
alpha = 8
steps = 2
lr = 5e-3
batch = 4
max_len = 32
"""
TIES = '[merge]\nmethods = ["sum", "ties"]\nties = { density = 0.5 }\n'


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    d = tmp_path_factory.mktemp("estimate")
    scen, cache = _write(d, EST, "est.toml"), d / "cache"
    assert (
        main(["scenario", "run", str(scen), "--out", str(d / "out"), "--cache", str(cache), "--quiet"]) == 0
    )
    return {
        "dir": d,
        "scen": scen,
        "cache": cache,
        "file": cache / "throughput" / f"{machine('auto')['id']}.json",
    }


def _rates(measured) -> list[dict]:
    return json.loads(measured["file"].read_text())["rates"]


def _one(rates, **key) -> dict:
    (e,) = [e for e in rates if all(e["key"].get(k) == v for k, v in key.items())]
    return e


def _check(capsys, scen, cache, *args) -> str:
    capsys.readouterr()
    assert main(["scenario", "check", str(scen), "--cache", str(cache), *args]) == 0
    return capsys.readouterr().out


def test_a_run_records_the_steps_it_made(measured):
    assert [p.name for p in measured["file"].parent.iterdir()] == [measured["file"].name]  # no temporary left
    rates = _rates(measured)
    steps = Counter()
    for e in rates:
        assert e["units"] > 0 and e["seconds"] > 0 and e["key"]["threads"] == 1
        steps[e["key"]["kind"]] += e["steps"]
    assert steps == {"data": 4, "base": 1, "train": 3, "eval": 5, "similarity": 1}
    # 3 adapters x 2 steps x batch 4 example passes; the base 4 steps x batch 16
    assert _one(rates, kind="train")["units"] == 3 * 2 * 4
    assert _one(rates, kind="base")["units"] == 4 * 16
    # eval records: the base, the 2 adapters and the merged-data one (n=1 adapter), the sum (2), on both domains
    assert _one(rates, kind="eval", form="base")["units"] == 8
    assert _one(rates, kind="eval", form="adapters", adapters=1)["units"] == 3 * 8
    assert _one(rates, kind="eval", form="adapters", adapters=2)["units"] == 8


def test_check_after_the_run_has_nothing_to_make(measured, capsys):
    out = _check(capsys, measured["scen"], measured["cache"])
    assert "  plan: 14 steps" in out  # the earlier lines stay
    line = next(x for x in out.splitlines() if x.startswith("  estimate"))
    assert "for 0 steps to make (13 cached, plus 1 similarity step run every time)" in line
    assert f"measured on this machine ({machine('auto')['id']}: " in line and "no measurement" not in line
    # --fresh: every step to make; an empty cache: nothing measured
    assert "14 steps to make" not in out
    assert "13 steps to make (0 cached" in _check(capsys, measured["scen"], measured["cache"], "--fresh")
    out = _check(capsys, measured["scen"], measured["dir"] / "empty")
    assert "estimate: none yet, no measurement on this machine" in out and "4 data, 1 base, 5 eval" in out


def test_estimate_of_a_changed_scenario_is_units_over_the_recorded_rates(measured, tmp_path, capsys):
    """A second seed and a dense merge: the new seed's steps priced by the
    rates in the file, the two ties merges reported as unmeasured."""
    scen = _write(tmp_path, EST.replace("seeds = [0]", "seeds = [0, 1]") + TIES)
    rates = _rates(measured)

    def per_unit(**key):
        e = _one(rates, **key)
        return e["seconds"] / e["units"]

    # seed 1: 3 adapters of 2 x 4 example passes; evaluations on both domains (8 records): its 2 adapters and
    # merged-data adapter alone, and the sum of its 2 adapters; the similarity of 2 adapters for both seeds.
    expected = (3 * 8 * per_unit(kind="train") + 3 * 8 * per_unit(kind="eval", adapters=1)
                + 8 * per_unit(kind="eval", adapters=2) + 2 * 2 * per_unit(kind="similarity"))  # fmt: skip
    sc = load_scenario(scen)
    est = estimate(sc, plan(sc), measured["cache"], device="auto")
    assert est.seconds == pytest.approx(expected, rel=1e-9) and est.wall == pytest.approx(expected, rel=1e-9)
    assert (est.to_make, est.cached, est.rerun) == (3 + 4 + 2, 13, {"similarity": 2})
    assert est.unmeasured == {"merge": 2} and not est.coarse
    assert sum(s for s in est.per_step.values() if s is not None) == pytest.approx(expected, rel=1e-9)
    out = _check(capsys, scen, measured["cache"])
    assert (
        f"estimate (rough): ~{duration(expected)} for 9 steps to make (13 cached, plus 2 similarity steps run every time)"
        in out
    )
    assert "; 2 steps with no measurement yet, not counted (2 merge)" in out

    # Two jobs: never more than the sum, never less than half of it.
    est2 = estimate(sc, plan(sc), measured["cache"], device="auto", jobs=2)
    assert expected / 2 <= est2.wall <= expected + 1e-9 and est2.seconds == pytest.approx(expected)
    assert "with 2 jobs" in _check(capsys, scen, measured["cache"], "--jobs", "2")


def test_other_settings_fall_back_to_the_kind_scaled_by_max_len(measured, tmp_path, capsys):
    """A longer max_len changes every adapter and evaluation key: priced from
    the pooled rate of their kind on the same base size, times units x max_len."""
    scen = _write(tmp_path, EST.replace("max_len = 32", "max_len = 40"))
    rates = _rates(measured)

    def pooled(kind):
        es = [e for e in rates if e["key"]["kind"] == kind]
        return sum(e["seconds"] for e in es) / sum(e["units"] * e["key"]["max_len"] for e in es)

    sim = _one(rates, kind="similarity")
    expected = 3 * 8 * 40 * pooled("train") + 5 * 8 * 40 * pooled("eval") + 2 * sim["seconds"] / sim["units"]
    sc = load_scenario(scen)
    est = estimate(sc, plan(sc), measured["cache"], device="auto")
    assert est.seconds == pytest.approx(expected, rel=1e-9)
    assert est.coarse == {"adapter": 2, "merged-data": 1, "eval": 5} and not est.unmeasured
    assert "8 steps (5 eval, 2 adapter, 1 merged-data) priced from other settings" in _check(
        capsys, scen, measured["cache"]
    )


def test_a_corrupt_throughput_file_breaks_neither_check_nor_run(measured, tmp_path, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(measured["cache"], cache)
    f = cache / "throughput" / measured["file"].name
    for junk in ["{not json", "[1, 2]", json.dumps({"format": 1, "rates": [{"key": 3, "units": "x"}]})]:
        f.write_text(junk)
        out = _check(capsys, measured["scen"], cache)  # ignored: the rerun similarity is priced from nothing
        assert "estimate: none yet, no measurement on this machine" in out and ": 1 similarity;" in out
        out = _check(capsys, _write(tmp_path, EST.replace("seeds = [0]", "seeds = [1]")), cache)
        assert "estimate: none yet, no measurement on this machine" in out
    out = tmp_path / "out"
    assert (
        main(["scenario", "run", str(measured["scen"]), "--out", str(out), "--cache", str(cache), "--quiet"])
        == 0
    )
    (e,) = load_rates(f).values()  # rewritten: the similarity, the one step the rerun made
    assert e["key"]["kind"] == "similarity" and e["steps"] == 1


def test_updates_are_atomic_and_history_weighs_at_most_50_steps(tmp_path):
    f = tmp_path / "t" / "m.json"
    k = {"kind": "data", "threads": 1}
    add_rates(
        f, {"id": "m"}, {"a": {"key": k, "units": 100.0, "seconds": 1.0, "n": 100, "steps": 100, "scale": 1}}
    )
    add_rates(
        f, {"id": "m"}, {"a": {"key": k, "units": 10.0, "seconds": 1.0, "n": 1, "steps": 1, "scale": 1}}
    )
    (e,) = load_rates(f).values()
    assert e["steps"] == 101 and e["n"] == pytest.approx(51) and e["units"] == pytest.approx(60)
    assert e["seconds"] == pytest.approx(1.5)
    assert [p.name for p in f.parent.iterdir()] == ["m.json"]


def test_wall_time_follows_the_dependencies():
    def st(i, *deps):
        return Step(i, "data", None, None, i, deps, i, "data")

    steps = [st("a"), st("b", "a"), st("c", "a"), st("d", "b", "c")]
    secs = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 1.0}
    assert _wall(steps, secs, 1) == 7.0
    assert _wall(steps, secs, 2) == 5.0  # a; b and c side by side; d
    assert _wall(steps, secs, 8) == 5.0


@pytest.mark.parametrize("text", [CI_SCENARIO, STUDY], ids=["ci", "study"])
def test_every_step_of_larger_plans_has_a_cost(text, tmp_path):
    """d2lora, svd / ties / d2-signed merges, features, top_layers, members:
    every step is priced or reported, none dropped."""
    sc = load_scenario(_write(tmp_path, text))
    steps = plan(sc)
    est = estimate(sc, steps, tmp_path / "no-cache", m={"id": "none", "cpu": "x", "cpus": 1})
    assert sum(est.unmeasured.values()) == est.to_make + sum(est.rerun.values()) == len(steps)
    assert est.seconds == 0 and est.lines()[0].startswith("  estimate: none yet")
    assert not Path(tmp_path / "no-cache").exists()  # check writes nothing
