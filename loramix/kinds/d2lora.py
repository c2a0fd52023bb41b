"""D2-LoRA (arXiv 2602.14728), as loramix defines it: the kind and its layer.

The formulas (signed two-branch residual, projection onto the base's norms,
merged weight, norm factor from the factors) are in :mod:`loramix.d2lora`;
the file format in ``docs/d2lora.md``. In short, for ``W0`` ``(out, in)``::

    dW = s (B+ A+ - tau B- A-) = Bf Af      Bf (out, 2r), Af (2r, in)
    c  = ||W0||_n / max(||W0 + dW||_n, eps)
    effective delta = c (W0 + dW) + dW - W0     depends on W0: needs_base
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..d2lora import d2_effective_delta, d2_merged_weight, d2_norm_scale, d2_signed_factors
from ..errors import UsageError
from ..io.peft_layout import D2_TAU
from .base import AdapterKind, AttachTerms, TrainableLayer, check_rank, kaiming_, layout_extra, missing_part


class D2LoraKind(AdapterKind):
    id = "d2lora"
    label = "D2-LoRA"
    peft_type = "D2LORA"
    parts = {
        "lora_A_pos": ("A", "pos"),
        "lora_B_pos": ("B", "pos"),
        "lora_A_neg": ("A", "neg"),
        "lora_B_neg": ("B", "neg"),
    }
    # literals: the CLI reads the kinds' files without importing them (discovery.declared); tau is D2_TAU
    options = {"tau": 0.5, "norm_dim": 1, "eps": 1e-8}
    needs_base = True

    def scaled_factors(self, m, dtype=torch.float64, device=None):
        Bp, Ap, Bn, An = (t.to(device=device, dtype=dtype) for t in (m.B, m.A, m.B_neg, m.A_neg))
        B, A = d2_signed_factors(Bp, Ap, Bn, An, m.tau)
        return B, A, float(m.scale)

    def delta(self, m, W0, dtype=torch.float64, device=None):
        """``W_hat - W0`` (out, in); ``W0`` (out, in) is required."""
        if W0 is None:
            raise ValueError(f"{m.name}: the effective delta of a D2-LoRA module needs the base weight")
        Bf, Af = self.factors(m, dtype=dtype, device=device)
        dW = Bf @ Af
        return d2_effective_delta(W0.to(device=dW.device, dtype=dtype), dW, norm_dim=m.norm_dim, eps=m.eps)

    def norm_axis(self, m):
        return m.norm_dim

    def gains(self, m, w0_sq, v_sq):
        """``(c - 1, c + 1)`` with ``c = ||W0||_n / max(||W0 + dW||_n, eps)``, as
        :func:`~loramix.d2lora.d2_norm_scale` forms it from the same two norms."""
        c = w0_sq.sqrt() / v_sq.clamp_min(m.eps * m.eps).sqrt()
        return c - 1, c + 1

    def layer(self, base, rank, alpha, *, generator=None, dtype=torch.float32, dense=None, **options):
        opts = {k: options.get(k, v) for k, v in self.options.items()}
        return D2LoraLinear(base, rank, alpha, generator=generator, dtype=dtype, dense=dense, **opts)

    def attach_terms(self, W0, weight, m, dtype):
        """Row norms (``norm_dim=1``): a per-row gain ``w (c - 1)`` on ``W0 x``
        and the pair ``(w (c + 1) Bf, Af)``. Column norms: an extra term
        ``w (W0 ((c - 1) x) + Bf (Af ((c + 1) x)))``. ``c`` once, in float64."""
        Bf, Af = self.factors(m, dtype=torch.float64, device=W0.device)
        c = d2_norm_scale(W0, Bf, Af, norm_dim=m.norm_dim, eps=m.eps)
        if m.norm_dim == 1:
            return AttachTerms(B=weight * (c + 1).unsqueeze(1) * Bf, A=Af, gain=weight * (c - 1))
        cm1, cp1 = (weight * (c - 1)).to(dtype), (c + 1).to(dtype)
        wB, A = (weight * Bf).to(dtype), Af.to(dtype)

        def extra(x, layer):
            xf = x.to(A.dtype)
            return layer.base_matmul((xf * cm1).to(x.dtype)) + ((xf * cp1) @ A.T) @ wB.T

        return AttachTerms(B=Bf[:, :0], A=Af[:0], extra=extra)

    def from_tensors(self, name, fs, config, *, scale, alpha, embedding=False):
        from ..adapter import ModuleDelta

        layout_extra(self, name, embedding)  # D2-LoRA is defined on linear layers only
        missing_part(fs, self.parts, name)
        A, B, An, Bn = fs[("A", "pos")], fs[("B", "pos")], fs[("A", "neg")], fs[("B", "neg")]
        if An.shape != A.shape or Bn.shape != B.shape:
            raise ValueError(
                f"module {name}: negative branch shapes {tuple(Bn.shape)}, {tuple(An.shape)} "
                f"differ from positive {tuple(B.shape)}, {tuple(A.shape)}"
            )
        return ModuleDelta(
            name=name, B=B, A=A, scale=scale, alpha=alpha, B_neg=Bn, A_neg=An, kind=self,
            tau=float(config.get("tau", D2_TAU)), norm_dim=int(config.get("norm_dim", 1)),
            eps=float(config.get("eps", 1e-8)),
        )  # fmt: skip

    def tensors(self, m):
        return {"lora_A_pos": m.A, "lora_B_pos": m.B, "lora_A_neg": m.A_neg, "lora_B_neg": m.B_neg}

    def save(self, out_dir, modules, *, rank, alpha, options=None, fan_in_fan_out=False, **kw):
        """A loramix D2-LoRA folder (``docs/d2lora.md``); ``options``: tau, norm_dim, eps."""
        from ..io.formats.d2 import save_d2_adapter

        opts = {k: (options or {}).get(k, v) for k, v in self.options.items()}
        return save_d2_adapter(out_dir, modules, r=rank, lora_alpha=alpha, **opts, **kw)


D2LORA = D2LoraKind()


class D2LoraLinear(TrainableLayer):
    """D2-LoRA around a frozen linear projection (:mod:`loramix.d2lora`).

    Parameters: ``A+``, ``A-`` ``(r, in)``; ``B+``, ``B-`` ``(out, r)``;
    ``s = alpha / r``; ``tau`` fixed; ``norm_dim`` 1 (one norm per output
    unit, as DoRA) or 0 (per input column); ``eps`` guards the division.

        dW = s (B+ A+ - tau B- A-),  V = W0 + dW,  c = ||W0||_n / max(||V||_n, eps)
        y  = c * V x + dW x + b = (W* + dW) x + b

    The default forward never forms ``dW``: with ``dW = Bf Af`` it is
    ``y = c * (W0 x) + ((c + 1) * Bf) (Af x) + b`` (row norms) or
    ``y = W0 (c * x) + Bf (Af ((c + 1) * x)) + b`` (column norms), ``c`` from
    :func:`loramix.d2lora.d2_norm_scale`, so only ``c`` (a vector) and the
    factors need gradients. ``dense=True`` selects the reference forward that
    builds ``W_hat`` and calls ``F.linear``. ``dense=None`` (the default)
    takes it where it was measured faster: training on a CUDA device (input
    on CUDA, gradients on; SmolLM2-135M's shapes on an H200, batch 32 x 512:
    +10.4 % over LoRA a step, the factored forward +30.1 %,
    reports/benchmarks-gpu.md), and the factored forward elsewhere (on the
    CPU the two are within a few per cent; evaluation on the fly adds nothing
    to LoRA's time). Autograd keeps about ``3 out x in`` values per module
    for the dense backward against ``T x out`` (``T`` tokens) for the
    factored one, so the dense one is no larger wherever a micro-batch has
    more than about ``3 in`` tokens. ``||W0||_n^2`` is cached at
    construction: the base is frozen.

    Init: ``B+ = B- = 0`` (the layer starts as the base); ``A+`` and ``A-``
    Kaiming-uniform, drawn independently so the residual has rank ``2r`` from
    the first step (with ``A+ = A-`` the two ``B`` gradients would be
    proportional).
    """

    kind = D2LORA

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        alpha: float,
        *,
        tau: float = D2_TAU,
        norm_dim: int = 1,
        eps: float = 1e-8,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        dense: bool | None = None,
    ):
        super().__init__(base)
        check_rank(rank)
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
        kaiming_(self.lora_A_pos, generator)
        kaiming_(self.lora_A_neg, generator)
        # ||W0||_n^2, accumulated in float64; not saved with the model (derivable from W0).
        w0_sq = self.base_weight().detach().double().pow(2).sum(dim=self.norm_dim)
        self.register_buffer("w0_sq", w0_sq.to(dtype), persistent=False)
        self.register_buffer("w0_norm", w0_sq.sqrt().to(dtype), persistent=False)

    def factors(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Bf, Af)`` with ``dW = Bf @ Af``: ``(out, 2r)`` and ``(2r, in)``."""
        Bp, Bn, Ap, An = self.lora_B_pos, self.lora_B_neg, self.lora_A_pos, self.lora_A_neg
        if dtype is not None:
            Bp, Bn, Ap, An = (t.to(dtype) for t in (Bp, Bn, Ap, An))
        Bf, Af = d2_signed_factors(Bp, Ap, Bn, An, self.tau)
        return Bf * self.scale, Af

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense = self.dense if self.dense is not None else x.is_cuda and torch.is_grad_enabled()
        if dense:
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
            # The bias rides in the low-rank GEMM (addmm) and c in one fused multiply-add,
            # so beyond the GEMMs the D2 forward makes one pass over the (T, out) output,
            # as LoRA's add does.
            h = self.base_matmul(x2).to(Af.dtype)  # W0 x, in the base dtype as base(x) would
            Bc = (c + 1).unsqueeze(1) * Bf  # (out, 2r)
            u = xf @ Af.T  # (T, 2r)
            low = u @ Bc.T if bias is None else torch.addmm(bias, u, Bc.T)
            y = torch.addcmul(low, h, c)
        else:
            h = self.base_matmul((xf * c).to(x.dtype)).to(Af.dtype)
            y = h + ((xf * (c + 1)) @ Af.T) @ Bf.T
            if bias is not None:
                y = y + bias
        return y.reshape(shape).to(x.dtype)

    def _dense_forward(self, x: torch.Tensor) -> torch.Tensor:
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
        W0 = self.base_weight().detach().double()
        return d2_merged_weight(W0, self.residual(), norm_dim=self.norm_dim, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.rank}, tau={self.tau}, norm_dim={self.norm_dim}"
