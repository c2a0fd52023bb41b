"""Benchmark merging PEFT tuners that loramix reads as LoRA (AdaLoRA, LoHa, LoKr) into a real base, against PEFT.

Setup (cached in ``benchmarks/_work/tuners/``, git-ignored): the real
SmolLM2-135M (imported once from the GGUF in ``../shared/models``,
``_smol.py``) and one adapter of each tuner, made by PEFT on all seven
linear modules of every block (``q/k/v/o_proj``, ``gate/up/down_proj``), its
factors moved by seeded noise as training moves them:

- ``lora``: LoRA, ``r`` 8 (the reference row);
- ``adalora``: AdaLoRA, ``init_r`` 12, 8 ranks kept per module by a
  ``rank_pattern`` as PEFT's allocator writes one;
- ``loha``: LoHa, ``r`` 8 (read as LoRA of rank 64);
- ``lokr``: LoKr, ``r`` 8, PEFT's default shapes (``W1`` whole, ``W2`` a
  pair; read as LoRA of rank ``min(a, b) * 8``, 192 on SmolLM2's 576-wide
  modules).

Whole processes, interleaved, each timed by ``_common.run_measured`` (wall
time and that child's own peak RSS), for each adapter:

- ``loramix sum ADAPTER --into BASE --out OUT``, first run (an empty
  ``$LORAMIX_CACHE_DIR``) and warm;
- PEFT: transformers ``from_pretrained``, ``PeftModel.from_pretrained``,
  ``merge_and_unload``, ``save_pretrained``.

Then the largest per-tensor relative difference between the two merged
models. No target: the readers are new (this round); the rows say what
reading a tuner as LoRA costs against LoRA and against PEFT's own merge.

    python benchmarks/bench_tuners.py [--repeat 3] [--smol DIR]
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import child_check, machine_line, markdown_table, run_measured  # noqa: E402
from _smol import smol_base  # noqa: E402

WORK = HERE / "_work" / "tuners"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TUNERS = ("lora", "adalora", "loha", "lokr")


# ---- setup ------------------------------------------------------------------------


def _config(kind: str):
    from peft import AdaLoraConfig, LoHaConfig, LoKrConfig, LoraConfig

    if kind == "lora":
        return LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)
    if kind == "adalora":
        return AdaLoraConfig(init_r=12, target_r=8, lora_alpha=16, total_step=100, target_modules=TARGETS)
    if kind == "loha":
        return LoHaConfig(r=8, alpha=16, target_modules=TARGETS)
    return LoKrConfig(r=8, alpha=16, target_modules=TARGETS)


def setup(work: Path, smol: Path) -> dict[str, Path]:
    """Build (once) one adapter of each tuner on ``smol``; return their folders."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    ads = {k: work / k for k in TUNERS}
    if all((a / ".done").exists() for a in ads.values()):
        return ads
    model = AutoModelForCausalLM.from_pretrained(smol, torch_dtype=torch.float32)
    for i, (kind, folder) in enumerate(ads.items()):
        shutil.rmtree(folder, ignore_errors=True)
        torch.manual_seed(i)
        pm = get_peft_model(copy.deepcopy(model), _config(kind))
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for _, t in sorted(pm.named_parameters(), key=lambda kv: kv[0]):
                if t.requires_grad:  # the tuner's own parameters
                    t.add_(0.01 * torch.randn(t.shape, generator=g))
        if kind == "adalora":
            names = sorted(n.removeprefix("base_model.model.").replace(".default", "")
                           for n, _ in pm.named_parameters() if ".lora_E." in n)  # fmt: skip
            pattern = {}
            for n in names:  # 8 of 12 ranks kept, which ones drawn per module
                keep = set(torch.randperm(12, generator=g)[:8].tolist())
                pattern[n] = [j in keep for j in range(12)]
            pm.peft_config["default"].rank_pattern = pattern
        pm.save_pretrained(str(folder))
        (folder / ".done").touch()
    return ads


