"""Benchmark: start-up of the ``loramix`` command against ``import torch``.

A user starts every command from a cold interpreter, so ``loramix --help``,
``loramix CMD --help`` and argument errors must not pay for torch,
transformers or pandas (issue 12, item 2). Measured as whole processes,
interleaved in one run (so a busy machine slows all of them alike), each
``--repeat`` times, median wall time:

* ``python -c "import torch"`` (the anchor);
* ``python -m loramix --help``;
* ``python -m loramix merge --help`` and ``python -m loramix similarity --help``;
* ``python -m loramix sum A --out O --weights 1,2`` (an argument error, exit 2);
* ``python -c "pass"`` (the interpreter alone, for reference).

Target: ``loramix --help`` (and every ``CMD --help``) <= 1/5 of ``import torch``.

Then the other commands as a user meets them, on small inputs written to a
temporary folder (two GPT-2-shaped LoRA adapters of 2 layers, a fit.json of 5
points, a tiny Llama base folder of 2 blocks with a tokenizer and a scenario on
it), in the same interleaved runs, each beside its anchor (what the
command must at least do):

* ``inspect A``: numpy and pandas, no torch (the numpy reader; its norms are
  numpy's float64 Gram products); anchors ``import torch`` and ``python -c
  "import pandas"``;
* ``inspect DORA`` and ``similarity DORA DORA2``: two PEFT DoRA adapters
  (``use_dora=True``, rank 4, the 7 linear modules of the tiny Llama base's 2
  blocks): the numpy reader too, no torch; anchor ``python -c "import pandas"``;
* ``plan A B`` (no fit) and ``predict A B --fit fit.json``: numpy and pandas,
  no torch (the cosines are numpy's); anchors ``import torch`` and
  ``python -c "import pandas"``;
* ``scenario check scenarios/quickstart.toml`` with an empty cache, and
  ``scenario check`` of a scenario on the base folder; anchor ``import
  torch`` (they import neither torch nor pandas: the kinds' flags are read
  from their files, the base's config and safetensors headers as JSON);
* argument errors with a missing path (``inspect``, ``sum``, ``plan``,
  ``predict``, ``base import``, ``scenario check``, ``eval --data``,
  ``eval --base``, ``similarity``, ``base build --data``, ``plan --fit``), an
  unknown ``train --kind``, a ``merge --density`` out of range, ``merge -m
  ties`` without ``--into`` (the adapters' checks in numpy first) and
  ``train --top-layers 0`` (checked against config.json): anchor ``python -c
  "pass"`` (those checks need nothing heavy);
* ``base import SmolLM2.gguf --out EXISTING`` (exit 2, refused before the file
  is parsed), where ``../shared/models`` holds the GGUF;
* ``scenario run`` of a small LoRA study (a tiny GPT-2 built on the spot, two
  synthetic domains, sum and TIES) whose every step is in the cache (run once
  by the fixtures): the report re-rendered, torch and transformers not
  imported; anchor ``import torch``.

A first ``base import`` of that GGUF (20-40 s, de-quantisation and tokenizer
conversion) is ``bench_gguf.py``'s.

    python benchmarks/bench_startup.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import machine_line, markdown_table, run_measured  # noqa: E402
from _smol import GGUF  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--fixtures", default=None, help=argparse.SUPPRESS)  # the child that writes them
    args = ap.parse_args(argv)
    if args.fixtures is not None:
        fixtures(Path(args.fixtures))
        return
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as work:
        # written by a child: with torch loaded here, every child forked from this process
        # would start at its resident size, and the peak RSS column would read that
        run_measured([sys.executable, __file__, "--fixtures", work]).check()
        run(args, Path(work))


def fixtures(work: Path) -> None:
    """Two small LoRA adapters (``adapters/a000``, ``a001``), a fit.json, a data
    file (``d.jsonl``), two folders (``exists``, ``cache``), a tiny Llama base
    (``base``: 2 blocks, a byte-level BPE tokenizer) and a scenario on it
    (``base.toml``), and a small study (``tiny.toml``) run once into the cache
    ``scache`` (report ``tiny``) in ``work``."""
    import torch
    from bench_similarity import write_adapters
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from loramix.fit import fit_line

    write_adapters(work / "adapters", 2, layers=2)
    fit = fit_line([0.05, 0.1, 0.2, 0.3, 0.4], [1.0, 2.5, 4.0, 7.5, 9.0]).to_dict()
    (work / "fit.json").write_text(
        json.dumps({"fits": [{"adapter_method": "lora", "merge_method": "sum", **fit}]})
    )
    (work / "exists").mkdir()
    (work / "cache").mkdir()
    (work / "d.jsonl").write_text('{"question": "1+1?", "answer": "2"}\n' * 8)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(work / "base")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["1 + 2 = 3", "two plus two is four"], trainers.BpeTrainer(vocab_size=300))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>").save_pretrained(str(work / "base"))
    from peft import LoraConfig, get_peft_model

    for i in range(2):  # DoRA: PEFT's own files (init_lora_weights=False: B nonzero)
        torch.manual_seed(1 + i)
        dora = LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])  # fmt: skip
        model = get_peft_model(LlamaForCausalLM.from_pretrained(work / "base"), dora)
        model.save_pretrained(str(work / f"dora{i}"))
    (work / "base.toml").write_text(
        f'name = "v"\n[base]\npath = "{work / "base"}"\n'
        '[domains.a]\ndata = "synthetic:arith"\ntrain = 10\neval = 5\n'
        '[domains.b]\ndata = "synthetic:units"\ntrain = 10\neval = 5\n[adapters]\nrank = 4\n'
    )
    from loramix.scenario.runner import run_scenario

    (work / "tiny.toml").write_text(
        'name = "tiny"\n[base.build]\nsteps = 20\n'
        '[domains.a]\ndata = "synthetic:arith"\ntrain = 32\neval = 16\n'
        '[domains.b]\ndata = "synthetic:units"\ntrain = 32\neval = 16\n'
        "[adapters]\nrank = 2\nalpha = 8\nsteps = 4\nbatch = 8\nmax_len = 48\n"
        '[merge]\nmethods = ["sum", "ties"]\nties = { density = 0.5 }\n'
    )
    run_scenario(work / "tiny.toml", out=work / "tiny", cache_dir=work / "scache", progress=False)


def run(args, work: Path) -> None:
    py = sys.executable
    f = {"a": str(work / "adapters" / "a000"), "b": str(work / "adapters" / "a001"), "fit": str(work / "fit.json"),
         "exists": str(work / "exists"), "cache": str(work / "cache")}  # fmt: skip
    lmx = [py, "-m", "loramix"]
    cmds = {
        'python -c "import torch"': [py, "-c", "import torch"],
        "loramix --help": [py, "-m", "loramix", "--help"],
        "loramix merge --help": [py, "-m", "loramix", "merge", "--help"],
        "loramix similarity --help": [py, "-m", "loramix", "similarity", "--help"],
        "loramix sum: bad --weights (exit 2)": [
            py,
            "-m",
            "loramix",
            "sum",
            "a",
            "--out",
            "o",
            "--weights",
            "1,2",
        ],
        'python -c "pass"': [py, "-c", "pass"],
        'python -c "import pandas"': [py, "-c", "import pandas"],
        # the other commands, each with its anchor (ANCHOR below)
        "loramix inspect A": [*lmx, "inspect", f["a"]],
        "loramix inspect DORA": [*lmx, "inspect", str(work / "dora0")],
        "loramix similarity DORA DORA2": [*lmx, "similarity", str(work / "dora0"), str(work / "dora1")],
        "loramix plan A B": [*lmx, "plan", f["a"], f["b"]],
        "loramix predict A B --fit fit.json": [*lmx, "predict", f["a"], f["b"], "--fit", f["fit"]],
        "loramix scenario check quickstart.toml": [
            *lmx,
            "scenario",
            "check",
            str(HERE.parent / "scenarios" / "quickstart.toml"),
            "--cache",
            f["cache"],
        ],
        "loramix inspect MISSING (exit 2)": [*lmx, "inspect", str(work / "missing")],
        "loramix sum A MISSING (exit 2)": [
            *lmx,
            "sum",
            f["a"],
            str(work / "missing"),
            "--out",
            str(work / "o"),
        ],
        "loramix plan A MISSING (exit 2)": [*lmx, "plan", f["a"], str(work / "missing")],
        "loramix predict A MISSING --fit fit.json (exit 2)": [
            *lmx,
            "predict",
            f["a"],
            str(work / "missing"),
            "--fit",
            f["fit"],
        ],
        "loramix base import MISSING (exit 2)": [*lmx, "base", "import", str(work / "m.gguf"), "--out", "o"],
        "loramix scenario check MISSING (exit 2)": [*lmx, "scenario", "check", str(work / "missing.toml")],
        "loramix base build --data MISSING (exit 2)": [
            *lmx,
            "base",
            "build",
            "--data",
            str(work / "m.jsonl"),
            "--out",
            "o",
        ],
        "loramix eval --data MISSING (exit 2)": [
            *lmx,
            "eval",
            "--base",
            f["exists"],
            "--data",
            str(work / "m.jsonl"),
        ],
        "loramix train --kind bogus (exit 2)": [
            *lmx, "train", "--base", f["exists"], "--data", str(work / "d.jsonl"), "--out", str(work / "o"),
            "--kind", "bogus",
        ],
        "loramix eval --base MISSING (exit 2)": [
            *lmx, "eval", "--base", str(work / "missing"), "--data", str(work / "d.jsonl"),
        ],
        "loramix merge -m ties --density 2 (exit 2)": [
            *lmx, "merge", f["a"], f["b"], "-m", "ties", "--density", "2", "--out", str(work / "o"),
        ],
        "loramix similarity A MISSING (exit 2)": [*lmx, "similarity", f["a"], str(work / "missing")],
        "loramix scenario check (a base folder)": [
            *lmx, "scenario", "check", str(work / "base.toml"), "--cache", f["cache"],
        ],
        "loramix plan A B --fit MISSING (exit 2)": [*lmx, "plan", f["a"], f["b"], "--fit", str(work / "m.json")],
        "loramix merge -m ties, no --into (exit 2)": [
            *lmx, "merge", f["a"], f["b"], "-m", "ties", "--density", "0.5", "--out", str(work / "o"),
        ],
        "loramix scenario run, every step cached": [
            *lmx, "scenario", "run", str(work / "tiny.toml"), "--out", str(work / "tiny"), "--cache",
            str(work / "scache"), "--quiet",
        ],
        "loramix train --top-layers 0 (exit 2)": [
            *lmx, "train", "--base", str(work / "base"), "--data", str(work / "d.jsonl"), "--out", str(work / "o"),
            "--top-layers", "0",
        ],
    }  # fmt: skip
    if GGUF.is_file():
        cmds["loramix base import SmolLM2 --out EXISTING (exit 2)"] = [
            *lmx, "base", "import", str(GGUF), "--out", f["exists"],
        ]  # fmt: skip
    torch_, pass_, pandas_ = 'python -c "import torch"', 'python -c "pass"', 'python -c "import pandas"'
    anchor = {k: torch_ for k in cmds if k.startswith("loramix")}
    anchor.update({k: pass_ for k in cmds if "(exit 2)" in k})
    numpy_only = ("loramix predict A B --fit fit.json", "loramix inspect A", "loramix inspect DORA",
                  "loramix similarity DORA DORA2")  # fmt: skip
    anchor.update({k: pandas_ for k in cmds if k in numpy_only})
    expect_rc = {k: 2 for k in cmds if "(exit 2)" in k}
    runs: dict[str, list[float]] = {k: [] for k in cmds}
    rss: dict[str, float] = {}
    for _ in range(max(1, args.repeat)):
        for label, cmd in cmds.items():
            m = run_measured(cmd, cwd=HERE.parent)
            if m.returncode != expect_rc.get(label, 0):
                raise RuntimeError(f"{label}: exit {m.returncode}\n{m.stderr[-2000:]}")
            runs[label].append(m.wall_s)
            rss[label] = max(rss.get(label, 0.0), m.peak_rss_mb)
    med = {k: statistics.median(v) for k, v in runs.items()}
    torch_s = med['python -c "import torch"']
    print(f"\n### start-up: whole processes, median of {args.repeat} interleaved runs\n")
    print(
        markdown_table(
            ["process", "wall (s)", "min (s)", "peak RSS (MiB)", "/ import torch", "anchor", "/ anchor"],
            [
                [
                    k,
                    f"{med[k]:.3f}",
                    f"{min(runs[k]):.3f}",
                    f"{rss[k]:.0f}",
                    f"{med[k] / torch_s:.3f}",
                    anchor.get(k, ""),
                    f"{med[k] / med[anchor[k]]:.2f}" if k in anchor else "",
                ]
                for k in cmds
            ],
        )
    )
    helps = [k for k in cmds if k.startswith("loramix") and ("--help" in k or "bad --weights" in k)]
    worst = max(med[k] for k in helps)
    print(
        f"\n- loramix --help: {torch_s / med['loramix --help']:.1f}x faster than import torch; slowest "
        f"--help or --weights-error row {worst / torch_s:.3f} of it (target <= 0.2: {'met' if worst <= 0.2 * torch_s else 'NOT met'})"
    )
    others = [k for k in anchor if k not in helps and k.startswith("loramix")]
    for k in others:
        print(f"- {k}: {med[k]:.2f} s, {med[k] / med[anchor[k]]:.2f}x {anchor[k]}")
    print(f"- {machine_line()}")


if __name__ == "__main__":
    main()
