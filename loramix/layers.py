"""Adapter layers: trainable LoRA and D2-LoRA, and loaded adapters applied to a model.

Every layer here wraps one frozen base projection ``base``: a ``torch.nn.Linear``
(weight ``W0`` stored ``(out, in)``) or a transformers GPT-2 ``Conv1D`` (weight
stored ``(in, out)``, i.e. ``W0.T``; PEFT's ``fan_in_fan_out``). The math is
written in ``nn.Linear`` layout throughout; :meth:`_Wrapped.base_weight` gives
``W0`` as an ``(out, in)`` view either way, and the only place the Conv1D
transpose matters is :meth:`_Wrapped.base_matmul` and the in-place merge.

Shapes: ``x`` is ``(..., in)``, ``y`` is ``(..., out)``, ``r`` the rank.

LoRA (:class:`LoraLinear`)::

    y = base(x) + s * (x @ A^T) @ B^T       A: (r, in), B: (out, r), s = alpha / r

D2-LoRA (:class:`D2LoraLinear`, DESIGN.md section 4)::

    dW    = s * (B+ A+ - tau * B- A-)                  (out, in), rank 2r, s = alpha / r
    V     = W0 + dW
    c     = ||W0||_n / max(||V||_n, eps)               one factor per output unit (norm_dim=1)
    W*    = c * V
    y     = W* x + dW x + b                            training forward
    W_hat = W* + dW                                    merged weight: same y, to rounding

The D2 layer's forward materialises neither ``dW`` nor ``W_hat``. With
the residual as one factor pair ``dW = Bf @ Af`` (``Bf = s [B+, -tau B-]``
``(out, 2r)``, ``Af = [A+; A-]`` ``(2r, in)``) the row norms follow from

    ||V_i||^2 = ||W0_i||^2 + 2 <W0_i, dW_i> + ||dW_i||^2
              = n0_i + 2 sum_k (W0 Af^T)_ik Bf_ik + sum_k (Bf (Af Af^T))_ik Bf_ik

at ``O(out * in * 2r)``, with ``||W0||^2`` cached, and the forward becomes

    y = c * (W0 x) + ((c + 1) * Bf) (Af x) + b

so the dense weight never needs a gradient; only ``c`` (a vector) and the
low-rank factors do. ``norm_dim=0`` (one norm per input column) is the same
with the roles of rows and columns exchanged:
``y = W0 (c * x) + Bf (Af ((c + 1) * x)) + b``.

Init (``inject_trainable``): ``B+ = B- = 0`` so ``dW = 0`` and the model starts
as the base; ``A+`` and ``A-`` are each drawn Kaiming-uniform with
``a = sqrt(5)`` (PEFT's LoRA init: uniform on ``+-1/sqrt(in)``), independently,
from one generator seeded by ``seed``, module by module in model order. With
``A+ = A-`` the loss would depend on ``B+ - tau B-`` alone at the start, the two
``B`` gradients would be proportional, and the residual would begin as one
rank-r branch; independent draws give it rank 2r from the first step.

Loaded adapters (:func:`attach_adapters`, :func:`merge_into_model`) apply a
weighted sum of *effective* deltas: LoRA ``s B A``; D2 ``W_hat - W0``. On the
fly, every LoRA and every row-norm D2 adapter of a module folds into one
concatenated low-rank pair plus one per-row gain on ``W0 x``:

    y = (1 + sum_i w_i (c_i - 1)) * (W0 x) + b + [w_1 s_1 B_1 | w_2 (c_2 + 1) Bf_2 | ...] [A_1; Af_2; ...] x

one dense product per module whatever the number of adapters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import D2LORA, LORA, Adapter, ModuleDelta
from .errors import AdapterError, UsageError

__all__ = [
    "LoraLinear",
    "D2LoraLinear",
    "AttachedLinear",
    "default_targets",
    "find_targets",
    "inject_trainable",
    "extract_modules",
    "attach_adapters",
    "merge_into_model",
    "detach",
    "restore_weights",
    "wrapped_modules",
    "d2_norm_scale",
]



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


# --------------------------------------------------------------------------- base wrapper


class _Wrapped(nn.Module):
    """Holds the frozen base projection and hides its storage layout."""

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


@torch.no_grad()
def _kaiming_(t: torch.Tensor, generator: torch.Generator | None) -> None:
    # PEFT's LoRA A init: kaiming_uniform_(a=sqrt(5)) = uniform(-1/sqrt(in), 1/sqrt(in)).
    # Drawn on CPU in float32 and copied, so a seed gives the same factors on any device.
    tmp = torch.empty(t.shape, dtype=torch.float32)
    nn.init.kaiming_uniform_(tmp, a=math.sqrt(5), generator=generator)
    t.copy_(tmp)


# --------------------------------------------------------------------------- LoRA


class LoraLinear(_Wrapped):
    """LoRA around a frozen linear projection.

    ``y = base(x) + s * (x @ A^T) @ B^T`` with ``A`` ``(r, in)``, ``B``
    ``(out, r)``, ``s = alpha / r``. ``B`` starts at zero, ``A``
    Kaiming-uniform (``a = sqrt(5)``), as PEFT does, so the adapted layer
    starts equal to ``base``. The factors are float32 unless ``dtype`` says
    otherwise; the input is cast to them and the result back.
    """

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        alpha: float,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__(base)
        if rank < 1:
            raise UsageError("--rank", f"rank must be at least 1, got {rank}")
        self.rank, self.alpha = int(rank), float(alpha)
        self.scale = self.alpha / self.rank
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=dtype))
        _kaiming_(self.lora_A, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        u = x.to(self.lora_A.dtype) @ self.lora_A.T  # (..., r)
        return y + (u @ self.lora_B.T * self.scale).to(y.dtype)

    def residual(self) -> torch.Tensor:
        """Dense ``dW = s B A`` ``(out, in)``, float64, detached (for checks and merging)."""
        return self.scale * (self.lora_B.detach().double() @ self.lora_A.detach().double())

    def merged_weight(self) -> torch.Tensor:
        """``W0 + dW`` ``(out, in)``, float64."""
        return self.base_weight().detach().double() + self.residual()

    def module_delta(self, name: str) -> ModuleDelta:
        return ModuleDelta(
            name=name,
            B=self.lora_B.detach().clone().cpu(),
            A=self.lora_A.detach().clone().cpu(),
            scale=self.scale,
            alpha=self.alpha,
        )


# --------------------------------------------------------------------------- D2-LoRA


def d2_norm_scale(
    W0: torch.Tensor,
    Bf: torch.Tensor,
    Af: torch.Tensor,
    *,
    norm_dim: int = 1,
    eps: float = 1e-8,
    w0_sq: torch.Tensor | None = None,
    w0_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """``c = ||W0||_n / max(||W0 + Bf Af||_n, eps)`` without forming ``Bf Af``.

    ``W0`` ``(out, in)``, ``Bf`` ``(out, k)``, ``Af`` ``(k, in)``. Returns
    ``(out,)`` for ``norm_dim=1`` (a norm per output row) or ``(in,)`` for
    ``norm_dim=0`` (per input column). ``w0_sq`` is ``||W0||_n^2`` if already
    known (it is cached by :class:`D2LoraLinear`, with ``w0_norm = sqrt(w0_sq)``).
    Cost ``O(out * in * k)`` plus ``O((out + in) k^2)``; differentiable in
    ``Bf`` and ``Af``.

    Row case: ``||V_i||^2 = ||W0_i||^2 + 2 sum_k (W0 Af^T)_ik Bf_ik +
    sum_k (Bf G)_ik Bf_ik`` with ``G = Af Af^T``. Column case: the transpose,
    ``W0^T Bf`` and ``H = Bf^T Bf``.
    """
    if w0_sq is None:
        w0_sq = W0.double().pow(2).sum(dim=norm_dim).to(Bf.dtype)
    # A 16-bit base is multiplied in its own dtype (fp32 accumulation) rather than
    # copied to fp32 every step; fp32/fp64 bases keep full precision.
    mm = W0.dtype if W0.dtype in (torch.float16, torch.bfloat16) else Bf.dtype
    W0 = W0.to(mm)
    if norm_dim == 1:
        cross = ((Af.to(mm) @ W0.T).to(Bf.dtype).T * Bf).sum(1)  # <W0_i, dW_i>, (out,)
        own = ((Bf @ (Af @ Af.T)) * Bf).sum(1)  # ||dW_i||^2
    elif norm_dim == 0:
        cross = ((W0.T @ Bf.to(mm)).to(Bf.dtype) * Af.T).sum(1)  # <W0_:j, dW_:j>, (in,)
        own = ((Af.T @ (Bf.T @ Bf)) * Af.T).sum(1)
    else:
        raise UsageError("--norm-dim", f"norm_dim must be 0 or 1, got {norm_dim}")
    v_sq = (w0_sq + 2 * cross + own).clamp_min(eps * eps)  # sqrt(max(.,eps^2)) = max(||V||, eps)
    return (w0_sq.sqrt() if w0_norm is None else w0_norm) / v_sq.sqrt()


class D2LoraLinear(_Wrapped):
    """D2-LoRA around a frozen linear projection (DESIGN.md section 4).

    Parameters: ``A+``, ``A-`` ``(r, in)``; ``B+``, ``B-`` ``(out, r)``;
    ``s = alpha / r``; ``tau`` fixed; ``norm_dim`` 1 (one norm per output
    unit, as DoRA) or 0 (per input column); ``eps`` guards the division.

        dW = s (B+ A+ - tau B- A-),  V = W0 + dW,  c = ||W0||_n / max(||V||_n, eps)
        y  = c * V x + dW x + b = (W* + dW) x + b

    The default forward never forms ``dW`` (see the module docstring);
    ``dense=True`` selects the reference forward that builds
    ``W_hat = W* + dW`` with :func:`loramix.d2lora.d2_merged_weight` and calls
    ``F.linear`` (kept for tests and the benchmark). ``||W0||_n^2`` is cached
    at construction: the base is frozen.
    """

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        alpha: float,
        *,
        tau: float = 0.5,
        norm_dim: int = 1,
        eps: float = 1e-8,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        dense: bool = False,
    ):
        super().__init__(base)
        if rank < 1:
            raise UsageError("--rank", f"rank must be at least 1, got {rank}")
        if norm_dim not in (0, 1):
            raise UsageError("--norm-dim", f"norm_dim must be 0 or 1, got {norm_dim}")
        self.rank, self.alpha = int(rank), float(alpha)
        self.scale = self.alpha / self.rank
        self.tau, self.norm_dim, self.eps, self.dense = float(tau), int(norm_dim), float(eps), dense
        dev = base.weight.device
        self.lora_A_pos = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=dtype))
        self.lora_A_neg = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=dtype))
        self.lora_B_pos = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=dtype))
        self.lora_B_neg = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=dtype))
        _kaiming_(self.lora_A_pos, generator)
        _kaiming_(self.lora_A_neg, generator)
        # ||W0||_n^2, accumulated in float64; not saved with the model (derivable from W0).
        w0_sq = self.base_weight().detach().double().pow(2).sum(dim=self.norm_dim)
        self.register_buffer("w0_sq", w0_sq.to(dtype), persistent=False)
        self.register_buffer("w0_norm", w0_sq.sqrt().to(dtype), persistent=False)

    def factors(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Bf, Af)`` with ``dW = Bf @ Af``: ``(out, 2r)`` and ``(2r, in)``."""
        Bp, Bn, Ap, An = self.lora_B_pos, self.lora_B_neg, self.lora_A_pos, self.lora_A_neg
        if dtype is not None:
            Bp, Bn, Ap, An = (t.to(dtype) for t in (Bp, Bn, Ap, An))
        Bf = torch.cat([Bp, Bn * (-self.tau)], dim=1) * self.scale
        Af = torch.cat([Ap, An], dim=0)
        return Bf, Af

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense:
            return self._dense_forward(x)
        Bf, Af = self.factors()
        W0 = self.base_weight()
        c = d2_norm_scale(
            W0, Bf, Af, norm_dim=self.norm_dim, eps=self.eps, w0_sq=self.w0_sq, w0_norm=self.w0_norm
        )
        shape = x.shape[:-1] + (self.out_features,)
        x2 = x.reshape(-1, self.in_features)  # (T, in)
        xf = x2.to(Af.dtype)
        bias = None if self.bias is None else self.bias.to(Af.dtype)
        if self.norm_dim == 1:
            # y = c * (W0 x) + ((c + 1) * Bf)(Af x) + b: the bias rides in the low-rank
            # GEMM (addmm) and c in one fused multiply-add, so beyond the GEMMs the D2
            # forward makes one pass over the (T, out) output, as LoRA's add does.
            h = self.base_matmul(x2).to(Af.dtype)  # W0 x, in the base dtype as base(x) would
            Bc = (c + 1).unsqueeze(1) * Bf  # (out, 2r)
            u = xf @ Af.T  # (T, 2r)
            low = u @ Bc.T if bias is None else torch.addmm(bias, u, Bc.T)
            y = torch.addcmul(low, h, c)
        else:
            # y = W0 (c * x) + Bf (Af ((c + 1) * x)) + b
            h = self.base_matmul((xf * c).to(x.dtype)).to(Af.dtype)
            y = h + ((xf * (c + 1)) @ Af.T) @ Bf.T
            if bias is not None:
                y = y + bias
        return y.reshape(shape).to(x.dtype)

    def _dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        from .d2lora import d2_merged_weight

        Bf, Af = self.factors()
        W0 = self.base_weight().to(Af.dtype)
        W_hat = d2_merged_weight(W0, Bf @ Af, norm_dim=self.norm_dim, eps=self.eps)
        b = None if self.bias is None else self.bias.to(Af.dtype)
        return F.linear(x.to(Af.dtype), W_hat, b).to(x.dtype)

    def residual(self) -> torch.Tensor:
        """Dense signed residual ``dW`` ``(out, in)``, float64, detached."""
        with torch.no_grad():
            Bf, Af = self.factors(torch.float64)
            return Bf @ Af

    def merged_weight(self) -> torch.Tensor:
        """``W_hat = W* + dW`` ``(out, in)``, float64, detached."""
        from .d2lora import d2_merged_weight

        W0 = self.base_weight().detach().double()
        return d2_merged_weight(W0, self.residual(), norm_dim=self.norm_dim, eps=self.eps)

    def module_delta(self, name: str) -> ModuleDelta:
        return ModuleDelta(
            name=name,
            B=self.lora_B_pos.detach().clone().cpu(),
            A=self.lora_A_pos.detach().clone().cpu(),
            scale=self.scale,
            alpha=self.alpha,
            B_neg=self.lora_B_neg.detach().clone().cpu(),
            A_neg=self.lora_A_neg.detach().clone().cpu(),
            tau=self.tau,
            norm_dim=self.norm_dim,
            eps=self.eps,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.rank}, tau={self.tau}, norm_dim={self.norm_dim}"