# ---- the children -------------------------------------------------------------------


def child_setup(work: str, smol: str) -> None:
    ads = setup(Path(work), Path(smol))
    sizes = {k: sum(f.stat().st_size for f in a.glob("*.safetensors")) / 1e6 for k, a in ads.items()}
    print("adapters: " + ", ".join(f"{k} ({mb:.1f} MB)" for k, mb in sizes.items()))


def child_peft(base: str, adapter: str, out: str) -> None:
    import warnings

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    warnings.simplefilter("ignore")  # AdaLoRA's rank_pattern keys, checked as LoRA's patterns
    model = AutoModelForCausalLM.from_pretrained(base)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out, safe_serialization=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--smol", default=None, help="an imported SmolLM2 folder (default: import the shared GGUF)"
    )
    ap.add_argument("--work", default=str(WORK))
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        {"setup": child_setup, "peft": child_peft, "check": child_check}[kind](*rest)
        return

    smol, how = smol_base(args.smol)
    if smol is None:
        print(f"### merging PEFT tuners read as LoRA: {how}")
        return
    py = sys.executable
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(run_measured([py, __file__, "--child", "setup", str(work), str(smol)]).check().stdout.strip())
    print(f"setup: {time.perf_counter() - t0:.1f} s; base: {how}")
    cache = work / "cache"
    env = dict(os.environ, LORAMIX_CACHE_DIR=str(cache))

    def once(tuner: str, how: str) -> tuple[float, float]:
        out = work / f"out_{tuner}_{how}"
        shutil.rmtree(out, ignore_errors=True)
        if how == "peft":
            cmd = [py, __file__, "--child", "peft", str(smol), str(work / tuner), str(out)]
        else:
            if how == "cold":  # an empty cache: what a user meets on a base loramix has never seen
                shutil.rmtree(cache, ignore_errors=True)
            cmd = [py, "-m", "loramix", "sum", str(work / tuner), "--into", str(smol), "--out", str(out),
                   "--no-progress"]  # fmt: skip
        m = run_measured(cmd, env=env).check()
        return m.wall_s, m.peak_rss_mb

    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    once("lora", "warm")  # the page cache holds the base from here on
    for _ in range(args.repeat):
        for tuner in TUNERS:
            for how in ("cold", "warm", "peft"):
                results.setdefault((tuner, how), []).append(once(tuner, how))
    med = {k: tuple(statistics.median(r[i] for r in v) for i in range(2)) for k, v in results.items()}
    worst = {
        t: run_measured(
            [py, __file__, "--child", "check", str(work / f"out_{t}_warm"), str(work / f"out_{t}_peft")]
        )
        .check()
        .stdout.strip()
        for t in TUNERS
    }
    print(
        f"\n### PEFT tuners merged into SmolLM2-135M (all 7 linear modules of 30 blocks), "
        f"`loramix sum --into` against PEFT's `merge_and_unload`, median of {args.repeat} whole-process runs\n"
    )
    lora_warm = med["lora", "warm"][0]
    rows = []
    for t in TUNERS:
        (cw, _), (ww, wr), (pw, pr) = med[t, "cold"], med[t, "warm"], med[t, "peft"]
        rows.append([t, f"{cw:.2f}", f"{ww:.2f}", f"{wr:.0f}", f"{pw:.2f}", f"{pr:.0f}", f"{pw / cw:.2f}",
                     f"{pw / ww:.2f}", f"{ww / lora_warm:.2f}", worst[t]])  # fmt: skip
    print(
        markdown_table(
            [
                "adapter",
                "loramix first run (s)",
                "loramix warm (s)",
                "loramix peak RSS (MiB)",
                "PEFT (s)",
                "PEFT peak RSS (MiB)",
                "PEFT / first run",
                "PEFT / warm",
                "warm / LoRA's",
                "max rel. diff",
            ],
            rows,
        )  # fmt: skip
    )
    print(f"\n- {machine_line()}")


if __name__ == "__main__":
    main()
