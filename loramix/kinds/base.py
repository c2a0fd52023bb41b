"""What every adapter kind provides, and the frozen-base wrapper its layers share.

An adapter kind (LoRA, D2-LoRA, ...) is one :class:`AdapterKind` subclass in
one file of this package. It is a ``str`` whose value is the kind's name as
files and configs spell it (``"lora"``, ``"d2lora"``), so it compares equal
to that string, hashes like it and writes to JSON as it, while callers ask it
for what differs between kinds instead of branching on the name:

* ``needs_base``: whether the effective delta depends on the base weight ``W0``;
* :meth:`AdapterKind.scaled_factors` / :meth:`AdapterKind.factors`: the
  module's residual as one pair, ``dW = s * B @ A = Bf @ Af``;
* :meth:`AdapterKind.delta`: the dense effective delta given ``W0``;
  :meth:`AdapterKind.norm_axis` and :meth:`AdapterKind.gains`: the same as
  per-row or per-column gains on ``W0`` and ``dW``, from two norms;
* :meth:`AdapterKind.layer`: its trainable layer, and
  :meth:`AdapterKind.attach_terms`: how a loaded module applies on the fly;
* :meth:`AdapterKind.tensors` / :meth:`AdapterKind.from_tensors` and
  :meth:`AdapterKind.save`: how it is stored;
* ``embedding``: whether it is defined on an embedding (PEFT's
  ``lora_embedding_A`` / ``_B``; such a module has ``extra["layout"] ==
  "embedding"``).

Shapes: ``W0`` and every delta are ``(out, in)`` (``nn.Linear`` layout);
``B`` ``(out, k)``, ``A`` ``(k, in)``; see ``docs/adapters.md``. An embedding
module is written in its weight's own layout, ``(vocab, dim)``: ``out`` is
the vocabulary (the rows a lookup selects) and ``in`` the embedding width
(the lookup's output features).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from ..adapter import ModuleDelta


@dataclass
class AttachTerms:
    """One loaded module's contribution to :class:`loramix.layers.AttachedLinear`.

    ``y += gain * (W0 x) + B (A x) + extra(x)``: ``gain`` ``(out,)`` or None,
    ``B`` ``(out, k)`` and ``A`` ``(k, in)`` join the layer's concatenated
    low-rank pair, ``extra`` (``x, layer -> (..., out)``) is for what does not
    fold into them. The module's weight is already applied.

    For an embedding module (:class:`loramix.layers.AttachedEmbedding`,
    ``W0 = E0`` ``(vocab, dim)``): ``y += gain * E0[ids] + B[ids] @ A``, so
    ``gain`` is ``(dim,)`` (the lookup's output features), ``B`` ``(vocab,
    k)`` and ``A`` ``(k, dim)``; ``extra`` is not allowed.
    """

    B: torch.Tensor
    A: torch.Tensor
    gain: torch.Tensor | None = None
    extra: Callable[[torch.Tensor, Any], torch.Tensor] | None = None


class AdapterKind(str):
    """Base class of the adapter kinds (see the module docstring).

    A subclass sets ``id`` (its name on disk), ``label`` (for people),
    ``peft_type`` (the config's ``peft_type``), ``parts`` (tensor-key parts of
    one module, each mapped to its ``(factor, branch)``), ``options`` (the
    hyperparameters its layer takes beyond rank and alpha, with defaults) and
    ``needs_base``, and implements :meth:`scaled_factors`, :meth:`layer`,
    :meth:`from_tensors`, :meth:`tensors` and :meth:`save`. A kind that sets
    ``embedding`` handles modules with ``extra["layout"] == "embedding"`` in
    :meth:`delta` and :meth:`attach_terms` (see :class:`AttachTerms`).
    """

    id: ClassVar[str] = ""
    label: ClassVar[str] = ""
    peft_type: ClassVar[str] = ""
    parts: ClassVar[dict[str, tuple[str, str]]] = {}
    options: ClassVar[dict[str, Any]] = {}
    needs_base: ClassVar[bool] = False
    #: loramix trains it (:meth:`layer`), so a study may list it; read from the
    #: kind's file (:func:`loramix.scenario.traits.trainable_kinds`)
    trainable: ClassVar[bool] = True
    #: defined on an embedding (PEFT's embedding LoRA); else such modules are refused
    embedding: ClassVar[bool] = False

    def __new__(cls):
        return super().__new__(cls, cls.id)

    @property
    def name(self) -> str:
        return str.__str__(self)

    def __reduce__(self):
        # Pickles (process pools) resolve to the registered singleton.
        from . import get_kind

        return (get_kind, (self.name,))

    # ---- math
    def scaled_factors(
        self, m: ModuleDelta, dtype: torch.dtype = torch.float64, device=None
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(B, A, s)`` with the residual ``dW = s * B @ A``; ``B`` (out, k), ``A`` (k, in)."""
        raise NotImplementedError

    def factors(self, m: ModuleDelta, dtype: torch.dtype = torch.float64, device=None):
        """``(Bf, Af)`` with ``dW = Bf @ Af``: the scale folded into ``B``."""
        B, A, s = self.scaled_factors(m, dtype=dtype, device=device)
        return B * s, A

    def delta(self, m: ModuleDelta, W0: torch.Tensor | None, dtype=torch.float64, device=None):
        """Dense effective delta (out, in): what merging adds to ``W0``.

        The residual ``Bf @ Af`` unless the kind ``needs_base`` (then ``W0``,
        ``(out, in)``, is required)."""
        B, A = self.factors(m, dtype=dtype, device=device)
        return B @ A

    def based_factors(self, m: ModuleDelta, W0: torch.Tensor, dtype=torch.float64, device=None):
        """``(Bf, Af)``: the pair similarity against a base stacks for ``m``
        given ``W0`` (out, in). The residual's (:meth:`factors`), which the
        gains of :meth:`norm_axis` then scale; a kind whose effective delta is
        low rank once ``W0`` is known (PiSSA, OLoRA) returns that delta's pair."""
        return self.factors(m, dtype=dtype, device=device)

    def norm_axis(self, m: ModuleDelta) -> int | None:
        """For a kind that ``needs_base``, the axis its norms run along (1: one per
        output row, 0: one per input column), so that the effective delta is
        ``g0 * W0 + g1 * dW`` with gains ``(g0, g1)`` from :meth:`gains` scaling
        the rows (``(out,)``) or the columns (``(in,)``). None: the residual is
        the effective delta."""
        return None

    def gains(self, m: ModuleDelta, w0_sq: torch.Tensor, v_sq: torch.Tensor):
        """``(g0, g1)`` along :meth:`norm_axis` from ``w0_sq = ||W0||_n^2`` and
        ``v_sq = ||W0 + dW||_n^2`` (both that axis's length): what
        :meth:`delta` forms densely, from the norms alone (similarity against a
        base, ``docs/adapters.md``)."""
        raise NotImplementedError

    def rank(self, m: ModuleDelta) -> int:
        """Rank of one branch (the ``r`` of the config)."""
        return int(m.A.shape[0])

    def num_parameters(self, m: ModuleDelta) -> int:
        return sum(t.numel() for t in self.tensors(m).values())

    # ---- layers
    def layer(self, base: nn.Module, rank: int, alpha: float, *, generator=None, **options) -> nn.Module:
        """A trainable layer around ``base`` (options: the kind's ``options``)."""
        raise NotImplementedError

    def attach_terms(
        self, W0: torch.Tensor, weight: float, m: ModuleDelta, dtype: torch.dtype
    ) -> AttachTerms:
        """How ``weight * (effective delta of m)`` applies on the fly; ``W0``
        (out, in) float64. Default: the residual as one low-rank pair."""
        Bf, Af = self.factors(m, dtype=torch.float64, device=W0.device)
        return AttachTerms(B=weight * Bf, A=Af)

    # ---- storage
    def from_tensors(
        self, name: str, fs: dict, config: dict, *, scale: float, alpha: float, embedding: bool = False
    ) -> ModuleDelta:
        """A :class:`ModuleDelta` from the module's tensors ``{(factor, branch): t}``
        and the adapter config. ``embedding``: the factors are an embedding's,
        already in its weight's layout (``B`` ``(vocab, r)``, ``A`` ``(r,
        dim)``); the module gets ``extra["layout"] = "embedding"``. Raises
        ``ValueError`` (a message) on a mismatch, also for an embedding module
        of a kind that is not ``embedding``."""
        raise NotImplementedError

    def tensors(self, m: ModuleDelta) -> dict[str, torch.Tensor]:
        """``{part: tensor}`` as stored (the inverse of :meth:`from_tensors`)."""
        raise NotImplementedError

    def save(self, out_dir, modules: dict, *, rank: int, alpha: float, **kw):
        """Write ``modules`` (name -> ModuleDelta) as this kind's adapter folder."""
        raise NotImplementedError


