"""The dtypes of every path that merges or writes weights (docs/merging.md,
"Sum", "Rounding"): each result against the exact reference, the merge
formed in float64 from the stored values and rounded once (round to nearest
even) to the output dtype, for bases stored in float32, bfloat16, float16 and
float64, adapters saved in float32, bfloat16 and float16, LoRA, DoRA and
D2-LoRA; and against PEFT's ``merge_and_unload`` where PEFT's rule is what
users expect."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from loramix.adapter import ModuleDelta
from loramix.cli import main
from loramix.io.adapter_files import load_adapter
from loramix.io.formats.d2 import save_d2_adapter
from loramix.layers import attach_adapters, merge_into_model
from tests.factories import save_base, tiny_llama

DT = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
WEIGHTS = [1.0, 0.7]  # 0.7 s_i is no power of two: the folded factors round


def round_once(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 ``x`` rounded once to ``dtype`` (round to nearest even). torch's
    own float64 -> bfloat16 / float16 goes through float32 and rounds twice;
    numpy's float16 rounds once, and bfloat16 is float32 rounded to odd
    (truncated, its last bit set where inexact: 24 bits, two more than
    bfloat16's 8 need) then rounded to nearest even, which is exact."""
    x = x.double()
    if dtype == torch.float64:
        return x
    a = x.numpy()
    if dtype in (torch.float32, torch.float16):
        return torch.from_numpy(a.astype(np.float32 if dtype == torch.float32 else np.float16))
    t = a.astype(np.float32)
    t = np.where(np.abs(t.astype(np.float64)) > np.abs(a), np.nextafter(t, np.float32(0)), t)
    bits = t.view(np.uint32) | (t.astype(np.float64) != a).astype(np.uint32)
    return torch.from_numpy(bits.view(np.float32)).to(torch.bfloat16)


def ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of ``x``'s dtype at each entry of ``x``, in float64."""
    fi = torch.finfo(x.dtype)
    mant = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24, torch.float64: 53}[x.dtype]
    e = torch.floor(torch.log2(x.double().abs().clamp_min(fi.smallest_normal)))
    return torch.pow(2.0, e - (mant - 1))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Bases and adapters made once, in a folder per (what, dtype)."""
    root = tmp_path_factory.mktemp("dtypes")
    made = {}

    def get(what: str, dtype: str, seed: int = 1):
        key = (what, dtype, seed)
        if key not in made:
            f = root / f"{what}-{dtype}-{seed}"
            made[key] = _make_base(f, dtype) if what == "base" else _make_adapter(f, what, dtype, seed)
        return made[key]

    return get


def _make_base(folder, dtype):
    return save_base(tiny_llama().to(DT[dtype]), folder)


def _make_adapter(folder, kind, dtype, seed):
    """A PEFT LoRA or DoRA adapter (magnitudes moved, as training would)
    saved in ``dtype``, or a D2-LoRA adapter of ``dtype`` factors."""
    if kind == "d2":
        g = torch.Generator().manual_seed(seed)
        mods = {}
        for n, mod in tiny_llama().named_modules():
            if n.endswith(("q_proj", "up_proj", "down_proj")):
                (o, i), r = mod.weight.shape, 4
                t = [0.1 * torch.randn(s, generator=g) for s in ((o, r), (r, i), (o, r), (r, i))]
                t = [x.to(DT[dtype]) for x in t]
                mods[n] = ModuleDelta(name=n, B=t[0], A=t[1], B_neg=t[2], A_neg=t[3], scale=2.0, alpha=8.0)
        return save_d2_adapter(folder, mods, r=4, lora_alpha=8.0, tau=0.4)
    from tests.factories import make_peft_adapter
    from tests.test_formats import _train_magnitudes

    _train_magnitudes(make_peft_adapter(tiny_llama(), folder, seed=seed, r=4, lora_alpha=12,
                                        use_dora=kind == "dora"), seed)  # fmt: skip
    f = folder / "adapter_model.safetensors"
    save_file({k: v.to(DT[dtype]) for k, v in load_file(str(f)).items()}, str(f))
    return folder


def reference(stored: dict, adapters, key: str, weights=WEIGHTS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W0 + sum_i w_i dW_i, |W0| + sum_i |w_i dW_i|)`` in float64 from the
    stored values of ``key``'s base weight and the adapters' modules."""
    name = key.removesuffix(".weight")
    W0 = stored[key].double()
    acc, mag = W0.clone(), W0.abs()
    for ad, w in zip(adapters, weights):
        m = ad.modules[name]
        if m.kind.id == "lora":  # s B A, independently of loramix's kinds
            d = w * m.scale * (m.B.double() @ m.A.double())
        else:  # DoRA, D2-LoRA: their effective deltas, formed in float64
            d = w * m.delta(W0, dtype=torch.float64)
        acc += d
        mag += d.abs()
    return acc, mag


