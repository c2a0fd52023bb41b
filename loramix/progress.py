"""How far a long command is: a bar on a terminal, a plain line elsewhere.

A tqdm bar is drawn only where stderr is a terminal
(:func:`loramix.options.bar_disabled`): a command run in the background
(``loramix train ... 2> train.log &``), in CI or into a pipe said nothing
until it ended. :func:`progress_bar` gives such a command, where progress was
asked for, a :class:`Lines` in the bar's place: it keeps the bar's count and
prints a plain line on stderr at most once every :func:`line_every` seconds
(60; ``LORAMIX_PROGRESS_EVERY`` sets it, 0: at every update)::

    loramix: train lora: 120/400 steps (30%), loss 2.310, lr 1.0e-04, 4m10s elapsed, ~9m43s left

``<what>: <done>/<total> <unit>s (<percent>)``, then the bar's own fields
(``name value``), the time since the bar was made and the time left at the
rate so far (``elapsed * (total - done) / done``). On a terminal the bar is
drawn as before; with progress off (``--no-progress``, ``progress=False``)
nothing is printed. Nothing goes to stdout, which holds the tables and JSON.
An update costs one clock read and a comparison beyond the count.
"""

from __future__ import annotations

import math
import os
import sys
import time

from .errors import UsageError

#: seconds between two progress lines where stderr is a file or a pipe
LINE_EVERY = 60.0
#: the variable that sets them (seconds, >= 0; 0: a line at every update)
ENV = "LORAMIX_PROGRESS_EVERY"


def line_every() -> float:
    """Seconds between two lines: ``$LORAMIX_PROGRESS_EVERY`` where set and
    not empty, else :data:`LINE_EVERY`; anything but a finite number >= 0 is
    a :class:`UsageError` naming the variable."""
    raw = os.environ.get(ENV)
    if raw is None or not raw.strip():  # set to nothing: as unset
        return LINE_EVERY
    try:
        every = float(raw)
    except ValueError:
        every = math.nan
    if not (math.isfinite(every) and every >= 0):
        raise UsageError(ENV, f"must be a number of seconds >= 0, got {raw!r}")
    return every


def lines_wanted(progress: bool, file=None) -> bool:
    """Whether progress asked for is said in plain lines: ``file`` (stderr)
    is not a terminal, where tqdm draws no bar, and the bar is not a
    notebook's widget (which tqdm.auto draws whatever stderr is)."""
    if not progress:
        return False
    file = sys.stderr if file is None else file
    if not hasattr(file, "isatty"):  # tqdm draws on such a stream
        return False
    try:
        if file.isatty():
            return False
    except (ValueError, OSError):  # closed: nowhere to write a line either
        return False
    return not _notebook()


def _notebook() -> bool:
    from tqdm.auto import tqdm

    return any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__)


def progress_bar(iterable=None, *, progress: bool, **kw):
    """tqdm.auto's bar of ``iterable`` (``kw``: tqdm's ``total``, ``desc``,
    ``unit``, ``unit_scale``, ...) where ``progress`` is asked for and stderr
    is a terminal; a :class:`Lines` where it is not; a disabled (silent)
    bar with ``progress`` off. All three take the same calls."""
    if lines_wanted(progress, kw.get("file")):
        return Lines(iterable, total=kw.get("total"), desc=kw.get("desc") or "", unit=kw.get("unit", "it"),
                     unit_scale=bool(kw.get("unit_scale")))  # fmt: skip
    from tqdm.auto import tqdm

    from .options import bar_disabled

    return tqdm(iterable, disable=bar_disabled(progress), **kw)


class Lines:
    """A tqdm bar's stand-in where stderr is a file or a pipe: the count, and
    a line (module docstring) when :func:`line_every` seconds have passed
    since the last one (or since it was made). The calls loramix makes of a
    bar: ``update``, ``set_postfix``, ``set_postfix_str``,
    ``set_description``, ``write``, ``close``, iteration."""

    def __init__(
        self, iterable=None, *, total=None, desc: str = "", unit: str = "it", unit_scale: bool = False
    ):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.unit_scale, self.n, self.postfix = unit_scale, 0, ""
        self.every = line_every()
        self.t0 = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            print(self.line(now), file=sys.stderr, flush=True)

    def line(self, now: float) -> str:
        """``loramix: <desc>: <n>/<total> <unit>s (<p>%)[, <postfix>], <t> elapsed, ~<t> left``."""
        total = self._amount(self.total) if self.total else "?"
        count = f"{self._amount(self.n)}/{total}" + ("" if self.unit_scale else f" {self.unit}s")
        parts = [count + (f" ({100 * self.n / self.total:.0f}%)" if self.total else "")]
        if self.postfix:
            parts.append(self.postfix)
        elapsed = now - self.t0
        parts.append(f"{duration(elapsed)} elapsed")
        if self.total and 0 < self.n < self.total:
            parts.append(f"~{duration(elapsed * (self.total - self.n) / self.n)} left")
        return f"loramix: {self.desc}: " + ", ".join(parts)

    def _amount(self, x) -> str:
        """``x`` as it is, or with ``unit_scale`` in decimal units: ``1.20 GB``."""
        if not self.unit_scale:
            return f"{x}"
        for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(x) >= scale:
                return f"{x / scale:.2f} {prefix}{self.unit}"
        return f"{x} {self.unit}"

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kw) -> None:
        fields = {**(ordered_dict or {}), **kw}
        self.postfix = ", ".join(f"{k} {v}" for k, v in fields.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    @staticmethod
    def write(s: str, file=None, end: str = "\n", nolock: bool = False) -> None:
        print(s, file=sys.stderr if file is None else file, end=end, flush=True)

    def close(self) -> None:
        pass

    def __iter__(self):
        for x in self.iterable:
            yield x
            self.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def duration(seconds: float) -> str:
    """``45s``, ``4m10s``, ``2h05m``: whole seconds below an hour, minutes above."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
