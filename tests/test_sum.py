"""``loramix sum``: checked against PEFT (``add_weighted_adapter(..., "cat")`` +
``merge_and_unload``, the exact sum) and against dense math, on tiny real
GPT-2 (``Conv1D``) and Llama (``nn.Linear``) models with real PEFT adapters.

PEFT's ``linear``/``ties``/``dare`` combinations act on A and B separately and
are not the sum (docs/merging.md, "Deltas, not factors"), so they are never the reference here.
"""

from __future__ import annotations

import json
import platform
import shutil

import pytest
import torch

from loramix.adapter import ModuleDelta
from loramix.cli import main
from loramix.d2lora import d2_merged_weight
from loramix.errors import AdapterError, BaseModelError, OutputError, UsageError
from loramix.io.adapter_files import load_adapter, save_d2_adapter
from loramix.io.model_folder import BaseModelFolder
from loramix.io.safetensors_io import file_sha256
from loramix.methods.sum import sum_adapters, sum_into_base

from .factories import make_peft_adapter, save_base, tiny_gpt2, tiny_llama

TOL = 1e-6


def _adapters(model, root, kind):
    """Three adapters of mixed rank/alpha/rsLoRA/rank_pattern/alpha_pattern and
    coverage. The first is plain LoRA on purpose: PEFT's cat merge copies the
    first adapter's config, so an rsLoRA first adapter would give the merged
    adapter a scale of sqrt(R) instead of 1 (a PEFT quirk, not the sum)."""
    if kind == "gpt2":
        specs = [
            dict(seed=1, r=4, lora_alpha=8),
            dict(seed=2, r=2, lora_alpha=3, use_rslora=True, rank_pattern={"c_fc": 5}),
            dict(
                seed=3, r=2, lora_alpha=6, target_modules=["c_attn", "c_proj"], alpha_pattern={"c_proj": 1.5}
            ),
        ]
    else:
        specs = [
            dict(seed=1, r=4, lora_alpha=8),
            dict(seed=2, r=2, lora_alpha=4, use_rslora=True, rank_pattern={"down_proj": 6}),
            dict(
                seed=3,
                r=3,
                lora_alpha=5,
                target_modules=["q_proj", "v_proj", "up_proj"],
                alpha_pattern={"v_proj": 2},
            ),
        ]
    return [make_peft_adapter(model, root / f"{kind}_ad{i}", **s) for i, s in enumerate(specs)]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    model = tiny_gpt2(seed=0)
    return dict(
        make=lambda: tiny_gpt2(seed=0),
        base=save_base(model, root / "base"),
        sharded=save_base(model, root / "base_sharded", max_shard_size="20KB"),
        adapters=_adapters(model, root, "gpt2"),
        root=root,
    )


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    model = tiny_llama(seed=0)
    return dict(
        make=lambda: tiny_llama(seed=0),
        base=save_base(model, root / "base"),
        adapters=_adapters(model, root, "llama"),
        root=root,
    )


def peft_cat_merged(make, adapters, weights):
    """The reference: PEFT's exact cat combination, merged into the base."""
    from peft import PeftModel

    names = [f"a{i}" for i in range(len(adapters))]
    pm = PeftModel.from_pretrained(make(), str(adapters[0]), adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:]):
        pm.load_adapter(str(path), adapter_name=name)
    pm.add_weighted_adapter(names, list(weights), "summed", combination_type="cat")
    pm.set_adapter("summed")
    return pm.merge_and_unload().eval()


