"""Benchmark evaluation throughput (issue 4).

(a) loramix :func:`~loramix.evaluate.perplexity` against a plain transformers
    loop (``model(**batch).loss`` per batch under ``inference_mode``, the
    token-weighted mean taken outside) on the same batches of the same model.
    Tokens per second count the scored tokens (labels != -100 after the
    shift), identical for both. Target: loramix >= 0.9x. loramix is also run
    with ``fast=False`` (full logits, as transformers) to show where the gain
    comes from: with ``--on answer`` loramix applies the output layer to the
    scored positions only.

(b) The sum of ``--adapters`` random LoRA adapters (rank 8, all of ``c_attn``,
    ``c_proj``, ``c_fc``) evaluated merged into the weights
    (:func:`loramix.layers.merge_into_model`) against attached on the fly
    (:func:`loramix.layers.attach_adapters`): the ratio of tokens per second
    (the D2-LoRA paper reports 1.91x for merged). Both perplexities are
    printed as a check that they agree.

``--kind d2lora`` makes (b)'s adapters D2-LoRA ones (on the fly, each forward
also takes the row norms of ``W0 + dW``; merged, nothing).

The model: by default a randomly initialised GPT-2 of ``--arch`` (``small``:
loramix's ``base build --size small`` shape; ``gpt2``: GPT-2 small, 124M;
``smol``: a Llama of SmolLM2-135M's shapes)
with a BPE tokenizer trained on the synthetic domains; weights do not change
the speed. ``--base DIR`` uses a real folder instead. Data: the synthetic
domains, or ``--data FILE ...`` (e.g. ``../shared/data/math.jsonl``).
Timings are the best of ``--repeat`` interleaved runs after one warm-up.

    python benchmarks/bench_eval.py [--arch small|gpt2|tiny|smol] [--base DIR] [--data F ...]
        [--records 256] [--batch 16] [--max-len 256] [--on answer|all] [--adapters 3] [--kind lora|d2lora]
        [--repeat 3] [--device cpu|cuda] [--threads N]

``--smol [DIR]``: the SmolLM2-135M rows (a real base and real data,
``benchmarks/_smol.py``; skipped with the reason where absent): the plain
transformers loop against loramix's full forward, loramix from the cached
prefix with the top 4 layers run (the cost of evaluating any adapter or merge
on those layers; the prefix's one-off cost per data set shown apart) and the
base loaded in bf16, all on both cores (``--threads``).

    python benchmarks/bench_eval.py --smol [DIR] [--records 64] [--max-len 256] [--repeat 1]

With ``--smol``, two first-run rows follow (skip them with ``--cold-records
0``): ``loramix eval`` as a cold process (imports, loading, tokenising,
the forward) on ``--cold-records`` records of the README's real domains
(math and medicine, ``--max-len``, ``--batch``) with an empty
``LORAMIX_CACHE_DIR``: its CPU time (user + system, the steadier figure on
a shared machine) and wall time; and a study's evaluation step: one
random rank-8 LoRA adapter on the top 2 blocks evaluated from the base held
in memory, ``evaluate((model, tokenizer), adapters=..., top_layers=2)``, on
4 records of each of those domains at ``max_len`` 64, ``batch`` 8 (the
settings of ``scenarios/real-14-domains.toml``), the prefix computed by a
first call: CPU seconds per evaluation, the best of ``--repeat`` + 2, as the
study runs it (the base lent to the evaluation, its prefix digest remembered,
:func:`loramix.prefix.remembering_digests`) against the anchor, what it did
before: a copy of the base per evaluation, its prefix hashed each time
(interleaved); and the fraction of the positions the forward computes that
are padding.

Prints markdown tables. On a shared machine the figures are preliminary.
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work" / "eval"
ARCHS = {
    "tiny": dict(n_layer=2, n_embd=128, n_head=4),
    "small": dict(n_layer=4, n_embd=256, n_head=8),
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12),
    # SmolLM2-135M's shapes (a Llama with grouped-query attention), random weights
    "smol": dict(
        num_hidden_layers=30,
        hidden_size=576,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        tie_word_embeddings=True,
    ),  # fmt: skip
}


def make_base(arch: str, max_len: int, work: Path = WORK) -> Path:
    """A random GPT-2 (or Llama, ``smol``) of ``arch`` with a synthetic-data
    tokenizer, cached in ``work`` (``--work``)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from loramix.basebuild import train_tokenizer
    from loramix.data import load_records, record_text

    folder = work / f"base-{arch}-{max_len}"
    if (folder / "model.safetensors").exists():
        return folder
    texts = [
        record_text(r)
        for d in ("arith", "units", "dates", "sort")
        for r in load_records(f"synthetic:{d}?n=2000")
    ]
    tok = train_tokenizer(texts, 4096, max_len)
    torch.manual_seed(0)
    ids = dict(vocab_size=len(tok), eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    if arch == "smol":
        model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=max_len, **ids, **ARCHS[arch]))
    else:
        model = GPT2LMHeadModel(GPT2Config(n_positions=max_len, **ids, **ARCHS[arch]))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_adapters(model, n: int, rank: int = 8, kind: str = "lora") -> list:
    """``n`` random PEFT-layout LoRA adapters (non-zero B) as loramix Adapters, in
    memory; ``kind="d2lora"``: D2-LoRA ones (a second, negative branch, tau 0.5)."""
    from loramix.adapter import D2LORA, LORA, Adapter, ModuleDelta
    from loramix.layers import default_targets, find_targets

    names = find_targets(model, default_targets(model))
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        mods = {}
        for name in names:
            w = model.get_submodule(name).weight
            o, k = (
                (w.shape[1], w.shape[0])
                if not isinstance(model.get_submodule(name), torch.nn.Linear)
                else w.shape
            )
            B = torch.randn(o, rank, generator=g) * 0.02
            A = torch.randn(rank, k, generator=g) / math.sqrt(k)
            neg = {}
            if kind == D2LORA:
                neg = dict(B_neg=torch.randn(o, rank, generator=g) * 0.02, tau=0.5,
                           A_neg=torch.randn(rank, k, generator=g) / math.sqrt(k))  # fmt: skip
            mods[name] = ModuleDelta(name=name, B=B, A=A, scale=2.0, alpha=2.0 * rank, **neg)
        out.append(Adapter(name=f"rand{i}", kind=D2LORA if kind == D2LORA else LORA, modules=mods))
    return out


