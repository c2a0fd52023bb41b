"""loramix D2-LoRA adapters (``peft_type: D2LORA``, format ``d2lora/1``).

PEFT's layout with four factors per module, ``lora_A_pos``, ``lora_B_pos``,
``lora_A_neg``, ``lora_B_neg``, and config keys ``r``, ``lora_alpha``,
``tau``, ``norm_dim``, ``eps``; documented in ``docs/d2lora.md``.
"""

from __future__ import annotations

from pathlib import Path

from ...adapter import ModuleDelta
from ...api import renamed
from ...errors import AdapterError
from ...kinds import D2LORA
from ...results import WrittenPath
from .base import PREFIX, PeftLayoutFormat, check_pair, clean_number, write_folder


class LoramixD2(PeftLayoutFormat):
    name = "loramix-d2lora"
    kind = D2LORA
    peft_type = "D2LORA"


@renamed({"out_dir": "out"})
def save_d2_adapter(
    out: str | Path,
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
) -> WrittenPath:
    """Write a loramix D2-LoRA folder (format in ``docs/d2lora.md``): each of
    ``modules`` (name -> a D2-LoRA :class:`~loramix.adapter.ModuleDelta`,
    ``B``/``B_neg`` (out, r), ``A``/``A_neg`` (r, in)) as its four factors,
    the config from ``r``, ``lora_alpha``, ``tau``, ``norm_dim``, ``eps``
    and ``base_model_name_or_path``, with ``extra_config`` added;
    ``provenance`` is recorded as :func:`~loramix.io.formats.peft.save_peft_adapter`
    records it.
    Written into ``out`` as :func:`~loramix.io.formats.peft.save_peft_adapter`
    writes; a module of another kind or with factors that do not pair up
    raises :class:`~loramix.errors.AdapterError` before anything is made.
    Returns ``out``, the :class:`~pathlib.Path` it always returned, as a
    :class:`~loramix.results.WrittenPath` with figures ``modules`` and
    ``tensors`` (counts written)."""
    out_dir = Path(out)
    tensors = {}
    for name, m in modules.items():
        if not isinstance(m, ModuleDelta) or m.kind is not D2LORA:
            # a ValueError before: a traceback where a notebook expects loramix's one-line error
            what = m.kind.name if isinstance(m, ModuleDelta) else type(m).__name__
            raise AdapterError(out_dir, f"module {name}: a D2-LoRA folder holds D2-LoRA modules, not {what}")
        check_pair(out_dir, name, m.B, m.A)
        check_pair(out_dir, name, m.B_neg, m.A_neg)
        for part, t in D2LORA.tensors(m).items():
            tensors[f"{PREFIX}{name}.{part}.weight"] = t.detach().contiguous().cpu()
    config = {
        "peft_type": "D2LORA",
        "loramix_format": "d2lora/1",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(r),
        "lora_alpha": clean_number(lora_alpha),
        "tau": float(tau),
        "norm_dim": int(norm_dim),
        "eps": float(eps),
        "use_rslora": False,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in modules}),
    }
    if extra_config:
        config.update(extra_config)
    return WrittenPath.of(
        write_folder(out_dir, tensors, config, provenance), modules=len(modules), tensors=len(tensors)
    )