# --------------------------------------------------------------------------- loaded adapters


class AttachedLinear(_Wrapped):
    """A weighted sum of loaded adapters' effective deltas, applied on the fly.

    Built from ``(weight, ModuleDelta)`` pairs. LoRA and row-norm D2 modules
    fold into one low-rank pair ``(B_cat, A_cat)`` and one per-output gain
    ``gamma = sum_i w_i (c_i - 1)`` (``c_i`` the D2 norm ratio, computed once
    here in float64, since nothing trains):

        y = (1 + gamma) * (W0 x) + b + B_cat (A_cat x)

    Column-norm D2 modules (``norm_dim=0``) add
    ``w (W0 ((c - 1) * x) + Bf (Af ((c + 1) * x)))`` each. Frozen buffers only.
    """

    def __init__(self, base: nn.Module, entries: Sequence[tuple[float, ModuleDelta]]):
        super().__init__(base)
        W0 = self.base_weight().detach().double()
        dev, dt = W0.device, self.base.weight.dtype
        if dt not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            dt = torch.float32
        Bs, As = [], []
        gamma = torch.zeros(self.out_features, dtype=torch.float64, device=dev)
        cols = []  # (c - 1, c + 1, Bf, Af) for norm_dim=0 modules
        for w, m in entries:
            Bf, Af = m.factors(dtype=torch.float64, device=dev)
            if m.kind == LORA:
                Bs.append(w * Bf)
                As.append(Af)
                continue
            c = d2_norm_scale(W0, Bf, Af, norm_dim=m.norm_dim, eps=m.eps)
            if m.norm_dim == 1:
                gamma += w * (c - 1)
                Bs.append(w * (c + 1).unsqueeze(1) * Bf)
                As.append(Af)
            else:
                cols.append(((w * (c - 1)).to(dt), (c + 1).to(dt), (w * Bf).to(dt), Af.to(dt)))
        self.has_gain = bool(gamma.abs().max() > 0) if gamma.numel() else False
        self.register_buffer("gain", (1 + gamma).to(dt), persistent=False)
        B_cat = (
            torch.cat(Bs, dim=1) if Bs else torch.zeros(self.out_features, 0, dtype=torch.float64, device=dev)
        )
        A_cat = (
            torch.cat(As, dim=0) if As else torch.zeros(0, self.in_features, dtype=torch.float64, device=dev)
        )
        self.register_buffer("B_cat", B_cat.to(dt), persistent=False)
        self.register_buffer("A_cat", A_cat.to(dt), persistent=False)
        self._cols = cols
        self.n_adapters = len(entries)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_gain:
            y = self.base_matmul(x) * self.gain
            if self.bias is not None:
                y = y + self.bias
        else:
            y = self.base(x)
        if self.A_cat.shape[0]:
            y = y + ((x.to(self.A_cat.dtype) @ self.A_cat.T) @ self.B_cat.T).to(y.dtype)
        for cm1, cp1, Bf, Af in self._cols:
            xf = x.to(Af.dtype)
            y = y + (self.base_matmul((xf * cm1).to(x.dtype)) + ((xf * cp1) @ Af.T) @ Bf.T).to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, adapters={self.n_adapters}, rank={self.A_cat.shape[0]}"


