"""``--device auto|cpu|cuda``: where the arithmetic runs. Everything runs on CPU."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import TYPE_CHECKING

from .errors import UsageError

if TYPE_CHECKING:  # torch is imported when a device is resolved, not by the CLI's option lists
    import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cuda`` without a GPU is
    a usage error (exit 2), not a silent fallback."""
    import torch

    if isinstance(spec, torch.device):
        return spec
    spec = "auto" if spec is None else spec.lower()  # '' (an unset shell variable) is refused, not auto
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("device", f"{spec} requested but torch.cuda.is_available() is False")
        return torch.device(spec)
    if spec == "cpu":
        return torch.device("cpu")
    raise UsageError("device", f"unknown device {spec!r}; choose auto, cpu or cuda")


def is_cpu(spec: str | torch.device | None = "auto") -> bool:
    """Whether ``spec`` resolves to the CPU, told without importing torch
    where it can be: ``cpu``, or ``auto`` on a machine without a GPU driver
    (then ``torch.cuda.is_available()`` is False anyway). Errors as
    :func:`resolve_device`."""
    if spec is None or isinstance(spec, str):
        s = "auto" if spec is None else spec.lower()
        no_driver = not any(os.path.exists(p) for p in ("/proc/driver/nvidia/version", "/dev/kfd"))
        if s == "cpu" or (s == "auto" and no_driver):
            return True
    return resolve_device(spec).type == "cpu"


@contextmanager
def torch_threads(n: int | None):
    """torch on ``n`` threads in this block (None: as it is, and torch not
    imported), as before after it. A process-wide setting, as
    ``torch.set_num_threads`` is."""
    if n is None:
        yield
        return
    import torch

    old = torch.get_num_threads()
    if n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextmanager
def kept_rng(dev: torch.device):
    """torch's global random state (the CPU's, and ``dev``'s where it is a GPU)
    as it was on entry, restored on exit: a training seeds it for its dropout
    (``torch.manual_seed``), which reset a notebook's own random stream."""
    import torch

    gpus = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus):
        yield
