"""Adapters as numpy factors, read without torch.

The same folders and checks as :func:`loramix.io.adapter_files.load_adapter`
(:mod:`loramix.io.peft_layout`), but the factors are numpy arrays read with
safetensors' numpy interface, so that a similarity run on the CPU (float64
numpy arithmetic, :mod:`loramix.overlap`) never imports torch. ``bfloat16``,
which numpy lacks, is read as its raw ``uint16`` bits shifted into the high
half of a ``float32``: the same value, exactly.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import AdapterError
from .peft_layout import (
    D2LORA,
    LORA,
    adapter_method,
    adapter_name,
    check_features,
    module_factors,
    parse_keys,
    read_config,
    read_parts,
    resolve_adapter_paths,
)


@dataclass
class NpModule:
    """One adapted weight as numpy factors: ``dW = scale B A`` (LoRA,
    ``B`` (out, r), ``A`` (r, in)) or ``scale (B A - tau B_neg A_neg)`` (the
    D2-LoRA signed residual); the fields of :class:`loramix.adapter.ModuleDelta`."""

    name: str
    B: np.ndarray
    A: np.ndarray
    scale: float
    alpha: float
    B_neg: np.ndarray | None = None
    A_neg: np.ndarray | None = None
    tau: float = 0.0
    norm_dim: int = 1
    eps: float = 1e-8

    @property
    def kind(self) -> str:
        return D2LORA if self.B_neg is not None else LORA

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)`` of the delta, in ``nn.Linear`` layout."""
        return int(self.B.shape[0]), int(self.A.shape[1])

    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        """``(Bf, Af)`` in float64 with ``dW = Bf @ Af``, the scale folded into
        ``Bf``: LoRA ``(s B, A)``; D2 ``(s [B, -tau B_neg], [A; A_neg])`` (rank 2r)."""
        B, A = self.B.astype(np.float64), self.A.astype(np.float64)
        if self.B_neg is not None:
            B = np.concatenate([B, -self.tau * self.B_neg.astype(np.float64)], axis=1)
            A = np.concatenate([A, self.A_neg.astype(np.float64)], axis=0)
        return B * self.scale, A


@dataclass
class NpAdapter:
    """An adapter's modules as :class:`NpModule` (``method``: ``lora`` or ``d2lora``)."""

    name: str
    method: str
    modules: dict[str, NpModule]
    config: dict
    path: Path | None = None


def _np(t) -> np.ndarray | None:
    # numpy has no bfloat16; float32 holds every bfloat16 value exactly
    return (
        None
        if t is None
        else t.detach().cpu().float().numpy()
        if t.dtype.itemsize == 2
        else t.detach().cpu().numpy()
    )


def np_adapter(adapter) -> NpAdapter:
    """A loaded :class:`loramix.adapter.Adapter` with its factors as numpy
    arrays (views where the dtype allows; fp16/bf16 widened to float32)."""
    fields = ("name", "scale", "alpha", "tau", "norm_dim", "eps")
    modules = {
        name: NpModule(
            **{f: getattr(m, f) for f in fields},
            **{f: _np(getattr(m, f)) for f in ("B", "A", "B_neg", "A_neg")},
        )
        for name, m in adapter.modules.items()
    }
    return NpAdapter(adapter.name, adapter.method, modules, adapter.config, adapter.path)


class _NpSafetensors:
    """``safe_open(framework="np")`` with one-line :class:`AdapterError`\\ s,
    non-finite values refused, and ``BF16`` read from its bits."""

    def __init__(self, path: Path):
        from safetensors import SafetensorError, safe_open

        self.path, self._errors = path, (SafetensorError, OSError, ValueError, RuntimeError, TypeError)
        try:
            self._f = safe_open(str(path), framework="np")
        except self._errors as e:
            raise AdapterError(path, f"not a valid safetensors file (corrupt or truncated): {e}") from e
        self._header: dict | None = None

    def keys(self) -> list[str]:
        return list(self._f.keys())

    def _bf16(self, key: str) -> np.ndarray:
        if self._header is None:  # safe_open has checked it already
            with open(self.path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                self._header = json.loads(fh.read(n))
                self._data_start = 8 + n
        info = self._header[key]
        b, e = info["data_offsets"]
        bits = np.fromfile(self.path, dtype="<u2", count=(e - b) // 2, offset=self._data_start + b)
        return (bits.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])

    def get(self, key: str) -> np.ndarray:
        try:
            if self._f.get_slice(key).get_dtype() == "BF16":
                t = self._bf16(key)
            else:
                t = self._f.get_tensor(key)
        except self._errors as e:
            raise AdapterError(self.path, f"cannot read tensor {key} (corrupt or truncated file): {e}") from e
        if np.issubdtype(t.dtype, np.floating) and not np.isfinite(t).all():
            raise AdapterError(self.path, f"tensor {key} has non-finite values (nan or inf)")
        return t


def load_np_adapter(path: str | Path, name: str | None = None) -> NpAdapter:
    """Read a PEFT LoRA or loramix D2-LoRA adapter (folder or ``.safetensors``
    file) into numpy factors, with :func:`~loramix.io.adapter_files.load_adapter`'s
    checks and errors."""
    given, cfg_path, weights = resolve_adapter_paths(path)
    config = read_config(cfg_path)
    method, parts = adapter_method(config, cfg_path)
    f = _NpSafetensors(weights)
    parsed = parse_keys(f.keys(), parts, weights)
    check_features(config, cfg_path)
    raw = read_parts(parsed, f.get, weights)
    modules = {
        module: NpModule(name=module, **kw)
        for module, kw in module_factors(raw, method, config, cfg_path, weights).items()
    }
    return NpAdapter(
        name=name or adapter_name(given), method=method, modules=modules, config=config, path=given
    )
