"""Checked safetensors reading: one tensor at a time, errors name the file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import LoramixError


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class CheckedSafetensors:
    """``safe_open`` with errors turned into one-line :class:`LoramixError`\\ s.

    Use as a context manager. ``error`` is the error class to raise (for
    instance ``AdapterError`` or ``BaseModelError``).
    """

    def __init__(self, path: str | Path, error: type[LoramixError] = LoramixError, device: str = "cpu"):
        self.path = Path(path)
        self.error = error
        self.device = device
        self._f = None

    def __enter__(self) -> CheckedSafetensors:
        if not self.path.exists():
            raise self.error(self.path, "no such file")
        try:
            self._f = safe_open(str(self.path), framework="pt", device=self.device)
            self._f.__enter__()
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise self.error(self.path, f"not a valid safetensors file (corrupt or truncated): {e}") from e
        return self

    def __exit__(self, *exc) -> None:
        if self._f is not None:
            self._f.__exit__(*exc)

    def keys(self) -> list[str]:
        return list(self._f.keys())

    def metadata(self) -> dict:
        return self._f.metadata() or {}

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._f.get_slice(key).get_shape())

    def dtype_str(self, key: str) -> str:
        return self._f.get_slice(key).get_dtype()

    def get(self, key: str, check_finite: bool = False) -> torch.Tensor:
        try:
            t = self._f.get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise self.error(self.path, f"cannot read tensor {key} (corrupt or truncated file): {e}") from e
        if check_finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise self.error(self.path, f"tensor {key} has non-finite values (nan or inf)")
        return t


def safetensors_metadata(provenance: dict | None = None) -> dict[str, str]:
    """Metadata for a file we write: ``format: pt`` (transformers requires it)
    plus the provenance, less its timestamp, as one JSON string."""
    meta = {"format": "pt"}
    if provenance is not None:
        # The wall-clock time lives in loramix.json only: with it here, the same
        # inputs could never give byte-identical weight files.
        record = {k: v for k, v in provenance.items() if k != "created"}
        meta["loramix"] = json.dumps(record, sort_keys=True)
    return meta


def canonicalize_header(path: str | Path) -> None:
    """Rewrite a safetensors header with its keys sorted, in place.

    ``safetensors`` serialises ``__metadata__`` from a Rust ``HashMap``, whose
    order is random per call: two writes of the same tensors and metadata can
    differ in bytes. Sorting the header's JSON keys (same compact separators,
    padded with spaces to the original length, as the format allows) makes
    the file a function of its content. Offsets are relative to the end of
    the header, so the data is untouched.
    """
    path = Path(path)
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        if "__metadata__" in header and isinstance(header["__metadata__"], dict):
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > n:  # cannot happen for headers safetensors wrote; leave such a file alone
            return
        f.seek(8)
        f.write(text + b" " * (n - len(text)))
