"""The PEFT adapter folder layout, read without torch.

Paths, ``adapter_config.json``, tensor keys and the checks that every reader
of this layout applies, whatever array type it reads the factors into:
:func:`loramix.io.adapter_files.load_adapter` (torch tensors) and
:mod:`loramix.io.np_factors` (numpy arrays, so that similarity on the CPU
never imports torch). Torch-free on purpose.

Keys are ``base_model.model.<module>.<part>.weight``, optionally with an
adapter name (``lora_A.default.weight``); PEFT LoRA has the parts ``lora_A``
(r, in) and ``lora_B`` (out, r), loramix D2-LoRA ``lora_{A,B}_{pos,neg}``;
PEFT's embedding LoRA ``lora_embedding_{A,B}`` (:data:`EMBEDDING_PARTS`) and
DoRA's ``lora_magnitude_vector`` are parts of the kinds that read them,
``modules_to_save`` copies are full tensors (:func:`saved_tensor_name`) and
PEFT's copy of a targeted base weight is skipped (:data:`BASE_COPY`).
Per-module rank and alpha follow PEFT's ``rank_pattern`` / ``alpha_pattern``
rule (:func:`get_pattern_key`).
"""

from __future__ import annotations

import errno
import math
import os
import re
import sys
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path

from ..errors import AdapterError
from .config_schema import FLOAT32_MAX, FLOAT32_TINY

# The kinds, as loramix.adapter names them (LORA, D2LORA).
LORA, D2LORA = "lora", "d2lora"

#: D2-LoRA's ``tau`` where none is given: a file's config without it, the kind's
#: option, training, and a module built by hand (``ModuleDelta``, ``NpModule``)
D2_TAU = 0.5

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

_LORA_PARTS = {"lora_A": ("A", "pos"), "lora_B": ("B", "pos")}
#: DoRA's per-module magnitude vector (``use_dora``), beside the LoRA factors
MAGNITUDE_PART = {"lora_magnitude_vector": ("M", "pos")}
_D2_PARTS = {
    "lora_A_pos": ("A", "pos"),
    "lora_B_pos": ("B", "pos"),
    "lora_A_neg": ("A", "neg"),
    "lora_B_neg": ("B", "neg"),
}
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


def checked_scale(config: dict, module: str, alpha: float, r: int, cfg_path: Path) -> float:
    """:func:`lora_scale` of ``module``, refused (naming the config and the
    module) where it does not fit float32: ``lora_alpha`` may be any finite
    number, but ``1e308 / r`` would make every delta inf or nan."""
    scale = lora_scale(alpha, r, bool(config.get("use_rslora", False)))
    if not abs(scale) <= FLOAT32_MAX:
        raise AdapterError(
            cfg_path, f"module {module}: the scale lora_alpha / r = {scale:.3g} does not fit float32, in "
            "which its deltas are computed (PEFT's too)",
        )  # fmt: skip
    if scale != 0 and abs(scale) < FLOAT32_TINY:
        # below float32's normal range PEFT's delta is 0 or a few bits, loramix's (float64) is not
        raise AdapterError(
            cfg_path, f"module {module}: the scale lora_alpha / r = {scale:.3g} is below float32's range "
            "(1.2e-38), in which PEFT computes its deltas; a zero lora_alpha turns an adapter off",
        )  # fmt: skip
    return scale


def _missing(p: Path) -> str:
    """Why ``p`` (which does not exist as far as ``exists`` can tell) cannot be read."""
    try:
        os.stat(p)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic link loop"
        if p.is_symlink():
            return f"a symbolic link to {os.readlink(p)}, which does not exist"
    return "no such file or folder"


def _named_inside(p: Path) -> str:
    """A hint for a folder PEFT's ``save_pretrained`` wrote an adapter with a
    name other than ``default`` into: such an adapter is saved in a subfolder
    of that name (``p/NAME/adapter_config.json``), as PEFT loads it back
    (``subfolder=NAME``); loramix reads the subfolder, so name it. A
    Trainer's ``output_dir`` holds ``checkpoint-N`` subfolders instead, each
    the adapter at step N: the hint names the last, not a list in string
    order (which puts ``checkpoint-10`` before ``checkpoint-5``)."""
    try:
        subs = sorted(d.name for d in p.iterdir() if (d / CONFIG_NAME).is_file())
    except OSError:
        return ""
    if not subs:
        return ""
    steps = {s: int(s.rpartition("-")[2]) for s in subs if re.fullmatch(r"checkpoint-\d+", s)}
    if steps:
        # a Trainer's output_dir: its checkpoint-N folders hold the adapter at step N, the last usually wanted
        last = max(steps, key=steps.__getitem__)
        return (f"; it holds {len(steps)} training checkpoint(s) (a Trainer's output_dir): pass one, "
                f"e.g. the last, {p / last}")  # fmt: skip
    shown = ", ".join(str(p / s) for s in subs[:3]) + (f" and {len(subs) - 3} more" if len(subs) > 3 else "")
    return f"; PEFT saved a named adapter in a subfolder: pass {shown}"


