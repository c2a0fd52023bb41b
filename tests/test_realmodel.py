"""A real pretrained base: SmolLM2-135M-Instruct imported from its GGUF.

The model tests use ``../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf`` beside
the checkout and skip, saying so, where it is absent. One session-wide import
is shared by all of them. Oracles: transformers (loading, perplexity), PEFT
(loading a trained adapter, ``cat`` + ``merge_and_unload``) and a dense
reference ``W0 + s B A`` formed here from the adapter's files.

The bad-input tests need no model: they write small GGUF files with
``gguf.GGUFWriter``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from loramix.cli import main
from loramix.io.safetensors_io import file_sha256

from .factories import SHARED_DATA, SMOL_GGUF, one_line_error, write_jsonl

GGUF = SMOL_GGUF
needs_model = pytest.mark.skipif(
    not GGUF.is_file(), reason=f"real model not found at {GGUF} (see README: Real model)"
)
needs_data = pytest.mark.skipif(
    not (SHARED_DATA / "math.jsonl").is_file(), reason=f"real QA data not found at {SHARED_DATA}"
)

# Plain English prose, not from any of the data sets.
PARAGRAPH = (
    "The history of the printing press begins in the middle of the fifteenth century, when Johannes "
    "Gutenberg, a goldsmith from Mainz, combined several existing technologies into a single machine. "
    "Before his invention, books were copied by hand, a slow and expensive process that kept them out of "
    "reach of most people. Gutenberg's press used movable metal type, oil-based ink and a screw mechanism "
    "adapted from wine presses. Within a few decades, printing shops had spread to more than two hundred "
    "cities across Europe, and millions of books had been produced. The new technology made it easier to "
    "share ideas, and many historians believe it played an important role in the Renaissance, the "
    "Reformation and the rise of modern science."
)
# The top two blocks only: training stays fast (no backward through the frozen prefix).
TOP_TARGETS = (
    r"model\.layers\.(28|29)\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
)


# ---- the real model ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def trained(smol, tmp_path_factory):
    """Two short LoRA trainings on the top blocks (math, medicine): a few steps each."""
    if not (SHARED_DATA / "math.jsonl").is_file():
        pytest.skip(f"real QA data not found at {SHARED_DATA}")
    from loramix import train_adapter

    root = tmp_path_factory.mktemp("smol-adapters")
    res = {}
    for i, dom in enumerate(["math", "medicine"]):
        res[dom] = train_adapter(
            str(smol), str(SHARED_DATA / f"{dom}.jsonl"), out=root / dom, targets=TOP_TARGETS, rank=4,
            alpha=8, steps=6, batch=4, max_len=64, lr=3e-3, limit=40, eval_size=8, seed=i,
            device="cpu", progress=False,
        )  # fmt: skip
    return res


@needs_model
def test_import_loads_tied_and_recorded(smol):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    cfg = json.loads((smol / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["hidden_size"]) == ("llama", 30, 576)
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"] and cfg["tie_word_embeddings"]
    with safe_open(str(smol / "model.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    sha = file_sha256(GGUF)
    assert json.loads(meta["loramix"])["inputs"][0]["sha256"] == sha
    assert json.loads((smol / "loramix.json").read_text())["inputs"][0]["sha256"] == sha
    model, info = AutoModelForCausalLM.from_pretrained(str(smol), output_loading_info=True)
    assert not any(info.values()), info
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@needs_model
def test_import_loads_without_warnings(smol):
    """A fresh process loading model and tokenizer prints nothing but transformers' progress bar."""
    code = (
        "import sys; from transformers import AutoModelForCausalLM, AutoTokenizer; "
        "AutoModelForCausalLM.from_pretrained(sys.argv[1]); AutoTokenizer.from_pretrained(sys.argv[1])"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONWARNINGS": "default"}
    r = subprocess.run(
        [sys.executable, "-c", code, str(smol)], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 0, r.stderr
    noise = [ln for ln in r.stderr.splitlines() if ln.strip() and "Loading weights" not in ln]
    assert not noise, noise


@needs_model
def test_perplexity_of_english_prose(smol):
    """A real SmolLM2 gives about 12 here (about 18.5 on other prose; random weights ~56,000).
    A wrong q/k un-permutation still loads but gives over 100."""
    from loramix.models import load_causal_lm

    model, tok = load_causal_lm(smol)
    ids = tok(PARAGRAPH, return_tensors="pt").input_ids
    with torch.no_grad():
        ppl = math.exp(float(model(ids, labels=ids).loss))
    assert 5 < ppl < 30, ppl


@needs_model
@needs_data
def test_short_training_lowers_heldout_loss(trained):
    for dom, r in trained.items():
        assert r["ppl_adapter"] < r["ppl_base"], (dom, r["ppl_base"], r["ppl_adapter"])


@needs_model
@needs_data
def test_peft_loads_the_adapter_with_the_dense_logits(smol, trained, tmp_path):
    """PEFT's model equals ``W0 + s B A`` formed here, and loramix's on-the-fly perplexity equals PEFT's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loramix import evaluate, load_adapter
    from loramix.data import encode_records, load_records, make_batches
    from loramix.models import load_tokenizer

    path = Path(trained["math"]["out"])
    ad = load_adapter(path)
    dense = AutoModelForCausalLM.from_pretrained(str(smol)).eval()
    with torch.no_grad():
        for name, m in ad.modules.items():
            w = dense.get_submodule(name).weight
            w.copy_((w.double() + m.scale * m.B.double() @ m.A.double()).float())
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(smol)), str(path)).eval()
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
    recs = [{"question": "What is 12 times 7?", "answer": "12 * 7 = 84. #### 84"},
            {"question": "Tom has 3 apples and buys 5 more. How many?", "answer": "3 + 5 = 8. #### 8"}]  # fmt: skip
    recs = load_records(write_jsonl(tmp_path / "qa.jsonl", recs))
    ours = evaluate(str(smol), adapters=[path], data=[recs], device="cpu")["ppl"][0]
    tok = load_tokenizer(smol)
    batches = make_batches(encode_records(tok, recs, max_len=64), batch_size=2, pad_id=tok.pad_token_id)
    tot, n, hf = 0.0, 0, 0.0
    with torch.no_grad():
        for b in batches:
            out, t = pm(**b), b["labels"][:, 1:]
            keep = t != -100
            z, t = out.logits[:, :-1][keep].double(), t[keep]  # PEFT's float32 logits, then float64
            tot += float((torch.logsumexp(z, -1) - z.gather(1, t[:, None])[:, 0]).sum())
            n, hf = n + int(keep.sum()), hf + float(out.loss) * int(keep.sum())
    assert ours == pytest.approx(math.exp(tot / n), rel=2e-6)
    # transformers' float32 loss is ~1e-5 low on this vocabulary (loramix.perplexity, "Precision")
    assert ours == pytest.approx(math.exp(hf / n), rel=1e-4)


@needs_model
@needs_data
def test_sum_into_equals_peft_cat(smol, trained, tmp_path, capsys):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    paths = [trained[d]["out"] for d in ("math", "medicine")]
    out = tmp_path / "merged"
    assert (
        main(["sum", "--no-progress", *paths, "--weights", "1,0.5", "--into", str(smol), "--out", str(out)])
        == 0
    )
    capsys.readouterr()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())  # still tied
    pm = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(smol)), paths[0], adapter_name="a0"
    )
    pm.load_adapter(paths[1], adapter_name="a1")
    pm.add_weighted_adapter(["a0", "a1"], [1.0, 0.5], "summed", combination_type="cat")
    pm.set_adapter("summed")
    ref = pm.merge_and_unload().eval()
    ours = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert set(ref_sd) == set(our_sd)
    for k, v in ref_sd.items():
        err = float((our_sd[k].double() - v.double()).norm() / v.double().norm().clamp_min(1e-30))
        assert err <= 1e-6, k
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


def _peft_made(smol, folder, seed, **cfg):
    """An adapter as a PEFT user saves it on the real base, random non-zero
    factors (no training: the configs are what is checked); DoRA magnitudes
    moved off their init, which would make DoRA a LoRA."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(smol))
    get_peft_model(base, LoraConfig(init_lora_weights=False, **cfg)).save_pretrained(str(folder))
    f = str(folder / "adapter_model.safetensors")
    t = load_file(f)
    g = torch.Generator().manual_seed(seed)
    t = {k: v * (1 + 0.2 * torch.rand(v.shape, generator=g)) if "magnitude" in k else v for k, v in t.items()}
    save_file({k: v.half() if cfg.get("use_rslora") else v for k, v in t.items()}, f)  # one saved in float16
    return folder


@needs_model
def test_peft_made_configs_sum_into_the_base_as_peft_merges_them(smol, tmp_path, capsys):
    """PEFT users' configs on the real base, not loramix's own adapters: rsLoRA
    with a rank and an alpha pattern and ``layers_to_transform``, saved in
    float16; DoRA. ``sum --into`` equals ``W0`` plus PEFT's own
    ``merge_and_unload`` delta of each (DoRA's delta depends on ``W0``, so
    PEFT cannot merge the two one after the other), every tensor to 1e-6."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    top = [28, 29]
    ads = [_peft_made(smol, tmp_path / "rs", 0, r=8, lora_alpha=16, use_rslora=True, layers_to_transform=top,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      rank_pattern={"o_proj": 4, "model.layers.29.self_attn.q_proj": 2},
                      alpha_pattern={"k_proj": 4}),
           _peft_made(smol, tmp_path / "dora", 1, r=4, lora_alpha=8, use_dora=True, layers_to_transform=top,
                      target_modules=["q_proj", "up_proj"])]  # fmt: skip
    out = tmp_path / "merged"
    assert main(["sum", "--no-progress", *map(str, ads), "--into", str(smol), "--out", str(out)]) == 0
    capsys.readouterr()
    W0 = load_file(str(smol / "model.safetensors"))
    ref = {k: v.double() for k, v in W0.items()}
    for a in ads:
        pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(smol)), str(a))
        for k, v in pm.merge_and_unload().state_dict().items():
            if k in W0:
                ref[k] += v.double() - W0[k].double()
    ours = load_file(str(out / "model.safetensors"))
    assert set(ours) == set(W0)
    changed = {k for k in W0 if not torch.equal(ours[k], W0[k])}
    assert len(changed) == 2 * 4 + 2  # the two layers' attention, and DoRA's up_proj
    for k, v in ours.items():
        err = float((v.double() - ref[k]).norm() / ref[k].norm())
        assert err <= 1e-6, (k, err)


@needs_model
def test_gguf_path_accepted_as_base(smol, monkeypatch, tmp_path, capfd):
    """A GGUF where a base folder goes is imported once into the cache, keyed
    by its sha256 and the import rule, and the import says so on stderr (it
    was silent); imports of that file by older rules are removed then."""
    from loramix.gguf_import import IMPORT_RULE, resolve_base
    from loramix.io.filehash import cache_dir
    from loramix.io.model_folder import BaseModelFolder

    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(tmp_path / "cache"))
    sha = file_sha256(GGUF)
    stale = [cache_dir() / "bases" / f"{sha}-float32", cache_dir() / "bases" / f"{sha}-float32-r1"]
    other = cache_dir() / "bases" / f"{'0' * 64}-float32"  # another file's import: kept
    for d in [*stale, other]:
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
    capfd.readouterr()
    folder = resolve_base(GGUF)
    said = [line for line in capfd.readouterr().err.splitlines() if "importing" in line]
    assert said == [f"loramix: importing {GGUF} into {folder} (once per file)"]
    assert folder.name == f"{sha}-float32-r{IMPORT_RULE}" and (folder / "config.json").is_file()
    assert not any(d.exists() for d in stale) and other.is_dir()
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert BaseModelFolder(GGUF).path == folder  # found, not imported again
    assert (
        folder / "model.safetensors"
    ).stat().st_mtime_ns == mtime and "importing" not in capfd.readouterr().err
    assert (folder / "model.safetensors").read_bytes() == (smol / "model.safetensors").read_bytes()


# ---- bad input, with small crafted files ----------------------------------------------------------


def write_gguf(path: Path, arch: str, tensors: dict) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_gguf(
    path: Path,
    drop: str | None = None,
    put: dict | None = None,
    _raw: dict | None = None,
    tokenizer: bool = False,
    floats: dict | None = None,
    **meta,
) -> Path:
    """A one-block Llama GGUF (width 32, vocab 64) with the metadata a model
    has (``meta`` overrides them, None leaves one out), less tensor ``drop``,
    with the tensors ``put`` in place of the random ones (or beside them);
    ``floats``: float32 keys by full name (ones GGUFWriter has no adder for)."""
    import gguf
    import numpy as np

    arch = meta.pop("arch", "llama")
    k = {"block_count": 1, "context_length": 64, "embedding_length": 32, "feed_forward_length": 64,
         "head_count": 2, "head_count_kv": 2, "layer_norm_rms_eps": 1e-5, **meta}  # fmt: skip
    w = gguf.GGUFWriter(str(path), arch)
    for key, v in k.items():
        if v is not None:
            getattr(w, f"add_{key}")(v)
    for key, v in (floats or {}).items():
        w.add_float32(key, v)
    if tokenizer:  # a byte-level BPE of 64 single characters, no merges
        w.add_tokenizer_model("gpt2")
        w.add_token_list([chr(33 + i) for i in range(64)])
        w.add_token_merges([])
        w.add_token_scores([0.0] * 64)
        w.add_token_types([1] * 64)
        w.add_eos_token_id(0)
    r = np.random.RandomState(0)
    ff = k["feed_forward_length"] or 64
    shapes = {"token_embd.weight": (64, 32), "output_norm.weight": (32,), "blk.0.attn_norm.weight": (32,),
              "blk.0.ffn_norm.weight": (32,), "blk.0.attn_q.weight": (32, 32), "blk.0.attn_k.weight": (32, 32),
              "blk.0.attn_v.weight": (32, 32), "blk.0.attn_output.weight": (32, 32),
              "blk.0.ffn_gate.weight": (ff, 32), "blk.0.ffn_up.weight": (ff, 32), "blk.0.ffn_down.weight": (32, ff)}  # fmt: skip
    for name, shape in shapes.items():
        if name != drop:
            raw = (_raw or {}).get(name)  # put holds the bytes of a quantised tensor of this ggml type
            w.add_tensor(name, (put or {}).get(name, r.randn(*shape).astype(np.float32)), raw_dtype=raw)
    for name, t in (put or {}).items():
        if name not in shapes:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_import_refuses_bad_input(tmp_path, capsys):
    import gguf
    import numpy as np

    text = tmp_path / "notes.gguf"
    text.write_text("this is not a model\n")
    good = write_gguf(tmp_path / "ok.gguf", "llama", {"token_embd.weight": np.ones((8, 32), np.float32)})
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[:-100])
    gpt2 = write_gguf(tmp_path / "gpt2.gguf", "gpt2", {"token_embd.weight": np.ones((8, 32), np.float32)})
    mistral = llama_gguf(tmp_path / "mistral.gguf", tokenizer=True, arch="mistral")
    ints = write_gguf(tmp_path / "int8.gguf", "llama", {"token_embd.weight": np.ones((8, 32), np.int8)})
    damaged = np.ones((64, 32), np.float32)
    damaged[3, 5] = np.nan  # as bytes overwritten in a real file make the de-quantised values
    nan = llama_gguf(tmp_path / "nan.gguf", put={"token_embd.weight": damaged})
    cases = [
        (text, ["not a GGUF file"]),
        (tmp_path / "missing.gguf", ["no such file"]),
        (truncated, ["corrupt or truncated"]),
        (gpt2, ["architecture 'gpt2' is not supported", "llama"]),
        # llama.cpp has no "mistral" architecture (its Mistral files are "llama"): was a StopIteration traceback
        (mistral, ["architecture 'mistral' is not supported", "llama"]),
        (ints, ["token_embd.weight", "I8", "cannot import"]),
        (nan, ["token_embd.weight", "1 nan or inf"]),
        (
            good,
            ["has no llama.embedding_length in its metadata"],
        ),  # and no transformers warning before the line
        (
            llama_gguf(tmp_path / "nokv.gguf", drop="blk.0.ffn_up.weight", tokenizer=True),
            ["lacks 1 tensor(s) of a llama model"],
        ),
        # metadata that cannot shape the model: transformers' defaults or a reshape failed with tracebacks
        (llama_gguf(tmp_path / "noheads.gguf", head_count=None), ["has no llama.attention.head_count"]),
        (llama_gguf(tmp_path / "noblocks.gguf", block_count=None), ["has no llama.block_count"]),
        # llama.cpp refuses it; transformers took its default epsilon (1e-6), another model's outputs
        (
            llama_gguf(tmp_path / "noeps.gguf", layer_norm_rms_eps=None),
            ["has no llama.attention.layer_norm_rms_epsilon"],
        ),
        (llama_gguf(tmp_path / "h0.gguf", head_count=0, head_count_kv=0), ["head_count 0 does not divide"]),
        (
            llama_gguf(tmp_path / "h3.gguf", head_count=3, head_count_kv=3),
            ["head_count 3 does not divide", "32"],
        ),
        (llama_gguf(tmp_path / "kv3.gguf", head_count_kv=3), ["head_count_kv 3 does not divide"]),
        # a kv head count the weights were not made with: the config written is the metadata's, checked
        # against the k/v projections (g x d rows); the line names the count behind the shape
        (
            llama_gguf(tmp_path / "kv1.gguf", head_count_kv=1, tokenizer=True),
            [
                "k_proj.weight has shape (32, 32); the config implies (16, 32) (its metadata's "
                "attention.head_count_kv 1 x head size 16)"
            ],
        ),  # fmt: skip
        # llama.cpp would rotate 8 of each head's 16 dimensions, transformers all 16
        (
            llama_gguf(tmp_path / "rot8.gguf", rope_dimension_count=8),
            ["llama.rope.dimension_count 8 rotates part of each head (head size 16)"],
        ),
        # RoPE scaling, which transformers' GGUF support drops: the written model would not be the file's
        (
            llama_gguf(
                tmp_path / "freqs.gguf",
                put={"rope_freqs.weight": np.linspace(1, 8, 8, dtype=np.float32)},
                tokenizer=True,
            ),
            ["tensor rope_freqs.weight scales the RoPE frequencies"],
        ),
        (
            llama_gguf(tmp_path / "linear.gguf", rope_scaling_type=gguf.RopeScalingType.LINEAR),
            ["its RoPE is scaled (llama.rope.scaling.type = 'linear')"],
        ),
    ]
    for i, (path, needles) in enumerate(cases):
        out = tmp_path / f"out{i}"
        one_line_error(capsys, ["base", "import", path, "--out", out], path, *needles)
        assert not out.exists() and not list(tmp_path.glob(f".out{i}*")), path


def test_rope_scale_factor_without_a_type_is_refused(tmp_path, capsys):
    """llama.cpp reads a RoPE scaling factor with no ``rope.scaling.type`` as
    linear scaling (its type defaults to "linear"), from ``rope.scaling.factor``
    or the older converters' ``rope.scale_linear``: positions divided by the
    factor. transformers' GGUF support drops both, so the import computed
    unscaled positions (accepted silently). A factor of 0 or 1 scales nothing
    and still imports."""
    for i, (kw, needle) in enumerate(
        [
            ({"rope_scaling_factor": 4.0}, "llama.rope.scaling.factor = 4.0"),
            ({"floats": {"llama.rope.scale_linear": 2.0}}, "llama.rope.scale_linear = 2.0"),
        ]
    ):
        path = llama_gguf(tmp_path / f"scaled{i}.gguf", tokenizer=True, **kw)
        one_line_error(capsys, ["base", "import", path, "--out", tmp_path / f"o{i}"], path, needle, "linear")
    for i, kw in enumerate([{"rope_scaling_factor": 1.0}, {"floats": {"llama.rope.scale_linear": 0.0}}]):
        path = llama_gguf(tmp_path / f"unscaled{i}.gguf", tokenizer=True, **kw)
        assert main(["base", "import", str(path), "--out", str(tmp_path / f"u{i}")]) == 0, capsys.readouterr()


def test_bad_gguf_as_base_is_one_line(tmp_path, capsys):
    import numpy as np

    gpt2 = write_gguf(tmp_path / "gpt2.gguf", "gpt2", {"token_embd.weight": np.ones((8, 32), np.float32)})
    one_line_error(capsys, ["eval", "--base", gpt2, "--data", "synthetic:arith"], gpt2, "gpt2")
    # refused before the import's notice: one line still
    h3 = llama_gguf(tmp_path / "h3.gguf", head_count=3, head_count_kv=3)
    one_line_error(capsys, ["eval", "--base", h3, "--data", "synthetic:arith"], h3, "does not divide")


def test_mistral_named_gguf_has_no_sliding_window(tmp_path):
    """A "llama" GGUF named Mistral is imported as MistralConfig; llama.cpp runs
    it with full attention, so the config must not take MistralConfig's default
    4096-token sliding window (positions >= 4096 gave other logits than
    transformers' own GGUF loader)."""
    from loramix.gguf_import import _hf_config, open_gguf

    path = llama_gguf(tmp_path / "m.gguf", name="Mistral 7B Instruct v0.3")
    config = _hf_config(open_gguf(path), path, "mistral", "float32")
    assert config.model_type == "mistral"
    assert config.sliding_window is None


def test_mistral_named_gguf_ignores_a_sliding_window_key(tmp_path):
    """llama.cpp reads no sliding window for a "llama" GGUF (its LLM_ARCH_LLAMA
    hparams are the RMS eps alone), and neither does transformers' GGUF loader:
    a ``llama.attention.sliding_window`` in the metadata changes nothing there.
    The import gave MistralConfig that window (16 here), so every position past
    it attended differently (logits off by 6 on 40 tokens against
    ``from_pretrained(gguf_file=...)``)."""
    from loramix.gguf_import import _hf_config, open_gguf

    path = llama_gguf(tmp_path / "m.gguf", name="Mistral 7B Instruct v0.1", sliding_window=16)
    config = _hf_config(open_gguf(path), path, "mistral", "float32")
    assert config.model_type == "mistral"
    assert config.sliding_window is None


def qwen_gguf(
    path: Path, arch: str, key_length: int | None = None, tied: bool = True, **meta
) -> tuple[Path, dict]:
    """:func:`llama_gguf`'s block as ``qwen2`` (with q/k/v biases), ``qwen3``
    (with the per-head q/k RMSNorm weights ``attn_q_norm``/``attn_k_norm``)
    or ``llama`` (neither): 2 heads, 1 key-value head, head size
    ``key_length`` (written as the key and value lengths, as llama.cpp's
    converter does) else 32 / 2 = 16, RoPE base 1e6 as Qwen's files have, an
    ``output.weight`` unless ``tied``; ``meta`` overrides the metadata.
    Returns the path and the tensors written in place of llama_gguf's own."""
    import numpy as np

    r = np.random.RandomState(1)
    d = key_length or 16
    shapes = {"blk.0.attn_q.weight": (2 * d, 32), "blk.0.attn_k.weight": (d, 32), "blk.0.attn_v.weight": (d, 32),
              "blk.0.attn_output.weight": (32, 2 * d)}  # fmt: skip
    if arch == "qwen2":
        shapes.update({"blk.0.attn_q.bias": (2 * d,), "blk.0.attn_k.bias": (d,), "blk.0.attn_v.bias": (d,)})
    elif arch == "qwen3":
        shapes.update({"blk.0.attn_q_norm.weight": (d,), "blk.0.attn_k_norm.weight": (d,)})
    if not tied:
        shapes["output.weight"] = (64, 32)
    put = {name: r.randn(*shape).astype(np.float32) for name, shape in shapes.items()}
    lengths = {"key_length": key_length, "value_length": key_length, **meta}
    path = llama_gguf(path, arch=arch, tokenizer=True, put=put, head_count_kv=1, layer_norm_rms_eps=1e-6,
                      rope_freq_base=1e6, **lengths)  # fmt: skip
    return path, put


@pytest.mark.parametrize(
    "arch, key_length, tied",
    [("qwen2", None, True), ("qwen2", None, False), ("qwen3", None, True), ("qwen3", 128, False),
     ("qwen3", 24, True), ("qwen2", 24, True), ("qwen2", 8, False)],
)  # fmt: skip
def test_qwen_gguf_imports_as_transformers_loads_it(tmp_path, capsys, arch, key_length, tied):
    """A qwen2 GGUF (q/k/v biases) and a qwen3 one (q/k norms; head size from
    ``attention.key_length``, as llama.cpp takes it) import to the logits of
    transformers' own GGUF loader on the same file, to float32 rounding. Q/K
    are stored unpermuted (llama.cpp runs both with rotate-half RoPE): the
    weights imported are the file's. transformers' map reads no key length
    (so its loader takes Qwen3Config's head_dim 128, qwen2's width / heads
    16, and refuses any other file); it is given the file's head size
    (``config``) where that differs. A qwen2 head size other than 16 was refused."""
    from safetensors.numpy import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path, put = qwen_gguf(tmp_path / f"{arch}.gguf", arch, key_length, tied)
    out = tmp_path / "m"
    assert main(["base", "import", str(path), "--out", str(out)]) == 0, capsys.readouterr().err
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    head_dim = key_length or 16
    assert (model.config.model_type, model.config.tie_word_embeddings) == (arch, tied)
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (head_dim, 32)
    got = load_file(str(out / "model.safetensors"))
    # Q/K as written: no Llama un-permutation; the biases or the q/k norms in their places
    names = {"attn_q.weight": "q_proj.weight", "attn_k.weight": "k_proj.weight"}
    if arch == "qwen2":
        names.update(
            {"attn_q.bias": "q_proj.bias", "attn_k.bias": "k_proj.bias", "attn_v.bias": "v_proj.bias"}
        )
    else:
        names.update({"attn_q_norm.weight": "q_norm.weight", "attn_k_norm.weight": "k_norm.weight"})
    for g, hf in names.items():
        assert (got[f"model.layers.0.self_attn.{hf}"] == put[f"blk.0.{g}"]).all(), hf
    assert ("lm_head.weight" in got) is not tied
    kw = {}
    if head_dim != {"qwen3": 128, "qwen2": 16}[arch]:
        # set after loading: from_pretrained drops a keyword Qwen2Config does not declare
        kw["config"] = AutoConfig.from_pretrained(str(tmp_path), gguf_file=path.name)
        kw["config"].head_dim = head_dim
    oracle, info = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, output_loading_info=True, **kw
    )
    assert not any(info.values()), info
    ids = AutoTokenizer.from_pretrained(str(out))("HELLO@WORLD=42?", return_tensors="pt").input_ids
    assert ids.shape[1] == 15
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, oracle.eval()(ids).logits)


@pytest.mark.parametrize("rot", [True, False])
def test_llama_gguf_head_size_from_key_length(tmp_path, capsys, rot):
    """A llama GGUF whose head size (24, ``attention.key_length`` and
    ``value_length``) is not width / heads (16) imports to the logits of
    transformers' own GGUF loader on the file. That loader takes Llama's
    ``head_dim`` from ``rope.dimension_count`` (llama.cpp's converter writes
    it); without that key it is given the head size (``config``), as llama.cpp
    reads it from the key length. Without ``rope.dimension_count`` the import
    took width / heads and refused the file over q_proj's shape."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path, _ = qwen_gguf(tmp_path / "l.gguf", "llama", 24, rope_dimension_count=24 if rot else None)
    out = tmp_path / "m"
    assert main(["base", "import", str(path), "--out", str(out)]) == 0, capsys.readouterr().err
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert (model.config.model_type, model.config.head_dim) == ("llama", 24)
    kw = (
        {} if rot else {"config": AutoConfig.from_pretrained(str(tmp_path), gguf_file=path.name, head_dim=24)}
    )
    oracle, info = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, output_loading_info=True, **kw
    )
    assert not any(info.values()), info
    ids = AutoTokenizer.from_pretrained(str(out))("HELLO@WORLD=42?", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, oracle.eval()(ids).logits)


@pytest.mark.parametrize(
    "arch, lengths, needle",
    [("qwen3", dict(value_length=None), "qwen3.attention.key_length 24 with no value_length (so 16, width / heads)"),
     ("qwen3", dict(value_length=16), "qwen3.attention.key_length 24 with value_length 16"),
     ("qwen2", dict(value_length=None), "qwen2.attention.key_length 24 with no value_length"),
     ("llama", dict(value_length=32), "llama.attention.key_length 24 with value_length 32")],
)  # fmt: skip
def test_gguf_key_and_value_head_sizes_must_agree(tmp_path, capsys, arch, lengths, needle):
    """llama.cpp reads the value head size apart from the key's
    (``attention.value_length``, default width / heads) and its llama, qwen2
    and qwen3 graphs refuse a file where they differ; transformers' models
    have one head size. Such a file is refused in one line naming it, where
    the import took the key length for both (a qwen3 file imported)."""
    path, _ = qwen_gguf(tmp_path / f"{arch}.gguf", arch, 24, **lengths)
    out = tmp_path / "m"
    one_line_error(capsys, ["base", "import", path, "--out", out], path, needle, "llama.cpp")
    assert not out.exists()


@pytest.mark.parametrize(
    "records, needle",
    [(dict(rope_dimension_count=16), "llama.rope.dimension_count 16 rotates part of each head (head size 32)"),
     (dict(key_length=16), "llama.attention.key_length 16 with no value_length (so 32, width / heads)"),
     (dict(key_length=16, value_length=16, rope_dimension_count=16),
      "the config implies (16, 32) (its metadata's attention.head_count 1 x head size 16)"),
     (dict(), None), (dict(rope_dimension_count=32), None)],
)  # fmt: skip
def test_a_head_count_edited_with_every_shape_kept(tmp_path, capsys, records, needle):
    """The one-block Llama GGUF's 2 heads of 16 (and 2 key-value heads)
    written as 1 head of 32: every tensor keeps its shape (SmolLM2's 9 heads
    of 64 and 3 kv heads written as 3 of 192 and 1 likewise). Where a second
    record of the head size says 16 (``rope.dimension_count``, as llama.cpp's
    converter writes it, or ``attention.key_length``), the import refuses
    the file in one line naming the file and both keys: the record's and
    ``attention.head_count`` (the first two lines named the record only,
    as partial rotation or a value size: the count, the likelier edit, now
    too; the third named the count already). Without one, or with it edited
    to match, the file imports: nothing in it tells that model apart."""
    path = llama_gguf(tmp_path / "h1.gguf", tokenizer=True, head_count=1, head_count_kv=1, **records)
    out = tmp_path / "m"
    if needle is None:
        assert main(["base", "import", str(path), "--out", str(out)]) == 0, capsys.readouterr().err
        assert json.loads((out / "config.json").read_text())["num_attention_heads"] == 1
        return
    line = one_line_error(capsys, ["base", "import", path, "--out", out], path, needle)
    assert "attention.head_count 1" in line and not out.exists()


# ggml's IQ4 non-linear grid (kvalues_iq4nl): 16 levels a 4-bit index picks from
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def iq4_reference(raw, kind: str):
    """ggml's IQ4_NL and IQ4_XS blocks de-quantised from their layouts, apart
    from gguf's code. IQ4_NL: 32 weights per 18 bytes, an fp16 scale ``d``
    and 16 bytes of index pairs (low nibble -> weight j, high -> j + 16),
    ``w = d * level``. IQ4_XS: 256 weights per 136 bytes, ``d`` (fp16), the
    high 2 bits of eight 6-bit sub-scales (uint16), their low 4 bits (4
    bytes), then eight 32-weight groups laid out as IQ4_NL's, each
    ``w = d * (scale - 32) * level``. Returns float32, one row per block."""
    import numpy as np

    levels = np.array(IQ4_LEVELS, np.float32)

    def groups(qs):  # (blocks, 16) index bytes -> (blocks, 32) levels
        return np.concatenate([levels[qs & 15], levels[qs >> 4]], axis=1)

    size = {"IQ4_NL": 18, "IQ4_XS": 136}[kind]
    b = raw.reshape(-1, size)
    d = b[:, :2].copy().view(np.float16).astype(np.float32)
    if kind == "IQ4_NL":
        return d * groups(b[:, 2:])
    high = b[:, 2:4].copy().view(np.uint16).astype(np.int32)
    low = b[:, 4:8].astype(np.int32)
    parts = []
    for g in range(8):
        scale = ((low[:, g // 2] >> (4 * (g % 2))) & 15) | (((high[:, 0] >> (2 * g)) & 3) << 4)
        parts.append(d * (scale[:, None] - 32) * groups(b[:, 8 + 16 * g : 24 + 16 * g]))
    return np.concatenate(parts, axis=1)


def test_import_iq4_nl_and_iq4_xs(tmp_path, capsys):
    """IQ4_NL and IQ4_XS tensors (what llama.cpp's IQ4 quantisations are made
    of) import to the values their block layouts define: random blocks with
    small fp16 scales, checked against :func:`iq4_reference`."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    from loramix.cli import main

    r = np.random.RandomState(1)

    def blocks(rows, per_row, size):
        raw = r.randint(0, 256, (rows, per_row, size)).astype(np.uint8)
        scales = (r.rand(rows, per_row) * 0.01 + 0.001).astype(np.float16)
        raw[..., :2] = scales[..., None].view(np.uint8)
        return raw.reshape(rows, per_row * size)

    v, down = blocks(32, 1, 18), blocks(32, 1, 136)  # v_proj 32 x 32 (IQ4_NL), down_proj 32 x 256 (IQ4_XS)
    path = tmp_path / "iq4.gguf"
    put = {"blk.0.attn_v.weight": v, "blk.0.ffn_down.weight": down}
    T = gguf.GGMLQuantizationType
    llama_gguf(path, feed_forward_length=256, tokenizer=True, put=put, _raw={"blk.0.attn_v.weight": T.IQ4_NL,
                                                              "blk.0.ffn_down.weight": T.IQ4_XS})  # fmt: skip
    assert main(["base", "import", str(path), "--out", str(tmp_path / "m")]) == 0, capsys.readouterr().err
    got = load_file(str(tmp_path / "m" / "model.safetensors"))
    np.testing.assert_array_equal(
        got["model.layers.0.self_attn.v_proj.weight"], iq4_reference(v, "IQ4_NL").reshape(32, 32)
    )
    np.testing.assert_array_equal(
        got["model.layers.0.mlp.down_proj.weight"], iq4_reference(down, "IQ4_XS").reshape(32, 256)
    )


def test_bfloat16_import_of_f16_tensors_says_it_rounds(tmp_path, capsys):
    """``--dtype bfloat16`` is the dtype of every stored weight: an F16
    tensor (11 significant bits) is rounded to bfloat16's 8 (relative error
    up to 2^-8), which the import did without a word. It now warns, naming
    the types and counts; float32 keeps the F16 values exactly, and a file of
    BF16 tensors stored as bfloat16 is exact and not warned about."""
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    f16 = np.random.RandomState(2).randn(32, 32).astype(np.float16)
    name = "model.layers.0.self_attn.v_proj.weight"
    path = llama_gguf(tmp_path / "f16.gguf", tokenizer=True, put={"blk.0.attn_v.weight": f16})
    assert main(["base", "import", str(path), "--out", str(tmp_path / "f32")]) == 0
    assert "warning" not in capsys.readouterr().err
    np.testing.assert_array_equal(load_file(str(tmp_path / "f32" / "model.safetensors"))[name].numpy(), f16)
    assert main(["base", "import", str(path), "--out", str(tmp_path / "bf"), "--dtype", "bfloat16"]) == 0
    err = capsys.readouterr().err
    # the F16 tensor and the F32 ones (random float32 values have 24 significant bits)
    assert "loramix: warning: " in err and "rounded the values of 11 tensor(s) (10 F32, 1 F16)" in err, err
    assert "--dtype float32 keeps the file's values exactly" in err, err
    got = load_file(str(tmp_path / "bf" / "model.safetensors"))[name].float().numpy()
    rel = np.abs(got - f16.astype(np.float32)) / np.abs(f16.astype(np.float32))
    assert 1e-3 < rel.max() <= 2.0**-8, rel.max()  # the bits the F16 file had, lost as the warning says
    # a file of BF16 tensors alone loses nothing as bfloat16: no warning, the same bits
    shapes = {t.name: tuple(int(x) for x in reversed(t.shape)) for t in gguf.GGUFReader(str(path)).tensors}
    g = torch.Generator().manual_seed(3)
    put = {n: torch.randn(*shape, generator=g).bfloat16() for n, shape in shapes.items()}
    raw = {n: t.view(torch.uint8).numpy() for n, t in put.items()}
    exact = llama_gguf(tmp_path / "bf16.gguf", tokenizer=True, put=raw,
                       _raw=dict.fromkeys(raw, gguf.GGMLQuantizationType.BF16))  # fmt: skip
    assert main(["base", "import", str(exact), "--out", str(tmp_path / "bb"), "--dtype", "bfloat16"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert torch.equal(
        load_file(str(tmp_path / "bb" / "model.safetensors"))[name], put["blk.0.attn_v.weight"]
    )


def test_the_imported_tokenizer_adds_bos_as_the_file_says(tmp_path, capsys):
    """``tokenizer.ggml.add_bos_token`` decides whether the imported tokenizer
    puts BOS first, as in llama.cpp, which honours the flag: the written
    tokenizer.json's post-processor carries it. Its ``add_bos_token``
    attribute reads False either way (transformers 5 neither saves the flag
    nor reads it back beside a tokenizer.json), so loramix asks an encode
    (``data._adds_bos``). SmolLM2's file says False: no BOS, in llama.cpp too."""
    from transformers import AutoTokenizer

    from loramix.data import _adds_bos

    for flag in (True, False):
        path = llama_gguf(tmp_path / f"{flag}.gguf", tokenizer=True, bos_token_id=1, add_bos_token=flag)
        assert main(["base", "import", str(path), "--out", str(tmp_path / f"m{flag}")]) == 0, (
            capsys.readouterr()
        )
        tok = AutoTokenizer.from_pretrained(str(tmp_path / f"m{flag}"))
        assert tok("ABC").input_ids == [1] * flag + [32, 33, 34]  # "!" is id 0, so "A" is 32
        assert _adds_bos(tok) is flag


def test_import_shows_a_bar_on_a_terminal(tmp_path):
    """``base import`` said nothing until it ended (7-20 s for SmolLM2 on a
    shared 2-core machine, minutes for a 7B file): now a bar of the bytes
    de-quantised where stderr is a terminal; none with --quiet."""
    from .test_eval import _on_a_terminal

    path = llama_gguf(tmp_path / "m.gguf", tokenizer=True)
    err = _on_a_terminal(["base", "import", str(path), "--out", str(tmp_path / "a")])
    assert "de-quantising" in err and "49.5k" in err, err  # the file's tensor bytes
    err = _on_a_terminal(["base", "import", str(path), "--out", str(tmp_path / "b"), "--quiet"])
    assert "de-quantising" not in err, err


def test_import_parses_the_gguf_header_once(tmp_path, monkeypatch, capsys):
    """``base import`` parses the file's header (gguf.GGUFReader: 2-4 s for
    SmolLM2's 49,152-token vocabulary) once for its checks, transformers'
    metadata read (``load_gguf_checkpoint``, handed loramix's reader) and the
    de-quantisation, not once for each (transformers parsed it a second time:
    1.5 s of a 7-8 s SmolLM2 import)."""
    import gguf
    from gguf.gguf_reader import GGUFReader

    import loramix.gguf_import as gi

    opened, parsed = [], []

    def counted(path):
        opened.append(path)
        return real(path)

    def reader(path, *args, **kwargs):
        return real_reader(path, *args, **kwargs)

    def parse(self, path, *args, **kwargs):  # any GGUFReader's, loramix's subclass's too
        parsed.append(str(path))
        real_init(self, path, *args, **kwargs)

    real, real_reader, real_init = gi.open_gguf, gguf.GGUFReader, GGUFReader.__init__
    monkeypatch.setattr(gi, "open_gguf", counted)
    monkeypatch.setattr(gguf, "GGUFReader", reader)
    monkeypatch.setattr(GGUFReader, "__init__", parse)
    path = llama_gguf(tmp_path / "m.gguf", tokenizer=True)
    assert main(["base", "import", str(path), "--out", str(tmp_path / "m")]) == 0, capsys.readouterr().err
    assert len(opened) == 1 and parsed == [str(path)]
    assert gguf.GGUFReader is reader  # put back after transformers' read


def test_overlapping_reader_hand_overs_put_gguf_back(tmp_path):
    """Two imports in threads whose GGUFReader hand-overs overlap: the swap is
    of gguf's module attribute, for the whole process, and each puts back what
    it found, so without one at a time the second put back the first's
    stand-in, left in gguf for every later reader. The first leaves once the
    second is inside (or after a second, the second held off), the second
    after the first."""
    import threading

    import gguf

    import loramix.gguf_import as gi

    real = gguf.GGUFReader
    inside, first_out = threading.Event(), threading.Event()

    def first():
        with gi._reader_handed_over(object(), tmp_path / "a.gguf"):
            inside.wait(1.0)
        first_out.set()

    def second():
        with gi._reader_handed_over(object(), tmp_path / "b.gguf"):
            inside.set()
            first_out.wait(10.0)

    try:
        t1 = threading.Thread(target=first)
        t1.start()
        while gguf.GGUFReader is real and t1.is_alive():  # the first's stand-in is in place
            time.sleep(0.001)
        t2 = threading.Thread(target=second)
        t2.start()
        t1.join(30)
        t2.join(30)
        assert gguf.GGUFReader is real
    finally:
        gguf.GGUFReader = real


def test_a_gguf_imported_before_resolves_without_torch(tmp_path):
    """A GGUF given where a base goes, imported by an earlier run, resolves to
    its cached folder from the file's cached hash alone: no torch, no gguf
    (it imported torch through io.model_folder: 2 s of every warm lookup)."""
    path = llama_gguf(tmp_path / "m.gguf", tokenizer=True)
    env = {**os.environ, "LORAMIX_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # fmt: skip
    code = (
        "import sys; from loramix.gguf_import import resolve_base; p = resolve_base(sys.argv[1]); "
        "print(p, 'torch' in sys.modules, 'gguf' in sys.modules)"
    )
    runs = [subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env,
                           timeout=300) for _ in range(2)]  # fmt: skip
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    first, warm = (r.stdout.split() for r in runs)
    assert first[0] == warm[0] and first[1:] == ["True", "True"]  # the import itself needs both
    assert warm[1:] == ["False", "False"]


def test_import_builds_no_model(tmp_path):
    """An import of each architecture (llama, a Mistral-named llama, qwen2
    untied, qwen3) imports none of transformers' modelling code
    (``modeling_llama``, ``modeling_utils``...): the parameters' names and
    shapes come from the config (:func:`loramix.archs.parameter_shapes`); a
    meta-device model was built for them, whose modules were a second of
    the import's CPU. transformers' GGUF config read and tokenizer
    conversion import no modelling module either."""
    paths = [llama_gguf(tmp_path / "llama.gguf", tokenizer=True),
             llama_gguf(tmp_path / "mistral.gguf", tokenizer=True, name="Mistral 7B Instruct v0.3"),
             qwen_gguf(tmp_path / "qwen2.gguf", "qwen2", tied=False)[0],
             qwen_gguf(tmp_path / "qwen3.gguf", "qwen3", key_length=24)[0]]  # fmt: skip
    code = (
        "import json, sys; from loramix.gguf_import import import_gguf\n"
        "types = [import_gguf(p, out=p + '.out')['architecture'] for p in sys.argv[1:]]\n"
        "mods = sorted(m for m in sys.modules if m.startswith('transformers.'))\n"
        "print(json.dumps([types, mods]))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "TQDM_DISABLE": "1"}
    r = subprocess.run([sys.executable, "-c", code, *map(str, paths)], capture_output=True, text=True, env=env,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    types, mods = json.loads(r.stdout.splitlines()[-1])
    assert types == ["llama", "mistral", "qwen2", "qwen3"]
    models = [m for m in mods if m.startswith("transformers.models.") and ".modeling_" in m]
    built = [m for m in mods if m.endswith((".modeling_utils", ".modeling_layers", ".masking_utils"))]
    assert models == ["transformers.models.auto.modeling_auto"] and not built, (models, built)