# --------------------------------------------------------------------------- model surgery


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def wrapped_modules(model: nn.Module, kind: type | tuple = _Wrapped) -> dict[str, _Wrapped]:
    """``{name: wrapper}`` of loramix layers in ``model``, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, kind)}


def default_targets(model: nn.Module) -> list[str]:
    """Target suffixes for ``model``'s architecture (``config.model_type``)."""
    from .archs import ARCHS, arch

    mt = getattr(getattr(model, "config", None), "model_type", None)
    a = arch(mt)
    if a and a.targets:
        return list(a.targets)
    # Unknown architecture: the first known architecture's projections present in the model.
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_adaptable(m)}
    for cand in (x.targets for x in ARCHS.values() if x.targets):
        if names & set(cand):
            return [t for t in cand if t in names]
    raise UsageError("--targets", f"no default target modules for model type {mt!r}; pass --targets")


def find_targets(model: nn.Module, targets: str | Iterable[str] | None) -> list[str]:
    """Names of the modules ``targets`` selects, by PEFT's rule.

    A list: a module ``m`` matches ``t`` when ``m == t`` or ``m`` ends with
    ``"." + t``. A single string: ``re.fullmatch`` on the module name (PEFT's
    regex form). ``None``: :func:`default_targets`. Only ``nn.Linear`` and
    ``Conv1D`` may be targeted; anything else matched is an error, as is no
    match at all.
    """
    import re

    if targets is None:
        targets = default_targets(model)
    if isinstance(targets, str):
        pattern = targets

        def match(n: str) -> bool:
            return re.fullmatch(pattern, n) is not None
    else:
        tl = list(targets)

        def match(n: str) -> bool:
            return any(n == t or n.endswith("." + t) for t in tl)

    names = []
    for n, m in model.named_modules():
        if not n or isinstance(m, _Wrapped) or not match(n):
            continue
        if isinstance(model.get_submodule(n.rpartition(".")[0]) if "." in n else model, _Wrapped):
            continue  # the .base inside one of our wrappers
        if not is_adaptable(m):
            raise UsageError(
                "--targets", f"module {n} is a {type(m).__name__}; only Linear/Conv1D can be adapted"
            )
        names.append(n)
    if not names:
        # Say what there is to target: the adaptable modules' short names, and one full name.
        full = [n for n, m in model.named_modules() if n and is_adaptable(m)]
        short = sorted({n.rpartition(".")[2] for n in full})
        raise UsageError(
            "--targets",
            f"no module of the model matches {targets}; its Linear/Conv1D modules are "
            f"{', '.join(short) or 'none'}" + (f" (full names like {full[0]})" if full else ""),
        )
    return names


