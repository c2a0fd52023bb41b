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
import math
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..adapter import D2LORA, LORA, Adapter, ModuleDelta
from ..errors import AdapterError
from .safetensors_io import CheckedSafetensors, canonicalize_header, file_sha256, safetensors_metadata

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

_LORA_PARTS = {"lora_A": ("A", "pos"), "lora_B": ("B", "pos")}
_D2_PARTS = {
    "lora_A_pos": ("A", "pos"),
    "lora_B_pos": ("B", "pos"),
    "lora_A_neg": ("A", "neg"),
    "lora_B_neg": ("B", "neg"),
}
_UNSUPPORTED = {
    "lora_embedding_A": "embedding LoRA",
    "lora_embedding_B": "embedding LoRA",
    "lora_magnitude_vector": "DoRA magnitude vectors",
    "modules_to_save": "modules_to_save (full trained copies of modules)",
    "trainable_tokens_delta": "trainable tokens",
    "token_adapter": "trainable tokens",
}
# PEFT LoRA variants whose saved factors are not (or not only) ``dW = s B A``
# on a 2-D weight: refused when the config sets them, never silently dropped.
_UNSUPPORTED_CONFIG = {
    "target_parameters": "LoRA on parameters (target_parameters)",
    "use_qalora": "QALoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
    "layer_replication": "layer replication (layer_replication)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
}


def get_pattern_key(pattern_keys: Iterable[str], key_to_match: str) -> str | None:
    """PEFT's rule: the first pattern ``k`` with ``re.match(rf"(.*\\.)?({k})$", key)``."""
    for k in pattern_keys:
        if re.match(rf"(.*\.)?({k})$", key_to_match):
            return k
    return None


