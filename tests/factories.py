"""Real, small models and adapters for tests: transformers models built from a
config with random weights, and real PEFT adapters made by ``peft`` on them.

Nothing here is mocked: the models are the real GPT-2 (``Conv1D``,
``fan_in_fan_out``) and Llama (``nn.Linear``) classes, just tiny.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SMOL_GGUF = Path(__file__).resolve().parents[2] / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny_gpt2(seed: int = 0, n_layer: int = 2, n_embd: int = 32, n_head: int = 2, vocab_size: int = 128):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        vocab_size=vocab_size,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(seed: int = 0, n_layer: int = 2, hidden: int = 32, n_head: int = 4, vocab_size: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        num_hidden_layers=n_layer,
        hidden_size=hidden,
        intermediate_size=2 * hidden + 8,
        num_attention_heads=n_head,
        num_key_value_heads=n_head // 2,
        vocab_size=vocab_size,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_base(model, folder: str | Path, max_shard_size: str | None = None) -> Path:
    """``save_pretrained`` as safetensors (sharded when ``max_shard_size`` is small)."""
    folder = Path(folder)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kw)
    return folder


def make_peft_adapter(model, folder: str | Path, seed: int = 0, **lora_kwargs) -> Path:
    """Wrap ``model`` with a random (non-zero B) PEFT LoRA and save it.

    ``lora_kwargs`` go to ``peft.LoraConfig`` (r, lora_alpha, target_modules,
    rank_pattern, alpha_pattern, use_rslora, ...). ``model`` is left unchanged.
    """
    import copy

    from peft import LoraConfig, get_peft_model

    kw = dict(r=4, lora_alpha=8, init_lora_weights=False)
    kw.update(lora_kwargs)
    if "target_modules" not in kw:
        kw["target_modules"] = GPT2_TARGETS if model.config.model_type == "gpt2" else LLAMA_TARGETS
    if model.config.model_type == "gpt2":
        kw.setdefault("fan_in_fan_out", True)
    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(**kw))
    pm.save_pretrained(str(folder))
    return Path(folder)


def peft_reloaded(make, folder: str | Path):
    """PEFT's own reload of the adapter at ``folder`` onto ``make()``, the
    original base, in eval mode (merge it with its ``merge_and_unload``)."""
    import warnings

    from peft import PeftModel

    with warnings.catch_warnings():
        # PEFT 0.21 checks an AdaLoRA rank_pattern's keys as LoRA's patterns and warns that none
        # matched; AdaLoRA's own resize then applies them
        warnings.simplefilter("ignore", RuntimeWarning)
        return PeftModel.from_pretrained(make(), str(folder)).eval()


def peft_deltas(pm) -> dict[str, torch.Tensor]:
    """PEFT's ``get_delta_weight`` of every module a PEFT model wraps with
    its adapter ``default`` (any tuner's layer: one of its
    ``adapter_layer_names`` holds it), in ``nn.Linear`` layout (out, in)."""
    out = {}
    for name, mod in pm.base_model.model.named_modules():
        if any("default" in getattr(mod, n, {}) for n in getattr(mod, "adapter_layer_names", ())):
            d = mod.get_delta_weight("default")
            out[name] = d.T if getattr(mod, "fan_in_fan_out", False) else d
    return out


def assert_rel(got: torch.Tensor, ref: torch.Tensor, rel: float = 1e-6, msg: str = "") -> None:
    """``max |got - ref| <= rel * max |ref|``: the project's bar against PEFT in float32."""
    err = float((got.double() - ref.double()).abs().max())
    assert err <= rel * float(ref.double().abs().max()), (msg, err)


def logits(model) -> torch.Tensor:
    """``model``'s logits of two fixed rows of six token ids, without gradients."""
    ids = torch.arange(1, 13).reshape(2, 6) % 100
    with torch.no_grad():
        return model(input_ids=ids).logits