def resolve_adapter_paths(path: str | Path) -> tuple[Path, Path, Path]:
    """``(given path, config path, weights path)`` for a folder or a file."""
    p = Path(path)
    if not p.exists():
        raise AdapterError(p, _missing(p))
    if p.is_dir():
        cfg, weights = p / CONFIG_NAME, p / WEIGHTS_NAME
        if not cfg.exists():
            # a merge written into its base (a path-like MergeResult too) reads as a model: say so
            model = (
                "; it holds a model (config.json), which is a base, not an adapter"
                if (p / "config.json").is_file()
                else ""
            )
            raise AdapterError(p, f"not an adapter folder: no {CONFIG_NAME}{model or _named_inside(p)}")
        if not weights.exists():
            if (p / "adapter_model.bin").exists():
                from .unsupported_formats import pickle_refusal

                raise AdapterError(p, pickle_refusal(p / "adapter_model.bin", folder=True))
            raise AdapterError(p, f"not an adapter folder: no {WEIGHTS_NAME}")
    else:
        if p.suffix != ".safetensors":
            raise AdapterError(p, "not an adapter: expected a folder or a .safetensors file")
        cfg, weights = p.parent / CONFIG_NAME, p
        if not cfg.exists():
            raise AdapterError(p, f"no {CONFIG_NAME} beside the file; loramix needs it for ranks and scales")
    return p, cfg, weights


def check_adapter_path(path) -> tuple[Path, Path | None, Path | None, dict | None]:
    """``(given path, config path, weights path, config)`` for an adapter path,
    or the one-line :class:`AdapterError` that
    :func:`~loramix.io.formats.find_format` raises when the path has no
    readable config and weights: a foreign format (kohya, diffusers, a
    pickle) named, else what :func:`resolve_adapter_paths` or
    :func:`read_config` says. Torch-free, so a command refuses a mistyped
    path before it imports torch; what only a reader can tell (the tensors)
    is left to it. A path in no PEFT layout that a reader of another layout
    detects (:func:`_other_layout_reads`) is ``(path, None, None, None)``:
    for the torch readers."""
    try:
        given, cfg, weights = resolve_adapter_paths(path)
        return given, cfg, weights, read_config(cfg)
    except AdapterError:
        from .unsupported_formats import name_unsupported

        if Path(path).exists():
            if _other_layout_reads(path):
                return Path(path), None, None, None
            if (what := name_unsupported(path)) is not None:
                raise AdapterError(path, what) from None
        raise


def _other_layout_reads(path) -> bool:
    """Whether a format reader that defines its own ``detect`` (one not in
    PEFT's layout) detects ``path``. The format files are read first
    (:func:`loramix.discovery.defining`): the readers (and torch) are imported
    only where the package holds such a reader and, if it names the files
    that mark its folders (``files = ("lora.json",)``), one of them is there."""
    from ..discovery import defining

    readers = defining("loramix.io.formats", "detect")
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    if not any("files" not in d or any((folder / f).exists() for f in d["files"]) for d in readers.values()):
        return False
    from .formats import FORMATS

    return any(r.detect(path) for r in FORMATS.values())


def check_adapter_paths(items) -> None:
    """:func:`check_adapter_path` for each path among ``items``; loaded
    adapters are skipped, anything else is refused (:func:`not_an_adapter`)."""
    for a in items:
        if isinstance(a, (str, os.PathLike)):
            check_adapter_path(a)
        elif not is_loaded_adapter(a):
            raise not_an_adapter(a)


