"""PEFT DoRA adapters (``peft_type: LORA`` with ``use_dora: true``): LoRA
factors plus ``lora_magnitude_vector`` per module, read as the DoRA kind
(:mod:`loramix.kinds.dora`); layout in :mod:`loramix.io.formats.base`."""

from __future__ import annotations

from ...kinds.dora import DORA
from .base import PeftLayoutFormat


class PeftDora(PeftLayoutFormat):
    name = "peft-dora"
    kind = DORA
    peft_type = "LORA"
    dora = True