def test_sum_into_a_base_as_float64_is_formed_in_float64(store, tmp_path):
    """``sum --into --dtype float64`` on a float32 or bfloat16 base forms
    ``W0 + sum_i w_i dW_i`` in float64, as on a float64 base: the float64
    reference to 1e-15 relative, LoRA and DoRA. It was formed in float32 and
    widened: 1.3e-7 off."""
    for bdt in ("float32", "bfloat16"):
        base = store("base", bdt)
        stored = load_file(str(base / "model.safetensors"))
        for kind in ("lora", "dora"):
            paths = [store(kind, "float32", 1), store(kind, "float32", 2)]
            out = tmp_path / f"{bdt}-{kind}"
            args = ["sum", *paths, "--weights", "1,0.7", "--into", base, "--out", out, "--dtype", "float64"]
            assert main([str(a) for a in args]) == 0
            got = load_file(str(out / "model.safetensors"))
            ads = [load_adapter(p) for p in paths]
            for key in (n + ".weight" for n in ads[0].modules):
                want, _ = reference(stored, ads, key)
                assert got[key].dtype == torch.float64
                err = float((got[key] - want).abs().max() / want.abs().max())
                assert err < 1e-15, (bdt, kind, key, err)
            assert all(t.dtype == torch.float64 for t in got.values())


def _merged_in_memory(base, dtype, adapters) -> dict:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(base), dtype=DT[dtype])
    merge_into_model(model, adapters, WEIGHTS)
    return model.state_dict()


def _magnitude(stored, adapters, key, weights=WEIGHTS) -> torch.Tensor:
    """``|W0| + sum_i |w_i| s_i |B_i| |A_i|`` for LoRA terms (the size of
    what a product over the rank adds up), ``|w_i dW_i|`` for the others."""
    name = key.removesuffix(".weight")
    _, mag = reference(stored, adapters, key, weights)
    for ad, w in zip(adapters, weights):
        m = ad.modules[name]
        if m.kind.id == "lora":
            mag += abs(w) * m.scale * (m.B.double().abs() @ m.A.double().abs())
    return mag


#: (engine, base dtype) -> the bound on |result - once-rounded reference|:
#: ("ulp", fraction of entries allowed to differ) or ("mag", k): k eps |.| (_magnitude)
BOUNDS = {
    ("stream", "float32"): ("mag", 16),  # B A in float32, then W0 + it: float32 roundings
    ("memory", "float32"): ("mag", 2),  # dW in float64, rounded, added: two roundings
    ("stream", "float64"): ("mag", 16),
    ("memory", "float64"): ("mag", 2),
    **{(e, d): ("ulp", 0.005) for e in ("stream", "memory") for d in ("bfloat16", "float16")},
}


