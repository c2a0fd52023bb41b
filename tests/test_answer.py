"""The report's "Adapter kinds compared" section (issue 10, item 7): its
numbers against a direct computation on a small hand-made table."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest

from loramix.scenario.answer import section_kinds

# Two domains, two seeds, two labels; the base once per domain.
PPL = {("lora", 0, "a"): 10.0, ("lora", 1, "a"): 12.0, ("lora", 0, "b"): 20.0, ("lora", 1, "b"): 20.0,
       ("d2lora", 0, "a"): 9.0, ("d2lora", 1, "a"): 9.0, ("d2lora", 0, "b"): 18.0, ("d2lora", 1, "b"): 22.0}  # fmt: skip
BASE = {"a": 16.0, "b": 25.0}


def _view():
    rows = [{"model": f"adapter:{d}", "domain": d, "ppl": p, "adapter_method": am, "seed": s}
            for (am, s, d), p in PPL.items()]  # fmt: skip
    rows += [
        {"model": "base", "domain": d, "ppl": p, "adapter_method": "", "seed": 0} for d, p in BASE.items()
    ]
    rows.append({"model": "adapter:b", "domain": "a", "ppl": 99.0, "adapter_method": "lora", "seed": 0})
    summary = pd.DataFrame([{"adapter_method": "lora", "merge_method": "sum", "retention_pct": 4.0},
                            {"adapter_method": "lora", "merge_method": "ties", "retention_pct": 50.0},
                            {"adapter_method": "d2lora", "merge_method": "sum", "retention_pct": 1.0}])  # fmt: skip
    return SimpleNamespace(evals=pd.DataFrame(rows), summary=summary)


def test_kinds_table_and_verdict_against_a_direct_computation():
    md = "\n".join(section_kinds({}, _view()))
    sd = pd.Series([10.0, 12.0]).std()  # lora on a; lora on b has no spread; d2lora: 0 on a, sd(18, 22) on b
    sd2 = pd.Series([18.0, 22.0]).std()
    lora_ppl, d2_ppl = (11.0 + 20.0) / 2, (9.0 + 20.0) / 2
    lora_cv, d2_cv = (100 * sd / 11.0 + 0) / 2, (0 + 100 * sd2 / 20.0) / 2
    gain = ((16 - 11) / 16 * 100 + (25 - 20) / 25 * 100) / 2
    assert f"| lora | {lora_ppl:.2f} | {gain:.1f} | {sd / 2:.3f} | {lora_cv:.2f} | 2 | 4.0 |" in md
    assert f"| d2lora | {d2_ppl:.2f} |" in md
    dp = 100 * (d2_ppl - lora_ppl) / lora_ppl
    assert f"held-out perplexity {abs(dp):.1f}% lower ({d2_ppl:.2f} vs {lora_ppl:.2f}" in md
    assert f"(seed CV) {d2_cv / lora_cv:.2f}x LoRA's" in md
    assert "retention of the sum 1.0 vs 4.0 points" in md  # the sum's, never the ties'


@pytest.mark.parametrize("labels", [["lora"], ["lora", "lora@16"]])
def test_no_verdict_without_both_kinds(labels):
    v = _view()
    v.evals = v.evals[v.evals["adapter_method"].isin(labels + [""])]
    v.summary = v.summary[v.summary["adapter_method"].isin(labels)]
    md = "\n".join(section_kinds({}, v))
    assert "against" not in md.replace("against unmerged", "").replace("against the base", "")


def test_predictors_file_names_the_kind_and_keeps_the_label(tmp_path):
    """A study of ``lora@2`` wrote that label as the predictors file's ``adapter_kind``;
    it is now the kind (``lora``), the label staying in ``adapter_method``."""
    import json
    from pathlib import Path

    from loramix.scenario.answer import write_predictor_files

    shipped = Path(__file__).parents[1] / "reports" / "quickstart" / "report.json"
    report = json.loads(shipped.read_text())
    for v in report["validations"]:
        v["adapter_method"] = v["adapter_method"].replace("lora", "lora@2", 1)
    write_predictor_files(tmp_path, report)
    p = json.loads((tmp_path / "predictors.json").read_text())
    assert p["adapter_kind"] == "lora" and p["adapter_method"] in ("lora@2", "lora@2:data")
