"""Reading and writing adapter files: the public entry points.

:func:`load_adapter` asks each format reader (:mod:`loramix.io.formats`) in
turn whether it recognises the path and lets the first that does read it:

* **PEFT LoRA** (``peft_type: LORA``, :mod:`loramix.io.formats.peft`);
* **PEFT DoRA** (``peft_type: LORA``, ``use_dora: true``);
* **loramix D2-LoRA** (``peft_type: D2LORA``, :mod:`loramix.io.formats.d2`,
  documented in ``docs/d2lora.md``).

A path may be the folder or the ``.safetensors`` file with its
``adapter_config.json`` beside it. PEFT DoRA (``use_dora``,
:mod:`loramix.io.formats.dora`), embedding LoRA and ``modules_to_save`` are
read; what loramix does not support (LoRA biases, conv LoRA, foreign formats
such as kohya or diffusers, pickles) is refused with a message naming the
module or format and the feature, never silently dropped.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..adapter import Adapter
from ..api import renamed
from ..errors import AdapterError
from .formats import find_format
from .formats.base import WEIGHTS_NAME
from .formats.d2 import save_d2_adapter
from .formats.peft import save_peft_adapter

__all__ = ["WEIGHTS_NAME", "load_adapter", "save_d2_adapter", "save_peft_adapter"]


@renamed(positional=("name",))
def load_adapter(path: str | Path, *, name: str | None = None) -> Adapter:
    """Load an adapter (folder or .safetensors file) in any known format.

    Tensors are read one at a time with ``safe_open`` and kept as stored.
    Raises :class:`AdapterError` (one line naming the file) on bad input,
    also for something that is not a path at all (``None``, a number).
    The checks are :mod:`loramix.io.peft_layout`'s, shared with the numpy
    reader of :mod:`loramix.io.np_factors`.

    Returns an :class:`~loramix.adapter.Adapter`: ``name`` (``name``, else
    taken from the path), ``kind``, ``modules`` (module name ->
    ``ModuleDelta``: factors ``B`` (out x r), ``A`` (r x in) and ``scale``;
    a LoRA's delta is ``dW = scale B A``), the raw ``config`` and ``path``.
    """
    if not isinstance(path, (str, os.PathLike)):
        from .peft_layout import out_hint

        hint = out_hint(path)  # a merge's result: its folder, not its whole repr
        said = repr(path)
        if hint or "\n" in said or len(said) > 60:  # a DataFrame's repr is its table
            said = f"a {type(path).__name__}{hint}"
        raise AdapterError(None, f"an adapter is a path to a folder or a .safetensors file, not {said}")
    return find_format(path).read(path, name)
