"""The layout PEFT uses for adapter folders, shared by the formats that follow it.

A folder with ``adapter_config.json`` and ``adapter_model.safetensors`` holding
``base_model.model.<module>.<part>.weight`` tensors; keys may carry an
adapter name (``lora_A.default.weight``). The parts of one module are its
kind's (:attr:`~loramix.kinds.base.AdapterKind.parts`: ``lora_A``/``lora_B``
for LoRA). Per-module rank and alpha follow PEFT's ``rank_pattern`` /
``alpha_pattern`` matching rule: a pattern key ``k`` applies to module ``m``
when ``re.match(rf"(.*\\.)?({k})$", m)``; the first matching key wins.

A path may be the folder or the ``.safetensors`` file with its
``adapter_config.json`` beside it. ``modules_to_save`` copies are kept as
full tensors (``Adapter.saved``); PEFT's copy of a targeted head's own weight
(``base_layer``) is skipped. Anything the kind does not define (LoRA biases,
conv LoRA, ...) is refused with a message naming the module and the feature,
never silently dropped.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import save_file

from ...adapter import Adapter, ModuleDelta
from ...errors import AdapterError
from ...kinds import AdapterKind
from ..safetensors_io import CheckedSafetensors, canonicalize_header, file_sha256, safetensors_metadata

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

#: the "factor" of PEFT's saved copy of a base weight (see :func:`_parse_key`)
BASE_COPY = "base_layer"

#: PEFT's embedding LoRA parts (read by kinds with ``lora_A``/``lora_B``):
#: ``lora_embedding_A`` (r, vocab), ``lora_embedding_B`` (dim, r), delta
#: ``s (B A)^T`` (vocab, dim) in the weight's layout, so the module keeps
#: ``B' = A^T``, ``A' = B^T`` and is a plain LoRA module of that weight.
EMBEDDING_PARTS = {"lora_embedding_A": ("EA", "pos"), "lora_embedding_B": ("EB", "pos")}

_UNSUPPORTED = {
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
    """``(module, factor, branch, adapter_name)`` of a tensor key, or raise.

    ``factor`` is ``BASE_COPY`` for PEFT's copy of a targeted head's or
    embedding's own weight (``lm_head.base_layer.weight``, saved with
    ``save_embedding_layers``): not a factor, and never merged."""
    toks = key.split(".")
    if toks[-2:] == ["base_layer", "weight"] and len(toks) > 2:
        return ".".join(toks[:-2]).removeprefix(PREFIX), BASE_COPY, "", None
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
            if rest == ["weight"] or not rest:
                name = None  # PEFT saves parameter-dict parts (embedding factors, magnitudes) bare
            elif len(rest) == 1:
                name = rest[0]
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


def saved_tensor_name(key: str, modules_to_save) -> str | None:
    """The base tensor a ``modules_to_save`` key replaces (``lm_head.weight``),
    or None when ``key`` is not one. PEFT saves them as
    ``base_model.model.<module>.<param>`` (older versions keep
    ``.modules_to_save.<adapter>.`` before the parameter); ``<module>`` ends
    with an entry of the config's ``modules_to_save`` (PEFT's rule)."""
    if not modules_to_save:
        return None
    toks = key.removeprefix(PREFIX).split(".")
    if "modules_to_save" in toks:
        i = toks.index("modules_to_save")
        toks = toks[:i] + toks[-1:]
    if len(toks) < 2 or toks[-1] not in ("weight", "bias"):
        return None
    module = ".".join(toks[:-1])
    if any(module == t or module.endswith(str(t)) for t in modules_to_save):
        return f"{module}.{toks[-1]}"
    return None


def embedding_as_weight_factors(fs: dict, module: str, weights: Path) -> dict:
    """PEFT's embedding factors as factors of the embedding weight (vocab, dim):
    ``B' = lora_embedding_A^T`` (vocab, r), ``A' = lora_embedding_B^T`` (r, dim)."""
    if set(fs) != {("EA", "pos"), ("EB", "pos")}:
        raise AdapterError(weights, f"module {module}: needs both lora_embedding_A and lora_embedding_B only")
    return {("B", "pos"): fs[("EA", "pos")].T, ("A", "pos"): fs[("EB", "pos")].T}


def common_rank_alpha(ranks: dict[str, int], alphas: dict[str, float]) -> tuple[int, float, dict, dict]:
    """Most common rank and alpha, plus patterns for the modules that differ."""
    from collections import Counter

    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    a = Counter(alphas.values()).most_common(1)[0][0] if alphas else float(r)
    rank_pattern = {m: v for m, v in ranks.items() if v != r}
    alpha_pattern = {m: v for m, v in alphas.items() if v != a}
    return r, a, rank_pattern, alpha_pattern


def clean_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def write_folder(
    out_dir: Path, tensors: dict[str, torch.Tensor], config: dict, provenance: dict | None
) -> Path:
    """Write ``tensors`` (canonical header, provenance in the metadata) and the config."""
    save_file(tensors, str(out_dir / WEIGHTS_NAME), metadata=safetensors_metadata(provenance))
    canonicalize_header(out_dir / WEIGHTS_NAME)
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def _check_config(config: dict, cfg_path: Path, dora: bool = False) -> None:
    """Refuse config switches whose saved factors loramix would misread
    (``use_dora`` unless the reader is DoRA's)."""
    if config.get("use_dora") and not dora:
        raise AdapterError(cfg_path, "not supported: DoRA (use_dora: true)")
    if config.get("lora_bias"):
        raise AdapterError(cfg_path, "not supported: LoRA biases (lora_bias: true)")
    if str(config.get("bias", "none")).lower() not in ("none", "null"):
        raise AdapterError(cfg_path, f"not supported: trained biases (bias: {config['bias']})")
    for k, feature in _UNSUPPORTED_CONFIG.items():
        if config.get(k):
            raise AdapterError(cfg_path, f"not supported: {feature}")


def _dora_reader() -> bool:
    from . import FORMATS

    return any(getattr(r, "dora", False) for r in FORMATS.values())


class PeftLayoutFormat:
    """A reader for one adapter kind stored in PEFT's folder layout.

    Subclasses set ``name`` (of the format) and ``kind``; :meth:`detect` says
    whether a path holds this format (from the config's ``peft_type``),
    :meth:`read` loads it.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[AdapterKind]
    #: the config's ``peft_type`` this format reads (default: the kind's)
    peft_type: ClassVar[str] = ""
    #: reads PEFT's ``use_dora: true`` adapters (and only those), else refuses them
    dora: ClassVar[bool] = False

    def detect(self, path: str | Path) -> bool:
        try:
            _, cfg, _ = resolve_adapter_paths(path)
            config = read_config(cfg)
        except AdapterError:
            return False
        if str(config.get("peft_type", "")).upper() != (self.peft_type or self.kind.peft_type):
            return False
        # A DoRA adapter is a PEFT LoRA with use_dora: its own reader claims it.
        return bool(config.get("use_dora")) == self.dora or (not self.dora and not _dora_reader())

    def read(self, path: str | Path, name: str | None = None) -> Adapter:
        """Load the adapter at ``path`` (folder or .safetensors file).

        Tensors are read one at a time with ``safe_open`` and kept as stored.
        Raises :class:`AdapterError` (one line naming the file) on bad input.
        """
        given, cfg_path, weights = resolve_adapter_paths(path)
        config = read_config(cfg_path)
        saved: dict[str, torch.Tensor] = {}
        raw = self._read_tensors(weights, config, cfg_path, saved)
        modules = {m: self._module(m, fs, config, cfg_path, weights) for m, fs in raw.items()}
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
            kind=self.kind,
            modules=modules,
            config=config,
            path=given,
            weights_path=weights,
            sha256=file_sha256(weights),
            saved=saved,
        )

    def _read_tensors(self, weights: Path, config: dict, cfg_path: Path, saved: dict) -> dict[str, dict]:
        """``{module: {(factor, branch): tensor}}``, every key checked first;
        ``modules_to_save`` tensors go into ``saved`` (base tensor name -> tensor)."""
        raw: dict[str, dict[tuple[str, str], torch.Tensor]] = {}
        adapter_names: set[str] = set()
        with CheckedSafetensors(weights, AdapterError) as f:
            keys = f.keys()
            if not keys:
                raise AdapterError(weights, "holds no tensors")
            to_save = config.get("modules_to_save")
            for key in keys:
                if (tname := saved_tensor_name(key, to_save)) is not None:
                    saved[tname] = f.get(key, check_finite=True)
            keys = [k for k in keys if saved_tensor_name(k, to_save) is None]
            # Parse every key before reading any tensor or trusting the config:
            # an unsupported feature is then reported with the module it is on.
            parts = {**self.kind.parts, **(EMBEDDING_PARTS if "lora_A" in self.kind.parts else {})}
            try:
                parsed = [(key, *_parse_key(key, parts)) for key in keys]
            except KeyError as e:
                raise AdapterError(weights, e.args[0]) from None
            _check_config(config, cfg_path, self.dora)
            for key, module, factor, branch, aname in parsed:
                if factor == BASE_COPY:
                    # PEFT saves the targeted head's own weight in case the vocabulary
                    # was resized; the delta applies to the base's tensor, whose shape
                    # the merge checks against the factors, so the copy is not read.
                    continue
                if aname is not None:
                    adapter_names.add(aname)
                t = f.get(key, check_finite=True)
                if t.ndim != (1 if factor == "M" else 2):  # "M": a per-row vector (DoRA's magnitude)
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

    def _module(self, module: str, fs: dict, config: dict, cfg_path: Path, weights: Path) -> ModuleDelta:
        """One module from its tensors: ranks checked against the config, then the kind builds it."""
        r_cfg, alpha = module_rank_alpha(config, module)
        embedding = ("EA", "pos") in fs or ("EB", "pos") in fs
        if embedding:
            fs = embedding_as_weight_factors(fs, module, weights)
        try:
            m = self.kind.from_tensors(
                module, fs, config,
                scale=lora_scale(alpha, r_cfg, bool(config.get("use_rslora", False))), alpha=alpha,
            )  # fmt: skip
        except ValueError as e:
            raise AdapterError(weights, str(e)) from None
        if embedding:
            m.extra["layout"] = "embedding"
        if m.B.shape[1] != m.A.shape[0]:
            raise AdapterError(
                weights, f"module {module}: lora_A has rank {m.A.shape[0]} but lora_B has rank {m.B.shape[1]}"
            )
        if m.A.shape[0] != r_cfg:
            raise AdapterError(
                weights,
                f"config and tensors disagree: module {module} has rank {m.A.shape[0]} "
                f"but {cfg_path.name} says {r_cfg} (r / rank_pattern)",
            )
        return m