def moved(pm, seed: int, marker: str, size: float = 0.05):
    """``pm`` with every parameter whose name holds ``marker`` moved by
    ``size`` times seeded normal noise, as training moves them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, t in sorted(pm.named_parameters()):
            if marker in n:
                t.add_(size * torch.randn(t.shape, generator=g))
    return pm


def assert_applied_as_peft(ref: dict, on_the_fly, adapter, base, make, out) -> None:
    """Every way loramix applies the adapter at ``adapter`` to the model
    ``make()`` builds (saved at ``base``) equals PEFT's reload of it: ``sum
    --into``, ``merge -m ties --density 1 --into`` (the adapter itself) and
    ``merge_into_model`` give the weights of ``ref`` (the reload's merged
    state dict), ``attach_adapters`` the logits ``on_the_fly``, each to 1e-6
    (:func:`assert_rel`). Outputs go under ``out``."""
    from loramix.cli import main
    from loramix.io.adapter_files import load_adapter
    from loramix.layers import attach_adapters, merge_into_model

    out = Path(out)
    for how in (["sum"], ["merge", "-m", "ties", "--density", "1"]):
        args = [*how, str(adapter), "--into", str(base), "--out", str(out / how[0]), "--no-progress"]
        assert main(args) == 0, args
    in_memory = make()
    merge_into_model(in_memory, [load_adapter(adapter)])
    cls = type(in_memory)
    for got in (cls.from_pretrained(str(out / "sum")), cls.from_pretrained(str(out / "merge")), in_memory):
        sd = got.state_dict()
        for n, p in ref.items():
            assert_rel(sd[n], p, msg=n)
    assert_rel(logits(attach_adapters(make(), [load_adapter(adapter)])), on_the_fly)


def edited_copy(src, dst, tensors=None, config=None) -> Path:
    """A copy of the adapter folder ``src`` at ``dst``, its weights replaced by
    ``tensors(weights)`` (a dict of tensors to a dict) and its config changed
    in place by ``config(cfg)``, where given."""
    import shutil

    from safetensors.torch import load_file, save_file

    d = Path(shutil.copytree(src, dst))
    if tensors is not None:
        w = d / "adapter_model.safetensors"
        save_file(tensors(load_file(str(w))), str(w))
    if config is not None:
        cfg = json.loads((d / "adapter_config.json").read_text())
        config(cfg)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


def as_bfloat16(folder) -> Path:
    """The adapter folder ``folder`` with its weights file's tensors rewritten in bfloat16."""
    from safetensors.torch import load_file, save_file

    w = Path(folder) / "adapter_model.safetensors"
    save_file({k: t.to(torch.bfloat16) for k, t in load_file(str(w)).items()}, str(w))
    return Path(folder)


def assert_read_in_float32_and_summed(adapter, make, out) -> None:
    """The adapter at ``adapter`` (a PEFT tuner that loramix reads as LoRA,
    its file in bfloat16: :func:`as_bfloat16`) reads into float32 factors
    whose deltas are those of PEFT's reload onto ``make()`` (PEFT's
    parameters are float32 too), to 1e-6; and ``loramix sum --out out``
    writes a PEFT LoRA that PEFT loads with those deltas (a module whose
    delta is zero, AdaLoRA's pruned to rank 0, left out)."""
    from peft import PeftModel

    from loramix.cli import main
    from loramix.io.adapter_files import load_adapter

    ad = load_adapter(adapter)
    want = {n: d for n, d in peft_deltas(peft_reloaded(make, adapter)).items() if float(d.abs().max()) > 0}
    assert set(ad.modules) == set(want)
    for name, m in ad.modules.items():
        assert m.A.dtype == m.B.dtype == torch.float32, name
        assert_rel(m.delta(), want[name], msg=name)
    assert main(["sum", str(adapter), "--out", str(out), "--no-progress"]) == 0
    assert json.loads((Path(out) / "adapter_config.json").read_text())["peft_type"] == "LORA"
    got = peft_deltas(PeftModel.from_pretrained(make(), str(out)))
    assert {n for n, d in got.items() if float(d.abs().max()) > 0} == set(want)
    for name, d in want.items():
        assert_rel(got[name], d, msg=name)


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def one_line_error(capsys, args, *needles) -> str:
    """Run the CLI on ``args``: exit 2 and one ``loramix: error:`` line on
    stderr holding every needle; return that line."""
    from loramix.cli import main

    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("loramix: error:"), (code, err)
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


@contextlib.contextmanager
def mounted(folder: str | Path, fstype: str, options: str, source: str | None = None):
    """``folder`` with a real ``fstype`` file system mounted on it (``mount -t
    fstype -o options``), unmounted after the block; the test is skipped
    where mounting is not allowed (not root)."""
    import pytest

    got = subprocess.run(
        ["mount", "-t", fstype, "-o", options, source or fstype, str(folder)], capture_output=True
    )
    if got.returncode:
        pytest.skip(f"cannot mount a {fstype} here (needs root)")
    try:
        yield Path(folder)
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def forward_taken(layer, x) -> str:
    """Which forward a D2-LoRA ``layer(x)`` runs: "dense" or "factored"."""
    taken = []
    dense = layer._dense_forward
    layer._dense_forward = lambda t: taken.append("dense") or dense(t)
    try:
        layer(x)
    finally:
        del layer._dense_forward
    return taken[0] if taken else "factored"
