"""How far the eval-split bootstrap of a study's worst-member figure sits from
the figure itself (loramix/scenario/compose.py, docs/scenarios.md).

A minimum of noisy values is biased low, so the percentile interval of the
resampled worst-member figures could be too. This prints, over a report's
rows with an eval interval, the median and the 10th/90th percentiles of
(median of the resamples - the figure), the median bias-correction z0 of a
BC interval, and the intervals' median width: a bias small against the
widths leaves the plain percentile interval as it is.

    python benchmarks/eval_interval_bias.py reports/real-14-domains/report.json
"""

from __future__ import annotations

import json
import sys
from statistics import NormalDist

import numpy as np
import pandas as pd

from loramix.scenario import compose
from loramix.scenario.evaluations import evaluations


def main(path: str) -> None:
    report = json.loads(open(path).read())
    boot = compose.resampled_ppl(pd.DataFrame(evaluations(report)), report.get("record_tokens"))
    seeds = report["scenario"]["seeds"]
    shift, z0, width = [], [], []
    for r in compose.compute(report):
        w = compose.worst_resamples(
            boot, r["adapter_method"], r["composition"], r["best_method"], seeds, r["no_gain"]
        )
        if w is None or not np.isfinite(r["kept_worst_pct"]):
            continue
        kept = r["kept_worst_pct"]
        p = (np.sum(w < kept) + 0.5 * np.sum(w == kept)) / len(w)
        shift.append(np.median(w) - kept)
        z0.append(NormalDist().inv_cdf(min(max(p, 1e-6), 1 - 1e-6)))
        width.append(r["kept_worst_pct_hi"] - r["kept_worst_pct_lo"])
    lo, hi = np.percentile(shift, [10, 90])
    print(f"{path}: {len(shift)} rows with an eval interval")
    print(
        f"median(resamples) - figure: median {np.median(shift):+.2f} points (10th {lo:+.2f}, 90th {hi:+.2f})"
    )
    print(f"BC bias correction z0: median {np.median(z0):+.3f}")
    print(f"interval width: median {np.median(width):.1f} points")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "reports/real-14-domains/report.json")
