"""PEFT LoRA adapters whose init moved the base (``peft_type: LORA`` with
``init_lora_weights`` ``"pissa"`` or ``"olora"``, saved unconverted): their
factors, read as the ``moved-base`` kind (:mod:`loramix.kinds.moved_base`),
whose delta ``s (B A - B0 A0)`` needs the base; layout in
:mod:`loramix.io.formats.base`."""

from __future__ import annotations

from ...kinds.moved_base import INITS, MOVED_BASE
from .base import PeftLayoutFormat


class PeftMovedBase(PeftLayoutFormat):
    name = "peft-moved-base"
    kind = MOVED_BASE
    peft_type = "LORA"
    inits = frozenset(INITS)
