"""How long a scenario run will take, from the throughput measured on this machine.

A run (:class:`Recorder`, fed by the runner's per-step callback in the parent
process, so every executor is covered) records each step it *makes* — a cache
hit costs nothing and teaches nothing — as work units and seconds under a
*rate key*: the step's cost kind plus what determines its cost. The rates are
kept per machine in ``<cache>/throughput/<machine id>.json``;
:func:`estimate` divides the work of each step a run would make by its rate.

==========  ==================================  ==================================================
cost kind   units                               key (besides the base, its architecture, threads)
==========  ==================================  ==================================================
data        records written                     —
base        steps x batch (pre-training)        size, batch
train       example passes: steps x batch, or   adapter kind, rank, top_layers, max_len, batch
            epochs x training records
eval        eval records                        form (base / adapters on the fly / low-rank
                                                merge), adapters, kind, max_len, batch, top_layers
merge       adapters merged (low-rank, kept)    method and its parameters, adapter kind
merge-eval  eval records (dense merge in        method, adapters, kind, max_len, batch
            memory, then evaluated)
similarity  adapters compared                   adapter kind, effective deltas
features    adapters                            adapter kind, calibration tokens and max_len
==========  ==================================  ==================================================

``threads`` is the torch threads of each job. A step whose exact key was never
measured falls back to the pooled rate of its cost kind on the same base
architecture, scaled by its units (and, for train, eval and merge-eval, by
``max_len``); a step with neither is reported as unmeasured, never counted
as zero. The estimate is rough: a rate is an average over whatever else the
machine was doing, the first step of a process also loads its model, and
``max_len`` scaling ignores that short records are padded to less.

The machine is a short fingerprint of the CPU model, ``os.cpu_count()``, the
total memory and, only for a CUDA run, the GPU's name. The file is replaced
atomically (a temporary and ``os.replace``): two runs writing at once may lose
one's update, never corrupt it; an unreadable file is ignored.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from .cache import canonical_json, is_cached
from .plan import Step
from .traits import kind_of, rank_of

FORMAT = 1
# An entry's history counts as at most this many steps when new ones are
# added, so that the rate follows the machine as it is now.
HISTORY = 50
FLUSH_SECONDS = 60.0


# --------------------------------------------------------------------------- the machine


def _memory_gib() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)
    except (AttributeError, ValueError, OSError):
        return None


def _gpu_name(device) -> str | None:
    """The CUDA device's name when ``device`` is (or resolves to) CUDA; torch is
    not imported for a CPU device (nor for ``auto`` without a GPU driver)."""
    if device is None:
        return None
    if isinstance(device, str):
        from ..devices import is_cpu, resolve_device

        if is_cpu(device):
            return None
        device = resolve_device(device)
    if getattr(device, "type", None) != "cuda":
        return None
    import torch

    return torch.cuda.get_device_name(device)


def machine(device=None) -> dict:
    """This machine: ``{id, cpu, cpus, memory_gib, gpu}``, ``id`` a short hash
    of the rest. ``device``: the run's device (a ``torch.device`` or
    ``auto``/``cpu``/``cuda``); its GPU's name joins the fingerprint."""
    from ..environment import cpu_name

    desc = {"cpu": cpu_name(), "cpus": os.cpu_count(), "memory_gib": _memory_gib(), "gpu": _gpu_name(device)}
    return {"id": hashlib.sha256(canonical_json(desc).encode()).hexdigest()[:12], **desc}


def machine_text(m: dict) -> str:
    gpu = f", {m['gpu']}" if m.get("gpu") else ""
    mem = f", {m['memory_gib']} GiB" if m.get("memory_gib") is not None else ""
    return f"{m['id']}: {m['cpus']} x {m['cpu']}{mem}{gpu}"


def throughput_path(cache_root: str | os.PathLike, machine_id: str) -> Path:
    return Path(cache_root) / "throughput" / f"{machine_id}.json"


# --------------------------------------------------------------------------- a step's work


@dataclass(frozen=True)
class Work:
    """A step's cost: its rate ``key`` (a dict), ``units`` of work, and the
    ``scale`` (``max_len`` or 1) by which the coarse fallback multiplies them."""

    key: dict
    units: float
    scale: float = 1.0

    @property
    def coarse(self) -> tuple:
        return self.key["kind"], self.key.get("arch")


@lru_cache(maxsize=64)
def _folder_arch(path: str) -> str:
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return "folder"
    names = ("model_type", "num_hidden_layers", "n_layer", "hidden_size", "n_embd", "vocab_size")
    return ":".join(str(cfg[k]) for k in names if k in cfg)


