"""Reading and writing adapter files.

Two formats:

* **PEFT LoRA** (``peft_type: LORA``): a folder with ``adapter_config.json``
  and ``adapter_model.safetensors`` holding
  ``base_model.model.<module>.lora_A.weight`` (r, in) and ``...lora_B.weight``
  (out, r); keys may carry an adapter name (``lora_A.default.weight``).
  Per-module rank and alpha follow PEFT's ``rank_pattern`` / ``alpha_pattern``
  matching rule: a pattern key ``k`` applies to module ``m`` when
  ``re.match(rf"(.*\\.)?({k})$", m)``; the first matching key wins.
* **loramix D2-LoRA** (``peft_type: D2LORA``, documented in ``docs/d2lora.md``):
  the same layout with four factors per module, ``lora_A_pos``, ``lora_B_pos``,
  ``lora_A_neg``, ``lora_B_neg``, and config keys ``r``, ``lora_alpha``,
  ``tau``, ``norm_dim``, ``eps``.

A path may be the folder or the ``.safetensors`` file with its
``adapter_config.json`` beside it. Anything loramix does not support (DoRA,
embedding LoRA, LoRA biases, modules_to_save, conv LoRA) is refused with a
message naming the module and the feature, never silently dropped.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..adapter import D2LORA, Adapter, ModuleDelta
from ..errors import AdapterError
from .peft_layout import (  # noqa: F401  (re-exported: the PEFT layout's names, used across loramix)
    CONFIG_NAME,
    PREFIX,
    WEIGHTS_NAME,
    adapter_method,
    adapter_name,
    check_features,
    get_pattern_key,
    lora_scale,
    module_factors,
    module_rank_alpha,
    parse_keys,
    read_config,
    read_parts,
    resolve_adapter_paths,
)
from .safetensors_io import CheckedSafetensors, canonicalize_header, file_sha256, safetensors_metadata


def load_adapter(path: str | Path, name: str | None = None) -> Adapter:
    """Load a PEFT LoRA or loramix D2-LoRA adapter (folder or .safetensors file).

    Tensors are read one at a time with ``safe_open`` and kept as stored.
    Raises :class:`AdapterError` (one line naming the file) on bad input.
    The checks are :mod:`loramix.io.peft_layout`'s, shared with the numpy
    reader of :mod:`loramix.io.np_factors`.
    """
    given, cfg_path, weights = resolve_adapter_paths(path)
    config = read_config(cfg_path)
    method, parts = adapter_method(config, cfg_path)
    with CheckedSafetensors(weights, AdapterError) as f:
        parsed = parse_keys(f.keys(), parts, weights)
        check_features(config, cfg_path)
        raw = read_parts(parsed, lambda key: f.get(key, check_finite=True), weights)
    modules = {
        module: ModuleDelta(name=module, **kw)
        for module, kw in module_factors(raw, method, config, cfg_path, weights).items()
    }
    return Adapter(
        name=name or adapter_name(given),
        method=method,
        modules=modules,
        config=config,
        path=given,
        weights_path=weights,
        sha256=file_sha256(weights),
    )


def _common_rank_alpha(ranks: dict[str, int], alphas: dict[str, float]) -> tuple[int, float, dict, dict]:
    """Most common rank and alpha, plus patterns for the modules that differ."""
    from collections import Counter

    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    a = Counter(alphas.values()).most_common(1)[0][0] if alphas else float(r)
    rank_pattern = {m: v for m, v in ranks.items() if v != r}
    alpha_pattern = {m: v for m, v in alphas.items() if v != a}
    return r, a, rank_pattern, alpha_pattern


def _clean_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def save_peft_adapter(
    out_dir: str | Path,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    base_model_name_or_path: str | None = None,
    fan_in_fan_out: bool = False,
    dtype: torch.dtype | None = None,
    provenance: dict | None = None,
    alphas: dict[str, float] | None = None,
    use_rslora: bool = False,
    extra_config: dict | None = None,
) -> Path:
    """Write a PEFT LoRA folder (``adapter_config.json`` + weights).

    ``factors`` maps module name to ``(B, A)`` with B (out, r), A (r, in).
    Without ``alphas`` the scale is folded into ``B`` already, and the config
    says ``lora_alpha = r`` per module, so PEFT's scale is exactly 1.
    Per-module ranks and alphas that differ from the most common go into
    ``rank_pattern`` / ``alpha_pattern`` with full module names.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for module, (B, A) in factors.items():
        if dtype is not None:
            B, A = B.to(dtype), A.to(dtype)
        tensors[f"{PREFIX}{module}.lora_A.weight"] = A.detach().contiguous().cpu()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = B.detach().contiguous().cpu()
        ranks[module] = int(A.shape[0])
    if alphas is None:
        # Scale 1: alpha = r (or sqrt(r) with rsLoRA, which we never write here).
        alphas = {m: float(r) for m, r in ranks.items()}
    r, a, rank_pattern, alpha_pattern = _common_rank_alpha(ranks, alphas)
    targets = sorted({m.rsplit(".", 1)[-1] for m in factors})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(r),
        "lora_alpha": _clean_number(a),
        "rank_pattern": {m: int(v) for m, v in rank_pattern.items()},
        "alpha_pattern": {m: _clean_number(v) for m, v in alpha_pattern.items()},
        "target_modules": targets,
        "fan_in_fan_out": bool(fan_in_fan_out),
        "use_rslora": bool(use_rslora),
        "lora_dropout": 0.0,
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    if extra_config:
        config.update(extra_config)
    save_file(tensors, str(out_dir / WEIGHTS_NAME), metadata=safetensors_metadata(provenance))
    canonicalize_header(out_dir / WEIGHTS_NAME)
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def save_d2_adapter(
    out_dir: str | Path,
    modules: dict[str, ModuleDelta],
    *,
    r: int,
    lora_alpha: float,
    tau: float,
    norm_dim: int = 1,
    eps: float = 1e-8,
    base_model_name_or_path: str | None = None,
    provenance: dict | None = None,
    extra_config: dict | None = None,
) -> Path:
    """Write a loramix D2-LoRA folder (format in ``docs/d2lora.md``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, m in modules.items():
        if m.kind != D2LORA:
            raise ValueError(f"{name} is not a D2-LoRA module")
        for part, t in (
            ("lora_A_pos", m.A),
            ("lora_B_pos", m.B),
            ("lora_A_neg", m.A_neg),
            ("lora_B_neg", m.B_neg),
        ):
            tensors[f"{PREFIX}{name}.{part}.weight"] = t.detach().contiguous().cpu()
    config = {
        "peft_type": "D2LORA",
        "loramix_format": "d2lora/1",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(r),
        "lora_alpha": _clean_number(lora_alpha),
        "tau": float(tau),
        "norm_dim": int(norm_dim),
        "eps": float(eps),
        "use_rslora": False,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in modules}),
    }
    if extra_config:
        config.update(extra_config)
    save_file(tensors, str(out_dir / WEIGHTS_NAME), metadata=safetensors_metadata(provenance))
    canonicalize_header(out_dir / WEIGHTS_NAME)
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir
