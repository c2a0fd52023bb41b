"""Running a merge: checks first, then module by module into a file.

Two outputs:

* an adapter (without ``into``): each module's ``(B, A)`` from
  :meth:`MergeMethod.factors` (low-rank methods: exact), written as a PEFT
  LoRA folder with scale 1; with ``out_rank`` / ``energy`` any method's merged
  delta ``D`` (exact factors, or dense) truncated by SVD,
  ``D = P diag(S) Q^T -> B = P_k diag(S_k)``, ``A = Q_k^T``, ``k`` the given
  rank or the smallest keeping the energy fraction, with the discarded
  energy ``sum_{j>=k} S_j^2`` per module in the facts (:func:`truncate`);
* a model (``into`` a base folder): the engine (:mod:`loramix.engine`) plans a
  job per base tensor and its executor runs :meth:`MergeMethod.merged` for
  each adapted module (float32 on the device, ``W0`` in ``(out, in)``
  layout), which returns the module's delta and facts.

The facts of all modules go through the method's :meth:`MergeMethod.summarize`
into the summary. Byte-identical outputs: the provenance inside the
safetensors metadata leaves out the creation time, which only
``loramix.json`` carries, and the header of an adapter file is canonicalised
(safetensors writes its metadata map in a random order).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..adapter import (
    Adapter,
    ModuleDelta,
    check_compatible,
    saved_tensors,
    warn_unscaled_copies,
)
from ..devices import resolve_device
from ..errors import AdapterError, UsageError
from ..io.adapter_files import WEIGHTS_NAME, load_adapter, save_peft_adapter
from ..io.outputs import atomic_output_dir, check_output, provenance, write_provenance
from ..io.peft_layout import warn_null_targets
from ..io.safetensors_io import canonicalize_header, file_record
from ..options import dtype_name, parse_dtype, parse_weights, promoted_dtype
from ..rounding import narrow
from . import MergeResult, get_method
from .base import (
    LowRank,
    MergeMethod,
    ModuleContext,
    check_adapter_output,
    check_out_rank,
    energy_info,
    split_truncation,
    summarize_energy,
)
from .params import check_divide_weights


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


def _summarize(method: MergeMethod, facts: dict[str, dict], n_modules: int) -> dict:
    return {"modules": n_modules, **(method.summarize(facts) if facts else {})}


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
    trunc = split_truncation(m, params, into)
    ads = [a if isinstance(a, Adapter) else load_adapter(a) for a in adapters]
    check_compatible(ads)
    ws = parse_weights(weights, len(ads))
    warn_unscaled_copies(ads, ws)
    p = m.validate(params, ads)
    check_divide_weights(p, ws, m)
    dev = resolve_device(device)
    out_dtype = parse_dtype(dtype)
    if into is None:
        check_adapter_output(m, ads, trunc)
        check_out_rank(m, p, ads, trunc)
        warn_null_targets(ads)
    inputs = [a.path for a in ads if a.path is not None] + ([into] if into is not None else [])
    out = check_output(out, force=force, inputs=inputs)

    if into is None:
        return _write_adapter(m, ads, ws, p, out=out, dev=dev, dtype=out_dtype, force=force, inputs=inputs,
                              trunc=trunc)  # fmt: skip
    return _write_model(
        m, ads, ws, p, into=into, out=out, dev=dev, dtype=out_dtype, force=force, progress=progress
    )


def _inputs(ads, ws) -> list[dict]:
    return [dict(a.provenance(), role="adapter", weight=w) for a, w in zip(ads, ws)]


def _record(m: MergeMethod, ads, ws, p, dtype) -> dict:
    return provenance(m.name, {**_clean(p), "weights": ws, "dtype": dtype_name(dtype)}, _inputs(ads, ws))


def _adapter_factors(m: MergeMethod, jobs, p, trunc) -> Iterator[LowRank]:
    """Per job, in order, the merged delta as factors: the method's own
    (low-rank methods), else from its dense delta; truncated by SVD when
    ``trunc``. A dense delta is formed one module at a time and dropped once
    truncated, before the next one is formed (not one per module at once)."""
    if m.low_rank:
        lrs = m.factors_many(jobs, p)
        yield from (lrs if trunc is None else (truncate(lr, *trunc) for lr in lrs))
        return
    for ctx, mds, ws in jobs:
        d = m.delta(ctx, mds, ws, None, p)
        lr = d if trunc is None else truncate(d, *trunc)
        del d  # not held while the caller waits for the next module
        yield lr


def _targets_every_layer(ad: Adapter) -> bool:
    """Whether ``ad``'s config puts it on every module of the names it lists
    (a list of last names, no layer selection, no exclusions), so that the
    same names describe a sum's modules exactly; a regex, full names,
    ``layers_to_transform`` or ``exclude_modules`` may cover some layers only."""
    cfg = ad.config
    t = cfg.get("target_modules")
    return (
        isinstance(t, list)
        and all("." not in x for x in t)
        and not any(cfg.get(k) for k in ("layers_to_transform", "layers_pattern", "exclude_modules"))
    )


def _first_given(ads, key: str):
    """The first input's ``key`` in its config that is set (not missing or
    null), else None: an output adapter names the base and the task of any
    input that names them (PEFT's ``AutoPeftModel`` loads the base from it)."""
    return next((a.config[key] for a in ads if a.config.get(key) is not None), None)


def _write_adapter(m, ads, ws, p, *, out, dev, dtype, force, inputs, trunc=None) -> MergeResult:
    """The result as a PEFT LoRA folder: per module ``(B, A)``, scale 1."""
    plan = module_plan(ads)
    saved = saved_tensors(ads)  # modules_to_save copies travel as they are
    for name in saved:  # PEFT would wrap the module as the copy and drop the factors, silently
        if (module := name.rpartition(".")[0]) in plan:
            where = next(a.path or a.name for a in ads if module in a.modules)
            raise AdapterError(where, f"module {module} is LoRA here and a modules_to_save copy ({name}) in "
                                      "another input: an adapter cannot carry both (PEFT keeps only the copy)")  # fmt: skip
    if dtype is None:
        dtype = promoted_dtype(md.dtype for ad in ads for md in ad.modules.values())
    jobs = [
        (
            ModuleContext(name, tuple(i for i, _ in items), dev, torch.float64),
            [md for _, md in items],
            [ws[i] for i, _ in items],
        )
        for name, items in plan.items()
    ]
    factors, infos = {}, {}
    for name, lr in zip(plan, _adapter_factors(m, jobs, p, trunc)):
        factors[name] = (narrow(lr.B, dtype).cpu(), narrow(lr.A, dtype).cpu())  # rounded once
        if lr.info:
            infos[name] = lr.info
    summary = _summarize(m, infos, len(plan))
    params = _clean(p)
    if trunc is not None:
        summary.update(summarize_energy(infos))
        params.update({k: v for k, v in zip(("out_rank", "energy"), trunc) if v is not None})
    # The weights file carries the whole record but its creation time.
    full = {**_record(m, ads, ws, params, dtype), "output": "adapter", "summary": summary, "modules": infos}
    fan_in_fan_out = any(bool(a.config.get("fan_in_fan_out")) for a in ads)
    with atomic_output_dir(out, force=force, inputs=inputs) as tmp:
        save_peft_adapter(
            tmp,
            factors,
            base_model_name_or_path=_first_given(ads, "base_model_name_or_path"),
            fan_in_fan_out=fan_in_fan_out,
            dtype=dtype,
            provenance=file_record(full),
            # null where no input names one, as PEFT writes it: a default (CAUSAL_LM) would make PEFT
            # wrap a BERT masked-LM base as a causal LM
            extra_config={"task_type": _first_given(ads, "task_type")},
            saved=saved,
            embeddings={
                n for a in ads for n, md in a.modules.items() if md.extra.get("layout") == "embedding"
            },
            full_names=not all(_targets_every_layer(a) for a in ads),
        )
        # safetensors writes its metadata map in a random order: sort it.
        canonicalize_header(tmp / WEIGHTS_NAME)
        write_provenance(tmp, full)
    return MergeResult(out, m.name, "adapter", params, ws, infos, summary, full)


def _write_model(m, ads, ws, p, *, into, out, dev, dtype, force, progress) -> MergeResult:
    """The base with each adapted module's merged delta added, streamed by the engine."""
    from ..engine import (
        Buffers,
        ModuleOutput,
        SerialExecutor,
        base_placeholder,
        execute_into_base,
        plan_into_base,
    )
    from ..io.model_folder import BaseModelFolder

    base = BaseModelFolder(into)
    modules = module_plan(ads)
    plan = plan_into_base(base, list(modules), ads, dtype)

    # work tensors reused from module to module: per thread, two sets used in turn, so a
    # result stays intact while the next module's delta is computed (the engine computes it
    # ahead while the helpers add this one: compute.ahead)
    local = threading.local()
    # A weight read or written in float64 is added to in float64 (the engine's compute dtype): its
    # delta is formed in float64 too, not from factors (w_i s_i folded in) or a method's work rounded
    # to float32.
    wide = {j.module for j in plan.module_jobs if "F64" in (j.info.dtype, j.out_code)}

    def compute(name: str, W0: torch.Tensor | None) -> ModuleOutput:
        items = modules[name]
        sets = getattr(local, "sets", None)
        if sets is None:
            sets = local.sets = [Buffers(), Buffers()]
        sets.reverse()
        scratch = sets[0]
        device = dev if W0 is None else W0.device
        work = torch.float64 if name in wide else torch.float32  # not the output's dtype
        # deferred: a method may leave its delta to be formed as the engine adds it (add_delta)
        ctx = ModuleContext(name, tuple(i for i, _ in items), device, work, scratch, deferred=True)
        d, facts = m.merged(ctx, [md for _, md in items], [ws[i] for i, _ in items], W0, p)
        # a non-finite delta makes a non-finite output tensor, which the writer
        # refuses naming it (io.safetensors_io.check_output_finite): no second pass here
        return ModuleOutput(d, facts)

    # W0 only where the method reads it: the engine then never forms it whole in float32;
    # one torch thread where that changes no bit
    compute.needs_base = lambda name: m.needs_base([md for _, md in modules[name]])
    compute.one_thread = lambda name: m.one_thread([md for _, md in modules[name]])
    compute.ahead = True

    # "created" is left out: the weight files' metadata must not change from
    # run to run; the time goes into loramix.json below. The facts are known
    # only after the run: the weights carry the summary they imply up front.
    params = {**_clean(p), "weights": ws, "dtype": dtype_name(dtype)}
    inputs = [*_inputs(ads, ws), base_placeholder(base)]
    summary = _summarize(m, {}, len(modules))
    record = provenance(m.name, params, inputs, created=None, output="model", summary=summary, modules={})
    paths = [base.path, *(a.path for a in ads if a.path is not None)]

    def finish(rec: dict, facts: dict) -> dict:  # loramix.json, written before the output is published
        return {**rec, "created": provenance(m.name, {}, [])["created"],
                "summary": _summarize(m, facts, len(modules)) if facts else summary, "modules": facts}  # fmt: skip

    res = execute_into_base(plan, out, compute, record=record, executor=SerialExecutor(dev), force=force,
                            inputs=paths, progress=progress, finish=finish)  # fmt: skip
    record = res.provenance
    return MergeResult(
        Path(res.out), m.name, "model", _clean(p), ws, res.facts, record["summary"], record, res
    )


# ----------------------------------------------------------------------------- any merge as an adapter


def truncate(delta, out_rank: int | None, energy: float | None) -> LowRank:
    """The rank-``k`` SVD truncation of a merged delta, as a :class:`LowRank`.

    ``delta`` is a dense ``(out, in)`` tensor or a :class:`LowRank` (exact
    factors ``B @ A``; its ``info`` is kept under the truncation's facts)."""
    from .svd import LowRankSVD, choose_rank, dense_svd

    if isinstance(delta, LowRank):
        svd = LowRankSVD(delta.B.double(), delta.A.double())
        S, stacked, prior = svd.S, int(delta.B.shape[1]), dict(delta.info)
        k = choose_rank(S, out_rank, energy, max(int(delta.B.shape[0]), int(delta.A.shape[1])))
        P, Qt = svd.factors(k)
    else:
        P, S, Qt = dense_svd(delta)  # on one thread: the same bytes on any --threads
        stacked, prior = min(delta.shape), {}
        k = choose_rank(S, out_rank, energy, max(delta.shape))
        P, Qt = P[:, :k], Qt[:k]
    info = {**{f"method_{n}": v for n, v in prior.items()}, **energy_info(S, k, stacked)}
    return LowRank(P * S[:k], Qt, info)
