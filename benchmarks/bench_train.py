"""D2-LoRA training-step overhead over LoRA at the same rank.

One training step = forward, backward and an AdamW update of the adapter
factors, on the same model and the same batches for every method:

- ``lora``: :class:`loramix.layers.LoraLinear`.
- ``d2lora``: :class:`loramix.layers.D2LoraLinear` as ``loramix train``
  runs it (``dense=None``: the dense forward when training on CUDA, the
  factored one elsewhere).
- ``d2lora-factored``: the factored forward (row norms of ``W0 + dW`` from
  the factors, ``||W0||`` cached; ``dW`` and ``W_hat`` never formed).
- ``d2lora-dense``: the reference forward that builds ``W_hat = W* + dW``
  each step (a direct transcription of the paper's formula).
- ``lora-compiled``, ``d2lora-compiled``: the model under
  ``torch.compile(dynamic=False)`` (compiled in the warm-up steps): the D2
  forward's small kernels (row norms, scales) fused; each is set against
  ``lora-compiled`` where both run. On the CPU, inductor needs a C++ compiler.

Methods are timed round-robin (one step of each in turn, repeated) so that a
load spike on a shared machine hits all of them alike; the table gives the
median milliseconds per step and the overhead against LoRA (the paper
reports 19% for D2-LoRA). Models are random-weight transformers configs of
the given sizes (timing does not depend on the weights).

    python benchmarks/bench_train.py                      # CPU, tiny and small GPT-2, small Llama
    python benchmarks/bench_train.py --device cuda --models gpt2-124m llama-1b --batch 16 --seq 512
    python benchmarks/bench_train.py --device cuda --models smollm2-135m --batch 32 --seq 512 \
        --methods lora d2lora lora-compiled d2lora-compiled     # issue 12 item 5: a model that fills the GPU

``--smol [DIR]`` runs the SmolLM2-135M rows instead (a real base and real
data, ``benchmarks/_smol.py``; skipped with the reason where absent): one
training step of ``--batch`` x ``<= --seq`` tokens of ``medicine.jsonl``, LoRA
rank 8 on every projection, for a plain PEFT + transformers loop
(``model(**batch).loss``, backward, clip, AdamW) and loramix's step
(:func:`loramix.train._step`: the fast head, length-bucketed batches), each
on all 30 layers and on the top 4 (PEFT ``layers_to_transform``; loramix
from the cached prefix, whose one-off cost per domain is shown apart), and
loramix top 4 under bf16 autocast. Round-robin, same threads (``--threads``,
default both cores); tokens/s are input tokens (every non-pad token run) and
loss tokens (scored) per second.

    python benchmarks/bench_train.py --smol [DIR] [--steps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

WORK = Path(__file__).resolve().parent / "_work"

MODELS = {
    # name: (family, layers, width, heads, vocab[, kv heads, intermediate]);
    # tiny/small are `loramix base build`'s sizes.
    "gpt2-tiny": ("gpt2", 2, 128, 4, 2048),
    "gpt2-small": ("gpt2", 4, 256, 8, 4096),
    "llama-small": ("llama", 4, 256, 8, 4096),
    "gpt2-124m": ("gpt2", 12, 768, 12, 50257),
    # SmolLM2-135M's shapes (its config.json): grouped-query attention, tied embeddings
    "smollm2-135m": ("llama", 30, 576, 9, 49152, 3, 1536),
    "llama-1b": ("llama", 16, 2048, 32, 32000),
}
#: methods: the adapter kind, then "-factored" or "-dense" (D2's two forwards; without
#: either, the one `train` takes on the device) or "-compiled" (the model under
#: ``torch.compile``: its small kernels fused)
METHODS = ("lora", "d2lora", "d2lora-factored", "d2lora-dense", "lora-compiled", "d2lora-compiled")
DENSE = {"dense": True, "factored": False}


def build_model(name: str, seq: int, device, dtype):
    family, n_layer, width, heads, vocab, *gqa = MODELS[name]
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: a 1B model's CPU init takes long
        return _build(family, n_layer, width, heads, vocab, seq, dtype, *gqa), vocab


def _build(family, n_layer, width, heads, vocab, seq, dtype, kv_heads=None, intermediate=None):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if family == "gpt2":
        cfg = GPT2Config(
            n_layer=n_layer, n_embd=width, n_head=heads, vocab_size=vocab, n_positions=max(seq, 128)
        )
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(
            num_hidden_layers=n_layer,
            hidden_size=width,
            intermediate_size=intermediate or 4 * width,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads or heads,
            vocab_size=vocab,
            max_position_embeddings=max(seq, 128),
            tie_word_embeddings=kv_heads is not None,
        )
        model = LlamaForCausalLM(cfg)
    # Dropout off: it would add noise to the timings and is the same for every method.
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model.to(dtype=dtype)


def make_setup(name, method, rank, alpha, seq, device, dtype):
    from loramix.layers import inject_trainable

    model, vocab = build_model(name, seq, device, dtype)
    kind, _, variant = method.partition("-")
    params = inject_trainable(model, method=kind, rank=rank, alpha=alpha, seed=0, dense=DENSE.get(variant))
    # Non-zero B, as after some training (B = 0 would make some products trivially cheap).
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and ".lora_B" in n:
                p.normal_(0, 0.01)
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    if variant == "compiled":  # compiled on its first step (a warm-up step), shapes fixed
        model = torch.compile(model, dynamic=False)
    return model, opt, vocab


def step(model, opt, batch):
    loss = model(**batch).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(name, methods, *, rank, alpha, batch, seq, steps, warmup, device, dtype):
    g = torch.Generator().manual_seed(0)
    setups = {m: make_setup(name, m, rank, alpha, seq, device, dtype) for m in methods}
    vocab = next(iter(setups.values()))[2]
    batches = []
    for _ in range(4):
        ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
        batches.append({"input_ids": ids, "labels": ids})
    times = {m: [] for m in methods}
    for i in range(warmup + steps):
        for m in methods:
            model, opt, _ = setups[m]
            b = batches[i % len(batches)]
            sync(device)
            t0 = time.perf_counter()
            step(model, opt, b)
            sync(device)
            if i >= warmup:
                times[m].append(time.perf_counter() - t0)
    rows = []
    for m in methods:
        med = statistics.median(times[m])
        # a compiled D2 step is set against the compiled LoRA step where both ran
        ref = "lora-compiled" if m.endswith("-compiled") and "lora-compiled" in times else "lora"
        base = statistics.median(times[ref]) if ref in times else None
        rows.append(
            {
                "model": name,
                "method": m,
                "rank": rank,
                "ms_per_step": 1000 * med,
                "ms_min": 1000 * min(times[m]),
                "vs": None if base is None or m == ref else ref,
                "overhead_vs_lora_pct": None if base is None or m == ref else 100 * (med / base - 1),
                "tokens_per_s": batch * seq / med,
            }
        )
    return rows


def markdown(rows, header) -> str:
    lines = [
        header,
        "",
        "| model | method | rank | ms/step (median) | ms/step (min) | tokens/s | overhead (vs) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ov = "" if r["overhead_vs_lora_pct"] is None else f"{r['overhead_vs_lora_pct']:+.1f}% ({r['vs']})"
        lines.append(
            f"| {r['model']} | {r['method']} | {r['rank']} | {r['ms_per_step']:.1f} | {r['ms_min']:.1f} | "
            f"{r['tokens_per_s']:,.0f} | {ov} |"
        )
    return "\n".join(lines)


SMOL_METHODS = ("peft", "loramix", "peft top-4", "loramix top-4", "loramix top-4 bf16")


def _smol_setup(method: str, base, ex, *, batch: int, top: int):
    """A step function ``b -> (loss, scored, input tokens)``, its batches, and the prefix seconds."""
    from loramix.data import make_batches, pad_id_for
    from loramix.layers import inject_trainable
    from loramix.models import load_causal_lm
    from loramix.prefix import prefix_states, split_point, top_targets, top_view
    from loramix.train import _step

    model, tok = load_causal_lm(base)
    pad, n_top = pad_id_for(tok), top if "top-" in method else None
    k = split_point(model, n_top) if n_top else None
    if method.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(_LLAMA_TARGETS),
                         layers_to_transform=list(range(k, len(model.model.layers))) if k else None)  # fmt: skip
        pm = get_peft_model(model, cfg).train()
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)

        def peft_step(b):
            loss = pm(**b).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
            opt.step()
            return (
                float(loss.detach()),
                int((b["labels"][:, 1:] != -100).sum()),
                int(b["attention_mask"].sum()),
            )

        return peft_step, make_batches(ex, batch_size=batch, pad_id=pad, shuffle=True), 0.0
    ac = torch.bfloat16 if method.endswith("bf16") else None
    t0 = time.perf_counter()
    states = prefix_states(model, k, ex, batch_size=batch, pad_id=pad, cache=None, autocast=ac) if k else None
    prefix_s = time.perf_counter() - t0 if k else 0.0
    params = inject_trainable(model, rank=8, alpha=16, targets=top_targets(model, None, k) if k else None)
    runner = top_view(model, k) if k else model
    runner.train()
    opt = torch.optim.AdamW(params, lr=1e-4)

    def loramix_step(b):
        opt.zero_grad(set_to_none=True)
        out = _step(runner, b, dev=torch.device("cpu"), micro=1, autocast=ac)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return out

    batches = make_batches(ex, batch_size=batch, pad_id=pad, shuffle=True, embeds=states, bucket=16)
    return loramix_step, batches, prefix_s


_LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def bench_smol(base, data, *, batch: int, seq: int, steps: int, warmup: int, top: int = 4) -> list[dict]:
    """The SmolLM2 rows (module docstring): per method, median ms per step and tokens/s."""
    from loramix.data import encode_records, load_records
    from loramix.models import load_tokenizer

    tok = load_tokenizer(base)
    ex = encode_records(tok, load_records(data, limit=batch * (steps + warmup)), max_len=seq)
    setups = {m: _smol_setup(m, base, ex, batch=batch, top=top) for m in SMOL_METHODS}
    stats = {m: {"t": [], "scored": 0, "input": 0, "loss": []} for m in SMOL_METHODS}
    for i in range(warmup + steps):
        for m, (step_fn, batches, _) in setups.items():
            t0 = time.perf_counter()
            loss, scored, n_in = step_fn(batches[i % len(batches)])
            dt = time.perf_counter() - t0
            stats[m]["loss"].append(round(loss, 4))
            if i >= warmup:
                st = stats[m]
                st["t"].append(dt)
                st["scored"] += scored
                st["input"] += n_in
    rows = []
    for m, st in stats.items():
        secs = sum(st["t"])
        rows.append({"method": m, "ms_per_step": 1000 * statistics.median(st["t"]),
                     "input_tokens_per_s": st["input"] / secs, "loss_tokens_per_s": st["scored"] / secs,
                     "prefix_s": setups[m][2], "prefix_tokens": sum(len(e["input_ids"]) for e in ex),
                     "losses": st["loss"]})  # fmt: skip
    ref = rows[0]["input_tokens_per_s"]
    for r in rows:
        r["vs_peft"] = r["input_tokens_per_s"] / ref
    return rows


def smol_markdown(rows, header) -> str:
    lines = [header, "", "| method | ms/step (median) | input tokens/s | loss tokens/s | vs PEFT loop "
             "| prefix, once per domain |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        pre = f"{r['prefix_s']:.1f} s for {r['prefix_tokens']:,} tokens" if r["prefix_s"] else ""
        lines.append(f"| {r['method']} | {r['ms_per_step']:,.0f} | {r['input_tokens_per_s']:,.0f} | "
                     f"{r['loss_tokens_per_s']:,.0f} | {r['vs_peft']:.2f}x | {pre} |")  # fmt: skip
    return "\n".join(lines)


def main_smol(args) -> None:
    import os

    from _smol import smol_base, smol_data

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    base, how = smol_base(args.smol or None)
    data, dhow = smol_data(args.smol_data)
    if base is None or data is None:
        print(how if base is None else dhow)
        return
    rows = bench_smol(base, data, batch=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup)
    header = (f"SmolLM2-135M training step ({how}; {dhow}), batch {args.batch} x <= {args.seq} tokens, "
              f"LoRA rank 8, cpu ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at the end)")  # fmt: skip
    print(smol_markdown(rows, header))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_name("bench_train_smol.json").write_text(
        json.dumps({"header": header, "rows": rows}, indent=2)
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument(
        "--models", nargs="+", default=["gpt2-tiny", "gpt2-small", "llama-small"], choices=list(MODELS)
    )
    ap.add_argument(
        "--methods", nargs="+", default=["lora", "d2lora-factored", "d2lora-dense"], choices=METHODS
    )
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--out", type=Path, default=WORK / "bench_train.json")
    ap.add_argument("--smol", nargs="?", const="", default=None, metavar="DIR",
                    help="the SmolLM2-135M rows (an imported folder, else the shared GGUF imported)")  # fmt: skip
    ap.add_argument("--smol-data", default=None, help="data file for --smol (default medicine.jsonl)")
    args = ap.parse_args(argv)
    if args.smol is not None:
        return main_smol(args)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rows = []
    for name in args.models:
        rows += bench_model(
            name,
            args.methods,
            rank=args.rank,
            alpha=args.alpha,
            batch=args.batch,
            seq=args.seq,
            steps=args.steps,
            warmup=args.warmup,
            device=device,
            dtype=dtype,
        )
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    header = (
        f"Training step (forward + backward + AdamW), batch {args.batch} x {args.seq} tokens, "
        f"rank {args.rank}, {args.dtype}, {device.type} ({dev_name}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)"
    )
    print(markdown(rows, header))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
