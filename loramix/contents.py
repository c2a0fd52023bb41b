"""What an adapter holds, module by module (``loramix inspect``).

For each module: ``out x in`` (``nn.Linear`` layout), rank ``r`` (one branch;
a D2 residual has rank ``2r``), ``alpha``, scale ``s``, the Frobenius norm of
the delta computed from the factors (``||s B A||_F^2 = sum((Bf^T Bf) *
(Af Af^T))``, no dense ``out x in`` matrix; D2: of the signed residual), the
stored dtype and the parameter count.

A path is read as numpy factors (:func:`loramix.io.np_factors.load_np_adapter`,
lazily: one module's factors at a time) and every number is computed in numpy
float64, so inspecting a PEFT LoRA or D2-LoRA adapter never imports torch.
What that reader leaves to the torch readers (embedding LoRA or DoRA,
``modules_to_save``, PEFT's copy of a base weight) is loaded as an
:class:`~loramix.adapter.Adapter`; its norms are computed from its float64
factors by the same numpy function
(:func:`loramix.io.np_factors.factor_squared_norm`), so a path and the
adapter loaded from it give the same table, every norm to the last bit.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from .adapter import Adapter

# the null-target_modules warning's last words here: inspect takes no base
# (a warning is worded for both readers: each step by its keyword and its flag, loramix.api)
_LISTS_ALL = ("inspect lists them all; given the base, similarity, merge, sum_into_base and evaluate apply "
              "PEFT's rule: similarity base=, merge or sum_into_base into=; similarity --base, sum or merge "
              "--into, eval")  # fmt: skip

COLUMNS = ["module", "kind", "out", "in", "rank", "alpha", "scale", "norm", "dtype", "params"]


def _natural_key(name: str) -> list:
    # h.2 before h.10 (safetensors stores keys in plain string order)
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def inspect_adapter(adapter: Adapter | str | Path) -> pd.DataFrame:
    """What ``loramix inspect`` shows of ``adapter`` (a path, or a loaded
    :class:`~loramix.adapter.Adapter`). Returns a pandas DataFrame, one row
    per module, in natural name order; columns :data:`COLUMNS` (``norm``: ``||s B A||_F`` in float64,
    the residual's for a kind that needs the base).

    ``df.attrs`` holds the adapter's ``name``, ``path``, ``sha256``,
    ``kind`` (and ``method``, its v0.1 name), ``base_model``, the
    :func:`totals`, ``magnitude`` (DoRA: :func:`magnitude_range`, else None)
    ``saved``: its ``modules_to_save`` full copies, one
    ``{tensor, shape, dtype, params}`` each (they replace base tensors; they
    are not deltas, so no row of their own), and ``base_copies``: PEFT's
    copies of targeted base weights (:func:`base_copies`), which nothing
    reads. A PEFT adapter with a null
    ``target_modules`` is listed whole, with a warning: which of its modules
    PEFT applies depends on the base (:func:`loramix.io.peft_layout.warn_null_targets`).
    """
    ad, sha256, saved = _read(adapter)
    from .io.peft_layout import warn_null_targets

    warn_null_targets([ad], _LISTS_ALL)
    rows = []
    for name in sorted(ad.modules, key=_natural_key):
        m = ad.modules[name]
        out_f, in_f = m.shape
        rows.append(
            (
                name,
                getattr(m.kind, "name", m.kind),  # a kind object, or its name (NpModule)
                out_f,
                in_f,
                m.rank,
                m.alpha,
                m.scale,
                m.norm(),
                str(m.dtype).removeprefix("torch."),
                m.num_parameters,
            )
        )
    df = pd.DataFrame(rows, columns=COLUMNS)
    df.attrs.update(
        name=ad.name,
        path=None if ad.path is None else str(ad.path),
        sha256=sha256,
        kind=getattr(ad.kind, "name", ad.kind),
        method=getattr(ad.kind, "name", ad.kind),
        base_model=ad.base_model,
        totals=totals(df),
        magnitude=magnitude_range(ad),
        saved=[
            {
                "tensor": n,
                "shape": list(t.shape),
                "dtype": str(t.dtype).removeprefix("torch."),
                "params": t.numel(),
            }
            for n, t in sorted(saved.items())
        ],
        base_copies=base_copies(ad.weights_path),
        read_as=read_as(ad.config),
    )
    return df


def read_as(config: dict | None) -> str | None:
    """How loramix reads an adapter whose ``peft_type`` a format reads as
    another kind (the format's ``read_as``: AdaLoRA, LoHa and LoKr as LoRA), else
    None; read from the format files without importing them."""
    from .io.peft_layout import declared_formats

    peft_type = str((config or {}).get("peft_type", "")).upper()
    for d in declared_formats():
        if str(d.get("peft_type", "")).upper() == peft_type and isinstance(d.get("read_as"), str):
            return d["read_as"]
    return None


def base_copies(weights_path) -> list[dict]:
    """PEFT's copies of targeted base weights in a safetensors adapter file,
    one ``{tensor, shape, dtype, params}`` each (``lm_head.weight`` for the
    key ``base_model.model.lm_head.base_layer.weight``), read from the header.

    PEFT saves them with ``save_embedding_layers`` (by default when an
    embedding or head is targeted), in case the vocabulary was resized. A
    merge applies the delta to the base's own tensor and checks its shape
    against the factors, so loramix never reads them
    (:func:`loramix.io.peft_layout.read_parts`); inspect lists them so the
    file's size is explained. ``[]`` for a file that is not safetensors."""
    if weights_path is None or Path(weights_path).suffix != ".safetensors":
        return []
    from .io.peft_layout import BASE_COPY, PREFIX
    from .io.st_header import read_safetensors_header

    header, _ = read_safetensors_header(Path(weights_path))
    out = []
    for key, info in sorted(header.items()):
        toks = key.split(".")
        if key == "__metadata__" or len(toks) < 3 or toks[-2:] != [BASE_COPY, "weight"]:
            continue
        out.append({"tensor": ".".join(toks[:-2]).removeprefix(PREFIX) + ".weight", "shape": info["shape"],
                    "dtype": info["dtype"], "params": math.prod(info["shape"])})  # fmt: skip
    return out


def _read(adapter_or_path) -> tuple:
    """``(adapter, sha256, saved copies)``: a path the numpy reader reads as an
    :class:`~loramix.io.np_factors.NpAdapter` (lazy factors, so the dtype
    column is the stored one), anything else as an ``Adapter``."""
    if isinstance(adapter_or_path, (str, os.PathLike)):
        from .io.np_factors import load_np_adapter

        ad = load_np_adapter(adapter_or_path, lazy=True, torch_fallback=False)
        if ad is not None:
            from .io.filehash import cached_file_sha256

            return ad, cached_file_sha256(ad.weights_path), {}
    from .adapter import Adapter
    from .io.adapter_files import load_adapter

    ad = adapter_or_path if isinstance(adapter_or_path, Adapter) else load_adapter(adapter_or_path)
    return ad, ad.sha256, ad.saved


def magnitude_range(ad) -> dict | None:
    """DoRA's magnitude vectors ``m`` (one entry per output row, per column on
    an embedding): ``{modules, min, max}`` over every module that has one, in
    float64; None for an adapter without them. (Its effective delta,
    ``m / ||W0 + s B A||`` times that sum, needs the base; inspect has none.)"""
    lo, hi, n = math.inf, -math.inf, 0
    for m in ad.modules.values():
        mag = getattr(m, "magnitude", None)
        if mag is None:
            mag = getattr(m, "extra", {}).get("magnitude")
        if mag is None:
            continue
        if hasattr(mag, "detach"):  # a torch tensor (the torch readers')
            mag = mag.detach().cpu().double().numpy()
        a = np.asarray(mag, dtype=np.float64)
        lo, hi, n = min(lo, float(a.min())), max(hi, float(a.max())), n + 1
    return {"modules": n, "min": lo, "max": hi} if n else None


def totals(df: pd.DataFrame) -> dict:
    """``modules``, ``params``, ``norm`` (``sqrt(sum_m ||dW_m||^2)``, the norm
    of the whole delta), ``ranks`` and ``dtypes`` present."""
    return {
        "modules": int(len(df)),
        "params": int(df["params"].sum()) if len(df) else 0,
        "norm": math.sqrt(float((df["norm"] ** 2).sum())) if len(df) else 0.0,
        "ranks": sorted({int(r) for r in df["rank"]}),
        "dtypes": sorted(set(df["dtype"])),
    }
