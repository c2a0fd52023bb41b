"""Results a study caches do not depend on ``--threads`` (no cache key holds it).

Found by running the same jobs with ``--threads 1`` and ``--threads 2`` and
comparing the files: ``train`` (SmolLM2, ``--top-layers 2``), ``eval`` (its
perplexity JSON) and the thread-independent merges gave the same bytes (on
the Zen 3, 4 and 5; on an Intel Xeon torch's own kernels round trainings and
evaluations by their threads: docs/scenarios.md); an
``svd`` merge did not (LAPACK's QR and SVD round by their threads' split: 13
of 420 tensors of a SmolLM2-shaped merge differed, up to 9e-10), so
:class:`loramix.methods.svd.LowRankSVD` runs on one thread. These tests fail
if a change makes it depend on the threads again."""

from __future__ import annotations

import pytest
import torch

from loramix.cli import main

from .factories import make_peft_adapter, tiny_llama


def test_lowrank_svd_is_the_same_on_one_thread_or_two():
    """576 x 32 factors (SmolLM2's q_proj, two rank-16 adapters stacked): torch's own QR and SVD
    give other bits on two threads than on one here; LowRankSVD gives the same."""
    from loramix.methods.svd import LowRankSVD

    g = torch.Generator().manual_seed(0)
    B, A = (
        torch.randn(1, 576, 32, dtype=torch.float64, generator=g),
        torch.randn(1, 32, 576, dtype=torch.float64, generator=g),
    )
    old, got = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            svd = LowRankSVD(B, A)
            got.append((*svd.factors(32), svd.S))  # every singular vector
            assert torch.get_num_threads() == threads  # the caller's threads, as they were
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(x, y) for x, y in zip(*got))


@pytest.mark.parametrize(
    "method",
    [
        ["svd", "--rank", "8"],
        ["sum", "--out-rank", "8"],
        ["ties", "--density", "0.5", "--out-rank", "8"],
        ["core-ties", "--density", "0.5"],
        ["knots-ties", "--density", "0.5"],
        ["iso-c"],
        ["iso-cts"],
        ["tsv"],
    ],
)
def test_a_low_rank_merge_is_the_same_bytes_on_any_threads(tmp_path, method):
    """``merge -m svd`` (and an adapter output truncated by --out-rank), as a study caches it, with
    --threads 1 and --threads 2: the same files. ``ties --out-rank`` truncates a dense delta by a
    dense SVD (methods.svd.dense_svd), which on torch's threads wrote other bytes on 2 than on 1."""
    model = tiny_llama(hidden=576, n_layer=1, n_head=4)
    ads = [make_peft_adapter(model, tmp_path / f"a{k}", seed=k, r=16, lora_alpha=32) for k in range(2)]
    out = {}
    for t in (1, 2):
        args = ["merge", "-m", *method, *ads, "--out", tmp_path / f"t{t}", "--threads", t, "--no-progress"]
        assert main([str(a) for a in args]) == 0
        out[t] = (tmp_path / f"t{t}" / "adapter_model.safetensors").read_bytes()
    assert out[1] == out[2]


