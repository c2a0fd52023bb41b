"""Benchmark ``loramix sum --into`` as a whole process, against PEFT and a plain copy.

Setup (cached in ``benchmarks/_work/sum/``, git-ignored): a GPT-2-small-shaped
base (``GPT2Config()`` defaults, 124M parameters, random init,
``save_pretrained``) and three rank-8 adapters on ``c_attn``/``c_proj``/``c_fc``
(random factors, written as PEFT folders).

Three whole processes, interleaved, each timed by ``_common.run_measured``
(wall time and that child's own peak RSS, from ``os.wait4``; this parent
imports neither torch nor transformers, since a child's ``ru_maxrss`` can
start from its parent's size):

- ``loramix``: ``loramix sum A B C --into BASE --out OUT``;
- ``peft``: transformers ``from_pretrained``, ``PeftModel`` + ``load_adapter``,
  ``add_weighted_adapter(..., "cat")``, ``merge_and_unload``, ``save_pretrained``;
- ``copy``: a plain streaming copy of the base file (``safe_open`` each tensor,
  ``save_file``) plus ``config.json``.

Targets (issues 3 and 12): loramix >= 3x faster than PEFT, <= 1/2 its peak
memory, <= 1.3x the plain copy, on the first run as on later ones. loramix
keeps a cache (``$LORAMIX_CACHE_DIR``: the base's sha256, a model layout for
architectures its table does not know); the first-run rows use a fresh, empty
cache directory for every run, the others a warm one.

    python benchmarks/bench_sum.py [--repeat 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import child_check, machine_line, markdown_table, run_measured  # noqa: E402

WORK = HERE / "_work" / "sum"
TARGETS = ["c_attn", "c_proj", "c_fc"]
N_ADAPTERS, RANK, ALPHA = 3, 8, 16


# ---- setup ------------------------------------------------------------------------


def setup(work: Path) -> tuple[Path, list[Path]]:
    """Build (once) the base and the adapters; return their paths."""
    import torch

    base, ads = work / "base", [work / f"adapter{i}" for i in range(N_ADAPTERS)]
    if not (base / ".done").exists():
        from transformers import GPT2Config, GPT2LMHeadModel

        shutil.rmtree(base, ignore_errors=True)
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config()).save_pretrained(base, safe_serialization=True)
        (base / ".done").touch()
    if not all((a / ".done").exists() for a in ads):
        from loramix.io.adapter_files import save_peft_adapter
        from loramix.io.model_folder import BaseModelFolder

        folder = BaseModelFolder(base)
        modules = [
            k.removesuffix(".weight")
            for k in folder.keys()
            if k.split(".")[-2] in TARGETS and k.endswith("weight")
        ]
        for i, a in enumerate(ads):
            shutil.rmtree(a, ignore_errors=True)
            g = torch.Generator().manual_seed(100 + i)
            factors = {}
            for m in modules:
                rows, cols = folder.tensors[m + ".weight"].shape  # Conv1D: (in, out)
                factors[m] = (
                    torch.randn(cols, RANK, generator=g) * 0.01,
                    torch.randn(RANK, rows, generator=g) * 0.01,
                )
            save_peft_adapter(
                a,
                factors,
                fan_in_fan_out=True,
                alphas={m: float(ALPHA) for m in modules},
                base_model_name_or_path="gpt2-small-random",
            )
            (a / ".done").touch()
    return base, ads


# ---- the children -------------------------------------------------------------------


def child_peft(base: str, out: str, device: str, *ads: str) -> None:
    import torch  # noqa: F401
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    if device != "cpu":
        model = model.to(device)
    names = [f"a{i}" for i in range(len(ads))]
    pm = PeftModel.from_pretrained(model, ads[0], adapter_name=names[0])
    for n, a in zip(names[1:], ads[1:]):
        pm.load_adapter(a, adapter_name=n)
    pm.add_weighted_adapter(names, [1.0] * len(ads), "summed", combination_type="cat")
    pm.set_adapter("summed")
    pm.merge_and_unload().save_pretrained(out, safe_serialization=True)


def child_copy(base: str, out: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    with safe_open(os.path.join(base, "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(os.path.join(base, "config.json"), os.path.join(out, "config.json"))


# ---- timing whole processes ---------------------------------------------------------


def child_setup(work: str) -> None:
    base, ads = setup(Path(work))
    size = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 1e6
    print(f"base {base} ({size:.0f} MB), adapters {', '.join(a.name for a in ads)}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--work", default=str(WORK))
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS for every child (default: torch's own choice)",
    )
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        {"peft": child_peft, "copy": child_copy, "setup": child_setup, "check": child_check}[kind](*rest)
        return

    py = sys.executable
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(run_measured([py, __file__, "--child", "setup", str(work)]).check().stdout.strip())
    print(f"setup: {time.perf_counter() - t0:.1f} s")
    base, ads = work / "base", [work / f"adapter{i}" for i in range(N_ADAPTERS)]
    outs = {k: work / f"out_{k}" for k in ("loramix", "peft", "copy")}
    cache = work / "cache"  # loramix's layout and sha256 caches
    env = dict(os.environ, LORAMIX_CACHE_DIR=str(cache))
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    cmds = {
        "copy": [py, __file__, "--child", "copy", str(base), str(outs["copy"])],
        "loramix": [
            *[py, "-m", "loramix", "sum"],
            *map(str, ads),
            *["--into", str(base), "--out", str(outs["loramix"]), "--device", args.device, "--no-progress"],
        ],
        "peft": [py, __file__, "--child", "peft", str(base), str(outs["peft"]), args.device, *map(str, ads)],
    }

    cmds["cold"] = cmds["loramix"]
    outs["cold"] = outs["loramix"]

    def once(kind):
        shutil.rmtree(outs[kind], ignore_errors=True)
        if kind == "cold":  # an empty cache: what a user meets on a base loramix has never seen
            shutil.rmtree(cache, ignore_errors=True)
        m = run_measured(cmds[kind], env=env).check()
        return m.wall_s, m.peak_rss_mb

    once("copy")  # warm the page cache with the base file
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in cmds}
    for _ in range(args.repeat):
        for kind in ("copy", "cold", "loramix", "peft"):
            results[kind].append(once(kind))
    check = [py, __file__, "--child", "check", str(outs["loramix"]), str(outs["peft"])]
    worst = run_measured(check).check().stdout.strip()

    med = {k: tuple(statistics.median(r[i] for r in v) for i in range(2)) for k, v in results.items()}
    lw, lr = med["loramix"]
    print(
        f"\n### loramix sum --into: GPT-2-small shape (124M, fp32), {N_ADAPTERS} rank-{RANK} adapters, "
        f"--device {args.device}, median of {args.repeat} whole-process runs"
        f"{f', {args.threads} thread(s)' if args.threads else ''}\n"
    )
    cold = med["cold"]
    rows = [
        ("loramix sum --into, first run (empty cache)", cold),
        ("loramix sum --into, warm cache", med["loramix"]),
        ("PEFT: load, cat, merge_and_unload, save_pretrained", med["peft"]),
        ("plain copy (safe_open + save_file)", med["copy"]),
    ]
    print(
        markdown_table(
            ["process", "wall (s)", "peak RSS (MiB)", "wall / loramix", "RSS / loramix"],
            [[label, f"{w:.2f}", f"{r:.0f}", f"{w / lw:.2f}", f"{r / lr:.2f}"] for label, (w, r) in rows],
        )
    )
    pw, pr = med["peft"]
    cw, _ = med["copy"]
    print(
        f"\n- first run: {pw / cold[0]:.2f}x faster than PEFT (target >= 3x), {cold[0] / cw:.2f}x the plain copy (target <= 1.3x)"
    )
    print(
        f"- warm: {pw / lw:.2f}x faster than PEFT (target >= 3x), {lw / cw:.2f}x the plain copy (target <= 1.3x)"
    )
    print(f"- peak memory vs PEFT: {lr / pr:.2f} (target <= 0.5)")
    print(f"- largest per-tensor relative difference, loramix vs PEFT: {worst}")
    print(f"- {machine_line()}")


if __name__ == "__main__":
    main()
