"""Benchmark ``sum --into``, ``merge -m ties``, ``-m dare-ties``, ``-m della``, ``-m core-ties``, ``-m knots-ties``, ``-m iso-c``, ``-m iso-cts`` and ``-m tsv``
at 7B scale, against a plain copy of the shards.

Setup (written once into ``--work``, default ``benchmarks/_work/scale/``,
git-ignored, and reused while its recipe is unchanged; about 14 GB):

- a Llama-2-7B-shaped base: a transformers folder (``config.json``,
  ``model_type`` llama, 32 layers, hidden 4096, intermediate 11008, 32 heads,
  vocabulary 32000, bfloat16, untied embeddings) with random bfloat16 weights
  (random bits with the exponent pinned, so every value is a finite
  ``+-[2^-7, 2^-5)``; norms 1), written tensor by tensor into shards of at most
  5 GB (transformers' ``max_shard_size="5GB"`` split: 3 shards, 13.5 GB) with
  ``model.safetensors.index.json``. ``.recipe.json`` records the shapes; a
  different recipe rebuilds it.
- three PEFT LoRA adapters, rank 16, ``lora_alpha`` 32, on ``q,k,v,o,gate,up,
  down`` of every layer (``adapter_config.json`` + ``adapter_model.safetensors``
  as PEFT writes them: float32 factors, keys ``base_model.model.<module>.lora_A.weight``),
  ``A`` Kaiming-uniform as PEFT initialises it and a random non-zero ``B``.

Whole processes, one at a time, each timed by ``_common.run_measured`` (wall
time, and that child's own peak RSS from ``os.wait4``, the figure
``/usr/bin/time -f %M`` gives):

- ``copy``: the anchor, a python process ``shutil.copyfile``-ing every file of
  the base folder (in-kernel ``sendfile``);
- ``sum``: ``loramix sum A1 A2 A3 --into BASE --out OUT``;
- ``ties``: ``loramix merge -m ties --density 0.2 A1 A2 A3 --into BASE --out OUT``
  (``--no-progress``, as ``sum``);
- ``dare-ties``: the same with ``-m dare-ties`` (no target: how far DARE's
  serial mask draws leave it behind TIES);
- ``della``: the same with ``-m della`` (no target: each entry of each dense
  delta kept with a probability by its magnitude's rank in its row; how far
  that leaves it behind);
- ``core-ties``, ``knots-ties``: the same with ``-m core-ties`` / ``-m
  knots-ties`` (no target: TIES on each delta's coordinates in bases the
  factors span, whose merged delta is a factor pair again; docs/merging.md,
  "Core space and KnOTS");
- ``iso-c``, ``iso-cts``, ``tsv``: the same with ``-m iso-c`` / ``-m iso-cts``
  / ``-m tsv`` (no target: the sum's SVD from the factors, its spectrum
  flattened, for Iso-CTS with each adapter's own directions in its weakest
  ones; each delta's SVD and the stacked vectors orthogonalised;
  docs/merging.md, "Iso-C and TSV", "Iso-CTS");
- ``sum`` again with ``LORAMIX_DIRECT_IO=0``: the output through the page
  cache instead of straight to the disk (``O_DIRECT``, the default for files
  this large), to show what that choice is worth.

Page cache: the 13.5 GB base fits this machine's page cache, the output does
not fit beside it; so before every timed process the base is read once in full
(into the cache) and ``sync`` runs (no write-back left over from the one
before), and every output is deleted as soon as it is measured. The copy runs
first and last; its figure is the mean of the two. loramix's cache of the
base's sha256 is the benchmark's own (``--work``/cache): the ``sum`` and
``ties`` rows run with it warm (what every run after the first on a base
meets), and one extra ``sum`` row runs with the hashes gone (the first run,
which also hashes the 13.5 GB). The TIES kernels (``loramix/native``) are
built once per machine into that cache; the build is timed once on its own
(in a fresh cache folder) and the ``ties`` rows run with it built.

Targets (issue 12): ``sum`` within 1.1x of the copy with a peak RSS under
1.5 GiB; ``ties`` within 2x of ``sum``.

    python benchmarks/bench_scale.py [--work DIR] [--repeat 1] [--threads N] [--clean]
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
sys.path.insert(0, str(HERE))
from _common import machine_line, markdown_table, run_measured  # noqa: E402

WORK = HERE / "_work" / "scale"

# Llama-2-7B: the shapes the base is built with (the recipe; a change rebuilds it)
RECIPE = {
    "model_type": "llama",
    "layers": 32,
    "hidden": 4096,
    "intermediate": 11008,
    "heads": 32,
    "vocab": 32000,
    "dtype": "bfloat16",
    "max_shard_bytes": 5_000_000_000,
    "generator": "pcg64 bits, exponent pinned to 2^-7..2^-6; norms 1",
    "seed": 0,
}
ADAPTERS = {"n": 3, "rank": 16, "alpha": 32, "dtype": "float32", "seed": 100}
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
GiB = 1 << 30


# ---- the base --------------------------------------------------------------------------


def base_tensors(r: dict) -> list[tuple[str, tuple[int, ...]]]:
    """``(key, shape)`` of a Llama checkpoint, in ``state_dict`` order."""
    h, f, v = r["hidden"], r["intermediate"], r["vocab"]
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(r["layers"]):
        p = f"model.layers.{i}."
        out += [(f"{p}self_attn.{n}.weight", (h, h)) for n in ATTN]
        out += [(f"{p}mlp.gate_proj.weight", (f, h)), (f"{p}mlp.up_proj.weight", (f, h))]
        out += [(f"{p}mlp.down_proj.weight", (h, f))]
        out += [(f"{p}input_layernorm.weight", (h,)), (f"{p}post_attention_layernorm.weight", (h,))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def shard_split(tensors, max_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """transformers' ``max_shard_size`` split: a new shard when the next
    tensor would take the current one past ``max_bytes``."""
    shards, cur, size = [], [], 0
    for key, shape in tensors:
        n = 2 * _numel(shape)
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((key, shape))
        size += n
    return [*shards, cur]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def write_random_bf16(f, key: str, numel: int, rng, chunk: int = 1 << 24) -> None:
    """``numel`` random bfloat16 values to ``f``, ``chunk`` at a time: random
    bits with sign, the exponent's low bit and the mantissa kept and the rest
    of the exponent set (``+-[2^-7, 2^-5)``); a norm's weights are 1."""
    import numpy as np

    if "norm" in key:
        f.write(np.full(numel, 0x3F80, dtype="<u2").tobytes())
        return
    done = 0
    while done < numel:
        n = min(chunk, numel - done)
        bits = np.frombuffer(rng.bytes(2 * n), dtype="<u2").copy()
        np.bitwise_and(bits, 0x80FF, out=bits)
        np.bitwise_or(bits, 0x3C00, out=bits)
        f.write(memoryview(bits))
        done += n