@pytest.mark.parametrize("bdt", ["float32", "bfloat16", "float16", "float64"])
@pytest.mark.parametrize(
    "kind,adt",
    [("lora", "float32"), ("lora", "bfloat16"), ("lora", "float16"), ("dora", "float32"),
     ("dora", "bfloat16"), ("d2", "float32"), ("d2", "float16")],
)  # fmt: skip
def test_merge_into_a_base_against_the_once_rounded_float64_merge(store, tmp_path, kind, adt, bdt):
    """Both engines (``sum --into``, streamed; ``merge_into_model``, ``eval
    --merged``) on every base dtype: the result keeps each weight's dtype and
    lies within BOUNDS of the float64 merge rounded once. On a 16-bit base
    that is one ulp (plus float32's rounding of ``|W0| + |delta|`` where the
    two cancel: 2 ulp of a result of 7.5e-7 from W0 = -0.036) and
    bit-identical in at least 99.5% of the entries (measured: at most 11 of
    19968 differ, by the double rounding float64 -> float32 -> 16 bits and,
    streamed, the float32 product); untouched tensors are copied bit for
    bit."""
    base = store("base", bdt)
    paths = [store(kind, adt, 1), store(kind, adt, 2)]
    ads = [load_adapter(p) for p in paths]
    out = tmp_path / "m"
    assert main([str(a) for a in ["sum", *paths, "--weights", "1,0.7", "--into", base, "--out", out]]) == 0
    stored = load_file(str(base / "model.safetensors"))
    results = {
        "stream": load_file(str(out / "model.safetensors")),
        "memory": _merged_in_memory(base, bdt, ads),
    }
    keys = [n + ".weight" for n in ads[0].modules]
    for k in set(stored) - set(keys):
        assert (
            torch.equal(results["stream"][k], stored[k]) and results["stream"][k].dtype == stored[k].dtype
        ), k
    for engine, got in results.items():
        how, bound = BOUNDS[(engine, bdt)]
        differ = total = 0
        for key in keys:
            want = round_once(reference(stored, ads, key)[0], DT[bdt])
            assert got[key].dtype == DT[bdt], (engine, key)
            err = (got[key].double() - want.double()).abs()
            if how == "ulp":  # one ulp, and float32's rounding where W0 and the delta cancel
                room = ulp(want) + 16 * torch.finfo(torch.float32).eps * _magnitude(stored, ads, key)
                assert bool((err <= room).all()), (engine, key, float((err / ulp(want)).max()))
                differ, total = differ + int((err > 0).sum()), total + err.numel()
            else:
                mag = _magnitude(stored, ads, key) * torch.finfo(DT[bdt]).eps
                assert bool((err <= bound * mag).all()), (engine, key, float((err / mag).max()))
        assert differ <= bound * total if how == "ulp" else True, (engine, differ, total)


@pytest.mark.parametrize("adt", ["bfloat16", "float16"])
def test_sum_as_an_adapter_rounds_its_factors_once(store, tmp_path, adt):
    """``sum --out`` (no base) of 16-bit adapters writes 16-bit factors, as
    loramix.json says, ``w_i s_i B_i`` formed in float64 and rounded once
    (docs/merging.md, "Exact sum as one adapter"), ``A_i`` as stored. torch's
    float64 -> 16-bit conversion rounds twice (through float32): 47 (float16)
    and 55 (bfloat16) of 4352 entries of ``B`` were one ulp off at
    ``w s = 0.7 * 3``. Inputs of both 16-bit dtypes give float32."""
    paths = [store("lora", adt, 1), store("lora", adt, 2)]
    out = tmp_path / "s"
    assert main([str(a) for a in ["sum", *paths, "--weights", "1,0.7", "--out", out]]) == 0
    assert json.loads((out / "loramix.json").read_text())["parameters"]["dtype"] == adt
    ads, got = [load_adapter(p) for p in paths], load_adapter(out)
    for name, m in got.modules.items():
        B = torch.cat(
            [w * a.modules[name].scale * a.modules[name].B.double() for a, w in zip(ads, WEIGHTS)], 1
        )
        assert m.B.dtype == m.A.dtype == DT[adt] and m.scale == 1.0
        assert torch.equal(m.B, round_once(B, DT[adt])), name
        assert torch.equal(m.A, torch.cat([a.modules[name].A for a in ads])), name
    other = "float16" if adt == "bfloat16" else "bfloat16"
    both = tmp_path / "both"
    assert main([str(a) for a in ["sum", paths[0], store("lora", other, 2), "--out", both]]) == 0
    assert {m.B.dtype for m in load_adapter(both).modules.values()} == {torch.float32}