def _arch(base: Step) -> str:
    """What a step's cost depends on in the base: its size (built) or its
    architecture's shape (a folder), not its weights."""
    if base.cache_kind:
        return f"build:{base.spec['recipe']['size']}"
    if base.args.get("arch"):  # a GGUF not imported yet: from its header, as its import's config will say
        return base.args["arch"]
    return _folder_arch(base.args["path"])


def _records(by_id: dict[str, Step], ids) -> int:
    return sum(int(by_id[i].spec["records"]) for i in ids)


def _label(by_id: dict[str, Step], adapter_id: str) -> str:
    return by_id[adapter_id].spec["method"]


def work(st: Step, by_id: dict[str, Step], sc, threads: int = 1) -> Work | None:
    """The cost of step ``st`` of a plan (``by_id``: the plan's steps by id) of
    scenario ``sc`` run with ``threads`` torch threads per job; None for a step
    that costs nothing (a base given as a folder, hashed while planning)."""
    base = by_id["base"]
    if st.kind == "base":
        if st.cache_kind is None:
            return None
        from ..basebuild import SIZES

        r = st.spec["recipe"]
        size = SIZES.get(r["size"])
        steps, batch = r.get("steps") or size.steps, r.get("batch") or size.batch
        return Work(
            {"kind": "base", "arch": f"build:{r['size']}", "batch": batch, "threads": threads}, steps * batch
        )
    if st.kind == "data":
        return Work({"kind": "data", "threads": threads}, max(1, int(st.spec["records"])))
    common = {"base": base.folder_name[:16], "arch": _arch(base), "threads": threads}
    if st.kind in ("adapter", "merged-data"):
        if st.cache_kind is None:  # given: hashed while planning
            return None
        r, label = st.spec["recipe"], st.spec["method"]
        n_train = _records(by_id, [d for d in st.deps if d.startswith("data/")])
        units = r["steps"] * r["batch"] if r.get("steps") else (r.get("epochs") or 1) * n_train
        key = {"kind": "train", **common, "adapter": kind_of(label), "rank": rank_of(label, r["rank"]),
               "top_layers": r.get("top_layers"), "max_len": r["max_len"], "batch": r["batch"]}  # fmt: skip
        return Work(key, units, r["max_len"])
    if st.kind == "eval":
        model, a = st.spec["model"], st.args
        if "merge" in model:
            form, ads = "merge", by_id[a["merge"]].args["adapters"]
        elif "adapters" in model:
            form, ads = "adapters", a["adapters"]
        else:
            form, ads = "base", []
        max_len = st.spec["settings"]["max_len"]
        key = {"kind": "eval", **common, "form": form, "adapters": len(ads),
               "adapter": kind_of(_label(by_id, ads[0])) if ads else None, "max_len": max_len,
               "batch": sc.eval.batch, "top_layers": sc.adapters.top_layers}  # fmt: skip
        return Work(key, max(1, _records(by_id, [f"data/{n}/eval" for n in a["domains"]])), max_len)
    if st.kind == "merge":
        a = st.args
        kind = kind_of(_label(by_id, a["adapters"][0]))
        if a["low_rank"]:
            key = {"kind": "merge", **common, "method": a["method"], "params": a["params"], "adapter": kind}
            return Work(key, len(a["adapters"]))
        max_len = st.spec["settings"]["max_len"]
        key = {"kind": "merge-eval", **common, "method": a["method"], "adapters": len(a["adapters"]),
               "adapter": kind, "max_len": max_len, "batch": sc.eval.batch}  # fmt: skip
        return Work(key, max(1, _records(by_id, [f"data/{n}/eval" for n in a["domains"]])), max_len)
    if st.kind == "similarity":
        names = st.args["names"]
        kind = kind_of(_label(by_id, f"adapter/{st.label}/{names[0]}"))
        return Work(
            {"kind": "similarity", **common, "adapter": kind, "effective": st.args["effective"]}, len(names)
        )
    if st.kind == "features":
        s = st.spec["settings"]
        key = {"kind": "features", **common, "adapter": kind_of(_label(by_id, st.args["adapters"][0])),
               "tokens": s["tokens"], "max_len": s["max_len"]}  # fmt: skip
        return Work(key, len(st.args["names"]))
    raise ValueError(f"no cost model for a {st.kind!r} step")


# --------------------------------------------------------------------------- the file


def _valid(e) -> bool:
    try:
        return (isinstance(e["key"], dict) and isinstance(e["key"].get("kind"), str)
                and all(math.isfinite(float(e[k])) and float(e[k]) > 0 for k in ("units", "seconds", "n", "scale"))
                and int(e["steps"]) >= 1)  # fmt: skip
    except (KeyError, TypeError, ValueError):
        return False