def is_loaded_adapter(a) -> bool:
    """True for a loaded adapter: :class:`loramix.adapter.Adapter` or the numpy
    reader's ``NpAdapter``. Not by a ``modules`` attribute: ``merge``'s and
    ``sum_into_base``'s results have one, and so has an ``nn.Module``, and
    taken for adapters they failed deep inside with an AttributeError. Without
    torch: neither class exists unless its module has been imported."""
    for module, cls in (("loramix.adapter", "Adapter"), ("loramix.io.np_factors", "NpAdapter")):
        m = sys.modules.get(module)
        if m is not None and isinstance(a, getattr(m, cls)):
            return True
    return False


def adapter_list(adapters) -> list:
    """``adapters`` as a list: one adapter (a path or a loaded adapter), or
    anything that is not a collection, becomes a list of it, which
    :func:`check_adapter_paths` then refuses in one line where it is neither."""
    from ..userpaths import is_table

    if is_table(adapters):  # iterated: its column names or keys, each refused as a missing file
        raise AdapterError(None, f"adapters are paths or loaded adapters (or a list of them), "
                                 f"not a {type(adapters).__name__}")  # fmt: skip
    one = isinstance(adapters, (str, os.PathLike)) or is_loaded_adapter(adapters)
    return [adapters] if one or not isinstance(adapters, Iterable) else list(adapters)


def out_hint(obj) -> str:
    """``"; pass its .out, 'folder'"`` for an object given where a path was
    wanted that names its output folder but is not path-like, else ``""``:
    the error points at the folder, not the object. ``merge``'s,
    ``sum_into_base``'s, ``train_adapter``'s and ``build_base``'s results are
    path-like (:mod:`loramix.results`) and taken as their folder, which is
    then read as any path is (a model folder refused as an adapter)."""
    out = getattr(obj, "out", None)
    return f"; pass its .out, {os.fspath(out)!r}" if isinstance(out, (str, os.PathLike)) else ""


def not_an_adapter(a) -> AdapterError:
    """The one-line error for ``a``, neither a path nor a loaded adapter
    (:func:`out_hint` where it names its output folder)."""
    return AdapterError(
        None, f"an adapter is a path or a loaded adapter, not a {type(a).__name__}{out_hint(a)}"
    )


def read_config(cfg: Path) -> dict:
    """The config, parsed and type-checked (:mod:`loramix.io.config_schema`)."""
    from .config_schema import read_adapter_config

    return read_adapter_config(cfg)


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
    if "modules_to_save" in toks:  # <module>.modules_to_save.<adapter>.<path in the module>
        i = toks.index("modules_to_save")
        toks = toks[:i] + toks[i + 2 :]
    if len(toks) < 2 or toks[-1] not in ("weight", "bias"):
        return None
    module = ".".join(toks[:-1])
    return f"{module}.{toks[-1]}" if in_modules_to_save(module, modules_to_save) else None


def in_modules_to_save(module: str, modules_to_save) -> bool:
    """Whether PEFT copies ``module`` for ``modules_to_save``: it wraps every
    module whose name ends with an entry (``str.endswith``, PEFT's rule), so
    ``module`` is copied when it or a module containing it matches."""
    return any(n.endswith(str(t)) for n in _ancestors(module) for t in modules_to_save or ())


