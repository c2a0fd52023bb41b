"""Benchmark the merge methods (issue 6).

(a) ``svd``: three rank-8 adapters of GPT-2-small shape (12 layers; ``c_attn``
    2304x768, ``attn.c_proj`` 768x768, ``c_fc`` 3072x768, ``mlp.c_proj``
    768x3072) recompressed to rank 8. Timed: the merge computation itself,
    inputs already in memory, in one process, interleaved repeats:

    - ``loramix``: what ``merge(..., "svd")`` runs for an adapter output,
      :meth:`Svd.factors_many` (QR of the stacked factors and SVD of the
      24x24 cores, batched over same-shaped modules; float64);
    - ``dense``: form each module's summed delta (float32) and
      ``torch.linalg.svd(full_matrices=False)``, truncate to rank 8;
    - ``peft``: ``add_weighted_adapter(..., combination_type="svd",
      svd_rank=8)`` on a PEFT GPT-2-small model holding the same three
      adapters (PEFT's defaults, ``full_matrices=True``).

    Target: loramix >= 100x faster than dense. The singular values of loramix
    and of the dense SVD are compared as a sanity check.

    The same adapters merged by TIES (density 0.2) into one adapter, in the
    same loop: ``core-ties`` (:meth:`CoreSpace.factors` per module, what
    ``merge(..., "core-ties")`` runs for an adapter output) against PEFT's
    ``add_weighted_adapter(..., combination_type="ties_svd", density=0.2,
    svd_rank=24)`` (the dense TIES delta and its SVD per module). Not the same
    merge (TIES of the cores against TIES of the deltas, then truncated):
    the two ways to a TIES adapter.

    ``iso-c``, ``iso-cts`` and ``tsv`` from the factors (what ``merge`` runs
    for an adapter output) against their papers' algorithms on the dense
    deltas in float32 (an SVD of each module's summed ``out x in`` delta;
    for Iso-CTS also of each delta's part outside the common subspace and of
    the stacked vectors; an SVD of each delta and of the stacked vectors),
    in the same loop; the results are compared as a sanity check.

(b) ``ties`` / ``dare-ties`` / ``dare-linear`` / ``core-ties`` / ``tsv`` / ``iso-c`` / ``iso-cts`` into a 124M
    GPT-2-small base against ``sum --into``, each a whole ``python -m loramix
    merge`` process (wall time and peak RSS via ``os.wait4``), interleaved.
    Target: within 2x of ``sum``. Reuses ``benchmarks/_work/sum/``
    (``bench_sum.py``'s base and adapters) when it is there, else builds its
    own in ``_work/merge/``.

(c) TIES as one adapter of the same three adapters, whole processes,
    interleaved: ``core-ties`` and ``knots-ties`` (the exact adapters of TIES
    in the core space and in KnOTS' basis, rank <= 24) against the way to a
    TIES adapter without them, ``ties
    --out-rank 24`` (the dense TIES delta of each module truncated by its SVD
    to the stacked rank). No target: the ratio is what the exact form saves.

    python benchmarks/bench_merge.py [--repeat 3] [--device cpu|cuda] [--only a|b|c] [--threads N]

Prints markdown tables. On a shared machine the figures are preliminary.
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
from _common import run_measured  # noqa: E402

WORK = HERE / "_work"
TARGETS = ["c_attn", "c_proj", "c_fc"]
N_ADAPTERS, RANK, ALPHA = 3, 8, 16
TIES_DENSITY = 0.2
# GPT-2 small, (out, in) in nn.Linear layout
SHAPES = {
    "attn.c_attn": (2304, 768),
    "attn.c_proj": (768, 768),
    "mlp.c_fc": (3072, 768),
    "mlp.c_proj": (768, 3072),
}


def sync(device):
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# ---- (a) svd: the computation itself ------------------------------------------------


def make_adapters(n_layer: int):
    """Three in-memory rank-8 adapters, GPT-2 module names, scale alpha/r = 2."""
    import torch

    from loramix.adapter import LORA, Adapter, ModuleDelta

    ads = []
    for i in range(N_ADAPTERS):
        g = torch.Generator().manual_seed(100 + i)
        mods = {}
        for layer in range(n_layer):
            for sub, (o, k) in SHAPES.items():
                name = f"transformer.h.{layer}.{sub}"
                mods[name] = ModuleDelta(
                    name=name,
                    B=torch.randn(o, RANK, generator=g) * 0.01,
                    A=torch.randn(RANK, k, generator=g) * 0.01,
                    scale=ALPHA / RANK,
                    alpha=float(ALPHA),
                )
        ads.append(Adapter(name=f"a{i}", kind=LORA, modules=mods))
    return ads


def loramix_factors(ads, device, method="svd", params=None):
    """What ``merge(..., method)`` computes for an adapter output (same call):
    ``svd`` to rank 8, or ``core-ties`` at density 0.2."""
    import torch

    from loramix.methods import get_method
    from loramix.methods.base import ModuleContext

    m = get_method(method)
    p = m.validate(params if params is not None else {"rank": RANK}, ads)
    names = list(ads[0].modules)
    jobs = [
        (
            ModuleContext(n, tuple(range(len(ads))), device, torch.float64),
            [a.modules[n] for a in ads],
            [1.0] * len(ads),
        )
        for n in names
    ]
    out = dict(zip(names, m.factors_many(jobs, p)))
    sync(device)
    return out


def dense_sum(ads, name, device):
    """The summed delta of module ``name``, formed densely in float32."""
    import torch

    D = None
    for a in ads:
        B, A = a.modules[name].factors(dtype=torch.float32, device=device)
        D = B @ A if D is None else D.addmm_(B, A)
    return D


def svd_dense(ads, device):
    import torch

    out = {}
    for name in ads[0].modules:
        D = dense_sum(ads, name, device)
        U, S, Vh = torch.linalg.svd(D, full_matrices=False)
        out[name] = (U[:, :RANK] * S[:RANK], Vh[:RANK], S)
    sync(device)
    return out


def iso_dense(ads, device):
    """Iso-C as its paper's code computes it, on the dense sum (float32): its
    SVD, every nonzero singular value set to their mean (the paper's mean is
    over all ``min(out, in)``; here over the sum's rank, loramix's answer)."""
    import torch

    out = {}
    for name in ads[0].modules:
        D = dense_sum(ads, name, device)
        U, S, Vh = torch.linalg.svd(D, full_matrices=False)
        k = int((S > S[0] * max(D.shape) * torch.finfo(S.dtype).eps).sum())
        out[name] = (U[:, :k] * S[:k].mean()) @ Vh[:k]
    sync(device)
    return out


def iso_cts_dense(ads, device, beta=0.8):
    """Iso-CTS as its paper's code computes it, on the dense deltas (float32):
    the sum's SVD, its top ``k_c`` directions, each delta's part outside them
    and that part's SVD, the stacked vectors orthogonalised by their own SVDs;
    the fractions of the sum's rank (the paper's are of ``min(out, in)``;
    loramix's answer, as ``iso_dense``)."""
    import torch

    out = {}
    for name in ads[0].modules:
        D = dense_sum(ads, name, device)
        U, S, Vh = torch.linalg.svd(D, full_matrices=False)
        K = int((S > S[0] * max(D.shape) * torch.finfo(S.dtype).eps).sum())
        each = min(round((K - int(K * beta)) / len(ads)), K // len(ads))
        k_c = K - each * len(ads)
        Uc = U[:, :k_c]
        Us, Ss, Vs = [Uc], [S[:k_c]], [Vh[:k_c]]
        for a in ads:
            B, A = a.modules[name].factors(dtype=torch.float32, device=device)
            d = B @ A
            P, R, Qh = torch.linalg.svd(d - Uc @ (Uc.T @ d), full_matrices=False)
            Us.append(P[:, :each]), Ss.append(R[:each]), Vs.append(Qh[:each])
        P, _, Zt = torch.linalg.svd(torch.cat(Us, 1), full_matrices=False)
        P2, _, Zt2 = torch.linalg.svd(torch.cat(Vs, 0).T, full_matrices=False)
        out[name] = ((P @ Zt) * torch.cat(Ss).mean()) @ (P2 @ Zt2).T
    sync(device)
    return out


def tsv_dense(ads, device):
    """TSV-Merge as its paper's code computes it, on the dense deltas (float32):
    each delta's SVD, its top ``min(out, in) // N`` triplets, the stacked
    vectors orthogonalised by their own SVDs."""
    import torch

    out = {}
    for name in ads[0].modules:
        Us, Ss, Vs = [], [], []
        for a in ads:
            B, A = a.modules[name].factors(dtype=torch.float32, device=device)
            U, S, Vh = torch.linalg.svd(B @ A, full_matrices=False)
            k = min(min(B.shape[0], A.shape[1]) // len(ads), RANK)  # the delta's rank, as loramix keeps
            Us.append(U[:, :k]), Ss.append(S[:k]), Vs.append(Vh[:k])
        P, _, Zt = torch.linalg.svd(torch.cat(Us, 1), full_matrices=False)
        P2, _, Zt2 = torch.linalg.svd(torch.cat(Vs, 0).T, full_matrices=False)
        out[name] = ((P @ Zt) * torch.cat(Ss)) @ (P2 @ Zt2).T
    sync(device)
    return out


def peft_model(ads, device):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    n_layer = 1 + max(int(n.split(".")[2]) for n in ads[0].modules)
    model = GPT2LMHeadModel(GPT2Config(n_layer=n_layer))
    cfg = dict(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, fan_in_fan_out=True)
    pm = get_peft_model(model, LoraConfig(**cfg), adapter_name="a0")
    for i in range(1, len(ads)):
        pm.add_adapter(f"a{i}", LoraConfig(**cfg))
    with torch.no_grad():
        for i, a in enumerate(ads):
            for name, md in a.modules.items():
                layer = pm.base_model.model.get_submodule(name)
                layer.lora_A[f"a{i}"].weight.copy_(md.A)
                layer.lora_B[f"a{i}"].weight.copy_(md.B)
    return pm.to(device).eval()


def svd_peft(pm, n, device, how="svd"):
    """PEFT's ``add_weighted_adapter`` with ``combination_type`` ``how``: ``svd``
    to rank 8, or ``ties_svd`` (density 0.2) to the stacked rank."""
    import torch

    names = [f"a{i}" for i in range(n)]
    if how in pm.peft_config:
        pm.delete_adapter(how)
    kw = {"svd_rank": RANK} if how == "svd" else {"svd_rank": n * RANK, "density": TIES_DENSITY}
    with torch.no_grad():
        pm.add_weighted_adapter(names, [1.0] * n, how, combination_type=how, **kw)
    sync(device)


def bench_svd(args) -> list[list[str]]:
    import torch

    torch.manual_seed(0)
    device = torch.device(args.device)
    ads = make_adapters(args.layers)
    times = {"loramix": [], "dense": [], "peft": [], "core-ties": [], "peft-ties": [], "iso-c": [],
             "iso-c-dense": [], "iso-cts": [], "iso-cts-dense": [], "tsv": [], "tsv-dense": []}  # fmt: skip
    pm = None if args.no_peft else peft_model(ads, device)
    core_ties = ("core-ties", {"density": TIES_DENSITY})
    loramix_factors(ads, device)  # warm-up (kernels, lazy imports)
    loramix_factors(ads, device, *core_ties)
    got = {k: loramix_factors(ads, device, k, {}) for k in ("iso-c", "iso-cts", "tsv")}
    dense = {
        "iso-c": iso_dense(ads, device),
        "iso-cts": iso_cts_dense(ads, device),
        "tsv": tsv_dense(ads, device),
    }
    # sanity: the same merges, to float32's rounding of the dense way
    agree = {
        k: max(float((got[k][n].B @ got[k][n].A - dense[k][n].double()).abs().max() / dense[k][n].abs().max())
               for n in dense[k])
        for k in got
    }  # fmt: skip
    for _ in range(args.repeat):
        for kind in times:
            if kind.startswith("peft") and pm is None:
                continue
            t0 = time.perf_counter()
            if kind == "loramix":
                lm = loramix_factors(ads, device)
            elif kind == "dense":
                dn = svd_dense(ads, device)
            elif kind == "core-ties":
                loramix_factors(ads, device, *core_ties)
            elif kind in ("iso-c", "iso-cts", "tsv"):
                loramix_factors(ads, device, kind, {})
            elif kind == "iso-c-dense":
                iso_dense(ads, device)
            elif kind == "iso-cts-dense":
                iso_cts_dense(ads, device)
            elif kind == "tsv-dense":
                tsv_dense(ads, device)
            else:
                svd_peft(pm, len(ads), device, "svd" if kind == "peft" else "ties_svd")
            times[kind].append(time.perf_counter() - t0)
    # sanity: the same singular values (relative to the largest)
    err = max(
        float(
            (torch.linalg.svdvals(lm[n].B @ lm[n].A).float()[:RANK].cpu() - dn[n][2][:RANK].cpu()).abs().max()
            / dn[n][2][0].cpu()
        )
        for n in lm
    )
    med = {k: statistics.median(v) for k, v in times.items() if v}
    rows = [["(a) svd, loramix (QR + small SVD)", f"{med['loramix'] * 1e3:.1f} ms", "1.0x", ""]]
    rows.append(
        [
            "(a) svd, dense torch.linalg.svd",
            f"{med['dense'] * 1e3:.0f} ms",
            f"{med['dense'] / med['loramix']:.0f}x slower",
            "target >= 100x",
        ]
    )
    if "peft" in med:
        rows.append(
            [
                "(a) svd, PEFT add_weighted_adapter",
                f"{med['peft'] * 1e3:.0f} ms",
                f"{med['peft'] / med['loramix']:.0f}x slower",
                "",
            ]
        )
    rows.append(["(a) ties as an adapter, loramix core-ties", f"{med['core-ties'] * 1e3:.1f} ms", "1.0x", ""])
    if "peft-ties" in med:
        rows.append(
            [
                f"(a) ties as an adapter, PEFT add_weighted_adapter ties_svd (rank {len(ads) * RANK})",
                f"{med['peft-ties'] * 1e3:.0f} ms",
                f"{med['peft-ties'] / med['core-ties']:.0f}x slower",
                "",
            ]
        )
    for k, what in (
        ("iso-c", "sum, torch.linalg.svd"),
        ("iso-cts", "sum, each delta's part and the stacked vectors, torch.linalg.svd"),
        ("tsv", "each delta's torch.linalg.svd, then the stacked vectors'"),
    ):
        rows.append([f"(a) {k}, loramix (from the factors)", f"{med[k] * 1e3:.1f} ms", "1.0x", ""])
        rows.append([f"(a) {k}, dense ({what}), as its paper's code", f"{med[k + '-dense'] * 1e3:.0f} ms",
                     f"{med[k + '-dense'] / med[k]:.0f}x slower", ""])  # fmt: skip
    print(f"svd sanity: max |S_loramix - S_dense| / S_max over modules = {err:.2e}", file=sys.stderr)
    for k, e in agree.items():
        print(f"{k} sanity: max |loramix - dense| / max |dense| over modules = {e:.2e}", file=sys.stderr)
    return rows


# ---- (b) whole processes into a 124M base --------------------------------------------


def setup_files(work: Path) -> tuple[Path, list[Path]]:
    """The 124M base and three rank-8 PEFT adapters: bench_sum's, built once,
    in a child process so that this one stays free of torch."""
    from bench_sum import N_ADAPTERS as n

    shared = work / "sum"
    run_measured([sys.executable, str(HERE / "bench_sum.py"), "--child", "setup", str(shared)]).check()
    return shared / "base", [shared / f"adapter{i}" for i in range(n)]


def run_child(cmd: list[str], env: dict) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS MiB) of one whole process."""
    m = run_measured(cmd, env=env).check()
    return m.wall_s, m.cpu_s, m.peak_rss_mb


def bench_into(args) -> list[list[str]]:
    work = Path(args.work)
    base, ads = setup_files(work)
    env = dict(os.environ, LORAMIX_CACHE_DIR=str(work / "layout-cache"))
    runs = {
        "sum": ["-m", "sum"],
        "ties": ["-m", "ties", "--density", "0.2"],
        "dare-ties": ["-m", "dare-ties", "--density", "0.5", "--seed", "0"],
        "dare-linear": ["-m", "dare-linear", "--density", "0.5", "--seed", "0"],
        "core-ties": ["-m", "core-ties", "--density", "0.2"],
        "tsv": ["-m", "tsv"],  # what `loramix plan` proposes for LoRA adapters without a fit
        "iso-c": ["-m", "iso-c"],
        "iso-cts": ["-m", "iso-cts"],
    }
    out = work / "merge" / "out"
    out.parent.mkdir(parents=True, exist_ok=True)

    def cmd(flags):
        return [
            sys.executable,
            "-m",
            "loramix",
            "merge",
            *flags,
            *map(str, ads),
            "--into",
            str(base),
            "--out",
            str(out),
            "--force",
            "--device",
            args.device,
        ]

    run_child(cmd(runs["sum"]), env)  # warm the layout cache and the page cache
    res = {k: [] for k in runs}
    for _ in range(args.repeat):
        for k, flags in runs.items():
            res[k].append(run_child(cmd(flags), env))
    shutil.rmtree(out, ignore_errors=True)
    t_sum = statistics.median(w for w, _, _ in res["sum"])
    c_sum = statistics.median(c for _, c, _ in res["sum"])
    rows = []
    for k, v in res.items():
        t, c, rss = (
            statistics.median(w for w, _, _ in v),
            statistics.median(c for _, c, _ in v),
            max(r for *_, r in v),
        )
        ratio = "1.0x" if k == "sum" else f"{t / t_sum:.2f}x of sum (CPU {c / c_sum:.2f}x)"
        rows.append(
            [
                f"(b) merge --method {k} --into 124M",
                f"{t:.2f} s wall, {c:.2f} s CPU, peak RSS {rss:.0f} MiB",
                ratio,
                "" if k == "sum" else "target <= 2x",
            ]
        )
    return rows


def bench_adapter(args) -> list[list[str]]:
    work = Path(args.work)
    _, ads = setup_files(work)
    env = dict(os.environ, LORAMIX_CACHE_DIR=str(work / "layout-cache"))
    stacked = N_ADAPTERS * RANK
    runs = {
        "core-ties": ["-m", "core-ties", "--density", "0.2"],
        "knots-ties": ["-m", "knots-ties", "--density", "0.2"],
        f"ties --out-rank {stacked}": ["-m", "ties", "--density", "0.2", "--out-rank", str(stacked)],
    }
    out = work / "merge" / "adapter-out"
    out.parent.mkdir(parents=True, exist_ok=True)

    def cmd(flags):
        return [sys.executable, "-m", "loramix", "merge", *flags, *map(str, ads), "--out", str(out), "--force",
                "--device", args.device]  # fmt: skip

    res = {k: [] for k in runs}
    for _ in range(args.repeat):
        for k, flags in runs.items():
            res[k].append(run_child(cmd(flags), env))
    shutil.rmtree(out, ignore_errors=True)
    first = next(iter(runs))
    t0 = statistics.median(w for w, _, _ in res[first])
    rows = []
    for k, v in res.items():
        t, c, rss = (statistics.median(w for w, _, _ in v), statistics.median(c for _, c, _ in v),
                     max(r for *_, r in v))  # fmt: skip
        ratio = "1.0x" if k == first else f"{t / t0:.2f}x of {first}"
        rows.append([f"(c) merge --method {k}, an adapter", f"{t:.2f} s wall, {c:.2f} s CPU, peak RSS {rss:.0f} MiB",
                     ratio, ""])  # fmt: skip
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--layers", type=int, default=12, help="(a) layers of the in-memory adapters")
    ap.add_argument("--no-peft", action="store_true", help="(a) skip the PEFT baseline")
    ap.add_argument("--only", choices=["a", "b", "c"], default=None)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (here and in the (b) children); on a loaded machine 1 avoids "
        "OpenMP oversubscription stalls",
    )
    ap.add_argument("--work", default=str(WORK))
    args = ap.parse_args(argv)

    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the (b) children
    rows = []
    # (b) first, while this process has not imported torch: on Linux a child's
    # peak RSS starts from its parent's at exec, so (a)'s models would inflate it.
    if args.only in (None, "b"):
        rows += bench_into(args)
    if args.only in (None, "c"):
        rows += bench_adapter(args)
    if args.only in (None, "a"):
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        rows = bench_svd(args) + rows
    import torch

    print(
        f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
        f"repeat {args.repeat} (median)\n"
    )
    print("| benchmark | time | ratio | target |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
