"""The options every command shares, parsed once: weights, dtype, device, progress.

Library errors name the parameter (``weights``, ``dtype``, ``device``); the
CLI prints them under their flag (``--weights``, ...; see
:data:`loramix.cli.FLAGS`). Torch is imported only where a dtype is built,
so the table of names is free to read.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from .errors import UsageError

#: dtype spellings accepted on the command line and in scenario files -> torch name
DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float64": "float64",
    "fp64": "float64",
}
#: the largest |weight| accepted: beyond it a merge only amplifies rounding
#: noise into the weights (and float16 outputs overflow), so it is a typo
MAX_WEIGHT = 1e6
#: the largest seed any command takes (``--seed``, a scenario's seeds): torch
#: and numpy take 64-bit seeds, and click's ``IntRange(0, 2**63 - 1)`` bounds
#: ``train --seed``; a larger one is a typo, not to be wrapped or hashed
MAX_SEED = 2**63 - 1
#: the output dtypes a merge or a sum offers (the canonical names of DTYPE_NAMES)
OUTPUT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def bar_disabled(progress: bool) -> bool | None:
    """tqdm's ``disable`` for a progress bar asked for by ``progress``: None
    (tqdm's own rule: drawn only where stderr is a terminal) or True. A bar
    written into a file or a pipe is control characters around the output,
    and stderr redirected must hold one line for bad input."""
    return None if progress else True


def capped_note(asked: int | None, used: int) -> str | None:
    """The line saying that ``--max-len`` was capped at the model's context
    (``eval`` and ``train`` cap it there), or None when it was not."""
    if asked is None or used >= asked:
        return None
    return f"--max-len {asked} is above the model's context: {used} tokens used"


def parse_weights(weights: Any, n: int, where: str = "weights") -> list[float]:
    """One finite weight per adapter, ``|w| <= MAX_WEIGHT``: ``None`` ->
    ``[1.0] * n``; a ``"1,0.5"`` string or a sequence of ``n`` numbers
    (booleans are not numbers). Errors name ``where``. ``sum``, ``merge`` and
    the Python API all parse their weights here."""
    if weights is None:
        return [1.0] * n
    if isinstance(weights, str):
        parts = [p.strip() for p in weights.split(",")]
        if not all(parts):  # "1,,2" or "1,2,": an entry left out, not to be dropped silently
            raise UsageError(where, f"{weights!r} has an empty entry; give one number per adapter")
    else:
        parts = list(weights)
    try:
        if any(isinstance(p, bool) for p in parts):
            raise TypeError
        ws = [float(p) for p in parts]
    except (TypeError, ValueError, OverflowError):
        raise UsageError(where, f"{weights!r} is not a comma-separated list of numbers") from None
    if len(ws) != n:
        raise UsageError(where, f"got {len(ws)} weights for {n} adapters; give one per adapter")
    if not all(math.isfinite(w) for w in ws):
        raise UsageError(where, f"{weights!r} holds a non-finite number")
    if any(abs(w) > MAX_WEIGHT for w in ws):
        raise UsageError(where, f"{weights!r} holds a weight beyond +-{MAX_WEIGHT:g}; that is not a weight")
    return ws


def check_numbers(values: dict[str, Any]) -> None:
    """Each of ``values`` (flag -> value; None: not given) a number: an int or
    a float (numpy's too), never a string or a bool. The Python API takes
    numbers, as click hands them to it; ``density="0.5"`` (a config read
    without conversion) was parsed, ``rank="8"`` failed with a TypeError deep
    inside, and ``True`` counted as 1. A :class:`UsageError` names the flag
    (the keyword, in Python)."""
    for where, v in values.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
            raise UsageError(where, f"{v!r} is not a number")


def seed_problem(seed: Any) -> str | None:
    """Why ``seed`` is not a seed (an integer in ``[0, MAX_SEED]``), or None."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        return f"{seed!r} is not a seed: seeds are integers in [0, 2^63 - 1]"
    return None


def check_seed(seed: Any, where: str = "--seed") -> int:
    """``seed`` if it is one (:func:`seed_problem`), else a :class:`UsageError`
    naming ``where``: the Python API's check of what ``--seed`` bounds."""
    if (why := seed_problem(seed)) is not None:
        raise UsageError(where, why)
    return seed


def check_dtype(dtype: Any, where: str = "dtype") -> str | None:
    """The torch name of a dtype spelling (``"bf16"`` -> ``"bfloat16"``),
    None for ``None``/``"auto"``; an unknown one is a :class:`UsageError`
    naming ``where``. Needs no torch, so a command can refuse a bad
    ``--dtype`` before loading it."""
    if dtype is None:
        return None
    key = str(dtype).lower().removeprefix("torch.")
    if key == "auto":
        return None
    if key not in DTYPE_NAMES:
        raise UsageError(where, f"unknown dtype {dtype!r}; choose {', '.join(OUTPUT_DTYPES)}")
    return DTYPE_NAMES[key]


def parse_dtype(dtype: Any, where: str = "dtype"):
    """``None``/``"auto"`` -> None (keep the input's); a torch dtype as is; a
    name of :data:`DTYPE_NAMES` (``bf16``, ``torch.float16``, ...) -> the
    torch dtype (see :func:`check_dtype`)."""
    if dtype is None or isinstance(dtype, str):
        name = check_dtype(dtype, where)
        if name is None:
            return None
        import torch

        return getattr(torch, name)
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    raise UsageError(where, f"unknown dtype {dtype!r}; choose {', '.join(OUTPUT_DTYPES)}")


def dtype_name(dtype) -> str | None:
    """``torch.bfloat16`` -> ``"bfloat16"`` (None stays None), as written in
    provenance and ``config.json``."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def promoted_dtype(dtypes):
    """The smallest torch dtype every one of ``dtypes`` promotes to
    (``torch.promote_types`` folded); float32 for none."""
    import torch

    out = None
    for dt in dtypes:
        out = dt if out is None else torch.promote_types(out, dt)
    return torch.float32 if out is None else out
