"""Benchmark: ``loramix similarity`` against the obvious dense way.

Adapters are GPT-2-small shaped (12 layers, width 768, rank 8 on
``attn.c_attn`` 2304x768, ``attn.c_proj`` 768x768, ``mlp.c_fc`` 3072x768,
``mlp.c_proj`` 768x3072): real PEFT folders (``adapter_config.json`` +
``adapter_model.safetensors``) with random factors, written to a work folder.
No 124M model is needed: similarity only reads the adapters.

Measured as whole processes (start-up, imports, reads), in the same run:

* ``dense``: this script's ``dense`` mode, the obvious way: load each
  adapter, form ``s * B @ A`` for every module (float32, as a merge would),
  keep them, then ``torch.nn.functional.cosine_similarity`` per module and
  pair, RMS over modules;
* ``loramix``: ``python -m loramix similarity DIRS --format csv``.

Both print the RMS matrix; the script checks they agree. Then 100 adapters
(4,950 pairs) with loramix alone (the dense way would hold 100 x 340 MB).

Against a base (``--base``, DoRA): 10 PEFT DoRA adapters (rank 16, magnitude
vectors) on a GPT-2-small-shaped base folder (the 48 ``Conv1D`` weights,
random), whose effective deltas ``m / ||W0 + s B A||_row * (W0 + s B A) - W0``
depend on ``W0``. The obvious way forms each one densely (float32, as PEFT's
merge does) and takes the cosines; ``loramix similarity --base`` forms the
inner products from the factors, ``W0`` and per-row gains (docs/adapters.md).

    python benchmarks/bench_similarity.py            # 10 vs dense, then 100
    python benchmarks/bench_similarity.py --help

Targets (issue 2): >= 10x faster and <= 1/5 of the peak memory of the dense
way for 10 adapters; 100 adapters in under 15 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import best_of, machine_line, markdown_table, run_measured  # noqa: E402

# (module path under transformer.h.<l>, out, in) in nn.Linear layout
GPT2_SMALL = [
    ("attn.c_attn", 2304, 768),
    ("attn.c_proj", 768, 768),
    ("mlp.c_fc", 3072, 768),
    ("mlp.c_proj", 768, 3072),
]


def save_peft(d: Path, tensors: dict, rank: int, **extra) -> Path:
    """A PEFT LoRA folder for GPT-2's ``Conv1D`` modules: ``tensors`` and a
    config with ``lora_alpha = 2 r`` and the ``extra`` keys; returns ``d``."""
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "gpt2",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": ["c_attn", "c_proj", "c_fc"],
        "fan_in_fan_out": True,
        "bias": "none",
        **extra,
    }
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return d


def write_adapters(
    folder: Path, n: int, *, layers: int = 12, rank: int = 8, width_scale: float = 1.0, seed: int = 0
):
    """``n`` PEFT LoRA folders ``folder/a000 ...``; returns their paths.

    Factors mix one of three shared "topic" directions per module with
    noise, so the similarities spread over [0, 1] instead of all being ~0
    (random high-dimensional factors are nearly orthogonal).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    shapes = [
        (f"transformer.h.{li}.{name}", int(o * width_scale), int(i * width_scale))
        for li in range(layers)
        for name, o, i in GPT2_SMALL
    ]
    topics = {
        m: [(torch.randn(o, rank, generator=g), torch.randn(rank, i, generator=g) / i**0.5) for _ in range(3)]
        for m, o, i in shapes
    }
    paths = []
    for a in range(n):
        t = a % 3
        mix = 0.6 + 0.4 * torch.rand(1, generator=g).item()
        tensors = {}
        for m, o, i in shapes:
            Bt, At = topics[m][t]
            B = mix * Bt + (1 - mix) * torch.randn(o, rank, generator=g)
            A = mix * At + (1 - mix) * torch.randn(rank, i, generator=g) / i**0.5
            tensors[f"base_model.model.{m}.lora_A.weight"] = A.contiguous()
            tensors[f"base_model.model.{m}.lora_B.weight"] = B.contiguous()
        paths.append(
            save_peft(
                folder / f"a{a:03d}", tensors, rank, use_rslora=False, rank_pattern={}, alpha_pattern={}
            )
        )
    return paths


