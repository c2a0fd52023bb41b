"""Benchmark the calibration pass of the data-aware features (``plan --base --data``).

On the real SmolLM2-135M (imported as ``_smol.smol_base`` does), four real
domains of ``../shared/data``, ``--tokens`` tokens of each (records cut at
``--max-len``), and four random rank-8 LoRA adapters on every linear module
of all 30 blocks (210 modules), so the whole model runs. Whole processes,
interleaved, each timed by ``_common.run_measured`` (wall time and that
child's peak RSS); the child also prints the seconds of the pass itself:

- ``loramix``: ``loramix.features._calibration.capture``: hooks project each
  module's inputs onto the stacked input factors, ``S += (X A^T)^T (X A^T)``
  (R x R, R = 32), and the model runs without its output head;
- ``loramix, whole model``: the same hooks with the head run too, as loramix
  did before (the head's logits are read by no hook: 49,152 x 576 per token);
- ``dense Gram (anchor)``: the obvious way, hooks that sum each module's
  ``G = X^T X`` (in x in, float64), then ``S = A G A^T``; one domain's Grams
  held at a time (about 1 GB on this model).

The three must agree: the first two bit for bit, the anchor to 1e-9 relative.

    python benchmarks/bench_calibration.py [--tokens 512] [--max-len 128] [--repeat 1] [--smol DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _common import machine_line, markdown_table, run_measured  # noqa: E402
from _smol import SHARED, smol_base  # noqa: E402

DOMAINS = ("math", "medicine", "finance", "law")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK = 8
VARIANTS = {"loramix": "trunk", "loramix, whole model": "whole", "dense Gram (anchor)": "dense"}


def write_adapters(base: Path, work: Path) -> list[Path]:
    """Four PEFT LoRA folders with random factors (seeds 0-3) on every TARGETS module."""
    import torch
    from safetensors.torch import save_file

    from loramix.models import load_causal_lm

    model, _ = load_causal_lm(base)
    mods = {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS}
    out = []
    for k in range(4):
        g = torch.Generator().manual_seed(k)
        tensors = {}
        for n, m in mods.items():
            tensors[f"base_model.model.{n}.lora_A.weight"] = (
                torch.randn(RANK, m.in_features, generator=g) * 0.02
            )
            tensors[f"base_model.model.{n}.lora_B.weight"] = (
                torch.randn(m.out_features, RANK, generator=g) * 0.02
            )
        folder = work / f"adapter{k}"
        folder.mkdir()
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        config = {"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "target_modules": list(TARGETS),
                  "base_model_name_or_path": str(base), "task_type": "CAUSAL_LM"}  # fmt: skip
        (folder / "adapter_config.json").write_text(json.dumps(config))
        out.append(folder)
    return out


def child(variant: str, base: str, adapters: list[str], data: list[str], tokens: int, max_len: int, out: str):
    """One variant's pass, timed; its S matrices saved to ``out``."""
    import torch

    import loramix.features._calibration as cal
    from loramix.io.adapter_files import load_adapter

    ads = [load_adapter(p) for p in adapters]
    if variant == "whole":
        cal._trunk = lambda model, owners: model
    if variant == "dense":
        cal._hook = _dense_hook
    t0 = time.perf_counter()
    c = cal.capture(ads, base, data, tokens=tokens, max_len=max_len)
    seconds = time.perf_counter() - t0
    torch.save(c.S, out)
    print(json.dumps({"seconds": seconds, "tokens": c.tokens}))


def _dense_hook(S, name, A, state, embedding=False):
    """The anchor: sum ``G = X^T X`` (in x in) over the domain's tokens; ``S``
    gets ``A G A^T`` once the domain is done (read through ``S[name]``)."""
    import torch

    class Deferred:  # S[name] += ...: keep G, form A G A^T when first read
        def __init__(self, zero):
            self.G = torch.zeros(A.shape[1], A.shape[1], dtype=torch.float64)
            self.zero = zero

        def __iadd__(self, rows):
            self.G += rows.T @ rows
            return self

        def cpu(self):
            return A @ self.G @ A.T

    S[name] = Deferred(S[name])

    def hook(module, inputs, output):
        x = inputs[0]
        rows = x.reshape(-1, x.shape[-1])[state["mask"]].to(torch.float64)
        S[name] += rows

    return hook


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--smol", default=None)
    ap.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        v, base, ads, data, tokens, max_len, out = args.child
        child(v, base, ads.split(","), data.split(","), int(tokens), int(max_len), out)
        return 0
    base, how = smol_base(args.smol)
    data = [SHARED / "data" / f"{d}.jsonl" for d in DOMAINS]
    if base is None or not all(p.exists() for p in data):
        print(how if base is None else f"skipped: no real data at {SHARED / 'data'}")
        return 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="bench-calibration-"))
    try:
        ads = write_adapters(base, work)
        runs: dict[str, list] = {k: [] for k in VARIANTS}
        for _ in range(max(1, args.repeat)):  # interleaved: a load spike hits every row alike
            for name, v in VARIANTS.items():
                cmd = [sys.executable, __file__, "--child", v, str(base), ",".join(map(str, ads)),
                       ",".join(map(str, data)), str(args.tokens), str(args.max_len), str(work / f"{v}.pt")]  # fmt: skip
                m = run_measured(cmd, env=env).check()
                runs[name].append((m, json.loads(m.stdout.strip().splitlines()[-1])))
        agree = _agreement(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ref = statistics.median(r["seconds"] for _, r in runs["loramix"])
    rows = []
    for name, ms in runs.items():
        sec = statistics.median(r["seconds"] for _, r in ms)
        rows.append([name, f"{sec:.1f}", f"{sec / ref:.2f}x", f"{min(m.wall_s for m, _ in ms):.1f}",
                     f"{max(m.peak_rss_mb for m, _ in ms):.0f}"])  # fmt: skip
    tok = runs["loramix"][0][1]["tokens"]
    print(f"Calibration pass on SmolLM2-135M ({how}): {len(DOMAINS)} domains x {tok[0]} tokens (records cut at "
          f"{args.max_len}), 4 rank-{RANK} adapters on all 210 linear modules; each process on one torch "
          f"thread (OMP_NUM_THREADS=1); parent: {machine_line()}\n")  # fmt: skip
    print(
        markdown_table(["variant", "pass s (median)", "vs loramix", "process wall s", "peak RSS MiB"], rows)
    )
    print(f"\nAgreement: {agree}")
    return 0


def _agreement(work: Path) -> str:
    import torch

    S = {v: torch.load(work / f"{v}.pt") for v in VARIANTS.values()}
    same = all(torch.equal(a[m], b[m]) for a, b in zip(S["trunk"], S["whole"]) for m in a)
    rel = max(
        float((a[m] - b[m]).abs().max() / b[m].abs().max()) for a, b in zip(S["dense"], S["trunk"]) for m in a
    )
    return f"loramix and whole model bit for bit: {same}; dense Gram vs loramix max relative difference {rel:.1e}"


if __name__ == "__main__":
    raise SystemExit(main())
