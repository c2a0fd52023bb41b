"""Adapters as numpy factors, read without torch.

The same folders and checks as :func:`loramix.io.adapter_files.load_adapter`
(:mod:`loramix.io.peft_layout`), but the factors are numpy arrays read with
safetensors' numpy interface, so that a similarity run on the CPU (float64
numpy arithmetic, :mod:`loramix.overlap`) never imports torch. ``bfloat16``,
which numpy lacks, is read as its raw ``uint16`` bits shifted into the high
half of a ``float32``: the same value, exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import AdapterError, raise_machine_fault
from .peft_layout import (
    BASE_COPY,
    BASED_COMMANDS,
    D2_TAU,
    D2LORA,
    EMBEDDING_PARTS,
    LORA,
    MAGNITUDE_PART,
    adapter_method,
    adapter_name,
    carry_null_targets_settled,
    check_adapter_path,
    check_features,
    declared_formats,
    magnitude_problem,
    module_factors,
    moved_base_init,
    moved_base_problem,
    parse_keys,
    read_parts,
)
from .pread import read_at
from .st_header import FLOAT_CODES, read_safetensors_header
from .unsupported_formats import name_unsupported

#: the kind name of a module with a magnitude vector (loramix.kinds.dora, which imports torch)
DORA = "dora"


def factor_squared_norm(B, A) -> float:
    """``||Bf Af||_F^2 = sum((Bf^T Bf) * (Af Af^T))`` in numpy float64, cost
    O(k^2 (out + in)), no dense ``(out, in)`` matrix; ``B`` (out, k), ``A``
    (k, in), numpy arrays or torch tensors (their float64 values, on the
    CPU). The one computation of a module's norm, whichever reader holds
    it (:class:`NpModule`, :class:`loramix.adapter.ModuleDelta`): torch's
    and numpy's BLAS sum the products in other orders, so each computing
    its own gave ``inspect`` of a path and of the loaded adapter norms that
    differed in the last bits."""
    B, A = (np.asarray(t.detach().cpu() if hasattr(t, "detach") else t, dtype=np.float64) for t in (B, A))
    return float(((B.T @ B) * (A @ A.T)).sum())


@dataclass
class NpModule:
    """One adapted weight as numpy factors: ``dW = scale B A`` (LoRA,
    ``B`` (out, r), ``A`` (r, in)) or ``scale (B A - tau B_neg A_neg)`` (the
    D2-LoRA signed residual); the fields of :class:`loramix.adapter.ModuleDelta`.
    A DoRA module has its residual ``scale B A`` and its ``magnitude`` ``m``
    ((out,); an embedding's (dim,)), which only its effective delta (torch's,
    given the base) uses."""

    name: str
    B: np.ndarray  # or LazyFactor: anything np.asarray reads
    A: np.ndarray
    scale: float
    alpha: float
    B_neg: np.ndarray | None = None
    A_neg: np.ndarray | None = None
    tau: float | None = None  # None: D2_TAU for a D2 module (as ModuleDelta), 0.0 otherwise
    norm_dim: int = 1
    eps: float = 1e-8
    magnitude: np.ndarray | None = None  # DoRA's m, or a LazyFactor

    def __post_init__(self):
        if self.tau is None:
            self.tau = D2_TAU if self.B_neg is not None else 0.0

    @property
    def kind(self) -> str:
        if self.B_neg is not None:
            return D2LORA
        return LORA if self.magnitude is None else DORA

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)`` of the delta, in ``nn.Linear`` layout."""
        return int(self.B.shape[0]), int(self.A.shape[1])

    @property
    def rank(self) -> int:
        """Rank of one branch (``r``); a D2 residual has rank ``2r``."""
        return int(self.A.shape[0])

    @property
    def dtype(self) -> str:
        """The dtype ``A`` is stored in (``float32``, ``bfloat16``, ...) when it
        is a :class:`LazyFactor`; else the array's (a widened bfloat16 says float32)."""
        return self.A.stored_dtype if isinstance(self.A, LazyFactor) else str(self.A.dtype)

    @property
    def num_parameters(self) -> int:
        parts = (self.B, self.A, self.B_neg, self.A_neg, self.magnitude)
        return sum(math.prod(t.shape) for t in parts if t is not None)

    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        """``(Bf, Af)`` in float64 with ``dW = Bf @ Af``, the scale folded into
        ``Bf``: LoRA ``(s B, A)``; D2 ``(s [B, -tau B_neg], [A; A_neg])`` (rank 2r)."""
        B, A = np.asarray(self.B, dtype=np.float64), np.asarray(self.A, dtype=np.float64)
        if self.B_neg is not None:
            B = np.concatenate([B, -self.tau * np.asarray(self.B_neg, dtype=np.float64)], axis=1)
            A = np.concatenate([A, np.asarray(self.A_neg, dtype=np.float64)], axis=0)
        return B * self.scale, A

    def squared_norm(self) -> float:
        """``||dW||_F^2`` from the factors, in float64 (:func:`factor_squared_norm`)."""
        return factor_squared_norm(*self.factors())

    def norm(self) -> float:
        return math.sqrt(max(self.squared_norm(), 0.0))