def _ancestors(module: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``."""
    toks = module.split(".")
    return [".".join(toks[: i + 1]) for i in range(len(toks))]


def missing_saved_copy(names, modules_to_save, saved) -> str | None:
    """The first parameter name in ``names`` (``lm_head.weight``, a base's
    tensor names; only weights and biases) that ``modules_to_save`` covers
    but ``saved`` (the names the adapter holds copies of) lacks, or None.
    PEFT refuses to load such an adapter (a missing key)."""
    for n in names:
        module, _, param = n.rpartition(".")
        if param in ("weight", "bias") and n not in saved and in_modules_to_save(module, modules_to_save):
            return n
    return None


def check_copies_held(where, modules_to_save, names, held) -> None:
    """Refuse (:class:`AdapterError` naming ``where``, the adapter) an adapter
    whose ``modules_to_save`` covers a parameter in ``names`` (the base's)
    that ``held`` (its copies, in the same naming) lacks: PEFT cannot load it."""
    if not modules_to_save or (name := missing_saved_copy(names, modules_to_save, held)) is None:
        return
    entry = next(str(t) for t in modules_to_save if any(
        m.endswith(str(t)) for m in _ancestors(name.rpartition(".")[0])))  # fmt: skip
    raise AdapterError(where, f"modules_to_save lists {entry!r}, but the adapter holds no copy of {name} "
                              "(PEFT cannot load it either): save the adapter again with it, or drop the entry")  # fmt: skip


def embedding_as_weight_factors(fs: dict, module: str, weights: Path) -> dict:
    """PEFT's embedding factors as factors of the embedding weight (vocab, dim):
    ``B' = lora_embedding_A^T`` (vocab, r), ``A' = lora_embedding_B^T`` (r, dim);
    a DoRA magnitude (factor ``"M"``, ``(dim,)``) is kept as it is."""
    pair = {("EA", "pos"), ("EB", "pos")}
    if not pair <= set(fs) or set(fs) - pair - {("M", "pos")}:
        raise AdapterError(weights, f"module {module}: needs both lora_embedding_A and lora_embedding_B only")
    out = {("B", "pos"): fs[("EA", "pos")].T, ("A", "pos"): fs[("EB", "pos")].T}
    if ("M", "pos") in fs:
        out[("M", "pos")] = fs[("M", "pos")]
    return out


def with_embedding_parts(parts: dict) -> dict:
    """``parts`` plus PEFT's embedding LoRA parts, for kinds with ``lora_A``/``lora_B``."""
    return {**parts, **(EMBEDDING_PARTS if "lora_A" in parts else {})}


#: the classes of :mod:`loramix.io.formats.base` a PEFT-layout format subclasses
FORMAT_BASES = ("PeftLayoutFormat", "LoraReading")


def declared_formats() -> list[dict]:
    """The class attributes each PEFT-layout format (:mod:`loramix.io.formats`)
    sets to literals (``name``, ``peft_type``, ``read_as``, ...), read from
    the files without importing them (:func:`loramix.discovery.declared`)."""
    from ..discovery import declared

    return list(declared("loramix.io.formats", FORMAT_BASES, attr="name").values())


def unsupported_peft_type(config: dict) -> str:
    """What a config whose ``peft_type`` no reader reads is told: the
    ``peft_type``\\ s the PEFT-layout formats name in their files
    (:func:`declared_formats`, torch-free), so that the numpy and the torch
    readers say the same."""
    found = declared_formats()
    known = sorted(
        {str(d["peft_type"]).upper() for d in found if d.get("peft_type")}, key=lambda t: (len(t), t)
    )
    said = f"unsupported peft_type {config.get('peft_type')!r}: loramix reads {' and '.join(known)}"
    if str(config.get("peft_type", "")).upper() == "VERA":  # its delta needs the base's shapes
        said += (
            "; convert a VeRA adapter to LoRA with its base: loramix convert ADAPTER --base BASE --out DIR"
        )
    return said


def adapter_method(config: dict, cfg_path: Path) -> tuple[str, dict]:
    """``(kind, parts)`` from ``peft_type``; what no reader can accept is refused
    before any tensor is opened."""
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type == "LORA":
        method, parts = LORA, _LORA_PARTS
    elif peft_type == "D2LORA":
        method, parts = D2LORA, _D2_PARTS
    else:
        raise AdapterError(cfg_path, unsupported_peft_type(config))
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


#: PEFT's ``init_lora_weights`` that took ``s B0 A0``, a function of the base weight and the
#: config alone, out of the base when the adapter was made: read as the kind ``moved-base``
#: (:mod:`loramix.kinds.moved_base`), whose delta ``s (B A - B0 A0)`` needs the base
MOVED_BASE_INITS = {"pissa": "PiSSA", "olora": "OLoRA"}

#: the commands that read such an adapter, given its base: said where one without it meets it
BASED_COMMANDS = "loramix reads it with its base only (similarity --base, sum or merge --into, eval)"

#: how to make a plain LoRA of such an adapter, said where loramix has no base for it
CONVERT_WITH_PEFT = ("save it converted to a LoRA with PEFT "
                     "(save_pretrained(..., path_initial_model_for_weight_conversion=...))")  # fmt: skip


def moved_base_init(config: dict | None) -> str | None:
    """``"pissa"`` or ``"olora"`` where the config's ``init_lora_weights`` is
    one of :data:`MOVED_BASE_INITS` as PEFT 0.21 reads it (``"pissa"``
    exactly, ``"olora"`` in any case), else None (an init that left the base
    alone, or one :func:`check_init` refuses)."""
    v = (config or {}).get("init_lora_weights", True)
    if isinstance(v, str) and (v == "pissa" or v.lower() == "olora"):
        return v.lower()
    return None


def check_init(config: dict, cfg_path: Path) -> None:
    """Refuse an ``init_lora_weights`` whose move of the base loramix cannot
    compute again, or one PEFT does not know (PEFT 0.21's ``update_layer``,
    in its order). Inits that leave the base alone (``true``, ``false``,
    ``null``, ``gaussian``, ``eva``, ``orthogonal``, ``mica``) are plain
    LoRA; ``pissa`` and ``olora`` are :data:`MOVED_BASE_INITS`."""
    v = config.get("init_lora_weights", True)
    if v is None or isinstance(v, bool) or moved_base_init(config) is not None:
        return
    why = None
    if not isinstance(v, str):
        why = "is not one PEFT knows (true, false or an init's name)"
    elif v.startswith("pissa"):
        why = (
            "moved the base by a randomized SVD (torch.svd_lowrank draws from the global random generator), "
            "which loramix cannot compute again (nor can PEFT's reload: it differs from the trained model)"
            if re.fullmatch(r"pissa_niter_\d+", v)
            else "is not one PEFT knows ('pissa' or 'pissa_niter_N'; PEFT refuses to load it)"
        )
    elif v.startswith("corda"):
        why = "(CorDA) moved the base by factors from calibration data, which the adapter does not hold"
    elif v == "loftq":
        why = "(LoftQ) replaced the base by a quantized one, which loramix does not reproduce"
    elif v == "lora_ga":
        why = ("(LoRA-GA) moved the base by factors from gradients on training data, which the adapter does "
               "not hold (PEFT's reload leaves the base as it is, so it differs from the trained model)")  # fmt: skip
    elif not (v.lower() in ("gaussian", "mica") or v in ("eva", "orthogonal")):
        why = "is not one PEFT knows (PEFT refuses to load it)"
    if why is not None:
        raise AdapterError(cfg_path, f"not supported: init_lora_weights {v!r} {why}; {CONVERT_WITH_PEFT}")


def check_base_free(adapters: Sequence, hint: str = "pass --base BASE") -> None:
    """Refuse, in one line naming the adapter's config and its init, an
    adapter whose init moved the base (:data:`MOVED_BASE_INITS`) where a
    command compares or reads deltas without the base: its factors alone
    (``s B A``) are not its delta ``s (B A - B0 A0)``. ``hint``: what gives
    the command the base."""
    for ad in adapters:
        if (init := moved_base_init(getattr(ad, "config", None))) is not None:
            raise AdapterError(where_config(ad), moved_base_problem(init, hint))


def where_config(ad) -> Path | str:
    """The config of a loaded adapter (beside its weights), else its path or name."""
    weights = getattr(ad, "weights_path", None)
    return Path(weights).parent / CONFIG_NAME if weights is not None else (ad.path or ad.name)


def moved_base_problem(init: str, hint: str) -> str:
    """The refusal of an adapter whose init ``init`` moved the base, read without one."""
    return (f"init_lora_weights {init!r}: PEFT's {MOVED_BASE_INITS[init]} init took s B0 A0 out of the base "
            f"weights, so the delta s (B A - B0 A0) depends on the base: {hint}, convert it to a LoRA with its "
            f"base (loramix convert ADAPTER --base BASE --out DIR), or {CONVERT_WITH_PEFT}")  # fmt: skip


def check_features(config: dict, cfg_path: Path, dora: bool = False) -> None:
    """Refuse the config flags of LoRA variants loramix would misread
    (``use_dora`` unless the reader is DoRA's; an init it cannot
    reproduce, :func:`check_init`)."""
    check_init(config, cfg_path)
    if config.get("use_dora") and (init := moved_base_init(config)) is not None:
        raise AdapterError(cfg_path, f"not supported: DoRA (use_dora: true) with init_lora_weights {init!r}")
    if config.get("use_dora") and not dora:
        raise AdapterError(cfg_path, "not supported: DoRA (use_dora: true)")
    if config.get("lora_bias"):
        raise AdapterError(cfg_path, "not supported: LoRA biases (lora_bias: true)")
    if str(config.get("bias", "none")).lower() not in ("none", "null"):
        raise AdapterError(cfg_path, f"not supported: trained biases (bias: {config['bias']})")
    for k, feature in _UNSUPPORTED_CONFIG.items():
        if config.get(k):
            raise AdapterError(cfg_path, f"not supported: {feature}")


def read_parts(
    parsed: list[tuple], get: Callable, weights: Path, vectors: Collection[str] = ("M",)
) -> dict[str, dict]:
    """``{module: {(factor, branch): array}}`` with ``get(key)`` reading one
    tensor (torch or numpy); 2-D factors (1-D for the factors in ``vectors``:
    DoRA's magnitude ``"M"``, VeRA's two vectors) and one adapter per file
    only. PEFT's copy of a base weight (``BASE_COPY``) is skipped unread."""
    raw: dict[str, dict] = {}
    seen: dict[tuple, str] = {}  # (module, factor, branch) -> its key
    adapter_names: set[str] = set()
    for key, module, factor, branch, aname in parsed:
        if factor == BASE_COPY:
            # PEFT saves the targeted head's own weight in case the vocabulary
            # was resized; the delta applies to the base's tensor, whose shape
            # the merge checks against the factors, so the copy is not read.
            continue
        if aname is not None:
            adapter_names.add(aname)
        t = get(key)
        if factor in vectors and t.ndim != 1:
            raise AdapterError(weights, f"module {module}: {key} has {t.ndim} dimensions, not a vector")
        if factor not in vectors and t.ndim != 2:
            raise AdapterError(
                weights,
                f"module {module}: {key} has {t.ndim} dimensions; only linear LoRA (2-D factors) is supported",
            )
        held = raw.setdefault(module, {})
        if (factor, branch) in held:
            # one stored with an adapter name and one without (``lora_A.weight`` and
            # ``lora_A.zeta.weight``): the later key silently replaced the other
            raise AdapterError(weights, f"module {module}: holds {key} and {seen[module, factor, branch]}, two "
                               "copies of one factor (several adapters in one file?); save them apart")  # fmt: skip
        held[(factor, branch)] = t
        seen[module, factor, branch] = key
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


def check_config_rank(module: str, rank: int, r_cfg: int, cfg_path: Path, weights: Path,
                      fields: str = "r / rank_pattern") -> None:  # fmt: skip
    """The tensors' rank of ``module`` must be the config's (``fields``: those that say it)."""
    if rank != r_cfg:
        raise AdapterError(
            weights,
            f"config and tensors disagree: module {module} has rank {rank} "
            f"but {cfg_path.name} says {r_cfg} ({fields})",
        )


def check_targets(modules: Iterable[str], config: dict, weights: Path) -> None:
    """Every module read must be one PEFT wraps by the config: matched by
    ``target_modules`` (a list: the name or its last parts, ``name == t`` or
    ``name.endswith("." + t)``; a string: ``re.fullmatch(t, name)``, except
    PEFT's ``all-linear``), not matched by ``exclude_modules`` (the same two
    rules), and in ``layers_to_transform`` (when given; PEFT applies it only
    to a list's suffix matches: a module named in full in the list, or any
    module of a regular expression, is in whatever layer). PEFT wraps only
    the modules the config selects and drops the factors of any other without
    a word, so loramix would merge deltas that PEFT never applies."""
    targets = config.get("target_modules")
    excluded = config.get("exclude_modules")
    layers = config.get("layers_to_transform")
    layers = None if layers is None or layers == [] else ([layers] if isinstance(layers, int) else layers)
    for module in modules:
        if isinstance(targets, list) and not _peft_selects(targets, module):
            raise AdapterError(
                weights, f"config and tensors disagree: module {module} is not in target_modules {targets}"
            )
        if (
            isinstance(targets, str)
            and targets.lower() != "all-linear"
            and not _peft_selects(targets, module)
        ):
            raise AdapterError(
                weights,
                f'config and tensors disagree: module {module} does not match target_modules "{targets}" '
                "(a regular expression PEFT matches against the whole module name)",
            )
        if excluded and _peft_selects(excluded, module):
            raise AdapterError(
                weights, f"config and tensors disagree: module {module} is in exclude_modules {excluded}"
            )
        if (
            layers is not None
            and not isinstance(targets, str)
            and module not in (targets or ())
            and (k := peft_layer_index(module, config.get("layers_pattern"))) not in layers
        ):
            where = "in no layer" if k is None else f"in layer {k}"
            raise AdapterError(
                weights,
                f"config and tensors disagree: module {module} is {where}, not in layers_to_transform {layers}",
            )


def _null_targets(config: dict | None) -> bool:
    """Whether ``config`` is a PEFT LoRA config (DoRA included) with no
    ``target_modules``. An adapter built in memory (no config, no
    ``peft_type``) names its modules itself; D2-LoRA is not PEFT's."""
    config = config or {}
    return str(config.get("peft_type", "")).upper() == "LORA" and config.get("target_modules") is None


# Set on an adapter object once its null target_modules is settled for this process: warned of
# (warn_null_targets), or checked against a base (check_default_targets). A command's paths meet
# (predict's features call similarity, plan's calibration checks the base before them): one line.
_SETTLED = "_loramix_null_targets_settled"


def carry_null_targets_settled(src, dst) -> None:
    """``dst`` (``src`` converted, e.g. to numpy factors) is settled where ``src`` is."""
    if getattr(src, _SETTLED, False):
        _settle(dst)


def _settle(ad) -> None:
    try:
        object.__setattr__(ad, _SETTLED, True)
    except (AttributeError, TypeError):  # an object without a __dict__: it may be told twice
        pass


def check_default_targets(adapters: Sequence, model_type: str | None) -> None:
    """PEFT's rule for a LoRA adapter whose config has no ``target_modules``
    (null or absent), once the base's ``model_type`` is known: PEFT fills
    them with its default for the type (:func:`loramix.peft_targets.peft_default_targets`;
    GPT-2: ``c_attn`` only; BLOOM: ``query_key_value``) and ignores the
    factors of any other module, so the adapter is checked as if its config
    named them (:func:`check_targets`, ``layers_to_transform`` included). A
    type PEFT has no default for (or a base naming no type) is refused, as
    PEFT refuses it. Where no base is given every factor is read
    (:func:`warn_null_targets`)."""
    from ..peft_targets import peft_default_targets

    for ad in adapters:
        cfg = ad.config or {}
        if not _null_targets(cfg):
            continue
        where = ad.weights_path or ad.path or ad.name
        defaults = peft_default_targets(model_type)
        if defaults is None:
            which = f"model type {model_type!r}" if model_type else "a base whose config names no model_type"
            raise AdapterError(
                where,
                f"target_modules is null and PEFT has no default targets for {which}, "
                "so PEFT refuses to load it; name the modules in adapter_config.json",
            )
        named = defaults if isinstance(defaults, str) else list(defaults)
        try:
            check_targets(ad.modules, {**cfg, "target_modules": named}, where)
        except AdapterError as e:
            raise AdapterError(
                where, f"{e.problem} (target_modules is null: PEFT's default for a {model_type} base)"
            ) from None
        _settle(ad)  # every factor is one PEFT applies: reading them all is PEFT's rule


#: what :func:`warn_null_targets` adds where a base can be given (similarity, sum, merge)
GIVE_THE_BASE = "give the base to apply PEFT's rule"


def warn_null_targets(adapters: Sequence, hint: str = GIVE_THE_BASE) -> None:
    """Warn (:class:`~loramix.errors.LoramixWarning`), in one line, of LoRA
    adapters with no ``target_modules`` read where no base is given: PEFT
    applies only its default targets for the base it loads them onto
    (:func:`check_default_targets`), which loramix cannot tell without one,
    so every factor is read (and an adapter written from them names them
    all). ``hint``: what the command reading them does, or what it takes to
    apply PEFT's rule. Once per adapter object: an adapter warned of here, or
    checked against a base by :func:`check_default_targets`, is not named again."""

    from ..errors import warn

    hit = [ad for ad in adapters if _null_targets(ad.config) and not getattr(ad, _SETTLED, False)]
    if hit:
        for ad in hit:
            _settle(ad)
        said = "; ".join(f"{ad.path or ad.name} ({len(ad.modules)} modules)" for ad in hit)
        warn(f"target_modules is null in {said}: PEFT applies only its default targets for the base's "
             "model type (GPT-2: c_attn; Llama, Mistral, Qwen: q_proj, v_proj); without a base every "
             f"factor is read ({hint})")  # fmt: skip


def _peft_selects(names: str | list[str], module: str) -> bool:
    """PEFT's rule for ``target_modules`` and ``exclude_modules``: a string is a
    regular expression of the whole name, a list holds names or their last parts."""
    if isinstance(names, str):
        return re.fullmatch(names, module) is not None
    return any(module == t or module.endswith("." + t) for t in names)


def peft_layer_index(module: str, layers_pattern=None) -> int | None:
    """The layer of ``module`` as PEFT finds it for ``layers_to_transform``:
    the number after the first ``PATTERN.`` (each of ``layers_pattern`` in
    turn, at the start or after a dot), else after the first ``.NAME.``
    followed by a number and a dot; None without one. The first, not the
    last: in ``model.layers.3.mlp.experts.7.w1`` the layer is 3, not the expert."""
    # PEFT reads an empty layers_pattern ("" or []) as none given
    patterns = (
        ([layers_pattern] if layers_pattern else [])
        if isinstance(layers_pattern, str)
        else list(layers_pattern or [])
    )
    for rx in [rf"(?:^|.*?\.){p}\.(\d+)\." for p in patterns] or [r".*?\.[^.]*\.(\d+)\."]:
        m = re.match(rx, module)
        if m is not None:
            return int(m.group(1))
    return None


def magnitude_problem(module: str, fs: dict, n: int) -> str | None:
    """What is wrong with DoRA's ``lora_magnitude_vector`` among a module's
    parts ``fs`` (``n``: the features it scales, an ``nn.Linear``'s ``out``),
    else None; the words of both readers (torch's, numpy's)."""
    if ("M", "pos") not in fs:
        return f"module {module} has lora_A and lora_B but no lora_magnitude_vector (use_dora)"
    shape = tuple(fs[("M", "pos")].shape)
    if shape != (n,):
        return f"module {module}: lora_magnitude_vector has shape {shape}, not ({n},)"
    return None


def module_factors(raw: dict[str, dict], method: str, config: dict, cfg_path: Path, weights: Path) -> dict:
    """``{module: fields}``: the checked factors of each module with its scale,
    as keyword arguments of :class:`loramix.adapter.ModuleDelta` (``B``,
    ``A``, ``scale``, ``alpha``; for D2 also ``B_neg``, ``A_neg``, ``tau``,
    ``norm_dim``, ``eps``). The config must agree with the tensors (ranks,
    ``target_modules``)."""
    modules: dict[str, dict] = {}
    for module, fs in raw.items():
        _check_factors(module, fs, method, weights)
        A, B = fs[("A", "pos")], fs[("B", "pos")]
        r_cfg, alpha = module_rank_alpha(config, module)
        check_config_rank(module, int(A.shape[0]), r_cfg, cfg_path, weights)
        kw = dict(B=B, A=A, scale=checked_scale(config, module, alpha, r_cfg, cfg_path), alpha=alpha)
        if method == D2LORA:
            kw.update(
                B_neg=fs[("B", "neg")],
                A_neg=fs[("A", "neg")],
                tau=float(config.get("tau", D2_TAU)),
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


def _layer_stems(ad) -> set[str]:
    """The containers of ``ad``'s layered modules: the name up to its first
    numeric part (``model.layers``, ``transformer.h``)."""
    stems = set()
    for name in ad.modules:
        parts = name.split(".")
        i = next((k for k, p in enumerate(parts) if p.isdigit()), None)
        if i:
            stems.add(".".join(parts[:i]))
    return stems


def check_one_base(adapters: Sequence) -> None:
    """Refuse adapters whose modules cannot belong to one base model: two
    adapters that share no module and whose layered modules live in
    different containers (``model.layers.N...`` against ``transformer.h.N...``:
    a Llama and a GPT-2) were made for different architectures. Shared
    modules are checked for shape by :func:`check_compatible`."""
    # each adapter's stems once, and pairs compared by group of equal stems: a bank of 1,000
    # adapters is 500,000 pairs, and their stems alike (one group, nothing to compare)
    groups: dict[frozenset, list] = {}
    for a in adapters:
        groups.setdefault(frozenset(_layer_stems(a)), []).append(a)
    keys = list(groups)
    for i, sa in enumerate(keys):
        for sb in keys[i + 1 :]:
            if not sa or not sb or sa & sb:
                continue
            for a in groups[sa]:
                for b in groups[sb]:
                    if not (set(a.modules) & set(b.modules)):
                        raise AdapterError(
                            b.path or b.name,
                            f"its modules ({sorted(sb)[0]}.N...) and those of {a.path or a.name} "
                            f"({sorted(sa)[0]}.N...) cannot belong to one base model: the adapters were made "
                            "for different architectures",
                        )
