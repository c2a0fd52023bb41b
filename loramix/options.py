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
#: the most optimizer steps a run takes (``train --steps``, ``--epochs`` times
#: the batches, ``--warmup``, ``base build --steps``, a scenario's): a billion
#: steps is years of training at any speed, so more is a typo. ``--epochs
#: 1e300`` was taken, and made a run no loop ends.
MAX_STEPS = 10**9
#: the most CPU threads ``--threads`` sets, and the most workers ``--jobs``
#: starts: beyond any machine's cores. torch took ``--threads 100000`` and the
#: process died of a segmentation fault in its first parallel region; a
#: number past 64 bits was a traceback; ``--jobs 100000`` started as many
#: processes, each loading torch.
MAX_WORKERS = 1024
#: the most windows one pre-training step of ``base build`` samples (a
#: scenario's ``base.build.batch``, ``build_base(batch=)``): windows are drawn
#: with replacement, so no data caps it (``train``'s and ``eval``'s batches are
#: capped at the records there are), and ``2^62`` was taken and failed at the
#: first step allocating ``batch x context`` tokens. 65,536 windows of the
#: small size's 256 tokens are 16.8M tokens a step, beyond any one accelerator.
MAX_BATCH = 2**16
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
    (booleans are not numbers); one number alone is a list of one, as
    ``"0.5"`` is (and, as one adapter alone is, ``adapters``). Errors name
    ``where``. ``sum``, ``merge`` and the Python API all parse their weights here."""
    if weights is None:
        return [1.0] * n
    if isinstance(weights, str):
        parts = [p.strip() for p in weights.split(",")]
        if not all(parts):  # "1,,2" or "1,2,": an entry left out, not to be dropped silently
            raise UsageError(where, f"{weights!r} has an empty entry; give one number per adapter")
    elif isinstance(weights, numbers.Real) and not isinstance(weights, bool):
        parts = [weights]  # weights=0.5: list() of it raised TypeError ('float' object is not iterable)
    else:
        try:
            parts = list(weights)
        except TypeError:  # an object that is no collection: one line, not list()'s TypeError
            parts = [weights]
    try:
        if any(isinstance(p, bool) for p in parts):
            raise TypeError
        ws = [float(p) for p in parts]
    except (TypeError, ValueError, OverflowError):
        raise UsageError(where, f"{weights!r} is not a comma-separated list of numbers") from None
    if len(ws) != n:
        raise UsageError(where, f"got {len(ws)} weight{'s' * (len(ws) != 1)} for {n} adapter{'s' * (n != 1)}; "
                         "give one per adapter")  # fmt: skip
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


def whole_numbers(values: dict[str, Any]) -> list[int | None]:
    """Each of ``values`` (flag -> value; None: not given) as an ``int``, in
    order: an int (numpy's too) as it is, a float only where it is whole
    (``8.0`` -> 8, as a merge's int parameters take it); a fraction, an
    infinity, a string or a bool is refused in one :class:`UsageError`
    naming the flag (the keyword, in Python). The CLI's int options are ints
    already; from Python, ``rank=2.5`` failed deep inside torch after the
    model had loaded, ``max_len=50.5`` and ``batch=2.5`` in a slice or a
    ``range`` (TypeErrors naming none of them), and ``top_layers=1.5``,
    ``limit=20.5`` or ``plan``'s ``max_group=2.5`` were taken as they were."""
    check_numbers(values)
    out: list[int | None] = []
    for where, v in values.items():
        if v is not None and not isinstance(v, numbers.Integral):
            if not (math.isfinite(v) and float(v).is_integer()):
                raise UsageError(where, f"{v!r} is not a whole number")
        out.append(None if v is None else int(v))
    return out


def check_workers(n: Any, where: str = "--threads") -> int | None:
    """``n`` (None: not given) if it is a whole number in ``[1, MAX_WORKERS]``
    (or this machine's cores, where more), else a :class:`UsageError` naming
    ``where``: ``--threads`` and ``--jobs`` of every command, and their
    keywords in Python."""
    import os

    if n is None:
        return None
    most = max(MAX_WORKERS, os.cpu_count() or 1)
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise UsageError(where, f"{n!r} is not a whole number")
    if n < 1:
        raise UsageError(where, f"must be at least 1, got {n}")
    if n > most:
        raise UsageError(where, f"must be at most {most} (more than any machine's cores), got {n}")
    return n


def steps_problem(n: Any, what: str = "steps") -> str | None:
    """Why ``n`` optimizer steps (or epochs, ``what``: each at least one
    step) are more than a run can take (:data:`MAX_STEPS`), or None."""
    if n is not None and n > MAX_STEPS:
        return (
            f"{n:g} {what} is more than the {MAX_STEPS:,} optimizer steps a run can take (years of training)"
        )
    return None


def batch_problem(n: Any) -> str | None:
    """Why a batch of ``n`` (at least 1) is more than a step can take
    (:data:`MAX_BATCH`), or None."""
    if n is not None and n > MAX_BATCH:
        return f"{n:,} is more than the {MAX_BATCH:,} a step can take (a typo?)"
    return None


def lr_problem(lr: Any, weight_decay: Any = 0.0) -> tuple[str, str] | None:
    """``("lr" or "weight_decay", why)`` where a peak learning rate ``lr``
    (positive) and AdamW's decoupled ``weight_decay`` (0 or more) cannot
    train, or None. AdamW's step multiplies each weight by
    ``1 - lr * weight_decay`` and adds at most ``lr`` times a unit step, in
    float32: an ``lr`` beyond float32's range (3.4e38) failed with torch's
    traceback at the first step, and ``lr * weight_decay >= 1`` zeroes or
    flips the sign of every weight at every step."""
    from .io.config_schema import FLOAT32_MAX

    if not 0 < lr <= FLOAT32_MAX:
        return "lr", f"must be a positive number within float32's range (3.4e38), got {lr}"
    if weight_decay is not None and not 0 <= weight_decay <= FLOAT32_MAX:
        return "weight_decay", f"must be 0 or more and within float32's range, got {weight_decay}"
    if weight_decay and lr * weight_decay >= 1:
        return "weight_decay", (
            f"lr x weight_decay = {lr * weight_decay:.3g} is 1 or more: AdamW multiplies every weight by "
            "1 - lr x weight_decay at each step, which zeroes or flips it"
        )
    return None


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