def load_rates(path: Path) -> dict[str, dict]:
    """``{canonical key: entry}`` of a throughput file; ``{}`` when it is absent,
    unreadable or not one (a corrupt file is ignored, not an error). An entry:
    ``{key, units, seconds, n, steps, scale, updated}``; its rate is
    ``units / seconds``."""
    try:
        doc = json.loads(path.read_text())
        rates = doc["rates"] if isinstance(doc, dict) and doc.get("format") == FORMAT else None
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if not isinstance(rates, list):
        return {}
    return {canonical_json(e["key"]): e for e in rates if isinstance(e, dict) and _valid(e)}


def _merge(old: dict | None, new: dict) -> dict:
    if old is None:
        return new
    w = min(1.0, HISTORY / old["n"])  # older history weighs at most HISTORY steps
    return {**new, "units": old["units"] * w + new["units"], "seconds": old["seconds"] * w + new["seconds"],
            "n": old["n"] * w + new["n"], "steps": int(old["steps"]) + new["steps"]}  # fmt: skip


def add_rates(path: Path, m: dict, measured: dict[str, dict]) -> None:
    """Add ``measured`` (entries as :func:`load_rates` returns) to the file at
    ``path``: read, merge, write a temporary, rename it into place."""
    rates = load_rates(path)
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    for e in measured.values():
        k = canonical_json(e["key"])
        rates[k] = _merge(rates.get(k), {**e, "updated": now})
    from ..io.outputs import atomic_write  # its temporary names its owner: a killed run's is removed later

    with atomic_write(path) as f:
        json.dump({"format": FORMAT, "machine": m, "rates": [rates[k] for k in sorted(rates)]}, f, indent=1,
                  sort_keys=True)  # fmt: skip