def load_out(path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def tokens(vocab=128):
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_sum_into_matches_peft_cat(kind, gpt2, llama, tmp_path):
    fx = gpt2 if kind == "gpt2" else llama
    weights = [1.0, 0.5, -0.7]
    res = sum_into_base(
        fx["adapters"], into=fx["base"], out=tmp_path / "out", weights=weights, progress=False
    )
    assert len(res.modules) == len({m for p in fx["adapters"] for m in load_adapter(p).modules})

    ref = peft_cat_merged(fx["make"], fx["adapters"], weights)
    ours = load_out(tmp_path / "out")
    base_sd = fx["make"]().state_dict()
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert set(ref_sd) == set(our_sd)
    changed = 0
    for k, v in ref_sd.items():
        assert rel_err(our_sd[k], v) <= TOL, k
        changed += not torch.equal(base_sd[k], v)
    assert changed == len(res.modules)  # the merge did something, and only there
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, ref(x).logits, rtol=1e-5, atol=1e-5)


def test_sum_into_matches_dense_math(llama, tmp_path):
    """Independent of PEFT: W0 + sum_i w_i s_i B_i A_i from the files."""
    weights = [0.3, 2.0, 1.0]
    sum_into_base(
        llama["adapters"], into=llama["base"], out=tmp_path / "out", weights=weights, progress=False
    )
    base, out = BaseModelFolder(llama["base"]), BaseModelFolder(tmp_path / "out")
    ads = [load_adapter(p) for p in llama["adapters"]]
    for name in {n for a in ads for n in a.modules}:
        W = base.read_module_weight(name, dtype=torch.float64)
        for a, w in zip(ads, weights):
            if name in a.modules:
                m = a.modules[name]
                W = W + w * m.scale * m.B.double() @ m.A.double()
        assert rel_err(out.read_module_weight(name), W) <= TOL, name


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_sum_adapters_loaded_by_peft_equals_sum_into(kind, gpt2, llama, tmp_path):
    from peft import PeftModel

    fx = gpt2 if kind == "gpt2" else llama
    weights = [1.0, -0.25, 0.8]
    sum_into_base(fx["adapters"], into=fx["base"], out=tmp_path / "into", weights=weights, progress=False)
    sum_adapters(fx["adapters"], out=tmp_path / "adapter", weights=weights)

    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"], "ranks differ per module, so the pattern must say so"
    merged = load_adapter(tmp_path / "adapter")
    assert all(m.scale == 1.0 for m in merged.modules.values())

    pm = PeftModel.from_pretrained(fx["make"](), str(tmp_path / "adapter")).eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(pm(x).logits, load_out(tmp_path / "into")(x).logits, rtol=1e-5, atol=1e-5)


def test_sharded_base_merges_like_single_file(gpt2, tmp_path):
    base = BaseModelFolder(gpt2["sharded"])
    assert len(base.shards) >= 2
    sum_into_base(gpt2["adapters"], into=gpt2["base"], out=tmp_path / "single", progress=False)
    sum_into_base(gpt2["adapters"], into=gpt2["sharded"], out=tmp_path / "sharded", progress=False)
    single, sharded = BaseModelFolder(tmp_path / "single"), BaseModelFolder(tmp_path / "sharded")
    assert sharded.shards == base.shards
    idx_in = json.loads((gpt2["sharded"] / "model.safetensors.index.json").read_text())
    idx_out = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert idx_out["weight_map"] == idx_in["weight_map"]
    assert idx_out["metadata"]["total_size"] == sum(t.nbytes for t in sharded.tensors.values())
    for key in single.keys():
        assert torch.equal(single.read_tensor(key), sharded.read_tensor(key)), key
    load_out(tmp_path / "sharded")


