"""The schema check of ``adapter_config.json``: every field loramix reads has
the type PEFT's own ``LoraConfig`` gives it, before any value is used.

JSON is read by :func:`load_json_file` (a regular file only; ``NaN`` and
``Infinity`` constants, invalid UTF-8 and nesting deep enough to exhaust
Python's recursion limit are errors naming the file). Then
:func:`check_adapter_config` checks, for the fields present:

====================================  ==========================================
field                                 type
====================================  ==========================================
``peft_type``, ``task_type``,         str (``base_model_name_or_path``,
``base_model_name_or_path``, ``bias``  ``task_type``, ``bias`` may be null)
``r``                                 int > 0 (a bool or 4.5 is not)
``lora_alpha``                        finite number (``1e309`` is infinite)
``rank_pattern``                      null or {regex str: int > 0}
``alpha_pattern``                     null or {regex str: finite number}
``target_modules``,                   null, a regular expression str or list
``exclude_modules``                   of str
``modules_to_save``                   null or list of str
``use_rslora``, ``fan_in_fan_out``,   bool (``"no"`` is not false)
``use_dora``, ``lora_bias``,
``inference_mode``
``tau``, ``eps`` (D2-LoRA)            finite number (``eps`` > 0, ``|tau|``
                                      within float32's range)
``norm_dim`` (D2-LoRA)                0 or 1
``loramix_format`` (D2-LoRA)          ``"d2lora/1"``
``init_r`` (AdaLoRA)                  int > 0
``rank_pattern`` (AdaLoRA)            null or {module name: list of bool}
``alpha`` (LoHa, LoKr)                finite number
``use_effective_conv2d`` (LoHa, LoKr) bool
====================================  ==========================================

A field another ``peft_type`` gives another type (:data:`TYPE_FIELDS`) is
checked as that type's: PEFT's AdaLoRA keeps its rank allocator's masks in
``rank_pattern``, one bool per initial rank.

The scale ``lora_alpha / r`` must fit float32 too (``peft_layout.checked_scale``).

Nothing is coerced: a value of the wrong type is an :class:`AdapterError`
naming the file, the field and what it holds. So are the pairs of fields
PEFT's ``LoraConfig`` refuses: ``layers_to_transform`` or ``layers_pattern``
(not null) beside a regular expression ``target_modules``, and a
``layers_pattern`` without ``layers_to_transform``.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path

from ..errors import AdapterError, LoramixError


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def load_json_file(path: Path, error: type[LoramixError] = AdapterError, constants: bool = False,
                   what: str = "JSON"):  # fmt: skip
    """The JSON value in ``path``; ``error`` (naming the file) for a missing or
    non-regular file, bad UTF-8, bad JSON, too deep nesting, or (unless
    ``constants``) ``NaN``/``Infinity``. ``what`` names the file's kind in the
    message ("not valid JSON", or e.g. "not a valid fit.json")."""
    bad = "not valid JSON" if what == "JSON" else f"not a valid {what}"
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise error(path, "not a regular file (a FIFO, device or folder?)")
        raw = Path(path).read_bytes()
    except OSError as e:
        raise error(path, f"cannot read: {e.strerror or e}") from None
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=None if constants else _refuse_constant)
    except RecursionError:
        raise error(path, f"{bad}: nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise error(path, f"{bad}: {e}") from None


#: the largest float32: a factor scaled beyond it is inf in float32, in which
#: merges, evaluation (and PEFT) compute
FLOAT32_MAX = 3.4028234663852886e38
#: the smallest normal float32; a scale below it loses its bits in PEFT's float32 products
FLOAT32_TINY = 1.1754943508222875e-38


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x) -> bool:
    """A finite JSON number: not a bool, not nan or infinity, and not an
    integer too large for a float (its 400 digits are finite, but not as a float)."""
    if not (_is_int(x) or isinstance(x, float)):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def _str_list(x) -> bool:
    return isinstance(x, list) and all(isinstance(v, str) for v in x)


def _regex(x) -> bool:
    """A string that compiles as a regular expression (PEFT matches a string
    ``target_modules`` / ``exclude_modules`` with ``re.fullmatch``)."""
    if not isinstance(x, str):
        return False
    try:
        re.compile(x)
    except (re.error, RecursionError):
        return False
    return True


def _pattern(x, value_ok) -> bool:
    if x is None:
        return True
    if not isinstance(x, dict):
        return False
    for k, v in x.items():
        try:
            re.compile(k)
        except (re.error, RecursionError):
            return False
        if not value_ok(v):
            return False
    return True


# field -> (check, what it must be)
FIELDS = {
    "peft_type": (lambda x: isinstance(x, str), "a string"),
    "task_type": (lambda x: x is None or isinstance(x, str), "a string or null"),
    "base_model_name_or_path": (lambda x: x is None or isinstance(x, str), "a string or null"),
    "bias": (lambda x: x is None or isinstance(x, str), "a string (none, all or lora_only)"),
    "r": (lambda x: _is_int(x) and x > 0, "a positive integer"),
    "lora_alpha": (is_number, "a finite number"),
    "rank_pattern": (lambda x: _pattern(x, lambda v: _is_int(v) and v > 0),
                     "an object of regular expression -> positive integer"),
    "alpha_pattern": (lambda x: _pattern(x, is_number), "an object of regular expression -> finite number"),
    "target_modules": (lambda x: x is None or _regex(x) or _str_list(x),
                       "a regular expression or a list of strings"),
    "exclude_modules": (lambda x: x is None or _regex(x) or _str_list(x),
                        "null, a regular expression or a list of strings"),
    "modules_to_save": (lambda x: x is None or _str_list(x), "null or a list of strings"),
    "layers_to_transform": (lambda x: x is None or (_is_int(x) and x >= 0)
                            or (isinstance(x, list) and all(_is_int(v) and v >= 0 for v in x)),
                            "null, a layer index or a list of them"),
    "layers_pattern": (lambda x: x is None or isinstance(x, str) or _str_list(x), "null, a string or a list of strings"),
    "use_rslora": (lambda x: isinstance(x, bool), "true or false"),
    "fan_in_fan_out": (lambda x: isinstance(x, bool), "true or false"),
    "use_dora": (lambda x: isinstance(x, bool), "true or false"),
    "lora_bias": (lambda x: isinstance(x, bool), "true or false"),
    "inference_mode": (lambda x: isinstance(x, bool), "true or false"),
    # B- is scaled by tau in float32: beyond its range every delta is inf or nan
    "tau": (lambda x: is_number(x) and abs(x) <= FLOAT32_MAX, "a finite number within float32's range"),
    "eps": (lambda x: is_number(x) and x > 0, "a positive finite number"),
    "norm_dim": (lambda x: _is_int(x) and x in (0, 1), "0 or 1"),
    # a later version may change what the tensors mean: refused, not guessed at
    "loramix_format": (lambda x: x == "d2lora/1", '"d2lora/1", the D2-LoRA format this loramix reads'),
}  # fmt: skip

#: the LyCORIS tuners' own fields (PEFT's LoHa and LoKr)
_LYCORIS = {
    "alpha": (is_number, "a finite number"),
    "use_effective_conv2d": (lambda x: isinstance(x, bool), "true or false"),
}

#: ``peft_type`` -> the fields it types otherwise than :data:`FIELDS` (or that only it has)
TYPE_FIELDS = {
    "ADALORA": {
        "init_r": (lambda x: _is_int(x) and x > 0, "a positive integer"),
        "rank_pattern": (lambda x: x is None or (isinstance(x, dict) and all(
                             isinstance(v, list) and all(isinstance(b, bool) for b in v) for v in x.values())),
                         "null or an object of module name -> list of true/false (AdaLoRA's masks)"),
    },
    "LOHA": _LYCORIS,
    "LOKR": _LYCORIS,
}  # fmt: skip


def show(value) -> str:
    text = json.dumps(value, allow_nan=True)
    return text if len(text) <= 60 else text[:57] + "..."


def check_adapter_config(config, path: Path) -> dict:
    """``config`` (the parsed ``adapter_config.json`` at ``path``) after
    checking it is an object and the type of every field in :data:`FIELDS`
    that it holds; an :class:`AdapterError` naming the first bad field."""
    if not isinstance(config, dict):
        raise AdapterError(path, "not a JSON object")
    kind = config.get("peft_type")
    fields = {**FIELDS, **TYPE_FIELDS.get(kind.upper(), {})} if isinstance(kind, str) else FIELDS
    for key, (ok, what) in fields.items():
        if key in config and not ok(config[key]):
            raise AdapterError(path, f"{key} must be {what}, not {show(config[key])}")
    # PEFT's LoraConfig refuses these pairs when it loads the config (a
    # regular expression selects modules in every layer itself), so no PEFT
    # user has such an adapter applied; loramix reading it would guess.
    if isinstance(config.get("target_modules"), str):
        for key in ("layers_to_transform", "layers_pattern"):
            if config.get(key) is not None:
                raise AdapterError(
                    path,
                    f"{key} cannot be used when target_modules is a regular expression (PEFT refuses it)",
                )
    if config.get("layers_pattern") and config.get("layers_to_transform") is None:
        raise AdapterError(path, "layers_pattern is given without layers_to_transform (PEFT refuses it)")
    return config


def read_adapter_config(path: Path) -> dict:
    """``adapter_config.json`` read (:func:`load_json_file`) and checked
    (:func:`check_adapter_config`)."""
    return check_adapter_config(load_json_file(path, AdapterError), path)