def hf_loop(model, batches, device) -> dict:
    """The plain transformers way: mean loss per batch, re-weighted by its token count."""
    tot, n = 0.0, 0
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            k = int((b["labels"][:, 1:] != -100).sum())
            tot += model(**b).loss.item() * k
            n += k
    if device.type == "cuda":
        torch.cuda.synchronize()
    s = time.perf_counter() - t0
    return {"ppl": math.exp(tot / n), "tokens": n, "seconds": s, "tokens_per_s": n / s}


def best(fns: dict, repeat: int) -> dict:
    """Warm each up once, then ``repeat`` interleaved rounds; keep each one's fastest."""
    res = {k: f() for k, f in fns.items()}
    for _ in range(repeat):
        for k, f in fns.items():
            r = f()
            if r["seconds"] < res[k]["seconds"]:
                res[k] = r
    return res


def main_smol(args) -> None:
    """The SmolLM2 rows (module docstring)."""
    import os

    from _smol import smol_base, smol_data

    from loramix.data import encode_records, load_records, make_batches, pad_id_for
    from loramix.models import load_causal_lm
    from loramix.perplexity import perplexity
    from loramix.prefix import prefix_states, split_point, top_view

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    base, how = smol_base(args.smol or None)
    data, dhow = smol_data(args.data[0] if args.data else None)
    if base is None or data is None:
        print(how if base is None else dhow)
        return
    dev = torch.device("cpu")
    model, tok = load_causal_lm(base)
    bf16, _ = load_causal_lm(base, dtype="bfloat16")
    pad = pad_id_for(tok)
    ex = encode_records(tok, load_records(data, limit=args.records), max_len=args.max_len, on=args.on)
    batches = make_batches(ex, batch_size=args.batch, pad_id=pad, sort_by_length=True)
    k = split_point(model, 4)
    t0 = time.perf_counter()
    states = prefix_states(model, k, ex, batch_size=args.batch, pad_id=pad, cache=None)
    prefix_s = time.perf_counter() - t0
    cached = make_batches(ex, batch_size=args.batch, pad_id=pad, sort_by_length=True, embeds=states)
    top = top_view(model, k)
    res = best({
        "transformers loop (model(**batch).loss)": lambda: hf_loop(model, batches, dev),
        "loramix perplexity, 30 layers": lambda: perplexity(model, batches, device=dev),
        "loramix perplexity, top 4 layers from the cached prefix": lambda: perplexity(top, cached, device=dev),
        "loramix perplexity, base in bf16": lambda: perplexity(bf16, batches, device=dev),
    }, args.repeat)  # fmt: skip
    n_in = sum(len(e["input_ids"]) for e in ex)
    print(f"## SmolLM2-135M evaluation ({how}; {dhow}, {len(ex)} records, {n_in:,} input tokens, batch "
          f"{args.batch}, max_len {args.max_len}, on={args.on}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f})\n")  # fmt: skip
    ref = res["transformers loop (model(**batch).loss)"]
    print("| method | ppl | seconds | loss tokens/s | input tokens/s | vs transformers |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in res.items():
        print(f"| {name} | {r['ppl']:.4f} | {r['seconds']:.2f} | {r['tokens_per_s']:,.0f} | "
              f"{n_in / r['seconds']:,.0f} | {r['tokens_per_s'] / ref['tokens_per_s']:.2f}x |")  # fmt: skip
    print(f"\nThe prefix (26 layers) for these {len(ex)} records: {prefix_s:.1f} s, once per data set.")
    if args.cold_records:
        first_run_rows(base, model, tok, args)


def _padding(tok, files, limit: int, max_len: int, batch: int) -> float:
    """The fraction of the positions that eval's sorted, padded batches compute
    that are padding (capped as eval caps them, ``_common.eval_positions``)."""
    from _common import eval_positions

    computed, real = eval_positions(tok, files, limit, max_len, batch)
    return 1 - real / computed


def _cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def first_run_rows(base, model, tok, args) -> None:
    """The cold ``loramix eval`` process and a study's evaluation step (module docstring)."""
    import copy
    import os
    import sys
    import tempfile

    from _common import run_measured
    from _smol import SHARED

    from loramix.adapter import LORA, Adapter, ModuleDelta
    from loramix.perplexity import evaluate
    from loramix.prefix import layer_of, remembering_digests, split_point

    files = [SHARED / "data" / f"{d}.jsonl" for d in ("math", "medicine")]
    if not all(f.exists() for f in files):
        print(f"\nFirst-run rows skipped: no {files[0]} or {files[1]}")
        return
    n, ml, b = args.cold_records, args.max_len, args.batch
    with tempfile.TemporaryDirectory() as cache:
        cmd = [sys.executable, "-m", "loramix", "eval", "--base", str(base), "--data", *map(str, files),
               "--limit", str(n), "--max-len", str(ml), "--batch", str(b), "--threads", str(torch.get_num_threads())]  # fmt: skip
        m = run_measured(cmd, env={**os.environ, "LORAMIX_CACHE_DIR": cache}).check()
    print(f"\n### First run: `loramix eval` as a cold process, empty cache\n\n{n} + {n} records of math and "
          f"medicine, max_len {ml}, batch {b}, {torch.get_num_threads()} threads; padding "
          f"{_padding(tok, files, n, ml, b):.1%} of the positions computed\n")  # fmt: skip
    print(f"| CPU s (user + sys) | wall s |\n| ---: | ---: |\n| {m.cpu_s:.1f} | {m.wall_s:.1f} |")
    k = split_point(model, 2)
    g = torch.Generator().manual_seed(0)
    mods = {}
    for name, mod in model.named_modules():
        if (
            isinstance(mod, torch.nn.Linear)
            and name.endswith(("q_proj", "v_proj"))
            and (layer_of(model, name) or 0) >= k
        ):
            o, i = mod.weight.shape
            mods[name] = ModuleDelta(name=name, B=torch.randn(o, 8, generator=g) * 0.02,
                                     A=torch.randn(8, i, generator=g) / i**0.5, scale=2.0, alpha=16.0)  # fmt: skip
    ad = Adapter(name="random", kind=LORA, modules=mods)
    # no bar: the default turned on with 7565f9c, and the rows before it were measured without one
    kw = dict(
        adapters=[ad], data=files, limit=4, max_len=64, batch=8, device="cpu", top_layers=2, progress=False
    )
    evaluate((model, tok), **kw)  # the prefix, once per data set

    def study():  # as evaluate_on_splits runs it: the base lent, its prefix digest remembered
        with remembering_digests():
            evaluate((model, tok), **kw)

    def copied():  # the anchor, what a study did before: a copy of the base, its prefix hashed each time
        evaluate((copy.deepcopy(model), tok), **kw)

    times = {"study": [], "copied": []}
    for _ in range(args.repeat + 2):  # interleaved
        for name, f in (("study", study), ("copied", copied)):
            t = _cpu()
            f()
            times[name].append(_cpu() - t)
    new, old = min(times["study"]), min(times["copied"])
    print(f"\n### A study's evaluation step: an adapter on the top 2 blocks, base in memory\n\n4 + 4 records, "
          f"max_len 64, batch 8, prefix cached; padding {_padding(tok, files, 4, 64, 8):.1%}; CPU s per "
          f"evaluation, best of {len(times['study'])} interleaved\n")  # fmt: skip
    print("| way | CPU s | vs copy + hash |\n| --- | ---: | ---: |")
    print(f"| copy of the base, prefix hashed (anchor) | {old:.3f} | 1.00x |")
    print(f"| base lent, prefix digest remembered (study) | {new:.3f} | {old / new:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=list(ARCHS), default="small")
    ap.add_argument("--base", default=None)
    ap.add_argument("--work", type=Path, default=WORK, help="where the random base is built and kept")
    ap.add_argument("--data", nargs="*", default=None)
    ap.add_argument("--records", type=int, default=256, help="records per data source")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--on", choices=["answer", "all"], default="answer")
    ap.add_argument("--adapters", type=int, default=3)
    ap.add_argument("--kind", choices=["lora", "d2lora"], default="lora", help="the adapters of (b)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", choices=["a", "b"], default=None)
    ap.add_argument("--smol", nargs="?", const="", default=None, metavar="DIR", help="the SmolLM2-135M rows")
    ap.add_argument(
        "--cold-records", type=int, default=16, help="--smol: records per domain of the cold eval (0: none)"
    )
    args = ap.parse_args()
    if args.smol is not None:
        return main_smol(args)
    if args.threads:
        torch.set_num_threads(args.threads)

    from loramix.data import encode_records, load_records, make_batches, pad_id_for
    from loramix.devices import resolve_device
    from loramix.layers import attach_adapters, detach, merge_into_model
    from loramix.models import load_causal_lm
    from loramix.perplexity import perplexity

    dev = resolve_device(args.device)
    base = Path(args.base) if args.base else make_base(args.arch, args.max_len, args.work)
    model, tok = load_causal_lm(base, device=dev)
    sources = args.data or [
        f"synthetic:{d}?n={args.records}&seed=1" for d in ("arith", "units", "dates", "sort")
    ]
    recs = [r for s in sources for r in load_records(s, limit=args.records)]
    ex = encode_records(tok, recs, max_len=args.max_len, on=args.on)
    batches = make_batches(ex, batch_size=args.batch, pad_id=pad_id_for(tok), sort_by_length=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"## Evaluation throughput ({base.name}, {n_params / 1e6:.1f}M parameters, {len(recs)} records, "
          f"batch {args.batch}, max_len {args.max_len}, on={args.on}, device {dev}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()})\n")  # fmt: skip

    if args.only in (None, "a"):
        res = best(
            {
                "transformers loop (model(**batch).loss)": lambda: hf_loop(model, batches, dev),
                "loramix perplexity": lambda: perplexity(model, batches, device=dev),
                "loramix perplexity, fast=False": lambda: perplexity(model, batches, device=dev, fast=False),
            },
            args.repeat,
        )
        ref = res["transformers loop (model(**batch).loss)"]["tokens_per_s"]
        print("| method | ppl | scored tokens | seconds | tokens/s | vs transformers |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for k, r in res.items():
            print(f"| {k} | {r['ppl']:.4f} | {r['tokens']} | {r['seconds']:.3f} | {r['tokens_per_s']:,.0f} "
                  f"| {r['tokens_per_s'] / ref:.2f}x |")  # fmt: skip
        print()

    if args.only in (None, "b") and args.adapters > 0:
        ads = make_adapters(model, args.adapters, kind=args.kind)
        fly = attach_adapters(copy.deepcopy(detach(model)), ads)
        merged = copy.deepcopy(detach(model))
        merge_into_model(merged, ads)
        res = best(
            {
                "on the fly (attach_adapters)": lambda: perplexity(fly, batches, device=dev),
                "merged (merge_into_model)": lambda: perplexity(merged, batches, device=dev),
                "base alone": lambda: perplexity(model, batches, device=dev),
            },
            args.repeat,
        )
        ref = res["on the fly (attach_adapters)"]["tokens_per_s"]
        kind = {"lora": "LoRA", "d2lora": "D2-LoRA"}[args.kind]
        print(f"### Sum of {args.adapters} rank-8 {kind} adapters: merged vs on the fly\n")
        print("| model | ppl | seconds | tokens/s | vs on the fly |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for k, r in res.items():
            print(f"| {k} | {r['ppl']:.4f} | {r['seconds']:.3f} | {r['tokens_per_s']:,.0f} | "
                  f"{r['tokens_per_s'] / ref:.2f}x |")  # fmt: skip
        print()


if __name__ == "__main__":
    main()