def _torch_rounds_by_threads() -> str | None:
    """What of torch's own arithmetic rounds otherwise on two threads than on
    one here, at the shapes of the test below, or None. Seen on an Intel Xeon
    (AVX-512, AMX); the Zen 3, 4 and 5 that ran this test before gave the
    same bytes. There MKL rounds a skinny product (down_proj's LoRA ``A``
    product, ``(238, 1160) @ (1160, 8)``) by its threads, and torch's SiLU
    computes the last entries of each thread's share of a tensor with scalar
    code, whose ``exp`` rounds otherwise than the vector code's."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(238, 1160, generator=g), torch.randn(1160, 8, generator=g)
    x = torch.randn(4, 14 * 17 * 1160, generator=g)
    old, got = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got.append((a @ b, torch.stack([F.silu(row) for row in x])))
    finally:
        torch.set_num_threads(old)
    why = [name for name, p, q in zip(("MKL's skinny product", "SiLU"), *got) if not torch.equal(p, q)]
    return " and ".join(why) or None


def test_training_and_evaluation_are_the_same_bytes_on_any_threads(tmp_path):
    """``train`` (the adapter's weights file) and ``eval --format json`` (the perplexities) with
    --threads 1 and --threads 2 on a base of SmolLM2's width: the same bytes (guards the finding;
    the old code gave the same too), where torch's own arithmetic rounds alike on one thread and
    two (:func:`_torch_rounds_by_threads`). Where it does not, loramix cannot give the same bytes;
    the results then agree to that rounding: the perplexities to 1e-6, each factor to 1e-3 of its
    norm and each entry to 1e-2 of the factor's largest (seen here: 2e-8, 1e-5 and 6e-4; Adam's
    normalised steps carry a last-bit difference in a gradient further)."""
    import contextlib
    import io
    import json

    from .factories import save_base, write_jsonl
    from .test_eval import _make_base

    base = _make_base(tmp_path / "base", "llama")  # its own tokenizer; widened below
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    save_base(tiny_llama(hidden=576, n_layer=1, n_head=4, vocab_size=len(tok)), base)
    data = write_jsonl(
        tmp_path / "d.jsonl", [{"question": f"{i} plus {i}?", "answer": str(2 * i)} for i in range(24)]
    )
    got = {}
    for t in (1, 2):
        out = tmp_path / f"ad{t}"
        args = ["train", "--base", base, "--data", data, "--steps", "2", "--batch", "8", "--eval-size", "4",
                "--out", out, "--threads", t, "--no-progress"]  # fmt: skip
        assert main([str(a) for a in args]) == 0
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            ev = [
                "eval",
                "--base",
                base,
                "--adapter",
                out,
                "--data",
                data,
                "--threads",
                t,
                "--format",
                "json",
                "--no-progress",
            ]
            assert main([str(a) for a in ev]) == 0
        rows = json.loads(buf.getvalue())["results"]
        got[t] = ((out / "adapter_model.safetensors").read_bytes(), [(r["ppl"], r["nll"]) for r in rows])
    if _torch_rounds_by_threads() is None:
        assert got[1] == got[2]
        return
    from safetensors.torch import load

    (one, ppl_one), (two, ppl_two) = got[1], got[2]
    assert [x for r in ppl_one for x in r] == pytest.approx([x for r in ppl_two for x in r], rel=1e-6)
    one, two = load(one), load(two)
    assert one.keys() == two.keys()
    for k in one:
        assert float((two[k] - one[k]).norm()) <= 1e-3 * float(one[k].norm()), k
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-2 * float(one[k].abs().max()), msg=k)


def test_della_into_a_base_is_the_same_bytes_on_any_threads(tmp_path):
    """``merge -m della --into`` with --threads 1 and --threads 2: the same model files. Its L1
    rescale summed each delta with torch's whole-tensor sum, which splits the entries between the
    threads: the merged weights differed (methods.della.l1_norm sums by rows)."""
    from .factories import save_base

    model = tiny_llama(hidden=576, n_layer=1, n_head=4)
    base = save_base(model, tmp_path / "base")
    ads = [make_peft_adapter(model, tmp_path / f"a{k}", seed=k, r=16, lora_alpha=32) for k in range(2)]
    out = {}
    for t in (1, 2):
        args = ["merge", "-m", "della", "--density", "0.5", *ads, "--into", base, "--out", tmp_path / f"t{t}",
                "--threads", t, "--no-progress"]  # fmt: skip
        assert main([str(a) for a in args]) == 0
        out[t] = {p.name: p.read_bytes() for p in (tmp_path / f"t{t}").glob("*.safetensors")}
    assert out[1] and out[1] == out[2]


DENSE = [("ties", {"density": 0.5}), ("dare-linear", {"density": 0.5}), ("dare-ties", {"density": 0.5}),
         ("breadcrumbs", {"density": 0.5}), ("magnitude", {"density": 0.5}), ("della", {"density": 0.5})]  # fmt: skip


def _kind_adapters(tmp_path, model, base, kind: str) -> list:
    from .test_eval import _random_d2

    if kind == "d2":
        return [_random_d2(base, tmp_path / f"{kind}{k}", ["q_proj", "down_proj"], seed=k) for k in range(2)]
    extra = {"use_dora": True} if kind == "dora" else {}
    return [
        make_peft_adapter(model, tmp_path / f"{kind}{k}", seed=k, r=16, lora_alpha=32, **extra)
        for k in range(2)
    ]


@pytest.mark.parametrize("kind", ["lora", "dora", "d2"])
def test_a_study_s_dense_merges_are_the_same_on_any_threads(tmp_path, kind):
    """A study merges a dense method in memory (scenario.steps.merged_in_memory: the method on
    torch's own threads, not the streaming engine's) and caches the evaluation under a key with no
    thread count: every dense method (d2-signed too for D2-LoRA) on LoRA, DoRA (norms of W0 + dW)
    and D2-LoRA gives the same weights and facts on 1 and 2 threads, on a module wide enough that
    torch splits its reductions (256 x 520). Guards the finding: the old code gave the same too (as did
    `merge --into` of each method and kind at 2048 x 5632, float32 and bfloat16, measured once)."""
    from loramix.io.adapter_files import load_adapter
    from loramix.scenario.steps import _restore, merged_in_memory

    from .factories import save_base

    model = tiny_llama(hidden=256, n_layer=1, n_head=4)
    base = save_base(model, tmp_path / "base")
    ads = [load_adapter(str(p)) for p in _kind_adapters(tmp_path, model, base, kind)]
    methods = DENSE + ([("d2-signed", {})] if kind == "d2" else [])
    old = torch.get_num_threads()
    try:
        for method, params in methods:
            got = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                saved, facts = merged_in_memory(model, ads, method, params)
                got.append(({n: model.get_submodule(n).weight.detach().clone() for n in saved}, facts))
                _restore(model, saved)
            (w1, f1), (w2, f2) = got
            assert w1.keys() == w2.keys() and all(torch.equal(w1[n], w2[n]) for n in w1), method
            assert f1 == f2, method
    finally:
        torch.set_num_threads(old)


def test_similarity_against_a_base_is_the_same_on_any_threads(tmp_path):
    """``similarity`` with the base (the torch path: DoRA's and D2-LoRA's effective deltas, and
    LoRA's deltas beside them; a study caches the effective one as ``similarity``): the same
    numbers on 1 and 2 torch threads. Its Gram products of a few rows by a long inner dimension
    split the inner sums between torch's threads: at 256 wide LoRA's norms and DoRA's cosines
    differed in the last bits (overlap.similarity runs them on one, devices.torch_threads). Fails on the old code."""
    from loramix.overlap import similarity

    from .factories import save_base

    model = tiny_llama(hidden=256, n_layer=1, n_head=4)
    base = save_base(model, tmp_path / "base")
    old = torch.get_num_threads()
    try:
        for kind in ("lora", "dora", "d2"):
            ads = _kind_adapters(tmp_path, model, base, kind)
            got = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                r = similarity(ads, base=base, per_module=True, progress=False)
                got.append(
                    [
                        x.to_numpy(dtype=float).tobytes()
                        for x in (r.rms, r.mean, r.norms, r.per_module["cosine"])
                    ]
                )
                assert torch.get_num_threads() == threads  # the caller's threads, as they were
            assert got[0] == got[1], kind
    finally:
        torch.set_num_threads(old)


def test_torch_threads_sets_the_count_in_its_block_and_gives_it_back():
    """devices.torch_threads (engine's blocks and similarity's products run under it): ``n``
    threads inside, the caller's count after, also when the block raises; None leaves it as it
    is. Guards the moved context manager (the two it replaces did the same)."""
    from loramix.devices import torch_threads

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(KeyError), torch_threads(1):
            raise KeyError
        assert torch.get_num_threads() == 2
        with torch_threads(None):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)