@dataclass
class NpAdapter:
    """An adapter's modules as :class:`NpModule` (``kind``: ``lora`` or ``d2lora``,
    the name of :attr:`loramix.adapter.Adapter.kind`)."""

    name: str
    kind: str
    modules: dict[str, NpModule]
    config: dict
    path: Path | None = None
    weights_path: Path | None = None  # the .safetensors file (read with load_np_adapter)

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def method(self) -> str:
        """Deprecated name of :attr:`kind`, as on :class:`loramix.adapter.Adapter`."""
        return self.kind


def _np(t) -> np.ndarray | None:
    if t is None:
        return None
    t = t.detach().cpu()
    # numpy has no bfloat16; float32 holds every bfloat16 (and float16) value exactly
    return (t.float() if t.dtype.itemsize == 2 else t).numpy()


def np_adapter(adapter) -> NpAdapter:
    """A loaded :class:`loramix.adapter.Adapter` with its factors as numpy
    arrays (views where the dtype allows; fp16/bf16 widened to float32).
    A module of another kind than LoRA / D2-LoRA is its residual as its kind
    defines it (``kind.scaled_factors``: ``dW = s B A``), in float64. An
    :class:`NpAdapter` is returned as it is."""
    if isinstance(adapter, NpAdapter):
        return adapter
    fields = ("name", "scale", "alpha", "tau", "norm_dim", "eps")
    modules = {}
    for name, m in adapter.modules.items():
        if m.kind in (LORA, D2LORA):
            modules[name] = NpModule(
                **{f: getattr(m, f) for f in fields},
                **{f: _np(getattr(m, f)) for f in ("B", "A", "B_neg", "A_neg")},
            )
        else:
            B, A, s = m.kind.scaled_factors(m)
            mag = _np(m.extra.get("magnitude"))
            modules[name] = NpModule(
                name=name, B=_np(B), A=_np(A), scale=float(s), alpha=m.alpha, magnitude=mag
            )
    out = NpAdapter(adapter.name, str(adapter.kind.name), modules, adapter.config, adapter.path)
    carry_null_targets_settled(adapter, out)  # a null target_modules warned of is not told again
    return out


# safetensors dtype codes numpy reads directly; BF16 is widened from its bits.
_NP_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}
# ... and the names torch gives them (what `loramix inspect` prints)
_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class LazyFactor:
    """One stored factor, read from its file each time it is asked for
    (``np.asarray``): a similarity over a bank of adapters then holds one
    module's factors at a time, never the whole bank."""

    def __init__(self, path: Path, key: str, code: str, shape: tuple[int, ...], offset: int):
        self.path, self.key, self.code, self.shape, self.offset = path, key, code, shape, offset

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def stored_dtype(self) -> str:
        """The dtype in the file, as torch names it (``bfloat16``)."""
        return _DTYPE_NAMES.get(self.code, self.code)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        if self.code not in _NP_DTYPES:
            raise AdapterError(self.path, f"tensor {self.key} has dtype {self.code}, not a float factor")
        count = math.prod(self.shape)
        t = np.empty(count, dtype=_NP_DTYPES[self.code])
        try:
            with open(self.path, "rb", buffering=0) as f:
                got = read_at(f, memoryview(t.view(np.uint8)), self.offset)
        except OSError as e:
            # what the header's read says (st_header): the machine's failure as its OSError
            # (exit 1; from Python the OSError), the user's (EACCES, ...) as the refusal
            raise_machine_fault(e, self.path)
            raise AdapterError(self.path, f"cannot read: {e.strerror or e}") from None
        if got != t.nbytes:
            raise AdapterError(
                self.path,
                f"cannot read tensor {self.key} (corrupt or truncated file): "
                f"{got // t.itemsize} of {count} values present",
            )
        if self.code == "BF16":
            t = (t.astype(np.uint32) << 16).view(np.float32)
        t = t.reshape(self.shape)
        if not np.isfinite(t).all():
            raise AdapterError(self.path, f"tensor {self.key} has non-finite values (nan or inf)")
        return t if dtype is None else t.astype(dtype)


def _lazy_factors(path: Path) -> dict[str, LazyFactor]:
    """``key -> LazyFactor`` from the file's header, validated by the one
    header check every reader goes through (:mod:`loramix.io.st_header`);
    only the float dtypes loramix computes with are accepted."""
    header, start = read_safetensors_header(path, AdapterError)
    header.pop("__metadata__", None)
    for key, info in header.items():
        if info["dtype"] not in FLOAT_CODES:
            raise AdapterError(
                path, f"tensor {key} has dtype {info['dtype']}; loramix reads {', '.join(FLOAT_CODES)}"
            )
    return {
        key: LazyFactor(path, key, info["dtype"], tuple(info["shape"]), start + info["data_offsets"][0])
        for key, info in header.items()
    }