class Recorder:
    """Collects the steps a run makes (:meth:`add`, from the executor's
    ``on_done`` in the parent process) and adds their rates to the machine's
    file now and then (:meth:`flush`; at least every :data:`FLUSH_SECONDS`
    and at the end of the run)."""

    def __init__(self, cache_root, m: dict, sc, steps: list[Step], threads: int = 1):
        self.path, self.machine, self.sc, self.threads = throughput_path(cache_root, m["id"]), m, sc, threads
        self.by_id = {st.id: st for st in steps}
        self.pending: dict[str, dict] = {}
        self.last_flush = time.monotonic()

    def add(self, st: Step, outcome) -> None:
        made = st.cache_kind is None or any(e.status != "hit" for e in outcome.events)
        w = work(st, self.by_id, self.sc, self.threads) if made else None
        if w is None or not outcome.seconds > 0:
            return
        k = canonical_json(w.key)
        e = self.pending.setdefault(k, {"key": w.key, "units": 0.0, "seconds": 0.0, "n": 0, "steps": 0,
                                        "scale": w.scale})  # fmt: skip
        e["units"] += w.units
        e["seconds"] += outcome.seconds
        e["n"] += 1
        e["steps"] += 1
        if time.monotonic() - self.last_flush > FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Write what was measured since the last flush. A cache folder that
        cannot be written loses the measurement, not the run."""
        self.last_flush = time.monotonic()
        if not self.pending:
            return
        pending, self.pending = self.pending, {}
        try:
            add_rates(self.path, self.machine, pending)
        except OSError:
            pass


# --------------------------------------------------------------------------- the estimate


@dataclass
class Estimate:
    """The predicted seconds of a run. ``seconds``: the sum over the steps it
    would make (and the uncached ones it reruns); ``wall``: with ``jobs``
    workers, scheduling the plan's dependencies as the executors do, assuming
    the jobs do not slow each other (``seconds`` when ``jobs`` is 1)."""

    machine: dict
    jobs: int
    seconds: float = 0.0
    wall: float = 0.0
    to_make: int = 0  # cached steps missing from the cache
    cached: int = 0
    rerun: Counter = field(
        default_factory=Counter
    )  # step kind -> uncached steps (the similarity): run every time
    measured_from: int = 0  # steps of earlier runs behind the rates used
    coarse: Counter = field(default_factory=Counter)  # step kind -> steps priced by the fallback rate
    unmeasured: Counter = field(default_factory=Counter)  # step kind -> steps with no rate
    per_step: dict = field(default_factory=dict)  # step id -> predicted seconds (None: unmeasured)

    def lines(self) -> list[str]:
        """One or two lines for ``scenario check``."""
        where = f"this machine ({machine_text(self.machine)})"
        unm = ", ".join(f"{n} {k}" for k, n in self.unmeasured.items())
        n_unm = sum(self.unmeasured.values())
        steps = f"{_n(self.to_make, 'step')} to make ({self.cached} cached"
        if self.rerun:
            steps += f", plus {', '.join(_n(n, k + ' step') for k, n in self.rerun.items())} run every time"
        steps += ")"
        n_run = self.to_make + sum(self.rerun.values())
        if not n_run:
            return [f"  estimate: nothing to make, all {self.cached} cached steps reused"]
        if n_unm == n_run:
            return [
                f"  estimate: none yet, no measurement on {where} for any of the {steps}: {unm}; "
                "a run measures them"
            ]
        head = f"  estimate (rough): ~{duration(self.wall)}"
        if self.jobs > 1:
            head += f" with {self.jobs} jobs"
        line = (
            f"{head} for {steps}, measured on {where} from {_n(self.measured_from, 'step')} of earlier runs"
        )
        if n_unm:
            line += f"; {_n(n_unm, 'step')} with no measurement yet, not counted ({unm})"
        notes = []
        if self.coarse:
            c = ", ".join(f"{n} {k}" for k, n in self.coarse.items())
            notes.append(f"{_n(sum(self.coarse.values()), 'step')} ({c}) priced from other settings of their kind, "
                         "scaled by work and max_len")  # fmt: skip
        if self.jobs > 1:
            notes.append(f"~{duration(self.seconds)} of step time in all, assuming the {self.jobs} jobs "
                         "do not slow each other")  # fmt: skip
        return [line] + ([f"  ({'; '.join(notes)})"] if notes else [])


def _n(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def duration(s: float) -> str:
    if s < 90:
        return f"{max(1, round(s))} s"
    if s < 90 * 60:
        return f"{round(s / 60)} min"
    return f"{s / 3600:.1f} h"


def _wall(steps: list[Step], secs: dict[str, float], jobs: int) -> float:
    """The makespan of the plan on ``jobs`` workers: a step is queued once its
    dependencies are done (in plan order), and the queue runs first in, first
    out, as the executors submit to their pool."""
    if jobs <= 1:
        return sum(secs.values())
    order = {st.id: i for i, st in enumerate(steps)}
    waiting = {st.id: len(st.deps) for st in steps}
    children: dict[str, list[str]] = {}
    for st in steps:
        for d in st.deps:
            children.setdefault(d, []).append(st.id)
    queue = [st.id for st in steps if not st.deps]
    running: list[tuple[float, int, str]] = []
    t, qi = 0.0, 0
    while qi < len(queue) or running:
        while qi < len(queue) and len(running) < jobs:
            sid = queue[qi]
            qi += 1
            heapq.heappush(running, (t + secs.get(sid, 0.0), order[sid], sid))
        t, _, sid = heapq.heappop(running)
        ready = []
        for c in children.get(sid, ()):
            waiting[c] -= 1
            if not waiting[c]:
                ready.append(c)
        queue += sorted(ready, key=order.get)
    return t


def estimate(sc, steps: list[Step], cache_root, *, device=None, threads: int = 1, jobs: int = 1,
             fresh: bool = False, m: dict | None = None) -> Estimate:  # fmt: skip
    """Predict the run of plan ``steps`` of scenario ``sc`` against the cache at
    ``cache_root`` (``fresh``: as if it were empty), with ``jobs`` jobs of
    ``threads`` torch threads each, on this machine (``m``, or
    :func:`machine` of ``device``), from the rates measured there."""
    m = m or machine(device)
    rates = load_rates(throughput_path(cache_root, m["id"]))
    pooled: dict[tuple, list] = {}  # coarse key -> [units x scale, seconds]
    for e in rates.values():
        p = pooled.setdefault((e["key"]["kind"], e["key"].get("arch")), [0.0, 0.0])
        p[0] += e["units"] * e["scale"]
        p[1] += e["seconds"]
    est, by_id = Estimate(m, max(1, jobs)), {st.id: st for st in steps}
    used: set = set()  # exact keys (strings) and coarse keys (tuples) priced from
    for st in steps:
        w = work(st, by_id, sc, threads)
        if w is None:
            continue
        if st.cache_kind is None:
            est.rerun[st.kind] += 1
        elif not fresh and is_cached(cache_root, st.cache_kind, st.key):
            est.cached += 1
            continue
        else:
            est.to_make += 1
        k = canonical_json(w.key)
        if k in rates:
            e = rates[k]
            s = w.units * e["seconds"] / e["units"]
            used.add(k)
        elif w.coarse in pooled:
            units, seconds = pooled[w.coarse]
            s = w.units * w.scale * seconds / units
            est.coarse[st.kind] += 1
            used.add(w.coarse)
        else:
            est.unmeasured[st.kind] += 1
            est.per_step[st.id] = None
            continue
        est.per_step[st.id] = s
        est.seconds += s
    behind = {k for k in used if k in rates}
    behind |= {k for k, e in rates.items() if (e["key"]["kind"], e["key"].get("arch")) in used}
    est.measured_from = sum(int(rates[k]["steps"]) for k in behind)
    est.wall = _wall(steps, {i: s for i, s in est.per_step.items() if s is not None}, est.jobs)
    return est
