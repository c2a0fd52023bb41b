"""Where numbers were taken: the machine and the library versions, for reports."""

from __future__ import annotations

import functools
import os
import platform
import sys
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(module: str) -> str:
    """``module.__version__``: from the module where it is imported, else from
    its installed metadata (the same string) without importing it."""
    if module in sys.modules:
        return sys.modules[module].__version__
    return _installed_version(module)


@functools.cache
def _installed_version(module: str) -> str:
    """The installed metadata's version of ``module``, read once per process:
    each read scans the installed distributions (a fiftieth of a second),
    and a report keys each of its figures on matplotlib's."""
    from importlib.metadata import version

    return version(module)


def environment(device, torch_threads: int | None = None) -> dict:
    """Versions, platform, CPU and device (a ``torch.device``, or ``"cpu"``) as
    a flat dict. ``torch_threads``: the threads the numbers were computed
    with (default: torch's now). torch and transformers are imported only
    where needed (a CUDA device, no ``torch_threads``): a scenario rerun read
    back from the cache reports them without the seconds of their import."""
    import numpy
    import pandas

    cpu = cpu_name()
    dev_name = "CPU"
    if getattr(device, "type", None) == "cuda":
        import torch

        dev_name = torch.cuda.get_device_name(device)
    if torch_threads is None:
        import torch

        torch_threads = torch.get_num_threads()
    return {
        "python": sys.version.split()[0],
        "torch": package_version("torch"),
        "transformers": package_version("transformers"),
        "numpy": numpy.__version__,
        "pandas": pandas.__version__,
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch_threads,
        "device": str(device),
        "device_name": dev_name,
    }