def _needs_torch_reader(keys) -> bool:
    """Whether the tensor keys hold a PEFT part only the torch readers read:
    embedding LoRA factors, or PEFT's saved copy of a targeted base weight
    (``...base_layer.weight``)."""
    for key in keys:
        toks = key.split(".")
        if toks[-2:] == [BASE_COPY, "weight"] or any(t in EMBEDDING_PARTS for t in toks):
            return True
    return False


def plugin_peft_types() -> set[str]:
    """The ``peft_type``\\ s that the adapter kinds (:mod:`loramix.kinds`) and
    formats (:mod:`loramix.io.formats`) name in their files, read without
    importing them: a config of such a type that this reader does not read
    (a kind added by one file and its format) is one for the torch readers."""
    from ..discovery import declared

    found = [*declared("loramix.kinds", "AdapterKind").values(), *declared_formats()]
    return {d["peft_type"].upper() for d in found if isinstance(d.get("peft_type"), str) and d["peft_type"]}


def _torch_read(path, name: str | None) -> NpAdapter:
    """Embedding LoRA (DoRA too), ``modules_to_save``, PEFT's base-weight copies, a kind's
    ``peft_type`` other than LoRA's and D2-LoRA's (:func:`plugin_peft_types`):
    read by the torch readers (:mod:`loramix.io.formats`) and viewed as numpy;
    only an adapter with such a feature makes a similarity run import torch."""
    from .adapter_files import load_adapter

    return np_adapter(load_adapter(path, name=name))


def load_np_adapter(
    path: str | Path, name: str | None = None, lazy: bool = False, torch_fallback: bool = True
) -> NpAdapter | None:
    """Read a PEFT LoRA (DoRA: its factors and magnitudes) or loramix D2-LoRA
    adapter (folder or ``.safetensors`` file) into numpy factors, with :func:`~loramix.io.adapter_files.load_adapter`'s
    checks and errors. ``lazy``: check everything the header tells (keys,
    shapes, ranks) now, but leave the factors as :class:`LazyFactor`\\ s, read
    (and checked finite) when used. An adapter with a PEFT feature this
    reader leaves to the torch readers (embedding LoRA or DoRA,
    ``modules_to_save``) is read by them and viewed as numpy (eagerly);
    with ``torch_fallback=False`` it is not read: None is returned, for a
    caller that reads such an adapter its own way. A foreign format (kohya, diffusers, a pickle) is named, as
    :func:`~loramix.io.formats.find_format` names it."""
    given, cfg_path, weights, config = check_adapter_path(path)
    if config is None:  # a format in another layout: its reader's
        return _torch_read(path, name) if torch_fallback else None
    try:
        method, parts = adapter_method(config, cfg_path)  # an unknown peft_type raises, naming it
    except AdapterError:
        # As io.formats.find_format: what no reader claims is named when foreign.
        if (what := name_unsupported(path)) is not None:
            raise AdapterError(path, what) from None
        if str(config.get("peft_type", "")).upper() in plugin_peft_types():  # another kind's: its reader's
            return _torch_read(path, name) if torch_fallback else None
        raise
    if config.get("modules_to_save"):
        return _torch_read(path, name) if torch_fallback else None
    factors = _lazy_factors(weights)
    if _needs_torch_reader(factors):
        return _torch_read(path, name) if torch_fallback else None
    dora = method == LORA and bool(config.get("use_dora"))  # DoRA on linear layers: LoRA and m
    parsed = parse_keys(list(factors), {**parts, **MAGNITUDE_PART} if dora else parts, weights)
    check_features(config, cfg_path, dora)
    if (init := moved_base_init(config)) is not None:
        # its delta needs the base (loramix.kinds.moved_base), which no numpy reader's caller has;
        # said for every caller (similarity, predict, plan, fit), not all of which take --base
        if not torch_fallback:
            return None
        raise AdapterError(cfg_path, moved_base_problem(init, BASED_COMMANDS))
    raw = read_parts(parsed, factors.__getitem__ if lazy else (lambda k: np.asarray(factors[k])), weights)
    mags = _magnitudes(raw, weights) if dora else {}
    modules = {
        module: NpModule(name=module, **kw, magnitude=mags.get(module))
        for module, kw in module_factors(raw, method, config, cfg_path, weights).items()
    }
    return NpAdapter(
        name=name or adapter_name(given), kind=DORA if dora else method, modules=modules, config=config,
        path=given, weights_path=weights,
    )  # fmt: skip


def _magnitudes(raw: dict[str, dict], weights: Path) -> dict:
    """DoRA's ``m`` of each module, taken out of its parts ``raw`` (those left
    are LoRA's), checked as the torch reader checks it: one per output row."""
    out = {}
    for module, fs in raw.items():
        if ("A", "pos") in fs and ("B", "pos") in fs:  # else module_factors names the one missing
            if (why := magnitude_problem(module, fs, int(fs[("B", "pos")].shape[0]))) is not None:
                raise AdapterError(weights, why)
        if ("M", "pos") in fs:
            # read now, even lazily (out floats): a non-finite m is refused as torch's reader refuses it
            out[module] = np.asarray(fs.pop(("M", "pos")))
    return out
