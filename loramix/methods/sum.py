"""Naive summation, the baseline (docs/merging.md, "Sum"); ``loramix sum`` is its shortcut.

    into a base:    W = W0 + sum_i w_i dW_i       (effective deltas for D2-LoRA)
    as an adapter:  B = [w_1 s_1 B_1 ... w_N s_N B_N] (out, sum r_i),  A = [A_1; ...; A_N]

The adapter form is exact (no approximation, scale 1). :func:`sum_into_base`
and :func:`sum_adapters` are this method through :func:`loramix.methods.merge`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..api import renamed
from ..errors import UsageError
from ..io.peft_layout import adapter_list
from ..results import WrittenPath
from . import merge, register
from .base import LowRank, MergeMethod, require_base

if TYPE_CHECKING:
    import torch


def _base_free_factors(module_deltas, weights, dtype, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The terms whose delta does not depend on the base, as one factor pair
    (:func:`loramix.kinds.stack_factors`): ``B @ A = sum_i w_i dW_i`` over
    those modules; None when there is none."""
    from ..kinds import stack_factors

    pairs = [(m, w) for m, w in zip(module_deltas, weights) if not m.kind.needs_base]
    if not pairs:
        return None
    st = stack_factors([m for m, _ in pairs], [w for _, w in pairs], dtype=dtype, device=device)
    return st.B, st.A


@register
class Sum(MergeMethod):
    name = "sum"
    uses_base = False  # reads W0 only for kinds that need it
    thread_independent = True
    summary = "the weighted sum of the deltas (exact; an adapter with ranks concatenated, or into a base)"
    params = ()
    low_rank = True
    attachable = True

    def delta(self, ctx, module_deltas, weights, W0, params):
        """Terms that do not need the base as one matmul of the stacked
        factors, in ``ctx.dtype``; the others (D2-LoRA, DoRA) as ``w_i`` times
        the effective delta, formed in float64."""
        return self._weighted_sum(ctx, module_deltas, weights, W0)

    @staticmethod
    def _weighted_sum(ctx, module_deltas, weights, W0):
        """``sum_i w_i dW_i`` (effective deltas where the kind needs the base)
        for ``weights`` as given: :meth:`merged` calls this, not :meth:`delta`,
        which a subclass overrides to rescale the weights it was handed
        (task-arithmetic's lambda was applied twice to a DoRA or D2-LoRA input)."""
        import torch

        pair = _base_free_factors(module_deltas, weights, ctx.dtype, ctx.device)
        if pair is not None:
            out = pair[0] @ pair[1]
        else:
            out = torch.zeros(module_deltas[0].shape, dtype=ctx.dtype, device=ctx.device)
        for m, w in zip(module_deltas, weights):
            if m.kind.needs_base:
                require_base(m, W0)
                out += m.delta(W0, dtype=torch.float64, device=ctx.device).mul_(w).to(out.dtype)
        return out

    def merged(self, ctx, module_deltas, weights, W0, params):
        # No kind needs the base: the factor pair, which the engine adds in one
        # fused addmm without forming the dense delta.
        if not any(m.kind.needs_base for m in module_deltas):
            return _base_free_factors(module_deltas, weights, ctx.dtype, ctx.device), {}
        return self._weighted_sum(ctx, module_deltas, weights, W0), {}

    def factors(self, ctx, module_deltas, weights, params):
        for m in module_deltas:
            if m.kind.needs_base:
                raise UsageError(
                    m.name,
                    f"the sum of {m.kind.label} effective deltas depends on the base: pass --into BASE",
                )
        return LowRank(*_base_free_factors(module_deltas, weights, ctx.dtype, ctx.device))


@renamed({"adapters_or_paths": "adapters", "base": "into"},
         positional=("into", "out", "weights", "dtype", "device", "force", "progress"))  # fmt: skip
def sum_into_base(
    adapters,
    *,
    weights: Sequence[float] | None = None,
    into,
    out,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    force: bool = False,
    progress: bool = True,
):
    """``W = W0 + sum_i w_i dW_i`` for every adapted weight of the base model
    folder ``into``, written as a model folder ``out``:
    ``merge(adapters, "sum", into=into, out=out)``. ``adapters``: paths or
    loaded adapters (one alone is a list of one); ``weights``: one per
    adapter (default 1); ``device``, ``dtype`` (the output's; default the
    base's), ``force`` (replace an existing ``out``) and ``progress``: as
    :func:`merge` takes them. Returns what the engine wrote (a
    :class:`loramix.engine.StreamResult`: tensors, bytes, device, seconds),
    which is that merge's ``MergeResult.stream``; path-like,
    ``os.fspath(result)`` is ``out`` (:mod:`loramix.results`)."""
    res = merge(adapters, "sum", weights=weights, into=into, out=out,
                device=device, dtype=dtype, force=force, progress=progress)  # fmt: skip
    return res.stream


@renamed({"adapters_or_paths": "adapters"}, positional=("out", "weights", "force", "base", "dtype"))
def sum_adapters(
    adapters,
    *,
    weights: Sequence[float] | None = None,
    base=None,
    out,
    out_rank: int | None = None,
    energy: float | None = None,
    dtype: str | torch.dtype | None = None,
    force: bool = False,
) -> WrittenPath:
    """Write the exact sum ``sum_i w_i dW_i`` as one PEFT LoRA adapter folder
    ``out``: ``merge(adapters, "sum", out=out)`` without a base; ``adapters``
    and ``weights`` as :func:`sum_into_base` takes them, ``dtype`` the
    factors' written (default the adapters'), ``force`` replaces an
    existing ``out``. Per module
    ``B = [w_1 s_1 B_1 ...]`` (out, R), ``A = [A_1; ...]`` (R, in), scale 1.
    D2-LoRA and DoRA adapters are refused (their effective deltas depend on ``W0``).
    ``base`` (optional) checks that every module exists in it with a fitting
    shape. ``out_rank`` (``k``) or ``energy`` (a fraction in (0, 1]): the sum
    truncated by SVD from its factors, as ``loramix sum --out-rank`` /
    ``--energy`` writes it (``merge(..., "sum", out_rank=k)``, whose result
    also holds the discarded energy). Returns the folder written, the
    :class:`~pathlib.Path` it always returned, as a
    :class:`~loramix.results.WrittenPath`: path-like, ``out`` that path, and
    the merge's figures as :func:`merge`'s result has them (``summary``,
    ``weights``, ``params``; ``result``, the whole ``MergeResult``). No
    ``progress``: :func:`merge` draws its bar only for a model written."""
    ads = adapter_list(adapters)
    if base is not None:
        from ..adapter import Adapter
        from ..engine import resolve_targets
        from ..io.adapter_files import load_adapter
        from ..io.model_folder import BaseModelFolder

        ads = [a if isinstance(a, Adapter) else load_adapter(a) for a in ads]
        modules = list(dict.fromkeys(n for ad in ads for n in ad.modules))
        resolve_targets(base if isinstance(base, BaseModelFolder) else BaseModelFolder(base), modules, ads)
    res = merge(ads, "sum", weights=weights, out=out, dtype=dtype, device="cpu", force=force, out_rank=out_rank,
                energy=energy)  # fmt: skip
    return WrittenPath.of(res.out, result=res)  # the Path it returned before, with the merge's figures
