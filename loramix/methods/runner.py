"""Running a merge: checks first, then module by module into a file.

Two outputs:

* an adapter (low-rank methods without ``into``): each module's ``(B, A)``
  from :meth:`MergeMethod.factors`, written as a PEFT LoRA folder with scale 1;
* a model (``into`` a base folder): the streaming engine of
  :mod:`loramix.summation` reads the base one tensor at a time and adds
  :meth:`MergeMethod.delta` of each adapted module (computed in float32 on
  the device, from ``W0`` in ``(out, in)`` layout).

Byte-identical outputs: the provenance inside the safetensors metadata leaves
out the creation time, which only ``loramix.json`` carries, and the header of
an adapter file is canonicalised (safetensors writes its metadata map in a
random order).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from ..adapter import Adapter, ModuleDelta, check_compatible
from ..devices import resolve_device
from ..errors import UsageError
from ..io.adapter_files import WEIGHTS_NAME, load_adapter, save_peft_adapter
from ..io.outputs import atomic_output_dir, atomic_write, check_output, provenance, write_provenance
from ..io.safetensors_io import canonicalize_header
from . import MergeResult, get_method, parse_dtype, parse_weights
from .base import MergeMethod, ModuleContext


def module_plan(adapters: Sequence[Adapter]) -> dict[str, list[tuple[int, ModuleDelta]]]:
    """module name -> ``[(adapter index, ModuleDelta), ...]``, modules in the
    order they first appear, adapters in the user's order."""
    plan: dict[str, list[tuple[int, ModuleDelta]]] = {}
    for i, ad in enumerate(adapters):
        for name, m in ad.modules.items():
            plan.setdefault(name, []).append((i, m))
    return plan


def _clean(params: dict) -> dict:
    """Parameters as written in provenance (``lambda`` without the underscore)."""
    return {k.rstrip("_"): v for k, v in params.items() if v is not None}


def _summarize(method: MergeMethod, modules: dict[str, dict], n_modules: int) -> dict:
    out: dict = {"modules": n_modules}
    if method.name == "svd" and modules:
        total = sum(i["energy_total"] for i in modules.values())
        dropped = sum(i["energy_discarded"] for i in modules.values())
        worst = max(modules, key=lambda n: modules[n]["energy_discarded_fraction"])
        ranks = sorted({i["rank"] for i in modules.values()})
        out.update(
            ranks=ranks,
            energy_discarded=dropped,
            energy_discarded_fraction=dropped / total if total > 0 else 0.0,
            worst_module=worst,
            worst_module_discarded_fraction=modules[worst]["energy_discarded_fraction"],
        )
    if method.name == "d2-signed" and modules:
        diffs = [i["rel_diff_vs_effective_sum"] for i in modules.values()]
        out.update(
            rel_diff_vs_effective_sum_mean=sum(diffs) / len(diffs),
            rel_diff_vs_effective_sum_max=max(diffs),
        )
    return out


def run_merge(
    adapters,
    method,
    *,
    weights=None,
    into=None,
    out,
    device="auto",
    dtype=None,
    force=False,
    progress=False,
    **params,
) -> MergeResult:
    m = get_method(method)
    if not adapters:
        raise UsageError("merge", "no adapters given")
    ads = [a if isinstance(a, Adapter) else load_adapter(a) for a in adapters]
    check_compatible(ads)
    ws = parse_weights(weights, len(ads))
    p = m.validate(params, ads)
    dev = resolve_device(device)
    out_dtype = parse_dtype(dtype)
    if into is None and not m.low_rank:
        raise UsageError(
            "--into",
            f"method {m.name} writes a full model: pass --into BASE (only "
            f"{', '.join(n for n in _low_rank_names())} can write an adapter)",
        )
    inputs = [a.path for a in ads if a.path is not None] + ([into] if into is not None else [])
    out = check_output(out, force=force, inputs=inputs)

    if into is None:
        return _write_adapter(m, ads, ws, p, out=out, dev=dev, dtype=out_dtype, force=force, inputs=inputs)
    return _write_model(
        m, ads, ws, p, into=into, out=out, dev=dev, dtype=out_dtype, force=force, progress=progress
    )


