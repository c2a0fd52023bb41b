"""The PEFT adapter folder layout, read without torch.

Paths, ``adapter_config.json``, tensor keys and the checks that every reader
of this layout applies, whatever array type it reads the factors into:
:func:`loramix.io.adapter_files.load_adapter` (torch tensors) and
:mod:`loramix.io.np_factors` (numpy arrays, so that similarity on the CPU
never imports torch). Torch-free on purpose.

Keys are ``base_model.model.<module>.<part>.weight``, optionally with an
adapter name (``lora_A.default.weight``); PEFT LoRA has the parts ``lora_A``
(r, in) and ``lora_B`` (out, r), loramix D2-LoRA ``lora_{A,B}_{pos,neg}``.
Per-module rank and alpha follow PEFT's ``rank_pattern`` / ``alpha_pattern``
rule (:func:`get_pattern_key`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from ..errors import AdapterError

# The kinds, as loramix.adapter names them (LORA, D2LORA).
LORA, D2LORA = "lora", "d2lora"

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
    """The config, parsed and type-checked (:mod:`loramix.io.config_schema`)."""
    from .config_schema import read_adapter_config

    return read_adapter_config(cfg)


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


def adapter_method(config: dict, cfg_path: Path) -> tuple[str, dict]:
    """``(kind, parts)`` from ``peft_type``; what no reader can accept is refused
    before any tensor is opened."""
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
    return method, parts


def parse_keys(keys: list[str], parts: dict, weights: Path) -> list[tuple[str, str, str, str, str | None]]:
    """``(key, module, factor, branch, adapter_name)`` of every tensor key.

    Parsed before any tensor is read or the config's feature flags are
    trusted: an unsupported feature is then reported with its module."""
    if not keys:
        raise AdapterError(weights, "holds no tensors")
    try:
        return [(key, *_parse_key(key, parts)) for key in keys]
    except KeyError as e:
        raise AdapterError(weights, e.args[0]) from None


def check_features(config: dict, cfg_path: Path) -> None:
    """Refuse the config flags of LoRA variants loramix does not read."""
    if config.get("use_dora"):
        raise AdapterError(cfg_path, "not supported: DoRA (use_dora: true)")
    if config.get("lora_bias"):
        raise AdapterError(cfg_path, "not supported: LoRA biases (lora_bias: true)")
    if str(config.get("bias", "none")).lower() not in ("none", "null"):
        raise AdapterError(cfg_path, f"not supported: trained biases (bias: {config['bias']})")
    for k, feature in _UNSUPPORTED_CONFIG.items():
        if config.get(k):
            raise AdapterError(cfg_path, f"not supported: {feature}")


def read_parts(parsed: list[tuple], get: Callable, weights: Path) -> dict[str, dict]:
    """``{module: {(factor, branch): array}}`` with ``get(key)`` reading one
    tensor (torch or numpy); 2-D factors and one adapter per file only."""
    raw: dict[str, dict] = {}
    adapter_names: set[str] = set()
    for key, module, factor, branch, aname in parsed:
        if aname is not None:
            adapter_names.add(aname)
        t = get(key)
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
    return raw


def _check_factors(module: str, fs: dict, method: str, weights: Path) -> None:
    for br in ["pos", "neg"] if method == D2LORA else ["pos"]:
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
    if method == D2LORA:
        An, Bn = fs[("A", "neg")], fs[("B", "neg")]
        if An.shape != A.shape or Bn.shape != B.shape:
            raise AdapterError(
                weights,
                f"module {module}: negative branch shapes {tuple(Bn.shape)}, {tuple(An.shape)} "
                f"differ from positive {tuple(B.shape)}, {tuple(A.shape)}",
            )


def check_config_rank(module: str, rank: int, r_cfg: int, cfg_path: Path, weights: Path) -> None:
    """The tensors' rank of ``module`` must be the config's (``r`` / ``rank_pattern``)."""
    if rank != r_cfg:
        raise AdapterError(
            weights,
            f"config and tensors disagree: module {module} has rank {rank} "
            f"but {cfg_path.name} says {r_cfg} (r / rank_pattern)",
        )


def check_targets(modules: Iterable[str], config: dict, weights: Path) -> None:
    """Every module read must be in the config's ``target_modules`` (when a list)."""
    targets = config.get("target_modules")
    if isinstance(targets, list) and targets:
        for module in modules:
            if not any(module == t or module.endswith("." + t) for t in targets):
                raise AdapterError(
                    weights,
                    f"config and tensors disagree: module {module} is not in target_modules {targets}",
                )


def module_factors(raw: dict[str, dict], method: str, config: dict, cfg_path: Path, weights: Path) -> dict:
    """``{module: fields}``: the checked factors of each module with its scale,
    as keyword arguments of :class:`loramix.adapter.ModuleDelta` (``B``,
    ``A``, ``scale``, ``alpha``; for D2 also ``B_neg``, ``A_neg``, ``tau``,
    ``norm_dim``, ``eps``). The config must agree with the tensors (ranks,
    ``target_modules``)."""
    use_rslora = bool(config.get("use_rslora", False))
    modules: dict[str, dict] = {}
    for module, fs in raw.items():
        _check_factors(module, fs, method, weights)
        A, B = fs[("A", "pos")], fs[("B", "pos")]
        r_cfg, alpha = module_rank_alpha(config, module)
        check_config_rank(module, int(A.shape[0]), r_cfg, cfg_path, weights)
        kw = dict(B=B, A=A, scale=lora_scale(alpha, r_cfg, use_rslora), alpha=alpha)
        if method == D2LORA:
            kw.update(
                B_neg=fs[("B", "neg")],
                A_neg=fs[("A", "neg")],
                tau=float(config.get("tau", 0.5)),
                norm_dim=int(config.get("norm_dim", 1)),
                eps=float(config.get("eps", 1e-8)),
            )
        modules[module] = kw
    check_targets(modules, config, weights)
    return modules


def adapter_name(given: Path) -> str:
    """The default name of an adapter: its folder, or its file's stem
    (``adapter_model.safetensors`` takes its folder's name)."""
    name = given.name if given.is_dir() else given.stem
    return given.parent.name if name == "adapter_model" else name


def check_compatible(adapters: Sequence) -> None:
    """Shared modules must have the same ``(out, in)`` in every adapter.

    Different shapes mean adapters made for different bases: refuse, naming
    both files and the module.
    """
    seen: dict[str, tuple[tuple[int, int], object]] = {}
    for ad in adapters:
        for name, m in ad.modules.items():
            if name in seen and seen[name][0] != m.shape:
                shape0, other = seen[name]
                raise AdapterError(
                    ad.path or ad.name,
                    f"module {name} has shape {m.shape[0]}x{m.shape[1]} but "
                    f"{shape0[0]}x{shape0[1]} in {other.path or other.name}: "
                    "the adapters were made for different base models",
                )
            seen.setdefault(name, (m.shape, ad))
