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


def write_adapters(
    folder: Path, n: int, *, layers: int = 12, rank: int = 8, width_scale: float = 1.0, seed: int = 0
):
    """``n`` PEFT LoRA folders ``folder/a000 ...``; returns their paths.

    Factors mix one of three shared "topic" directions per module with
    noise, so the similarities spread over [0, 1] instead of all being ~0
    (random high-dimensional factors are nearly orthogonal).
    """
    import torch
    from safetensors.torch import save_file

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
        d = folder / f"a{a:03d}"
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
            "use_rslora": False,
            "bias": "none",
            "rank_pattern": {},
            "alpha_pattern": {},
        }
        (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        paths.append(d)
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
        print(f"\n{machine_line()}")
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "dense":
        dense_main(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "write":
        folder, n, layers, rank = sys.argv[2:6]
        write_adapters(Path(folder), int(n), layers=int(layers), rank=int(rank))
    else:
        main()
