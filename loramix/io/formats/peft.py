"""PEFT LoRA adapters (``peft_type: LORA``): read and written as PEFT does.

``base_model.model.<module>.lora_A.weight`` (r, in) and ``...lora_B.weight``
(out, r), ``dW = s B A`` with ``s = lora_alpha / r`` (``/ sqrt(r)`` with
``use_rslora``); layout and patterns in :mod:`loramix.io.formats.base`,
``fan_in_fan_out`` and scales in ``docs/adapters.md``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...api import renamed
from ...errors import AdapterError
from ...kinds import LORA
from ...results import WrittenPath
from .base import PREFIX, PeftLayoutFormat, check_pair, clean_number, common_rank_alpha, write_folder


class PeftLora(PeftLayoutFormat):
    name = "peft-lora"
    kind = LORA
    peft_type = "LORA"


@renamed({"out_dir": "out"})
def save_peft_adapter(
    out: str | Path,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    base_model_name_or_path: str | None = None,
    fan_in_fan_out: bool = False,
    provenance: dict | None = None,
    alphas: dict[str, float] | None = None,
    use_rslora: bool = False,
    extra_config: dict | None = None,
    saved: dict[str, torch.Tensor] | None = None,
    embeddings: set[str] | frozenset[str] = frozenset(),
    full_names: bool = False,
    dtype: torch.dtype | None = None,
) -> WrittenPath:
    """Write a PEFT LoRA folder (``adapter_config.json`` + weights).

    ``target_modules`` lists the modules' last names (``q_proj``), which PEFT
    wraps in every layer: right where the adapter has every module of those
    names. Where it may not (an input covered some layers only), pass
    ``full_names``: the full module names, each of which PEFT matches to that
    module alone, so it finds no module without its factors.

    ``factors`` maps module name to ``(B, A)`` with B (out, r), A (r, in),
    cast to ``dtype`` where given. ``base_model_name_or_path``,
    ``fan_in_fan_out`` (GPT-2 ``Conv1D`` targets) and ``use_rslora`` are
    the config's fields of those names; ``extra_config`` is added to the
    config; ``provenance`` is recorded in the safetensors metadata.
    Without ``alphas`` the scale is folded into ``B`` already, and the config
    says ``lora_alpha = r`` per module, so PEFT's scale is exactly 1.
    Per-module ranks and alphas that differ from the most common go into
    ``rank_pattern`` / ``alpha_pattern`` with full module names. ``saved``
    (base tensor name -> tensor) are ``modules_to_save`` copies, stored as
    PEFT stores them and listed by full module name. Modules in
    ``embeddings`` are embedding weights (``(B, A)`` still in the weight's
    ``(vocab, dim)`` layout) and are stored as PEFT's ``lora_embedding_A/B``.

    The files are written into ``out`` as it is (made if missing, files of
    the same names replaced; the commands write into a temporary folder,
    :func:`loramix.io.outputs.atomic_output_dir`), each through a temporary
    beside it, both renamed into place at the end: an error, a Ctrl-C or a
    SIGTERM meanwhile leaves ``out`` as it was (:func:`~loramix.io.formats.base.write_folder`). Factors that are not such
    pairs, or nothing to write, raise :class:`~loramix.errors.AdapterError`
    naming ``out`` before anything is made. Returns ``out``, the
    :class:`~pathlib.Path` it always returned, as a
    :class:`~loramix.results.WrittenPath` with figures ``modules`` and
    ``tensors`` (counts written).
    """
    out_dir = Path(out)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for module, pair in factors.items():
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise AdapterError(out_dir, f"module {module}: expected a pair (B, A), got {type(pair).__name__}")
        B, A = pair
        check_pair(out_dir, module, B, A)
        if dtype is not None:
            B, A = B.to(dtype), A.to(dtype)
        if module in (embeddings or ()):
            # PEFT's embedding LoRA: delta (vocab, dim) = s (B_e A_e)^T, B_e = A^T, A_e = B^T.
            tensors[f"{PREFIX}{module}.lora_embedding_A"] = B.detach().T.contiguous().cpu()
            tensors[f"{PREFIX}{module}.lora_embedding_B"] = A.detach().T.contiguous().cpu()
        else:
            tensors[f"{PREFIX}{module}.lora_A.weight"] = A.detach().contiguous().cpu()
            tensors[f"{PREFIX}{module}.lora_B.weight"] = B.detach().contiguous().cpu()
        ranks[module] = int(A.shape[0])
    for name, t in (saved or {}).items():
        tensors[PREFIX + name] = (
            t.to(dtype) if dtype is not None and t.is_floating_point() else t
        ).contiguous()
    if alphas is None:
        # Scale 1: alpha = r (or sqrt(r) with rsLoRA, which we never write here).
        alphas = {m: float(r) for m, r in ranks.items()}
    r, a, rank_pattern, alpha_pattern = common_rank_alpha(ranks, alphas)
    targets = sorted(factors) if full_names else sorted({m.rsplit(".", 1)[-1] for m in factors})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(r),
        "lora_alpha": clean_number(a),
        "rank_pattern": {m: int(v) for m, v in rank_pattern.items()},
        "alpha_pattern": {m: clean_number(v) for m, v in alpha_pattern.items()},
        "target_modules": targets,
        "fan_in_fan_out": bool(fan_in_fan_out),
        "use_rslora": bool(use_rslora),
        "lora_dropout": 0.0,
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": sorted({n.rsplit(".", 1)[0] for n in saved}) if saved else None,
    }
    if extra_config:
        config.update(extra_config)
    return WrittenPath.of(
        write_folder(out_dir, tensors, config, provenance), modules=len(factors), tensors=len(tensors)
    )
