"""The in-memory adapter model that every part of loramix shares.

An adapter is a set of modules. Each module adapts one weight ``W0`` of shape
``out x in`` (``nn.Linear`` layout; a GPT-2 ``Conv1D`` stores ``in x out``, but
the factors below are the same, only the base tensor is transposed).

Each module belongs to an adapter kind (:mod:`loramix.kinds`: LoRA, D2-LoRA,
DoRA), which defines its residual as one factor pair and its effective delta::

    dW = Bf @ Af                         Bf: (out, k) scale folded in, Af: (k, in)
    LoRA:    Bf = s B, Af = A, k = r     s = alpha / r (alpha / sqrt(r) with rsLoRA)
    D2-LoRA: Bf = s [B, -tau B_neg], Af = [A; A_neg], k = 2r; the effective
             delta W_hat - W0 depends on W0 (loramix.d2lora)
    DoRA:    Bf = s B, Af = A, k = r; the effective delta
             m / ||W0 + dW||_row * (W0 + dW) - W0 depends on W0 (loramix.kinds.dora)

See ``docs/adapters.md``. Factors are kept as stored (fp32/fp16/bf16);
nothing forms ``B @ A`` unless a caller asks for a dense delta, one module at
a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import AdapterError
from .io.outputs import normalized_path
from .io.peft_layout import check_compatible, check_one_base  # noqa: F401  (torch-free: the numpy similarity)
from .kinds import D2LORA, LORA, AdapterKind, get_kind

__all__ = ["LORA", "D2LORA", "ModuleDelta", "Adapter", "check_compatible", "check_one_base"]


@dataclass
class ModuleDelta:
    """Low-rank factors of one adapted weight (see the module docstring).

    ``name`` is the module path inside the base model, as PEFT sees it (no
    ``base_model.model.`` prefix, no ``.weight`` suffix), e.g.
    ``transformer.h.0.attn.c_attn`` or ``model.layers.3.self_attn.q_proj``.
    """

    name: str
    B: torch.Tensor  # (out, r)
    A: torch.Tensor  # (r, in)
    scale: float
    alpha: float
    # D2-LoRA only: the negative branch, its weight and the projection axis.
    B_neg: torch.Tensor | None = None  # (out, r)
    A_neg: torch.Tensor | None = None  # (r, in)
    #: None: the kind's default, D2-LoRA's ``tau`` option (``D2_TAU``, 0.5, as for a
    #: file without ``tau``) for a D2 module, 0.0 (unused) for any other kind
    tau: float | None = None
    norm_dim: int = 1
    eps: float = 1e-8
    #: the adapter kind (a name or a kind object); by default D2-LoRA when a
    #: negative branch is given, else LoRA (the only two v0.1 wrote)
    kind: AdapterKind | str | None = None
    #: what a kind keeps beyond the fields above (its own tensors and options),
    #: so that a new kind needs no new field here
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.kind = get_kind(self.kind if self.kind is not None else (LORA if self.B_neg is None else D2LORA))
        if self.tau is None:
            self.tau = float(self.kind.options.get("tau", 0.0))  # the kind's: D2_TAU for D2-LoRA

    def __repr__(self) -> str:
        # shapes, not values: a notebook echoes the object, and torch's repr of
        # the factors ran to hundreds of lines per module
        return (f"ModuleDelta({self.name!r}, kind={self.kind.name!r}, shape={self.shape}, rank={self.rank}, "
                f"scale={self.scale:g}, dtype={self.dtype})")  # fmt: skip

    @property
    def rank(self) -> int:
        """Rank of one branch (``r``); a D2 residual has rank ``2r``."""
        return self.kind.rank(self)

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)`` of the delta, in ``nn.Linear`` layout."""
        return int(self.B.shape[0]), int(self.A.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    @property
    def num_parameters(self) -> int:
        return self.kind.num_parameters(self)

    def factors(self, dtype: torch.dtype = torch.float64, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual as one factor pair, scale folded into ``B``: ``(Bf, Af)``
        with ``dW = Bf @ Af``, ``(out, k)`` and ``(k, in)`` (the kind's
        :meth:`~loramix.kinds.base.AdapterKind.factors`)."""
        return self.kind.factors(self, dtype=dtype, device=device)

    def residual(self, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
        """Dense ``dW`` (out, in): the LoRA delta, or the D2 signed residual."""
        B, A = self.factors(dtype=dtype, device=device)
        return B @ A

    def delta(
        self, W0: torch.Tensor | None = None, dtype: torch.dtype = torch.float64, device=None
    ) -> torch.Tensor:
        """Dense effective delta (out, in): what merging adds to ``W0``.

        The residual, unless the kind ``needs_base`` (D2-LoRA, DoRA: ``W_hat -
        W0``, which needs ``W0`` in ``(out, in)`` layout)."""
        return self.kind.delta(self, W0, dtype=dtype, device=device)

    def squared_norm(self) -> float:
        """``||dW||_F^2`` of the residual from the factors, in float64:
        ``sum((Bf^T Bf) * (Af Af^T))``, cost O(r^2 (out + in)), computed in
        numpy as a path's numpy factors are
        (:func:`loramix.io.np_factors.factor_squared_norm`): the same value
        to the last bit."""
        from .io.np_factors import factor_squared_norm

        return factor_squared_norm(*self.factors())

    def norm(self) -> float:
        return math.sqrt(max(self.squared_norm(), 0.0))


@dataclass
class Adapter:
    """A loaded adapter: modules plus where it came from.

    ``modules`` maps module name to :class:`ModuleDelta`, in file order.
    ``config`` is the adapter's raw ``adapter_config.json``.
    """

    name: str
    kind: AdapterKind | str  # a kind object or its name ("lora", "d2lora")
    modules: dict[str, ModuleDelta]
    config: dict = field(default_factory=dict)
    path: Path | None = None  # the folder, or the .safetensors file given
    weights_path: Path | None = None
    sha256: str | None = None
    #: full replacement tensors (PEFT ``modules_to_save``): base tensor name
    #: as PEFT sees it (``lm_head.weight``, ``score.bias``) -> tensor
    saved: dict[str, torch.Tensor] = field(default_factory=dict)
    #: config and weights together (:func:`loramix.io.filehash.adapter_identity_of`), where
    #: read from files: ``sha256`` alone is one for two configs of the same weights
    identity: str | None = None

    def __post_init__(self):
        self.kind = get_kind(self.kind)

    def __repr__(self) -> str:
        # one line, as ModuleDelta's: the dataclass repr printed every module's factors
        ranks = sorted({m.rank for m in self.modules.values()})
        rank = f"rank={ranks[0]}" if len(ranks) == 1 else f"ranks={ranks}"
        saved = f", saved={sorted(self.saved)}" if self.saved else ""
        path = None if self.path is None else str(self.path)
        return (f"Adapter({self.name!r}, kind={self.kind.name!r}, modules={len(self.modules)}, {rank}, "
                f"parameters={self.num_parameters}{saved}, path={path!r})")  # fmt: skip

    @property
    def method(self) -> str:
        """Deprecated name of :attr:`kind` (v0.1), as a plain string."""
        return self.kind.name

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def num_parameters(self) -> int:
        return sum(m.num_parameters for m in self.modules.values())

    def __len__(self) -> int:
        return len(self.modules)

    def __iter__(self):
        return iter(self.modules.values())

    def provenance(self) -> dict:
        return {
            "name": self.name,
            "path": None if self.path is None else normalized_path(self.path),
            "sha256": self.sha256,
            "identity": self.identity,
            "kind": self.kind.name,
        }


def saved_copies(adapters) -> dict[str, tuple[torch.Tensor, Adapter]]:
    """The adapters' ``modules_to_save`` copies: base tensor name (as PEFT
    names it, ``lm_head.weight``) -> (tensor, the first adapter carrying it).
    Several adapters carrying one tensor must carry equal copies, else
    :class:`AdapterError` names the tensor and both adapters."""
    out: dict[str, tuple[torch.Tensor, Adapter]] = {}
    for ad in adapters:
        for name, t in ad.saved.items():
            if name in out:
                t0, other = out[name]
                if t0.shape != t.shape or not torch.equal(t0, t.to(t0.dtype)):
                    raise AdapterError(
                        ad.path or ad.name,
                        f"modules_to_save tensor {name} differs from the one in {other.path or other.name}: "
                        "a merge cannot keep both full copies",
                    )
                continue
            out[name] = (t, ad)
    return out


def warn_unscaled_copies(adapters, weights: Sequence[float]) -> None:
    """Warn (:class:`~loramix.errors.LoramixWarning`) where an adapter
    weighted other than 1 carries ``modules_to_save`` copies: a copy is a
    full tensor put in place of the base's, so its weight does not scale it
    (``W0 + w (copy - W0)`` would be a guess at what the user meant)."""

    from .errors import warn

    hit = [f"{ad.path or ad.name} (weight {w:g}: {', '.join(sorted(ad.saved))})"
           for ad, w in zip(adapters, weights) if ad.saved and w != 1.0]  # fmt: skip
    if hit:
        warn(f"modules_to_save copies are full tensors and are put in whole, not scaled by their "
             f"adapter's weight: {'; '.join(hit)}")  # fmt: skip


def saved_tensors(adapters) -> dict[str, torch.Tensor]:
    """:func:`saved_copies` without the adapters: name -> tensor."""
    return {n: t for n, (t, _) in saved_copies(adapters).items()}