def inject_trainable(
    model: nn.Module,
    *,
    method: str = LORA,
    rank: int = 8,
    alpha: float = 16,
    targets: str | Iterable[str] | None = None,
    tau: float = 0.5,
    norm_dim: int = 1,
    eps: float = 1e-8,
    seed: int = 0,
    dense: bool = False,
) -> list[nn.Parameter]:
    """Wrap the target modules with trainable LoRA or D2-LoRA layers, in place.

    Every existing parameter of ``model`` is frozen; the new factors are the
    only trainable ones and are returned (in model order: for each module
    ``A, B`` or ``A+, A-, B+, B-``). Initialisation is drawn from a generator
    seeded with ``seed`` (see the module docstring), independent of the
    global RNG, so the same call gives the same factors.
    """
    if method not in (LORA, D2LORA):
        raise UsageError("--method", f"unknown method {method!r}; choose lora or d2lora")
    names = find_targets(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    params: list[nn.Parameter] = []
    for n in names:
        base = model.get_submodule(n)
        if method == LORA:
            layer = LoraLinear(base, rank, alpha, generator=gen)
        else:
            layer = D2LoraLinear(
                base,
                rank,
                alpha,
                tau=tau,
                norm_dim=norm_dim,
                eps=eps,
                generator=gen,
                dense=dense,
            )
        _set_submodule(model, n, layer)
        params.extend(p for p in layer.parameters() if p.requires_grad)
        for p in layer.base.parameters():
            p.requires_grad_(False)
    return params


def extract_modules(model: nn.Module) -> dict[str, ModuleDelta]:
    """``{name: ModuleDelta}`` of the trainable layers, named as PEFT names them.

    ``name`` is the wrapper's path in the Hugging Face model (for instance
    ``transformer.h.0.attn.c_attn``), i.e. the original module's path.
    Factors are detached CPU copies.
    """
    return {n: m.module_delta(n) for n, m in wrapped_modules(model, (LoraLinear, D2LoraLinear)).items()}


def _entries_per_module(
    model: nn.Module, adapters: Sequence[Adapter], weights: Sequence[float] | None
) -> dict[str, list[tuple[float, ModuleDelta]]]:
    """Validate adapters against ``model``; group ``(weight, module)`` by module name."""
    if isinstance(adapters, Adapter):
        adapters = [adapters]
    adapters = list(adapters)
    if weights is None:
        weights = [1.0] * len(adapters)
    weights = [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise UsageError("--weights", f"{len(weights)} weights for {len(adapters)} adapters")
    per: dict[str, list[tuple[float, ModuleDelta]]] = {}
    for ad, w in zip(adapters, weights):
        where = ad.path or ad.name
        for name, m in ad.modules.items():
            try:
                mod = model.get_submodule(name)
            except AttributeError:
                raise AdapterError(
                    where, f"module {name} is not in the base model: the adapter was made for another base"
                ) from None
            if isinstance(mod, _Wrapped):
                mod = mod.base
            if not is_adaptable(mod):
                raise AdapterError(
                    where, f"module {name} is a {type(mod).__name__} in the base model, not a linear layer"
                )
            wt = mod.weight
            shape = (wt.shape[1], wt.shape[0]) if not isinstance(mod, nn.Linear) else tuple(wt.shape)
            if tuple(m.shape) != tuple(shape):
                raise AdapterError(
                    where,
                    f"module {name} has shape {m.shape[0]}x{m.shape[1]} but the base model's is "
                    f"{shape[0]}x{shape[1]}: the adapter was made for another base",
                )
            per.setdefault(name, []).append((w, m))
    return per


def attach_adapters(
    model: nn.Module, adapters: Adapter | Sequence[Adapter], weights: Sequence[float] | None = None
) -> nn.Module:
    """Apply loaded adapters on the fly: ``W0 + sum_i w_i * effective delta_i``.

    LoRA contributes ``s B A``; a D2 adapter ``W_hat - W0`` as its own
    definition gives it (each D2 adapter projects its own ``W0 + dW``). Any
    loramix layers already in ``model`` are removed first (:func:`detach`,
    without merging). ``weights`` default to 1. Raises
    :class:`AdapterError` when a module is missing or its shape differs.
    Returns ``model``; undo with :func:`detach`.
    """
    per = _entries_per_module(model, adapters, weights)
    detach(model)
    for name, entries in per.items():
        base = model.get_submodule(name)
        _set_submodule(model, name, AttachedLinear(base, entries))
    return model


@torch.no_grad()
def merge_into_model(
    model: nn.Module,
    adapters: Adapter | Sequence[Adapter],
    weights: Sequence[float] | None = None,
    *,
    keep_original: bool = False,
) -> dict[str, torch.Tensor]:
    """Merge in memory: ``W = W0 + sum_i w_i * effective delta_i`` per module.

    Each effective delta is formed densely, one module at a time, in float64
    (:meth:`ModuleDelta.delta`), accumulated in float32 and written back in
    the base weight's dtype (transposed for ``Conv1D``). With
    ``keep_original`` the returned dict holds CPU copies of the replaced
    weights, for :func:`restore_weights`; otherwise it is empty.
    """
    per = _entries_per_module(model, adapters, weights)
    detach(model)
    originals: dict[str, torch.Tensor] = {}
    for name, entries in per.items():
        mod = model.get_submodule(name)
        fan_in_fan_out = not isinstance(mod, nn.Linear)
        W0 = mod.weight.T if fan_in_fan_out else mod.weight  # (out, in) view
        if keep_original:
            originals[name] = mod.weight.detach().cpu().clone()
        acc = W0.to(torch.float32).clone()
        for w, m in entries:
            acc += (w * m.delta(W0, dtype=torch.float64, device=W0.device)).to(torch.float32)
        W0.copy_(acc.to(W0.dtype))
    return originals


@torch.no_grad()
def restore_weights(model: nn.Module, originals: dict[str, torch.Tensor]) -> None:
    """Put back the weights :func:`merge_into_model` kept (``keep_original``)."""
    for name, w in originals.items():
        mod = model.get_submodule(name)
        if isinstance(mod, _Wrapped):
            mod = mod.base
        mod.weight.copy_(w.to(device=mod.weight.device, dtype=mod.weight.dtype))


def detach(model: nn.Module, *, merge: bool = False) -> nn.Module:
    """Remove every loramix layer, putting the original modules back in place.

    With ``merge`` the trainable layers (LoRA, D2-LoRA) are folded into the
    base weight first (``W0 + s B A``, or ``W_hat``, computed in float64) and
    the model is left with plain modules that reproduce the adapted forward.
    Attached (loaded) adapters are simply removed; merge those with
    :func:`merge_into_model`. The base parameters keep ``requires_grad=False``.
    """
    for name, layer in wrapped_modules(model).items():
        if merge and isinstance(layer, (LoraLinear, D2LoraLinear)):
            with torch.no_grad():
                W = layer.merged_weight()
                layer.base_weight().copy_(W.to(layer.base.weight.dtype))
        _set_submodule(model, name, layer.base)
    return model