def test_untouched_tensors_copied_exactly_and_tied_head_kept(gpt2, tmp_path):
    sum_into_base(gpt2["adapters"][2:], into=gpt2["base"], out=tmp_path / "out", progress=False)
    base, out = BaseModelFolder(gpt2["base"]), BaseModelFolder(tmp_path / "out")
    assert out.keys() == base.keys()
    for key in base.keys():
        if ".c_fc." not in key and not (key.endswith("weight") and ("c_attn" in key or "c_proj" in key)):
            assert torch.equal(out.read_tensor(key), base.read_tensor(key)), key
    model = load_out(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    for name in ("config.json", "generation_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (gpt2["base"] / name).read_bytes()


def test_provenance(gpt2, tmp_path):
    from safetensors import safe_open

    import loramix

    weights = [1.0, 2.0, 0.5]
    sum_into_base(
        gpt2["adapters"], into=gpt2["sharded"], out=tmp_path / "out", weights=weights, progress=False
    )
    rec = json.loads((tmp_path / "out" / "loramix.json").read_text())
    assert rec["method"] == "sum" and rec["loramix_version"] == loramix.__version__
    import numpy
    import safetensors
    import transformers

    assert rec["software"] == {"python": platform.python_version(), "torch": torch.__version__,
                               "transformers": transformers.__version__, "safetensors": safetensors.__version__,
                               "numpy": numpy.__version__}  # fmt: skip
    assert rec["parameters"]["weights"] == weights
    ads = [i for i in rec["inputs"] if i["role"] == "adapter"]
    assert [i["sha256"] for i in ads] == [
        file_sha256(p / "adapter_model.safetensors") for p in gpt2["adapters"]
    ]
    assert [i["weight"] for i in ads] == weights
    (b,) = [i for i in rec["inputs"] if i["role"] == "base"]
    assert b["files"]["model-00001-of-00008.safetensors"] == file_sha256(
        gpt2["sharded"] / "model-00001-of-00008.safetensors"
    )
    for shard in BaseModelFolder(tmp_path / "out").shards:
        with safe_open(str(tmp_path / "out" / shard), "pt") as f:
            assert f.metadata()["format"] == "pt"
            # The weights carry the provenance less when and where it ran: byte-identical reruns,
            # and a weight file's hash (a base's identity) that no package upgrade changes
            assert json.loads(f.metadata()["loramix"]) == {
                k: v for k, v in rec.items() if k not in ("created", "software")
            }

    sum_adapters(gpt2["adapters"], out=tmp_path / "ad", weights=weights)
    rec2 = json.loads((tmp_path / "ad" / "loramix.json").read_text())
    with safe_open(str(tmp_path / "ad" / "adapter_model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["loramix"]) == {
            k: v for k, v in rec2.items() if k not in ("created", "software")
        }
    assert "created" in rec2 and "software" in rec2
    assert [i["sha256"] for i in rec2["inputs"]] == [i["sha256"] for i in ads]


def test_sum_is_byte_reproducible(gpt2, tmp_path):
    for name in ("a", "b"):
        sum_into_base(gpt2["adapters"], into=gpt2["sharded"], out=tmp_path / name / "into", progress=False)
        sum_adapters(gpt2["adapters"], out=tmp_path / name / "adapter")
    for sub in ("into", "adapter"):
        files = sorted(p.name for p in (tmp_path / "a" / sub).glob("*.safetensors"))
        assert files
        for f in files:
            assert (tmp_path / "a" / sub / f).read_bytes() == (tmp_path / "b" / sub / f).read_bytes(), f


@pytest.mark.parametrize("large", [False, True])
def test_direct_writes_give_the_same_bytes(gpt2, tmp_path, monkeypatch, large):
    """``LORAMIX_DIRECT_IO=1`` (``O_DIRECT``) and ``0`` (the page cache)
    write the same files. ``large``: every file counts as large, so its data
    starts on a page and the results are written from their buffers without
    a copy; transformers loads it, with the same tensors."""
    from loramix.io import shard_writer

    if large:
        monkeypatch.setattr(shard_writer, "DIRECT_MIN_BYTES", 0)
        monkeypatch.setattr(shard_writer, "ZERO_COPY_MIN", 4096)
    for how in ("0", "1"):
        monkeypatch.setenv("LORAMIX_DIRECT_IO", how)
        for base in ("base", "sharded"):
            sum_into_base(gpt2["adapters"], into=gpt2[base], out=tmp_path / how / base, progress=False)
    for base in ("base", "sharded"):
        files = sorted(p.name for p in (tmp_path / "0" / base).glob("*.safetensors"))
        assert files
        for f in files:
            assert (tmp_path / "0" / base / f).read_bytes() == (tmp_path / "1" / base / f).read_bytes(), f
    if large:
        monkeypatch.setattr(shard_writer, "DIRECT_MIN_BYTES", 1 << 40)
        sum_into_base(gpt2["adapters"], into=gpt2["base"], out=tmp_path / "small", progress=False)
        ref, got = BaseModelFolder(tmp_path / "small"), BaseModelFolder(tmp_path / "1" / "base")
        assert got.keys() == ref.keys()
        for key in ref.keys():
            assert torch.equal(got.read_tensor(key), ref.read_tensor(key)), key
        (name,) = got.shards
        with open(tmp_path / "1" / "base" / name, "rb") as f:
            assert (8 + int.from_bytes(f.read(8), "little")) % shard_writer.ALIGN == 0
        load_out(tmp_path / "1" / "base")


def _leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


def test_fp16_base_keeps_dtype_and_dtype_option(tmp_path):
    model = tiny_gpt2(seed=4).half()
    base = save_base(model, tmp_path / "base16")
    ad = make_peft_adapter(tiny_gpt2(seed=4), tmp_path / "ad", seed=5)
    sum_into_base([ad], into=base, out=tmp_path / "out16", progress=False)
    out = BaseModelFolder(tmp_path / "out16")
    assert {t.dtype for t in out.tensors.values()} == {"F16"}
    m = load_adapter(ad).modules["transformer.h.1.mlp.c_fc"]
    W0 = BaseModelFolder(base).read_module_weight("transformer.h.1.mlp.c_fc")
    expect = (W0 + m.scale * m.B.float() @ m.A.float()).half()
    got = out.read_module_weight("transformer.h.1.mlp.c_fc", dtype=None)
    assert (got.float() - expect.float()).abs().max() <= 1e-3 * expect.float().abs().max()

    sum_into_base([ad], into=base, out=tmp_path / "outbf", dtype="bfloat16", progress=False)
    assert {t.dtype for t in BaseModelFolder(tmp_path / "outbf").tensors.values()} == {"BF16"}
    assert json.loads((tmp_path / "outbf" / "config.json").read_text())["dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "outbf"), dtype="auto").dtype == torch.bfloat16


def test_d2lora_sum_into_is_dense_effective_delta(gpt2, tmp_path):
    """W = W0 + w_d2 (W* + dW - W0) + w_lora s B A, checked densely; the
    square c_proj exercises the Conv1D transpose."""
    g = torch.Generator().manual_seed(7)
    base = BaseModelFolder(gpt2["base"])
    modules = {}
    for name in ("transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_attn"):
        out_f, in_f = base.read_module_weight(name).shape
        r = 3
        modules[name] = ModuleDelta(
            name=name,
            B=torch.randn(out_f, r, generator=g) * 0.3,
            A=torch.randn(r, in_f, generator=g) * 0.3,
            scale=8 / r,
            alpha=8.0,
            B_neg=torch.randn(out_f, r, generator=g) * 0.3,
            A_neg=torch.randn(r, in_f, generator=g) * 0.3,
            tau=0.5,
        )
    d2 = save_d2_adapter(tmp_path / "d2", modules, r=3, lora_alpha=8, tau=0.5)
    lora = gpt2["adapters"][0]
    weights = [0.7, 1.5]
    sum_into_base([d2, lora], into=gpt2["base"], out=tmp_path / "out", weights=weights, progress=False)
    out = BaseModelFolder(tmp_path / "out")
    lm = load_adapter(lora).modules
    for name, m in modules.items():
        W0 = base.read_module_weight(name, dtype=torch.float64)
        dW = m.scale * (m.B.double() @ m.A.double() - m.tau * m.B_neg.double() @ m.A_neg.double())
        expect = W0 + weights[0] * (d2_merged_weight(W0, dW) - W0)
        expect = expect + weights[1] * lm[name].scale * lm[name].B.double() @ lm[name].A.double()
        assert rel_err(out.read_module_weight(name), expect) <= TOL, name

    with pytest.raises(AdapterError, match="--into"):
        sum_adapters([d2, lora], out=tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_gpt2_checkpoint_without_prefix(tmp_path):
    """A GPT2Model checkpoint (keys h.0..., no transformer.) still maps, Conv1D transposed."""
    from transformers import GPT2Model

    gm = GPT2Model(tiny_gpt2().config)
    gm.save_pretrained(tmp_path / "bare")
    base = BaseModelFolder(tmp_path / "bare")
    assert base.module_weight_key("transformer.h.0.attn.c_proj") == ("h.0.attn.c_proj.weight", True)
    assert base.module_weight_key("base_model.model.transformer.h.1.mlp.c_fc") == (
        "h.1.mlp.c_fc.weight",
        True,
    )
    W = base.read_module_weight("transformer.h.0.attn.c_attn")
    assert torch.equal(W, gm.h[0].attn.c_attn.weight.detach().T)


# ---- bad inputs: library errors and the CLI's one line, exit 2 ----------------------


def run_cli(capsys, *args):
    code = main(["sum", "--no-progress", *map(str, args)])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def assert_one_line_error(code, err, *names):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("loramix: error:"), err
    for n in names:
        assert str(n) in lines[0], (n, lines[0])


def test_cli_happy_path(gpt2, tmp_path, capsys):
    a = gpt2["adapters"]
    code, out, err = run_cli(
        capsys, *a, "--weights", "1,0.5,2", "--into", gpt2["base"], "--out", tmp_path / "o"
    )
    assert code == 0, err
    assert "modules merged" in out and str(tmp_path / "o") in out
    code, out, err = run_cli(capsys, *a, "--out", tmp_path / "ad")
    assert code == 0, err
    assert (tmp_path / "ad" / "adapter_config.json").exists()


def test_base_without_weights(gpt2, tmp_path, capsys):
    bad = tmp_path / "noweights"
    bad.mkdir()
    shutil.copy(gpt2["base"] / "config.json", bad)
    with pytest.raises(BaseModelError, match="no weights"):
        BaseModelFolder(bad)
    code, _, err = run_cli(capsys, gpt2["adapters"][0], "--into", bad, "--out", tmp_path / "o")
    assert_one_line_error(code, err, bad, "no weights")
    assert not (tmp_path / "o").exists()


def test_truncated_shard_and_missing_shard(gpt2, tmp_path, capsys):
    bad = shutil.copytree(gpt2["sharded"], tmp_path / "trunc")
    shard = bad / "model-00002-of-00008.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    code, _, err = run_cli(capsys, gpt2["adapters"][0], "--into", bad, "--out", tmp_path / "o")
    assert_one_line_error(code, err, shard, "truncated")

    gone = shutil.copytree(gpt2["sharded"], tmp_path / "gone")
    (gone / "model-00003-of-00008.safetensors").unlink()
    code, _, err = run_cli(capsys, gpt2["adapters"][0], "--into", gone, "--out", tmp_path / "o")
    assert_one_line_error(
        code, err, gone / "model.safetensors.index.json", "model-00003-of-00008.safetensors"
    )
    assert not (tmp_path / "o").exists()


def test_adapter_that_does_not_fit(gpt2, llama, tmp_path, capsys):
    # Module missing: a Llama adapter into a GPT-2 base.
    lad = llama["adapters"][0]
    code, _, err = run_cli(capsys, lad, "--into", gpt2["base"], "--out", tmp_path / "o")
    assert_one_line_error(code, err, lad, "model.layers.0", gpt2["base"])
    # Wrong shape: an adapter for a wider GPT-2.
    wide = make_peft_adapter(tiny_gpt2(n_embd=48), tmp_path / "wide", seed=1)
    with pytest.raises(AdapterError, match="does not fit"):
        sum_into_base([wide], into=gpt2["base"], out=tmp_path / "o", progress=False)
    code, _, err = run_cli(capsys, wide, "--into", gpt2["base"], "--out", tmp_path / "o")
    assert_one_line_error(code, err, wide, "model.safetensors", "transformer.h.0.attn.c_attn")
    # Incompatible adapters with each other.
    code, _, err = run_cli(capsys, gpt2["adapters"][0], wide, "--out", tmp_path / "o")
    assert_one_line_error(code, err, wide)
    assert _leftovers(tmp_path, "o") == []


def test_existing_out_and_out_is_input(gpt2, tmp_path, capsys):
    a = gpt2["adapters"][0]
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, a, "--into", gpt2["base"], "--out", tmp_path / "o")
    assert_one_line_error(code, err, tmp_path / "o", "--force")
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"
    code, _, err = run_cli(capsys, a, "--into", gpt2["base"], "--out", tmp_path / "o", "--force")
    assert code == 0, err
    assert not (tmp_path / "o" / "keep.txt").exists()

    before = file_sha256(gpt2["base"] / "model.safetensors")
    for target in (gpt2["base"], a):
        with pytest.raises(OutputError):
            sum_into_base([a], into=gpt2["base"], out=target, force=True, progress=False)
        code, _, err = run_cli(capsys, a, "--into", gpt2["base"], "--out", target, "--force")
        assert_one_line_error(code, err, target, "input")
    assert file_sha256(gpt2["base"] / "model.safetensors") == before


def test_bad_weights(gpt2, tmp_path, capsys):
    a = gpt2["adapters"]
    code, _, err = run_cli(capsys, a[0], a[1], "--weights", "1,2,3", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "--weights", "3 weights for 2 adapters")
    code, _, err = run_cli(capsys, a[0], "--weights", "x", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "--weights")
    with pytest.raises(UsageError):
        sum_into_base(a[:2], into=gpt2["base"], out=tmp_path / "o", weights=[1.0], progress=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.cuda
def test_cuda_matches_cpu(gpt2, tmp_path):
    weights = [1.0, 0.5, -0.7]
    sum_into_base(
        gpt2["adapters"],
        into=gpt2["base"],
        out=tmp_path / "cpu",
        weights=weights,
        device="cpu",
        progress=False,
    )
    res = sum_into_base(
        gpt2["adapters"],
        into=gpt2["sharded"],
        out=tmp_path / "cuda",
        weights=weights,
        device="cuda",
        progress=False,
    )
    assert res.device.startswith("cuda")
    cpu, cuda = BaseModelFolder(tmp_path / "cpu"), BaseModelFolder(tmp_path / "cuda")
    for key in cpu.keys():
        assert rel_err(cuda.read_tensor(key), cpu.read_tensor(key)) <= TOL, key


def test_cli_cuda_without_gpu(gpt2, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, _, err = run_cli(
        capsys, gpt2["adapters"][0], "--into", gpt2["base"], "--out", tmp_path / "o", "--device", "cuda"
    )
    assert_one_line_error(code, err, "--device")
    assert _leftovers(tmp_path, "o") == []


@pytest.mark.parametrize("native", ["1", "0"])
def test_sum_into_a_bfloat16_base_is_computed_in_float32(native, monkeypatch, tmp_path):
    """A bfloat16 base is widened, summed in float32 and rounded once
    (engine.add_delta), with the kernels or without: ``bf16(f32(W0) + s B A)``,
    not a sum with bfloat16 factors or in bfloat16."""
    monkeypatch.setenv("LORAMIX_NATIVE", native)
    model = tiny_llama(seed=0, hidden=64).to(torch.bfloat16)
    base = save_base(model, tmp_path / "base")
    ad = make_peft_adapter(model.float(), tmp_path / "ad", seed=1, r=4, lora_alpha=32)
    sum_into_base([ad], into=base, out=tmp_path / "out", progress=False)
    out, src = BaseModelFolder(tmp_path / "out"), BaseModelFolder(base)
    checked = 0
    for name, m in load_adapter(ad).modules.items():
        W0 = src.read_module_weight(name, dtype=None)
        assert W0.dtype == torch.bfloat16
        want = (W0.double() + m.scale * m.B.double() @ m.A.double()).float().bfloat16()
        got = out.read_module_weight(name, dtype=None)
        assert got.dtype == torch.bfloat16
        # float32 products may round differently from float64's: at most one step, rarely
        steps = (got.view(torch.int16).int() - want.view(torch.int16).int()).abs()
        assert int(steps.max()) <= 1 and float((steps > 0).float().mean()) < 1e-3, name
        checked += 1
    assert checked > 0


def test_an_adapter_given_twice_is_warned_of(gpt2, tmp_path, capsys):
    """``sum a a`` (a repeated shell argument) merges a's delta twice: allowed, as --weights 2 is, but
    said in one warning naming the adapter, whatever the spelling (a folder, its file, a trailing /)."""
    a, b = gpt2["adapters"][0], gpt2["adapters"][1]
    code, out, err = run_cli(capsys, a, b, f"{a}/", "--out", tmp_path / "o")
    assert code == 0 and "summed 3 adapters" in out
    assert (
        err
        == f"loramix: warning: {a}: given 2 times, so its delta is merged 2 times (a weight scales one copy "
        "instead: weights=, --weights)\n"
    )
    twice = load_adapter(tmp_path / "o")
    # from Python: at the caller's line, through every wrapper (it was said inside loramix, at
    # loramix/api.py's "return f(*args, **kwargs)" under loramix.X, at methods/sum.py under sum_adapters)
    import loramix
    from loramix.errors import LoramixWarning

    for i, call in enumerate([lambda out: loramix.sum_adapters([a, b, a], out=out),
                              lambda out: loramix.merge([a, b, a], "sum", out=out),
                              lambda out: sum_adapters([a, b, a], out=out)]):  # fmt: skip
        with pytest.warns(LoramixWarning, match="given 2 times") as w:
            call(tmp_path / f"api{i}")
        assert [x.filename for x in w if x.category is LoramixWarning] == [__file__], i
    code, _, err = run_cli(capsys, a, b, "--weights", "2,1", "--out", tmp_path / "w")
    assert code == 0 and err == ""
    once = load_adapter(tmp_path / "w")
    for name, m in once.modules.items():
        assert torch.allclose(twice.modules[name].delta(), m.delta(), atol=1e-6)


def test_sum_adapters_truncates_as_the_command_does(gpt2, tmp_path, capsys):
    """``loramix sum --out-rank K`` / ``--energy F`` had no keyword in ``sum_adapters``
    (only ``merge(..., "sum", out_rank=K)`` reached it): the same bytes as the command."""
    a, b = gpt2["adapters"][0], gpt2["adapters"][1]
    for flag, kw in (("--out-rank", dict(out_rank=2)), ("--energy", dict(energy=0.9))):
        name = flag.strip("-")
        code, _, err = run_cli(capsys, a, b, flag, next(iter(kw.values())), "--out", tmp_path / f"cli-{name}")
        assert code == 0, err
        got = sum_adapters([a, b], out=tmp_path / f"api-{name}", **kw)
        cli = tmp_path / f"cli-{name}" / "adapter_model.safetensors"
        assert (got / "adapter_model.safetensors").read_bytes() == cli.read_bytes(), flag
    assert load_adapter(tmp_path / "api-out-rank").modules[next(iter(load_adapter(a).modules))].rank == 2