def _low_rank_names() -> list[str]:
    from . import _REGISTRY

    return sorted(n for n, c in _REGISTRY.items() if c.low_rank)


def _inputs(ads, ws) -> list[dict]:
    return [dict(a.provenance(), role="adapter", weight=w) for a, w in zip(ads, ws)]


def _record(m: MergeMethod, ads, ws, p) -> dict:
    return provenance(m.name, {**_clean(p), "weights": ws}, _inputs(ads, ws))


def _without_time(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k != "created"}


def _write_adapter(m, ads, ws, p, *, out, dev, dtype, force, inputs) -> MergeResult:
    """Low-rank result as a PEFT LoRA folder: per module ``(B, A)``, scale 1."""
    plan = module_plan(ads)
    if dtype is None:
        dtype = ads[0].modules[next(iter(ads[0].modules))].dtype
        for ad in ads[1:]:
            for md in ad.modules.values():
                dtype = torch.promote_types(dtype, md.dtype)
    jobs = [
        (
            ModuleContext(name, tuple(i for i, _ in items), dev, torch.float64),
            [md for _, md in items],
            [ws[i] for i, _ in items],
        )
        for name, items in plan.items()
    ]
    factors, infos = {}, {}
    for name, lr in zip(plan, m.factors_many(jobs, p)):
        factors[name] = (lr.B.to(dtype).cpu(), lr.A.to(dtype).cpu())
        if lr.info:
            infos[name] = lr.info
    rec = _record(m, ads, ws, p)
    summary = _summarize(m, infos, len(plan))
    fan_in_fan_out = any(bool(a.config.get("fan_in_fan_out")) for a in ads)
    with atomic_output_dir(out, force=force, inputs=inputs) as tmp:
        save_peft_adapter(
            tmp,
            factors,
            base_model_name_or_path=ads[0].base_model,
            fan_in_fan_out=fan_in_fan_out,
            dtype=dtype,
            provenance=_without_time(rec),
            extra_config={"task_type": ads[0].config.get("task_type", "CAUSAL_LM")},
        )
        # safetensors writes its metadata map in a random order: sort it.
        canonicalize_header(tmp / WEIGHTS_NAME)
        full = {**rec, "output": "adapter", "summary": summary, "modules": infos}
        write_provenance(tmp, full)
    return MergeResult(out, m.name, "adapter", _clean(p), ws, infos, summary, full)


def _write_model(m, ads, ws, p, *, into, out, dev, dtype, force, progress) -> MergeResult:
    """The base with each adapted module's merged delta added, streamed."""
    from ..summation import stream_into_base

    plan = module_plan(ads)
    infos: dict[str, dict] = {}

    def module_fn(name: str, W0: torch.Tensor) -> torch.Tensor:
        items = plan[name]
        ctx = ModuleContext(name, tuple(i for i, _ in items), W0.device, torch.float32)
        mds, wsub = [md for _, md in items], [ws[i] for i, _ in items]
        d, info = m.merged(ctx, mds, wsub, W0, p)
        if info:
            infos[name] = info
        if not bool(torch.isfinite(d).all()):
            raise UsageError(
                name, f"method {m.name} produced non-finite values (check --weights and --lambda)"
            )
        return d

    res = stream_into_base(
        into,
        out,
        module_fn,
        adapters=ads,
        dtype=dtype,
        device=dev,
        force=force,
        # "created" overrides the engine's timestamp: the weight files' metadata
        # must not change from run to run. The time goes into loramix.json below.
        provenance={
            "method": m.name,
            "parameters": {**_clean(p), "weights": ws},
            "inputs": _inputs(ads, ws),
            "created": None,
        },
        progress=progress,
    )
    summary = _summarize(m, infos, len(plan))
    record = {
        **res.provenance,
        "created": provenance(m.name, {}, [])["created"],
        "output": "model",
        "summary": summary,
        "modules": infos,
    }
    with atomic_write(Path(res.out) / "loramix.json") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.write("\n")
    return MergeResult(Path(res.out), m.name, "model", _clean(p), ws, infos, summary, record)