def missing_part(fs: dict, parts: dict[str, tuple[str, str]], module: str) -> None:
    """Raise ``ValueError`` naming the first factor of ``parts`` that ``fs`` lacks
    while its partner (the other factor of the same branch) is there."""
    by_key = {v: k for k, v in parts.items()}
    for (fac, br), label in by_key.items():
        if (fac, br) not in fs:
            other = by_key.get(("B" if fac == "A" else "A", br), "another factor")
            raise ValueError(f"module {module} has {other} but no {label}")


#: ``ModuleDelta.extra["layout"]`` of a module that adapts an embedding
EMBEDDING = "embedding"


def is_embedding(m: ModuleDelta) -> bool:
    """Whether ``m`` adapts an embedding (factors in the weight's ``(vocab, dim)`` layout)."""
    return m.extra.get("layout") == EMBEDDING


def layout_extra(kind: AdapterKind, name: str, embedding: bool) -> dict:
    """``extra`` for a new module: the embedding layout, or ``{}``; a kind that
    is not ``embedding`` refuses one (``ValueError`` naming the module)."""
    if not embedding:
        return {}
    if not kind.embedding:
        raise ValueError(
            f"module {name}: {kind.label} on an embedding is not supported (loramix defines it on linear layers only)"
        )
    return {"layout": EMBEDDING}