@pytest.mark.parametrize("odt", ["bfloat16", "float16"])
def test_a_float64_base_written_as_16_bits_is_rounded_once(store, tmp_path, odt):
    """``sum --into`` a float64 base ``--dtype bfloat16/float16``: each merged
    weight, formed in float64, and each untouched tensor are rounded once to
    the output dtype, bit for bit the once-rounded float64 values (torch's
    conversion, through float32, rounded some of them twice)."""
    base = store("base", "float64")
    paths = [store("lora", "float32", 1), store("lora", "float32", 2)]
    out = tmp_path / "m"
    args = ["sum", *paths, "--weights", "1,0.7", "--into", base, "--out", out, "--dtype", odt]
    assert main([str(a) for a in args]) == 0
    stored, got = load_file(str(base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    ads = [load_adapter(p) for p in paths]
    keys = {n + ".weight" for n in ads[0].modules}
    for k, t in got.items():
        want = reference(stored, ads, k)[0] if k in keys else stored[k]
        assert t.dtype == DT[odt] and torch.equal(t, round_once(want, DT[odt])), k


@pytest.mark.parametrize("kind", ["lora", "d2lora"])
def test_detach_merge_into_a_half_model_rounds_once(kind):
    """``detach(model, merge=True)`` on a float16 model writes each trained
    layer's float64 merged weight rounded once (it went through float32)."""
    from loramix.layers import detach, inject_trainable, wrapped_modules

    model = tiny_llama(n_layer=4, hidden=64).to(torch.float16)
    params = inject_trainable(model, kind=kind, rank=4, alpha=8, seed=1)
    with torch.no_grad():
        for p in params:  # B starts at zero: give every factor a value
            p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    want = {
        n: round_once(layer.merged_weight(), torch.float16) for n, layer in wrapped_modules(model).items()
    }
    detach(model, merge=True)
    for n, w in want.items():
        assert torch.equal(model.get_submodule(n).weight, w), n


@pytest.mark.parametrize(
    "kind,bdt", [("lora", "bfloat16"), ("lora", "float16"), ("dora", "float32"), ("dora", "bfloat16")]
)
def test_into_a_base_against_peft_merge_and_unload_in_the_same_dtype(store, tmp_path, kind, bdt):
    """PEFT's ``merge_and_unload`` on a base loaded in its dtype (its rule:
    the delta cast to the weight's dtype) against the once-rounded float64
    merge, and ``sum --into`` beside it: loramix is never further than PEFT
    beyond one rounding (``eps |.|``, :func:`_magnitude`). On 16-bit bases
    both are within one ulp (1 to 5 of 19968 entries differ, each). DoRA on a
    float32 base: PEFT up to 78 eps, loramix 1 (PEFT forms the weight norm
    and the scaled weight in float32; loramix the effective delta in
    float64)."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base, path = store("base", bdt), store(kind, "float32", 1)
    pm = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(base), dtype=DT[bdt]), str(path))
    theirs = pm.merge_and_unload().state_dict()
    out = tmp_path / "m"
    assert main([str(a) for a in ["sum", path, "--into", base, "--out", out]]) == 0
    ours, stored = load_file(str(out / "model.safetensors")), load_file(str(base / "model.safetensors"))
    ads, worst = [load_adapter(path)], {"peft": 0.0, "loramix": 0.0}
    for key in (n + ".weight" for n in ads[0].modules):
        want, eps = _reference_one(stored, ads, key, DT[bdt])
        for tag, got in (("peft", theirs[key]), ("loramix", ours[key])):
            assert got.dtype == DT[bdt]
            worst[tag] = max(worst[tag], float(((got.double() - want.double()).abs() / eps).max()))
    assert worst["loramix"] <= max(worst["peft"], 1.0), worst
    if (kind, bdt) == ("dora", "float32"):
        assert worst["peft"] > 10 * worst["loramix"], worst


def _reference_one(stored, adapters, key, dtype):
    """One adapter at weight 1: the once-rounded reference and ``eps |.|``."""
    want = round_once(reference(stored, adapters, key, [1.0])[0], dtype)
    return want, _magnitude(stored, adapters, key, [1.0]) * torch.finfo(dtype).eps


def test_a_mixed_base_keeps_each_tensors_dtype_and_dtype_converts_all(store, tmp_path):
    """A base of float32 norms and bfloat16 weights: ``sum --into`` keeps each
    tensor's dtype (merged weights bfloat16, norms float32, copied bit for
    bit); ``--dtype float16`` writes every tensor in float16, the untouched
    ones rounded once from what is stored."""
    stored = {
        k: v if "norm" in k else v.to(torch.bfloat16)
        for k, v in load_file(str(store("base", "float32") / "model.safetensors")).items()
    }
    base = tmp_path / "mixed"
    shutil.copytree(store("base", "float32"), base)
    save_file(stored, str(base / "model.safetensors"), metadata={"format": "pt"})
    paths = [store("lora", "float32", 1), store("lora", "float32", 2)]
    keys = {n + ".weight" for n in load_adapter(paths[0]).modules}
    for dtype in (None, "float16"):
        out = tmp_path / f"m-{dtype}"
        extra = ["--dtype", dtype] if dtype else []
        assert main([str(a) for a in ["sum", *paths, "--into", base, "--out", out, *extra]]) == 0
        got = load_file(str(out / "model.safetensors"))
        assert {k: t.dtype for k, t in got.items()} == {
            k: DT[dtype] if dtype else t.dtype for k, t in stored.items()
        }
        for k in set(stored) - keys:
            assert torch.equal(got[k], stored[k].to(got[k].dtype)), k


@pytest.mark.parametrize("bdt", ["bfloat16", "float16"])
@pytest.mark.parametrize("kind", ["lora", "dora", "d2"])
def test_merged_and_on_the_fly_agree_on_a_half_base(store, kind, bdt):
    """``eval --merged`` (``merge_into_model``) and on the fly
    (``attach_adapters``) on a model loaded in 16 bits: each model's logits
    within 8 eps of the dtype (max-normalised) of the float64 merge's, and of
    each other (measured: at most 4.0 eps in bfloat16, 5.2 in float16; the
    16-bit forward of the base alone is 0.8 eps off its float64 forward)."""
    from transformers import LlamaForCausalLM

    base = store("base", bdt)
    ads = [load_adapter(store(kind, "float32", s)) for s in (1, 2)]
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))

    def logits(dtype, how):
        model = LlamaForCausalLM.from_pretrained(str(base), dtype=dtype).eval()
        if how == "merged":
            merge_into_model(model, ads, WEIGHTS)
        else:
            attach_adapters(model, ads, WEIGHTS)
        with torch.no_grad():
            return model(ids).logits.double()

    ref, merged, fly = logits(torch.float64, "merged"), logits(DT[bdt], "merged"), logits(DT[bdt], "fly")
    eps = torch.finfo(DT[bdt]).eps
    for a, b in ((merged, ref), (fly, ref), (fly, merged)):
        assert float((a - b).abs().max() / b.abs().max()) <= 8 * eps


@pytest.mark.parametrize(
    "method,kind,extra",
    [("ties", "lora", ["--density", "0.5"]), ("dare-linear", "dora", ["--density", "0.7"]),
     ("d2-signed", "d2", [])],
)  # fmt: skip
def test_a_method_into_a_base_as_float64_is_the_float64_bases(store, tmp_path, method, kind, extra):
    """``merge -m METHOD --into BASE --dtype float64`` on a float32 base gives
    the bytes the same merge gives into that base stored in float64 (the
    same values, widened exactly): the method's work and the add both in
    float64. It was done in float32."""
    f32 = store("base", "float32")
    f64 = tmp_path / "b64"
    shutil.copytree(f32, f64)
    widened = {k: v.double() for k, v in load_file(str(f32 / "model.safetensors")).items()}
    save_file(widened, str(f64 / "model.safetensors"), metadata={"format": "pt"})
    paths = [store(kind, "float32", 1), store(kind, "float32", 2)]
    outs = []
    for base, dt in ((f32, ["--dtype", "float64"]), (f64, [])):
        outs.append(tmp_path / f"o{len(outs)}")
        args = [
            "merge",
            *paths,
            "-m",
            method,
            *extra,
            "--weights",
            "1,0.7",
            "--into",
            base,
            "--out",
            outs[-1],
            *dt,
        ]
        assert main([str(a) for a in args]) == 0
    a, b = (load_file(str(o / "model.safetensors")) for o in outs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
