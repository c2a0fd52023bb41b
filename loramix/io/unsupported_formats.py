"""Adapter formats loramix does not read, named in one line.

When no reader claims a path, :func:`name_unsupported` looks at what is
there (file names, and the tensor names in a safetensors header: never a
tensor, never a pickle) and says which foreign format it is, so the user
reads "a kohya-ss LoRA ... is not supported" rather than "no
adapter_config.json" or "not a LoRA factor":

* **pickled PEFT adapters** (``adapter_model.bin``, ``.pt``, ``.pth``,
  ``.ckpt``): loramix never unpickles (it can run code); a PEFT one is
  told how PEFT re-saves it as safetensors (:func:`pickle_refusal`);
* **kohya-ss / sd-scripts LoRA**: ``lora_down.weight`` / ``lora_up.weight``
  / ``alpha`` keys (``lora_unet_...``, ``lora_te_...``);
* **LyCORIS** (LoHa, LoKr) in its own layout: ``hada_w1_a`` / ``lokr_w1``
  keys without PEFT's ``adapter_config.json`` (PEFT's LoHa and LoKr folders
  are read: :mod:`loramix.io.formats.loha`, :mod:`loramix.io.formats.lokr`);
* **diffusers LoRA**: ``pytorch_lora_weights.safetensors``, or keys under
  ``unet.`` / ``text_encoder.`` or with ``.lora.down`` /
  ``lora_linear_layer``, without an ``adapter_config.json``.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import AdapterError
from .st_header import read_safetensors_header

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
DIFFUSERS_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
_HINT = "loramix reads PEFT LoRA folders (adapter_config.json + adapter_model.safetensors)"


def _kind_of_keys(keys: list[str], file_name: str) -> str | None:
    """The foreign format a list of tensor names belongs to, or None. LyCORIS
    is looked for first: its files name their modules as kohya's do
    (``lora_unet_...``), and what to do differs."""
    if any(p in k for k in keys for p in ("hada_w1_a", "lokr_w1")):
        return ("a LyCORIS adapter (LoHa / LoKr keys) in its own layout: loramix reads LoHa and LoKr as PEFT "
                "saves them (adapter_config.json with peft_type LOHA or LOKR)")  # fmt: skip
    if any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys) or any(
        k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys
    ):
        return "a kohya-ss LoRA (lora_down / lora_up / alpha keys)"
    diffusers_keys = any(".lora.down." in k or "lora_linear_layer" in k for k in keys) or any(
        k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in keys
    )
    if file_name in DIFFUSERS_NAMES or diffusers_keys:
        return "a diffusers LoRA (pytorch_lora_weights)"
    return None


#: what to do with a pickled PEFT adapter: PEFT itself writes the safetensors file loramix reads
_PEFT_RESAVE = ("re-save it as safetensors with PEFT (PeftModel.from_pretrained(base, DIR).save_pretrained(DIR, "
                "safe_serialization=True) writes adapter_model.safetensors)")  # fmt: skip


def _pickle_kind(p: Path) -> str:
    if p.name in DIFFUSERS_NAMES:
        return "a pickled diffusers LoRA"
    return "a pickled PEFT adapter" if p.name == "adapter_model.bin" else "a pickled checkpoint"


def pickle_refusal(f: Path, folder: bool) -> str:
    """The one line refusing the pickle ``f`` (``folder``: said of the folder
    holding it, else of the file itself): the file, that loramix never
    unpickles it and why, and what to do. :func:`name_unsupported` and
    :func:`~loramix.io.peft_layout.resolve_adapter_paths` both say it."""
    subject = f"holds {f.name}, {_pickle_kind(f)}," if folder else f"is {_pickle_kind(f)},"
    fix = _PEFT_RESAVE if f.name == "adapter_model.bin" else f"not supported; {_HINT}"
    return f"{subject} which loramix never loads (unpickling can run code): {fix}"


def _file_format(p: Path) -> str | None:
    """The foreign format of a safetensors file ``p`` by its tensor names, or None
    (a pickle is :func:`pickle_refusal`'s)."""
    if p.suffix == ".safetensors":
        try:
            header, _ = read_safetensors_header(p, AdapterError)
        except AdapterError:
            return None  # the reader's own checks name what is wrong with the file
        keys = [k for k in header if k != "__metadata__"]
        return _kind_of_keys(keys, p.name)
    return None


def name_unsupported(path: str | Path) -> str | None:
    """One line naming the foreign adapter format at ``path`` (a file or a
    folder), or None when it looks like none of them (then the PEFT layout's
    own checks explain what is missing)."""
    p = Path(path)
    if p.is_dir():
        if (p / "adapter_config.json").exists() and (p / "adapter_model.safetensors").exists():
            return None
        files = sorted(f for f in p.iterdir() if f.is_file())
        # The PEFT pickle first: it is what a folder with a config but no safetensors holds.
        files.sort(key=lambda f: f.name != "adapter_model.bin")
        for f in files:
            if f.suffix in PICKLE_SUFFIXES:
                return pickle_refusal(f, folder=True)
            what = _file_format(f)
            if what is not None:
                return f"holds {what}: not supported; {_HINT}"
        return None
    if p.is_file() and p.suffix in PICKLE_SUFFIXES:
        return pickle_refusal(p, folder=False)
    if p.is_file() and not (p.parent / "adapter_config.json").exists():
        what = _file_format(p)
        if what is not None:
            return f"is {what}: not supported; {_HINT}"
    return None