def dense_main(paths: list[str]) -> None:
    """The obvious dense way, printed as the same CSV as the loramix command."""
    import math

    import torch
    import torch.nn.functional as F

    from loramix import load_adapter

    torch.set_num_threads(min(2, torch.get_num_threads()))
    adapters = [load_adapter(p) for p in paths]
    deltas = [
        {name: m.scale * (m.B.float() @ m.A.float()) for name, m in ad.modules.items()} for ad in adapters
    ]
    names = [ad.name for ad in adapters]
    n = len(names)
    rms = [[1.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            cos = [
                F.cosine_similarity(deltas[i][m].flatten(), deltas[j][m].flatten(), dim=0).item()
                for m in deltas[i]
                if m in deltas[j]
            ]
            rms[i][j] = rms[j][i] = math.sqrt(sum(c * c for c in cos) / len(cos))
    print("adapter," + ",".join(names))
    for i in range(n):
        print(names[i] + "," + ",".join(f"{x:.10g}" for x in rms[i]))


def write_dora(folder: Path, n: int, *, layers: int = 12, rank: int = 16, seed: int = 1):
    """A GPT-2-small-shaped base folder ``folder/base`` (config.json and the
    48 ``Conv1D`` weights, ``in x out``, random) and ``n`` PEFT DoRA folders
    ``folder/d000 ...`` (``use_dora``, ``lora_magnitude_vector`` of ``out``
    gains near ``||W0||_row``); returns (base, adapters)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    shapes = [(f"transformer.h.{li}.{name}", o, i) for li in range(layers) for name, o, i in GPT2_SMALL]
    base = folder / "base"
    base.mkdir(parents=True, exist_ok=True)
    w0 = {m: torch.randn(o, i, generator=g) * 0.02 for m, o, i in shapes}  # (out, in)
    save_file({f"{m}.weight": w.t().contiguous() for m, w in w0.items()}, str(base / "model.safetensors"))
    cfg = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 768, "n_layer": layers}
    (base / "config.json").write_text(
        json.dumps({**cfg, "n_head": 12, "n_positions": 1024, "vocab_size": 50257})
    )
    paths = []
    for a in range(n):
        tensors = {}
        for m, o, i in shapes:
            k = f"base_model.model.{m}"
            tensors[f"{k}.lora_A.weight"] = (torch.randn(rank, i, generator=g) / i**0.5).contiguous()
            tensors[f"{k}.lora_B.weight"] = (torch.randn(o, rank, generator=g) * 0.01).contiguous()
            gain = 0.9 + 0.2 * torch.rand(o, generator=g)
            tensors[f"{k}.lora_magnitude_vector"] = (w0[m].norm(dim=1) * gain).contiguous()
        paths.append(save_peft(folder / f"d{a:03d}", tensors, rank, use_dora=True))
    return base, paths


def dense_dora_main(base: str, paths: list[str]) -> None:
    """The obvious dense way against a base, as PEFT merges DoRA: per module
    ``V = W0 + s B A``, ``delta = m / ||V||_row * V - W0`` (float32, every
    adapter's deltas kept), then torch's cosine per module and pair; printed
    as the loramix command's CSV."""
    import math

    import torch
    import torch.nn.functional as F
    from safetensors import safe_open

    torch.set_num_threads(min(2, torch.get_num_threads()))
    with safe_open(str(Path(base) / "model.safetensors"), "pt") as f:
        w0 = {k[: -len(".weight")]: f.get_tensor(k).t().contiguous() for k in f.keys()}  # Conv1D: in x out
    names, deltas = [], []
    for p in paths:
        cfg = json.loads((Path(p) / "adapter_config.json").read_text())
        s = cfg["lora_alpha"] / cfg["r"]
        with safe_open(str(Path(p) / "adapter_model.safetensors"), "pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}
        d = {}
        for m, w in w0.items():
            k = f"base_model.model.{m}"
            v = w + s * (t[f"{k}.lora_B.weight"] @ t[f"{k}.lora_A.weight"])
            d[m] = (t[f"{k}.lora_magnitude_vector"] / v.norm(dim=1))[:, None] * v - w
        names.append(Path(p).name)
        deltas.append(d)
    n = len(names)
    rms = [[1.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            cos = [
                F.cosine_similarity(deltas[i][m].flatten(), deltas[j][m].flatten(), dim=0).item() for m in w0
            ]
            rms[i][j] = rms[j][i] = math.sqrt(sum(c * c for c in cos) / len(cos))
    print("adapter," + ",".join(names))
    for i in range(n):
        print(names[i] + "," + ",".join(f"{x:.10g}" for x in rms[i]))


def read_csv_matrix(text: str):
    import pandas as pd

    return pd.read_csv(io.StringIO(text), index_col=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10, help="adapters compared against the dense way (default 10)")
    ap.add_argument("--n-large", type=int, default=100, help="adapters for the loramix-only run (0: skip)")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2, help="runs per measurement; best wall time is kept")
    ap.add_argument("--workdir", type=Path, help="where adapters are written (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the generated adapters")
    ap.add_argument("--skip-dense", action="store_true")
    ap.add_argument("--n-dora", type=int, default=10, help="DoRA adapters compared against a base (0: skip)")
    args = ap.parse_args()

    py = sys.executable
    # Same environment for both processes; loramix's CLI sets this default
    # itself (OpenMP threads sleep when idle), so the dense way gets it too.
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="loramix-bench-sim-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"# similarity benchmark\n\nwork folder: {work}\n", flush=True)
    try:
        n_all = max(args.n, args.n_large)
        # Written by a child: this parent stays free of torch, since a child's
        # peak RSS (ru_maxrss) starts from its parent's size at the fork.
        gen = [py, __file__, "write", str(work), str(n_all), str(args.layers), str(args.rank)]
        run_measured(gen).check()
        paths = [work / f"a{a:03d}" for a in range(n_all)]
        size_mb = sum(f.stat().st_size for p in paths[: args.n] for f in p.iterdir()) / 2**20
        small = [str(p) for p in paths[: args.n]]
        rows = []
        pairs = args.n * (args.n - 1) // 2
        lm = best_of([py, "-m", "loramix", "similarity", *small, "--format", "csv"], args.repeat, env=env)
        if not args.skip_dense:
            dn = best_of([py, __file__, "dense", *small], 1, env=env)
            diff = float((read_csv_matrix(lm.stdout) - read_csv_matrix(dn.stdout)).abs().to_numpy().max())
            rows.append(
                [
                    f"{args.n} adapters ({pairs} pairs)",
                    "dense: B@A per module + torch cosine",
                    f"{dn.wall_s:.2f}",
                    f"{dn.peak_rss_mb:.0f}",
                ]
            )
        rows.append(
            [
                f"{args.n} adapters ({pairs} pairs)",
                "`loramix similarity` (factored Gram, float64)",
                f"{lm.wall_s:.2f}",
                f"{lm.peak_rss_mb:.0f}",
            ]
        )
        if not args.skip_dense:
            rows.append(
                [
                    "",
                    "**ratio dense / loramix**",
                    f"**{dn.wall_s / lm.wall_s:.1f}x faster**",
                    f"**{dn.peak_rss_mb / lm.peak_rss_mb:.1f}x less memory**",
                ]
            )
        if args.n_large:
            big = [str(p) for p in paths[: args.n_large]]
            lg = best_of([py, "-m", "loramix", "similarity", *big, "--format", "csv"], args.repeat, env=env)
            pairs_l = args.n_large * (args.n_large - 1) // 2
            rows.append(
                [
                    f"{args.n_large} adapters ({pairs_l} pairs)",
                    "`loramix similarity`",
                    f"{lg.wall_s:.2f}",
                    f"{lg.peak_rss_mb:.0f}",
                ]
            )
        print(
            f"GPT-2-small-shaped adapters: {args.layers} layers x 4 modules, rank {args.rank}, fp32, "
            f"{size_mb / max(1, args.n):.1f} MiB each. Whole processes; wall time best of {args.repeat} "
            "(dense: 1 run), peak RSS of the process.\n"
        )
        print(markdown_table(["case", "method", "wall s", "peak RSS MiB"], rows))
        if not args.skip_dense:
            print(f"\nmax |RMS(loramix) - RMS(dense float32)| = {diff:.2e}")
            ok_t, ok_m = dn.wall_s / lm.wall_s >= 10, dn.peak_rss_mb / lm.peak_rss_mb >= 5
            print(
                f"target >= 10x faster: {'met' if ok_t else 'NOT met'}; target <= 1/5 memory: {'met' if ok_m else 'NOT met'}"
            )
        if args.n_large:
            print(
                f"target {args.n_large} adapters < 15 s: {'met' if lg.wall_s < 15 else 'NOT met'} ({lg.wall_s:.2f} s)"
            )
        if args.n_dora:
            dora_against_base(py, work, args, env)
        print(f"\n{machine_line()}")
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def dora_against_base(py: str, work: Path, args, env: dict) -> None:
    """``similarity --base`` of DoRA adapters against the dense way, one table."""
    folder = work / "dora"
    run_measured([py, __file__, "write-dora", str(folder), str(args.n_dora), str(args.layers)]).check()
    base, paths = folder / "base", [str(folder / f"d{a:03d}") for a in range(args.n_dora)]
    cmd = [py, "-m", "loramix", "similarity", *paths, "--base", str(base), "--format", "csv"]
    lm = best_of(cmd, args.repeat, env=env)
    dn = best_of([py, __file__, "dense-dora", str(base), *paths], 1, env=env)
    diff = float((read_csv_matrix(lm.stdout) - read_csv_matrix(dn.stdout)).abs().to_numpy().max())
    case = f"{args.n_dora} DoRA r16 vs base"
    rows = [
        [case, "dense: m/‖W0+sBA‖·(W0+sBA) − W0 per module + torch cosine", f"{dn.wall_s:.2f}",
         f"{dn.cpu_s:.2f}", f"{dn.peak_rss_mb:.0f}"],
        [case, "`loramix similarity --base` (factors, W0, row gains; float64)", f"{lm.wall_s:.2f}",
         f"{lm.cpu_s:.2f}", f"{lm.peak_rss_mb:.0f}"],
        ["", "**ratio dense / loramix**", f"**{dn.wall_s / lm.wall_s:.1f}x faster**",
         f"**{dn.cpu_s / lm.cpu_s:.1f}x**", f"**{dn.peak_rss_mb / lm.peak_rss_mb:.1f}x less memory**"],
    ]  # fmt: skip
    print(
        f"\nAgainst a base: {args.n_dora} PEFT DoRA adapters (rank 16, magnitude vectors) on a GPT-2-small-shaped "
        f"base folder ({args.layers} layers x 4 Conv1D weights, random); wall time best of {args.repeat} "
        "(dense: 1 run), CPU seconds (user + system) of that run, peak RSS.\n"
    )
    print(markdown_table(["case", "method", "wall s", "CPU s", "peak RSS MiB"], rows))
    print(f"\nmax |RMS(loramix) - RMS(dense float32)| = {diff:.2e}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "dense":
        dense_main(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "dense-dora":
        dense_dora_main(sys.argv[2], sys.argv[3:])
    elif len(sys.argv) > 1 and sys.argv[1] == "write-dora":
        folder, n, layers = sys.argv[2:5]
        write_dora(Path(folder), int(n), layers=int(layers))
    elif len(sys.argv) > 1 and sys.argv[1] == "write":
        folder, n, layers, rank = sys.argv[2:6]
        write_adapters(Path(folder), int(n), layers=int(layers), rank=int(rank))
    else:
        main()
