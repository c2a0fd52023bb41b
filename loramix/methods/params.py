"""Parameters of merge methods: :class:`Param` and the shared declarations.

Torch-free on purpose: the ``merge`` command builds its options from these
declarations, and ``loramix merge --help`` must not import torch. Re-exported
from :mod:`loramix.methods.base`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError
from ..options import MAX_WEIGHT, check_numbers, seed_problem


@dataclass(frozen=True)
class Param:
    """One parameter of a method: ``--<flag>`` on the command line.

    ``check(value)`` returns an error text (or None when the value is fine).
    ``default`` of ``None`` means "no default": the method decides.
    """

    name: str
    type: type
    default: Any = None
    help: str = ""
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], str | None] | None = None
    required: bool = False

    @property
    def key(self) -> str:
        """Its name as files write it (provenance, a scenario's table, a
        predictors file's ``merge``): ``lambda_`` is ``lambda``, a Python keyword."""
        return self.name.rstrip("_")

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    def coerce(self, value: Any) -> Any:
        if self.choices is not None:
            v = str(value).lower()
            if v not in self.choices:
                raise UsageError(self.flag, f"{value!r} is not one of {', '.join(self.choices)}")
            return v
        if self.type in (int, float):
            check_numbers({self.flag: value})  # "0.5" was parsed, True taken as 1
        try:
            if self.type is int:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                v = int(value)
            elif self.type is float:
                v = float(value)
                if not math.isfinite(v):
                    raise ValueError
            else:
                v = self.type(value)
        except (TypeError, ValueError):
            raise UsageError(self.flag, f"{value!r} is not a valid {self.type.__name__}") from None
        if self.check is not None and (msg := self.check(v)) is not None:
            raise UsageError(self.flag, msg)
        return v


def in_unit_interval(v: float) -> str | None:
    """A Param check: ``v`` in ``[0, 1)`` (a fraction that cannot be all)."""
    return None if 0.0 <= v < 1.0 else f"{v} is outside [0, 1)"


def _density_check(v: float) -> str | None:
    return None if 0.0 < v <= 1.0 else f"{v} is outside (0, 1]: it is the fraction of entries kept"


DENSITY = Param(
    "density",
    float,
    None,
    "fraction of each delta's entries kept, in (0, 1]",
    check=_density_check,
    required=True,
)
SIGN = Param(
    "sign",
    str,
    "mass",
    "sign election: mass (sign of the weighted sum) or count (majority)",
    choices=("mass", "count"),
)
DIVIDE = Param(
    "divide",
    str,
    "count",
    "divide agreeing entries by their count (as PEFT) or by their summed weights (mergekit); "
    "the sign is elected from the weighted deltas either way (docs/merging.md)",
    choices=("count", "weight"),
)


def check_divide_weights(params: dict, weights, method) -> None:
    """Refuse ``--divide weight`` with a negative weight (docs/merging.md,
    "Signed and zero weights").

    That divisor is ``D = sum_i keep_i w_i`` (mergekit's ``normalize``), the
    merged entry ``sum_i keep_i w_i t_i / D``: where the kept weights are all
    negative it is their weighted mean of the unweighted ``t_i``, so the sign
    of the weights cancels (``--weights -1`` gives ``+t``); with both signs
    kept ``D`` can vanish (``1,-1``: 0, taken as 1) or nearly (``1,-0.999``:
    the entry grows 1000-fold). Task negation is ``--divide count``'s mean or
    a linear method's sum; mergekit computes this, loramix refuses it.
    ``method``: the :class:`MergeMethod`; the refusal says weight is its
    default only where it is (della's; ties' and dare-ties' is count)."""
    if params.get("divide") == "weight" and any(float(w) < 0 for w in weights):
        default = next((p.default for p in method.params if p.name == "divide"), None)
        said = f"--divide weight ({method.name}'s default)" if default == "weight" else "--divide weight"
        raise UsageError(
            "--weights",
            f"{','.join(f'{float(w):g}' for w in weights)} holds a negative weight, which {said} cannot take: "
            "dividing each kept entry by the kept weights' sum cancels that sign, and blows it up where the sum "
            "nears 0 (1,-0.999: 1000-fold); use --divide count, or task-arithmetic",
        )


def _lambda_check(v: float) -> str | None:
    # bounded as --weights are: beyond it a merge only amplifies rounding noise, and 1e300 overflowed
    # float32 into a refusal naming a tensor, after the work
    return None if abs(v) <= MAX_WEIGHT else f"{v:g} is beyond +-{MAX_WEIGHT:g}; that is not a scale"


LAMBDA = Param("lambda_", float, 1.0, "scale of the merged delta", check=_lambda_check)
SEED = Param("seed", int, 0, "seed of the random drop masks (reproducible)", check=seed_problem)