def check_rank(rank: int) -> None:
    if rank < 1:
        raise UsageError("--rank", f"rank must be at least 1, got {rank}")


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return ()
    return Conv1D


def is_adaptable(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a transformers ``Conv1D``."""
    conv = _conv1d_class()
    return isinstance(module, nn.Linear) or (bool(conv) and isinstance(module, conv))


class Wrapped(nn.Module):
    """Holds the frozen base projection and hides its storage layout.

    ``base`` is an ``nn.Linear`` (weight ``W0`` stored ``(out, in)``) or a
    GPT-2 ``Conv1D`` (stored ``(in, out)``, PEFT's ``fan_in_fan_out``);
    :meth:`base_weight` is ``W0`` as an ``(out, in)`` view either way.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        if not is_adaptable(base):
            raise TypeError(f"cannot adapt {type(base).__name__}: only nn.Linear and Conv1D")
        self.base = base
        # GPT-2's Conv1D stores W0^T: (in, out).
        self.fan_in_fan_out = not isinstance(base, nn.Linear)
        w = base.weight
        self.out_features, self.in_features = (w.shape[1], w.shape[0]) if self.fan_in_fan_out else w.shape

    def base_weight(self) -> torch.Tensor:
        """``W0`` as an ``(out, in)`` view (no copy)."""
        w = self.base.weight
        return w.T if self.fan_in_fan_out else w

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def base_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``W0 x`` without the bias, ``(..., in) -> (..., out)``."""
        if self.fan_in_fan_out:
            return x @ self.base.weight
        return F.linear(x, self.base.weight)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fan_in_fan_out={self.fan_in_fan_out}"


class TrainableLayer(Wrapped):
    """A kind's trainable layer: its factors are the parameters that train.

    Subclasses set ``kind``, ``scale`` and ``alpha``, name their factor
    parameters as the kind's ``parts`` and implement ``forward``,
    :meth:`residual` (dense ``dW``, float64, detached) and
    :meth:`merged_weight` (what merging writes, ``(out, in)`` float64).
    """

    kind: ClassVar[AdapterKind]

    def residual(self) -> torch.Tensor:
        raise NotImplementedError

    def merged_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def module_delta(self, name: str) -> ModuleDelta:
        """The trained factors as a :class:`ModuleDelta` (detached CPU copies).

        The layer's parameters carry the kind's part names (``lora_A``, ...)
        and its options (``tau``, ...) are attributes, so the kind builds the
        module exactly as it would from a file."""
        fs = {fb: getattr(self, part).detach().clone().cpu() for part, fb in self.kind.parts.items()}
        options = {k: getattr(self, k) for k in self.kind.options}
        return self.kind.from_tensors(name, fs, options, scale=self.scale, alpha=self.alpha)


@torch.no_grad()
def kaiming_(t: torch.Tensor, generator: torch.Generator | None) -> None:
    """PEFT's LoRA ``A`` init, ``kaiming_uniform_(a=sqrt(5))``: uniform on ``+-1/sqrt(in)``.

    Drawn on the CPU in float32 and copied, so a seed gives the same factors on any device."""
    tmp = torch.empty(t.shape, dtype=torch.float32)
    nn.init.kaiming_uniform_(tmp, a=math.sqrt(5), generator=generator)
    t.copy_(tmp)