def module_rank_alpha(config: dict, module: str) -> tuple[int, float]:
    """``(r, alpha)`` for ``module`` from ``r``/``lora_alpha`` and the patterns."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rk = get_pattern_key(rank_pattern, module)
    ak = get_pattern_key(alpha_pattern, module)
    r = rank_pattern[rk] if rk is not None else config.get("r", 8)
    alpha = alpha_pattern[ak] if ak is not None else config.get("lora_alpha", 8)
    return int(r), float(alpha)


def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def resolve_adapter_paths(path: str | Path) -> tuple[Path, Path, Path]:
    """``(given path, config path, weights path)`` for a folder or a file."""
    p = Path(path)
    if not p.exists():
        raise AdapterError(p, "no such file or folder")
    if p.is_dir():
        cfg, weights = p / CONFIG_NAME, p / WEIGHTS_NAME
        if not cfg.exists():
            raise AdapterError(p, f"not an adapter folder: no {CONFIG_NAME}")
        if not weights.exists():
            if (p / "adapter_model.bin").exists():
                raise AdapterError(
                    p, "adapter_model.bin (pickle) is not read; loramix reads safetensors only"
                )
            raise AdapterError(p, f"not an adapter folder: no {WEIGHTS_NAME}")
    else:
        if p.suffix != ".safetensors":
            raise AdapterError(p, "not an adapter: expected a folder or a .safetensors file")
        cfg, weights = p.parent / CONFIG_NAME, p
        if not cfg.exists():
            raise AdapterError(p, f"no {CONFIG_NAME} beside the file; loramix needs it for ranks and scales")
    return p, cfg, weights


def read_config(cfg: Path) -> dict:
    try:
        config = json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(cfg, f"not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise AdapterError(cfg, "not a JSON object")
    return config


def _parse_key(key: str, parts: dict) -> tuple[str, str, str, str | None]:
    """``(module, factor, branch, adapter_name)`` of a tensor key, or raise."""
    toks = key.split(".")
    for i, t in enumerate(toks):
        if t in _UNSUPPORTED:
            module = ".".join(toks[:i]).removeprefix(PREFIX)
            raise KeyError(f"module {module}: not supported: {_UNSUPPORTED[t]} (tensor {key})")
        if t in parts:
            module = ".".join(toks[:i])
            module = module[len(PREFIX) :] if module.startswith(PREFIX) else module
            rest = toks[i + 1 :]
            if rest and rest[-1] == "bias":
                raise KeyError(f"module {module}: not supported: LoRA biases (lora_bias) (tensor {key})")
            if rest == ["weight"]:
                name = None
            elif len(rest) == 2 and rest[1] == "weight":
                name = rest[0]
            else:
                break
            factor, branch = parts[t]
            return module, factor, branch, name
    if toks[-1] == "bias":
        # PEFT's bias="all" / "lora_only" saves trained base biases.
        module = ".".join(t for t in toks[:-1] if t != "base_layer").removeprefix(PREFIX)
        raise KeyError(
            f"module {module}: not supported: trained biases (PEFT bias='all'/'lora_only') (tensor {key})"
        )
    raise KeyError(f"unexpected tensor {key}: not a LoRA factor")


def load_adapter(path: str | Path, name: str | None = None) -> Adapter:
    """Load a PEFT LoRA or loramix D2-LoRA adapter (folder or .safetensors file).

    Tensors are read one at a time with ``safe_open`` and kept as stored.
    Raises :class:`AdapterError` (one line naming the file) on bad input.
    """
    given, cfg_path, weights = resolve_adapter_paths(path)
    config = read_config(cfg_path)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type == "LORA":
        method, parts = LORA, _LORA_PARTS
    elif peft_type == "D2LORA":
        method, parts = D2LORA, _D2_PARTS
    else:
        raise AdapterError(
            cfg_path, f"unsupported peft_type {config.get('peft_type')!r}: loramix reads LORA and D2LORA"
        )
    if config.get("modules_to_save"):
        raise AdapterError(cfg_path, f"modules_to_save {config['modules_to_save']} is not supported")
    use_rslora = bool(config.get("use_rslora", False))

    raw: dict[str, dict[tuple[str, str], torch.Tensor]] = {}
    adapter_names: set[str] = set()
    with CheckedSafetensors(weights, AdapterError) as f:
        keys = f.keys()
        if not keys:
            raise AdapterError(weights, "holds no tensors")
        # Parse every key before reading any tensor or trusting the config:
        # an unsupported feature is then reported with the module it is on.
        try:
            parsed = [(key, *_parse_key(key, parts)) for key in keys]
        except KeyError as e:
            raise AdapterError(weights, e.args[0]) from None
        if config.get("use_dora"):
            raise AdapterError(cfg_path, "not supported: DoRA (use_dora: true)")
        if config.get("lora_bias"):
            raise AdapterError(cfg_path, "not supported: LoRA biases (lora_bias: true)")
        if str(config.get("bias", "none")).lower() not in ("none", "null"):
            raise AdapterError(cfg_path, f"not supported: trained biases (bias: {config['bias']})")
        for k, feature in _UNSUPPORTED_CONFIG.items():
            if config.get(k):
                raise AdapterError(cfg_path, f"not supported: {feature}")
        for key, module, factor, branch, aname in parsed:
            if aname is not None:
                adapter_names.add(aname)
            t = f.get(key, check_finite=True)
            if t.ndim != 2:
                raise AdapterError(
                    weights,
                    f"module {module}: {key} has {t.ndim} dimensions; only linear LoRA (2-D factors) is supported",
                )
            raw.setdefault(module, {})[(factor, branch)] = t
    if len(adapter_names) > 1:
        raise AdapterError(
            weights, f"holds several adapters ({', '.join(sorted(adapter_names))}); save them apart"
        )

    modules: dict[str, ModuleDelta] = {}
    for module, fs in raw.items():
        branches = ["pos", "neg"] if method == D2LORA else ["pos"]
        for br in branches:
            for fac in ("A", "B"):
                if (fac, br) not in fs:
                    other = "B" if fac == "A" else "A"
                    label = {"pos": "lora_{}" if method == LORA else "lora_{}_pos", "neg": "lora_{}_neg"}[br]
                    raise AdapterError(
                        weights, f"module {module} has {label.format(other)} but no {label.format(fac)}"
                    )
        A, B = fs[("A", "pos")], fs[("B", "pos")]
        if B.shape[1] != A.shape[0]:
            raise AdapterError(
                weights, f"module {module}: lora_A has rank {A.shape[0]} but lora_B has rank {B.shape[1]}"
            )
        r_cfg, alpha = module_rank_alpha(config, module)
        if A.shape[0] != r_cfg:
            raise AdapterError(
                weights,
                f"config and tensors disagree: module {module} has rank {A.shape[0]} "
                f"but {cfg_path.name} says {r_cfg} (r / rank_pattern)",
            )
        kw = {}
        if method == D2LORA:
            An, Bn = fs[("A", "neg")], fs[("B", "neg")]
            if An.shape != A.shape or Bn.shape != B.shape:
                raise AdapterError(
                    weights,
                    f"module {module}: negative branch shapes {tuple(Bn.shape)}, {tuple(An.shape)} "
                    f"differ from positive {tuple(B.shape)}, {tuple(A.shape)}",
                )
            kw = dict(
                B_neg=Bn,
                A_neg=An,
                tau=float(config.get("tau", 0.5)),
                norm_dim=int(config.get("norm_dim", 1)),
                eps=float(config.get("eps", 1e-8)),
            )
        modules[module] = ModuleDelta(
            name=module, B=B, A=A, scale=lora_scale(alpha, r_cfg, use_rslora), alpha=alpha, **kw
        )

    targets = config.get("target_modules")
    if isinstance(targets, list) and targets:
        for module in modules:
            if not any(module == t or module.endswith("." + t) for t in targets):
                raise AdapterError(
                    weights,
                    f"config and tensors disagree: module {module} is not in target_modules {targets}",
                )

    if name is None:
        name = given.name if given.is_dir() else given.stem
        if name == "adapter_model":
            name = given.parent.name
    return Adapter(
        name=name,
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
