"""PEFT AdaLoRA adapters (``peft_type: ADALORA``), read as LoRA.

AdaLoRA (Zhang et al. 2023) keeps each module's delta in an SVD-like form
and prunes its ranks while training. PEFT stores, per module::

    lora_A (r, in)   lora_E (r, 1)   lora_B (out, r)

and adds, on the fly and when merging (``SVDLinear.get_delta_weight``)::

    dW = B @ (A * E) * c / (ranknum + 1e-5)

with ``c = lora_alpha`` (``r`` where ``lora_alpha <= 0``) and ``ranknum``
the module's initial rank ``init_r``, as a float32. That is a LoRA module
with ``A' = A * E`` (each row of ``A`` times its singular value, in float32
as PEFT's parameters are) and scale ``s = c / (init_r + 1e-5)``, which is
how loramix reads it: every command then takes it as it takes a LoRA.

The rank allocator's masks are the config's ``rank_pattern``, ``{"<module>.
lora_E": [bool] * init_r}``. PEFT saves only the kept ranks, so a module's
``r`` is the count of its mask's ``true``\\ s (``init_r`` where it has no
mask), and reloads it with ``ranknum`` still ``init_r`` (PEFT 0.21's
``resize_modules_by_rank_pattern`` keeps the scale the training had);
``c`` uses the kept ``r``. A module whose every rank was pruned (``r = 0``,
all of its tensors empty) adds nothing and is left out; an adapter with
nothing left is refused. The layout and the checks are PEFT LoRA's
(:mod:`loramix.io.formats.base`); ``docs/adapters.md`` has the math.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ...errors import AdapterError
from .base import LoraReading, check_config_rank, checked_scale

#: AdaLoRA's default ``init_r`` (``AdaLoraConfig``), for a config that omits it
INIT_R = 12


def rank_mask(config: dict, module: str) -> list[bool] | None:
    """``module``'s mask in the config's ``rank_pattern`` (keys
    ``<module>.lora_E``, or ``<module>.lora_E.<adapter name>`` as older PEFT
    saved them; matched by name, as PEFT resolves them), else None."""
    for key, mask in (config.get("rank_pattern") or {}).items():
        if re.fullmatch(rf"{re.escape(module)}\.lora_E(\.[^.]+)?", key):
            return mask
    return None


class PeftAdaLora(LoraReading):
    name = "peft-adalora"
    peft_type = "ADALORA"
    label = "AdaLoRA"
    # no embedding parts: PEFT's AdaLoRA wraps linear and Conv1D layers only
    parts = {"lora_A": ("A", "pos"), "lora_B": ("B", "pos"), "lora_E": ("E", "pos")}
    read_as = ("PEFT AdaLoRA, read as LoRA: A is lora_A * lora_E and the scale lora_alpha / (init_r + 1e-5); "
               "pruned ranks are gone, and a module pruned to rank 0 is not listed")  # fmt: skip

    def lora_factors(
        self, module: str, fs: dict, config: dict, cfg_path: Path, weights: Path
    ) -> tuple | None:
        """``(B, A * E, c / (init_r + 1e-5), lora_alpha)`` (module docstring);
        None where the module's rank is 0."""
        self.require_all(module, fs, weights)
        A, B, E = fs[("A", "pos")], fs[("B", "pos")], fs[("E", "pos")]
        r = int(A.shape[0])
        if B.shape[1] != r or tuple(E.shape) != (r, 1):
            raise AdapterError(weights, f"module {module}: lora_A {tuple(A.shape)}, lora_E {tuple(E.shape)} and "
                               f"lora_B {tuple(B.shape)} must be (r, in), (r, 1) and (out, r)")  # fmt: skip
        init_r = config.get("init_r", INIT_R)
        mask = rank_mask(config, module)
        if mask is not None and len(mask) != init_r:
            raise AdapterError(cfg_path, f"rank_pattern of module {module} has {len(mask)} entries, "
                               f"but init_r is {init_r}: one per initial rank")  # fmt: skip
        check_config_rank(module, r, init_r if mask is None else sum(mask), cfg_path, weights,
                          fields="init_r / rank_pattern")  # fmt: skip
        if r == 0:
            return None
        alpha = float(config.get("lora_alpha", 8))
        # PEFT's ranknum is a float32 parameter, and + 1e-5 is a float32 sum
        ranknum = float(np.float32(init_r) + np.float32(1e-5))
        scale = checked_scale({}, module, alpha if alpha > 0 else float(r), ranknum, cfg_path)
        return B, A * E, scale, alpha