def write_base(base: Path, r: dict) -> None:
    """The base folder (config, shards, index), written shard by shard."""
    import numpy as np

    rng = np.random.default_rng(r["seed"])
    tmp = base.with_name(base.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards = shard_split(base_tensors(r), r["max_shard_bytes"])
    weight_map, total = {}, 0
    for i, items in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        items = sorted(items)  # safetensors stores a file's tensors by name
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for key, shape in items:
            n = 2 * _numel(shape)
            header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
            weight_map[key] = name
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(tmp / name, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for key, shape in items:
                write_random_bf16(f, key, _numel(shape), rng)
        total += off
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": r["model_type"],
        "hidden_size": r["hidden"],
        "intermediate_size": r["intermediate"],
        "num_hidden_layers": r["layers"],
        "num_attention_heads": r["heads"],
        "num_key_value_heads": r["heads"],
        "vocab_size": r["vocab"],
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "torch_dtype": r["dtype"],
        "use_cache": True,
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / ".recipe.json").write_text(json.dumps(r, sort_keys=True) + "\n")
    shutil.rmtree(base, ignore_errors=True)
    os.replace(tmp, base)


def write_adapter(out: Path, r: dict, a: dict, index: int) -> None:
    """One PEFT LoRA folder as PEFT saves it: float32 factors, keys without the adapter name."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(a["seed"] + index)
    h, f, rank = r["hidden"], r["intermediate"], a["rank"]
    shapes = {**{n: (h, h) for n in ATTN}, "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}
    tensors = {}
    for layer in range(r["layers"]):
        for n, (o, i) in shapes.items():
            part = "self_attn" if n in ATTN else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{n}"
            bound = 1.0 / i**0.5  # PEFT's kaiming_uniform_(a=sqrt(5)) bound
            tensors[f"{key}.lora_A.weight"] = (torch.rand(rank, i, generator=g) * 2 - 1) * bound
            tensors[f"{key}.lora_B.weight"] = torch.randn(o, rank, generator=g) * 0.02
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": "llama-2-7b-shaped-random",
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": a["alpha"],
        "lora_dropout": 0.05,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted(shapes),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (tmp / ".recipe.json").write_text(json.dumps({**r, **{f"adapter_{k}": v for k, v in a.items()}}) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def _recipe_ok(folder: Path, recipe: dict) -> bool:
    try:
        return json.loads((folder / ".recipe.json").read_text()) == recipe
    except (OSError, ValueError):
        return False


def child_setup(work: str, layers: str) -> None:
    RECIPE["layers"] = int(layers)
    work_p = Path(work)
    work_p.mkdir(parents=True, exist_ok=True)
    base = work_p / "base"
    t0 = time.perf_counter()
    if _recipe_ok(base, RECIPE):
        how = "reused"
    else:
        need = 2 * sum(_numel(s) for _, s in base_tensors(RECIPE))
        free = shutil.disk_usage(work_p).free
        if free < 2 * need + 2 * GiB:  # the base, and one output beside it later
            raise SystemExit(
                f"{work_p}: {free / 1e9:.0f} GB free; the base and one output need {2 * need / 1e9:.0f} GB"
            )
        write_base(base, RECIPE)
        how = "written"
    t_base = time.perf_counter() - t0
    for i in range(ADAPTERS["n"]):
        d = work_p / f"adapter{i}"
        if not _recipe_ok(d, {**RECIPE, **{f"adapter_{k}": v for k, v in ADAPTERS.items()}}):
            write_adapter(d, RECIPE, ADAPTERS, i)
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    n_shards = len(list(base.glob("*.safetensors")))
    ad_size = (work_p / "adapter0" / "adapter_model.safetensors").stat().st_size
    print(
        f"base {size / 1e9:.1f} GB in {n_shards} shards ({how} in {t_base:.0f} s); "
        f"{ADAPTERS['n']} adapters of {ad_size / 1e6:.0f} MB each"
    )


# ---- the children ----------------------------------------------------------------------


def child_copy(base: str, out: str) -> None:
    os.makedirs(out)
    for p in sorted(Path(base).iterdir()):
        if p.is_file() and not p.name.startswith("."):
            shutil.copyfile(p, Path(out) / p.name)


def child_check(base: str, out: str, *ads: str) -> None:
    """One adapted weight of ``out`` (layer 0's ``down_proj``) against
    ``W0 + sum_i s_i B_i A_i`` formed here in float64; prints the largest
    difference in units of the output's bfloat16 rounding step."""
    import torch
    from safetensors import safe_open

    key = "model.layers.0.mlp.down_proj"
    idx = json.loads((Path(base) / "model.safetensors.index.json").read_text())["weight_map"]

    def read(folder, name):
        with safe_open(str(Path(folder) / idx[name]), framework="pt") as f:
            return f.get_tensor(name)

    ref = read(base, key + ".weight").double()
    for a in ads:
        cfg = json.loads((Path(a) / "adapter_config.json").read_text())
        with safe_open(str(Path(a) / "adapter_model.safetensors"), framework="pt") as f:
            B = f.get_tensor(f"base_model.model.{key}.lora_B.weight").double()
            A = f.get_tensor(f"base_model.model.{key}.lora_A.weight").double()
        ref += cfg["lora_alpha"] / cfg["r"] * (B @ A)
    got = read(out, key + ".weight").double()
    # the spacing of bfloat16 at each reference value: 2^(exponent - 7)
    ulp = torch.ldexp(torch.ones_like(ref), torch.frexp(ref).exponent - 8)
    print(f"{float(((got - ref).abs() / ulp).max()):.2f}")


def read_through(base: Path) -> float:
    """Read every shard of ``base`` once (into the page cache); seconds taken."""
    t0 = time.perf_counter()
    buf = bytearray(64 << 20)
    for p in sorted(base.glob("*.safetensors")):
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--work", default=str(WORK), help="where the base and adapters live (default %(default)s)"
    )
    ap.add_argument("--repeat", type=int, default=1, help="timed runs of each process (median)")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every child")
    ap.add_argument("--clean", action="store_true", help="delete the base and adapters afterwards")
    ap.add_argument(
        "--layers", type=int, default=RECIPE["layers"], help="fewer layers: a quick run (default %(default)s)"
    )
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        {"setup": child_setup, "copy": child_copy, "check": child_check}[kind](*rest)
        return

    py = sys.executable
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    RECIPE["layers"] = args.layers
    setup = run_measured([py, __file__, "--child", "setup", str(work), str(args.layers)]).check()
    print(setup.stdout.strip())
    base, ads = work / "base", [work / f"adapter{i}" for i in range(ADAPTERS["n"])]
    out, cache = work / "out", work / "cache"
    env = dict(os.environ, LORAMIX_CACHE_DIR=str(cache))
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    lm = [py, "-m", "loramix"]
    into = ["--into", str(base), "--out", str(out), "--device", "cpu"]
    cmds = {
        "copy": [py, __file__, "--child", "copy", str(base), str(out)],
        "sum": [*lm, "sum", *map(str, ads), *into, "--no-progress"],
        "ties": [*lm, "merge", "-m", "ties", "--density", "0.2", *map(str, ads), *into, "--no-progress"],
        "dare-ties": [
            *lm,
            "merge",
            "-m",
            "dare-ties",
            "--density",
            "0.2",
            *map(str, ads),
            *into,
            "--no-progress",
        ],
    }
    for other in ("della", "core-ties", "knots-ties"):
        cmds[other] = [other if a == "dare-ties" else a for a in cmds["dare-ties"]]
    for other in ("iso-c", "iso-cts", "tsv"):  # no parameter to give
        cmds[other] = [*lm, "merge", "-m", other, *map(str, ads), *into, "--no-progress"]
    cmds["sum-cold"] = cmds["sum-buffered"] = cmds["sum"]
    envs = {"sum-buffered": dict(env, LORAMIX_DIRECT_IO="0")}
    checked: dict[str, str] = {}

    def once(kind: str) -> tuple[float, float, float, float, float]:
        """(wall, peak RSS MiB, CPU, then sync s, load average at start) of one process."""
        shutil.rmtree(out, ignore_errors=True)
        if kind == "sum-cold":  # the first run on this base: the sha256 is computed, not cached
            # (the hashes only: the native kernels, built once per machine, are timed on their own)
            shutil.rmtree(cache / "sha256", ignore_errors=True)
        read_through(base)
        os.sync()
        load = os.getloadavg()[0]
        m = run_measured(cmds[kind], env=envs.get(kind, env)).check()
        t0 = time.perf_counter()
        os.sync()  # what the process left in the page cache, written out
        synced = time.perf_counter() - t0
        if kind == "sum" and not checked:
            checked[kind] = (
                run_measured([py, __file__, "--child", "check", str(base), str(out), *map(str, ads)])
                .check()
                .stdout.strip()
            )
        shutil.rmtree(out, ignore_errors=True)
        os.sync()
        return m.wall_s, m.peak_rss_mb, m.cpu_s, synced, load

    print(
        f"first read of the base: {read_through(base):.1f} s; again (page cache): {read_through(base):.1f} s"
    )
    with tempfile.TemporaryDirectory() as fresh:  # what the first TIES merge on a machine adds, once
        built = run_measured(
            [py, "-c", "from loramix.native import ties; assert ties.kernels() is not None"],
            env=dict(env, LORAMIX_CACHE_DIR=fresh),
        )
    print(
        "TIES kernels (loramix/native/ties.c), built once per machine and cached: "
        + (f"{built.wall_s:.1f} s here" if built.returncode == 0 else "not built here (the eager code runs)")
    )
    runs: dict[str, list[tuple]] = {k: [] for k in cmds}
    order = [
        "copy",
        "sum-cold",
        "sum",
        "sum-buffered",
        "ties",
        "dare-ties",
        "della",
        "core-ties",
        "knots-ties",
        "iso-c",
        "iso-cts",
        "tsv",
    ]
    for _ in range(max(1, args.repeat)):
        for kind in order:
            runs[kind].append(once(kind))
    runs["copy"].append(once("copy"))  # the copy again, after loramix
    med = {k: tuple(statistics.median(r[i] for r in v) for i in range(5)) for k, v in runs.items() if v}
    copies = ", ".join(f"{r[0]:.1f}" for r in runs["copy"])
    med["copy"] = tuple(statistics.mean(r[i] for r in runs["copy"]) for i in range(5))

    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    print(
        f"\n### 7B scale: Llama-2-7B-shaped base ({size / 1e9:.1f} GB bfloat16, "
        f"{len(list(base.glob('*.safetensors')))} shards), {ADAPTERS['n']} rank-{ADAPTERS['rank']} adapters "
        f"on q,k,v,o,gate,up,down of all {args.layers} layers, --device cpu, "
        f"{'median of ' + str(args.repeat) if args.repeat > 1 else 'one'} whole-process run(s) each"
        f"{f', {args.threads} thread(s)' if args.threads else ''}\n"
    )
    print(
        "Before every process the base is read once in full (page cache) and `sync` runs; after it, "
        "`sync` is timed (what it left in the page cache, written to disk: *+ sync*) and the output "
        f"deleted. The copy ran first in each round and once more at the end ({copies} s); its row is "
        "their mean. The machine is shared: the load average at each start is in the table, and CPU is the "
        "process's user + system time.\n"
    )
    cw, sw, tw = med["copy"][0], med["sum"][0], med["ties"][0]
    cd, sd, td = (med[k][0] + med[k][3] for k in ("copy", "sum", "ties"))
    rows = [
        ("plain copy of the shards (`shutil.copyfile`)", med["copy"]),
        ("loramix sum --into (sha256 cached)", med["sum"]),
        ("loramix sum --into, first run (hashes the base)", med["sum-cold"]),
        ("loramix sum --into, through the page cache (`LORAMIX_DIRECT_IO=0`)", med["sum-buffered"]),
        ("loramix merge -m ties --density 0.2 --into", med["ties"]),
        ("loramix merge -m dare-ties --density 0.2 --into (no target)", med["dare-ties"]),
        ("loramix merge -m della --density 0.2 --into (no target)", med["della"]),
        ("loramix merge -m core-ties --density 0.2 --into (no target)", med["core-ties"]),
        ("loramix merge -m knots-ties --density 0.2 --into (no target)", med["knots-ties"]),
        ("loramix merge -m iso-c --into (no target)", med["iso-c"]),
        ("loramix merge -m iso-cts --into (no target)", med["iso-cts"]),
        ("loramix merge -m tsv --into (no target)", med["tsv"]),
    ]
    print(
        markdown_table(
            [
                "process",
                "wall (s)",
                "+ sync (s)",
                "CPU (s)",
                "peak RSS (MiB)",
                "wall / copy",
                "wall / sum",
                "load",
            ],
            [
                [
                    label,
                    f"{w:.1f}",
                    f"{w + y:.1f}",
                    f"{c:.1f}",
                    f"{r:.0f}",
                    f"{w / cw:.2f}",
                    f"{w / sw:.2f}",
                    f"{ld:.1f}",
                ]
                for label, (w, r, c, y, ld) in rows
            ],
        )
    )
    print(
        f"\n- sum / copy: {sw / cw:.2f} (target <= 1.1); with the sync {sd / cd:.2f}; CPU {med['sum'][2] / med['copy'][2]:.2f}; "
        f"first run {med['sum-cold'][0] / cw:.2f}"
    )
    bw, bd = med["sum-buffered"][0], med["sum-buffered"][0] + med["sum-buffered"][3]
    print(
        f"- direct writes: sum {sw:.1f} s against {bw:.1f} s through the page cache ({bw / sw:.2f}x); "
        f"with the sync {sd:.1f} against {bd:.1f} s; CPU {med['sum'][2]:.1f} against {med['sum-buffered'][2]:.1f} s"
    )
    peak = max(med["sum"][1], med["sum-cold"][1])
    print(
        f"- sum peak RSS: {peak:.0f} MiB (target < 1536 MiB); ties: {med['ties'][1]:.0f} MiB; "
        f"dare-ties: {med['dare-ties'][1]:.0f} MiB; della: {med['della'][1]:.0f} MiB"
    )
    print(
        f"- ties / sum: {tw / sw:.2f} (target <= 2); with the sync {td / sd:.2f}; CPU {med['ties'][2] / med['sum'][2]:.2f}"
    )
    print(
        f"- dare-ties / sum: {med['dare-ties'][0] / sw:.2f}; dare-ties / ties: {med['dare-ties'][0] / tw:.2f}; "
        f"della / sum: {med['della'][0] / sw:.2f}; della / ties: {med['della'][0] / tw:.2f}"
    )
    print(
        f"- core-ties / sum: {med['core-ties'][0] / sw:.2f} ({med['core-ties'][1]:.0f} MiB); "
        f"knots-ties / sum: {med['knots-ties'][0] / sw:.2f} ({med['knots-ties'][1]:.0f} MiB); "
        f"iso-c / sum: {med['iso-c'][0] / sw:.2f} ({med['iso-c'][1]:.0f} MiB); "
        f"iso-cts / sum: {med['iso-cts'][0] / sw:.2f} ({med['iso-cts'][1]:.0f} MiB); "
        f"tsv / sum: {med['tsv'][0] / sw:.2f} ({med['tsv'][1]:.0f} MiB)"
    )
    print(
        f"- check: layer 0's down_proj of the sum against W0 + sum_i s_i B_i A_i formed in float64 "
        f"differs by at most {checked.get('sum', '?')} bfloat16 steps (rounding once: 0.5)"
    )
    print(f"- {machine_line()}")
    if args.clean:
        for p in (base, *ads, cache):
            shutil.rmtree(p, ignore_errors=True)


if __name__ == "__main__":
    main()
