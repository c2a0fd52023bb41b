"""Executors: run a study's plan serially, in local processes, or on Ray.

Every executor runs each :class:`~loramix.scenario.plan.Step` once, after
all of its dependencies, and returns ``{step id: Outcome}``; ``done`` passes
the outcomes of steps run before (a second batch of steps planned from the
results of the first: the plan validation, :mod:`loramix.scenario.planval`),
which the returned dict includes. A step is an
idempotent job on the shared content-addressed cache: its result depends only
on its spec, so the order (and the process) in which steps run changes no
number; a process asking for an artifact another one is making waits for
it, and uses it once made (:meth:`loramix.scenario.cache.Cache.get_or_make`).

* ``serial``: in this process, in plan order.
* ``processes``: ``jobs`` local worker processes (``spawn``); with
  ``device="cuda"`` and several GPUs, worker ``i`` uses GPU ``i mod n``.
* ``ray``: tasks on a Ray cluster (``ray.init(address=...)``, or a local
  instance without an address); the cache folder must be shared by the nodes.

Torch threads: the run's ``threads`` are split across the ``jobs`` workers
(at least one each). Results are byte-identical to a serial run whenever each
job computes with the same number of threads as the serial run did.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..errors import LoramixError, UsageError
from ..options import check_workers
from ..stopping import deferred
from .plan import Step
from .steps import StepContext, reads_back, run_step

EXECUTORS = ("serial", "processes", "ray")


@dataclass
class Outcome:
    """A step's result, its cache lookups and its wall time."""

    result: dict
    events: list = field(default_factory=list)
    seconds: float = 0.0


def _timed(ctx: StepContext, st: Step, deps: dict) -> Outcome:
    n0, t0 = len(ctx.cache.log), time.perf_counter()
    result = run_step(ctx, st, deps)
    return Outcome(result, ctx.cache.log[n0:], time.perf_counter() - t0)


def _deps_of(st: Step, done: dict[str, Outcome]) -> dict:
    return {d: done[d].result for d in st.deps}


def threads_per_job(threads: int, jobs: int) -> int:
    """The run's torch threads split across ``jobs`` concurrent jobs."""
    return max(1, threads // max(1, jobs))


@dataclass
class SerialExecutor:
    def describe(self) -> dict:
        return {"name": "serial", "jobs": 1}

    def run(self, steps: list[Step], ctx: StepContext, on_done: Callable[[Step, Outcome], None],
            done: dict | None = None, on_start: Callable[[Step], None] | None = None) -> dict:  # fmt: skip
        done = dict(done or {})
        for st in steps:
            if on_start is not None:
                on_start(st)
            done[st.id] = _timed(ctx, st, _deps_of(st, done))
            on_done(st, done[st.id])
        return done


def _schedule(steps: list[Step], submit, wait_any, on_done, done: dict | None = None,
              on_start=None, slots: int | None = None) -> dict[str, Outcome]:  # fmt: skip
    """Submit each step once its dependencies are done (``done``: those run
    before); ``submit(step, deps)`` returns a handle, ``wait_any(handles)``
    yields ``(handle, outcome)`` pairs of finished ones. ``on_start(step)``
    is called as a step is submitted. ``slots``: at most that many steps
    submitted at once (a pool of that many workers), so a step starts when it
    is submitted rather than waiting in the pool's queue, and ``on_start``
    is its start; None: no limit (a Ray cluster schedules by its resources)."""
    done = dict(done or {})
    pending = list(steps)
    running: dict = {}
    while pending or running:
        ready = [st for st in pending if all(d in done for d in st.deps)]
        if slots is not None:
            ready = ready[: max(0, slots - len(running))]
        for st in ready:
            pending.remove(st)
            if on_start is not None:
                on_start(st)
            running[submit(st, _deps_of(st, done))] = st
        if not running:
            missing = {d for st in pending for d in st.deps} - done.keys()
            raise RuntimeError(f"plan has unsatisfiable dependencies: {sorted(missing)[:5]}")
        for handle, outcome in wait_any(list(running)):
            st = running.pop(handle)
            done[st.id] = outcome
            on_done(st, outcome)
    return done


# ------------------------------------------------------------------ processes

_WORKER: dict = {}
#: seconds a terminated worker has to unwind its step before it is killed
STOP_SECONDS = 30.0


def _worker_init(payload: dict, threads: int, devices, parent: int | None = None) -> None:
    import signal
    import threading

    import torch
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    signal.signal(signal.SIGTERM, _worker_terminated)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; it terminates us
    if hasattr(signal, "pthread_sigmask"):  # born with SIGINT blocked (_starting_workers); ignored now
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _die_with(parent)
    # tqdm's default lock holds a multiprocessing semaphore, which a worker leaving by
    # os._exit would leak (the resource tracker's warning at exit); its bars are off here
    tqdm.set_lock(threading.RLock())
    hf_logging.disable_progress_bar()
    torch.set_num_threads(threads)
    # what every computing step imports (models, tokenizers, the training and
    # evaluation code), now: a worker started beside the first step (the base
    # build, which runs alone; ProcessExecutor.run) then does it on the idle core
    import transformers.modeling_utils  # noqa: F401
    import transformers.tokenization_utils_fast  # noqa: F401

    from .. import perplexity, train  # noqa: F401

    device = devices.get() if devices is not None else None
    _WORKER["ctx"] = StepContext.from_payload(payload, device)


def _worker_started() -> None:
    """A task that does nothing: submitted to start a worker process (its
    :func:`_worker_init`) before a step needs it."""


@contextmanager
def _starting_workers():
    """Around the pool's start of a worker process (``pool.submit``): a
    Ctrl-C or a kill waits until the worker is started, then is raised here as
    usual. SIGINT is blocked in this thread, and the workers inherit the mask
    (:func:`_worker_init` ignores it, then unblocks it): a terminal's Ctrl-C,
    sent to the whole process group, reaching a worker while its Python
    starts and imports torch printed a KeyboardInterrupt traceback, or "Fatal
    Python error", beside the run's one line. SIGINT and SIGTERM are also held
    back from this process's own handlers, which run in the main thread
    whichever thread the signal reaches: raised while the pool writes a new
    worker its start-up data, they left it an EOFError traceback.
    (Multiprocessing's resource tracker is started the same way.)"""
    import signal
    import threading

    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    handlers = {
        s: signal.signal(s, lambda signum, frame: held.append(signum))
        for s in (signal.SIGINT, signal.SIGTERM)
    }
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for s, h in handlers.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        for s in dict.fromkeys(held):  # now to the handlers it was meant for
            signal.raise_signal(s)


def _worker_terminated(signum, frame):
    """SIGTERM in a worker. Within a step: unwind it, so its half-made
    artifact is removed, then leave (:func:`_worker_run`). Idle: leave at
    once. Either way without a traceback, and without going back to the
    pool for more work (the pool would take the interrupt for the step's
    result and wait). Already unwinding: ignored, so that the removal of
    the half-made artifact is not itself interrupted (a SIGTERM sent to the
    whole process group reaches a worker twice: once itself, once from the
    parent's :func:`_stop`). Within a step not in importlib's code or a C
    extension's start-up, where the interrupt can be lost and the step go
    on (:mod:`loramix.stopping`)."""
    if _WORKER.get("stopping"):
        return
    if _WORKER.get("in_step"):
        if deferred(signum, frame):
            return
        _WORKER["stopping"] = True
        raise KeyboardInterrupt
    os._exit(128 + signum)


def _die_with(parent: int | None) -> None:
    """Ask Linux for SIGTERM when the parent dies (a ``kill -9`` of the run
    would otherwise leave its workers computing); elsewhere a no-op."""
    import ctypes
    import signal

    if parent is None or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the request
        os._exit(143)


def _worker_run(st: Step, deps: dict) -> Outcome:
    from ..blas import openblas_threads

    _WORKER["in_step"] = True
    try:
        with openblas_threads(1):  # as in the run's own process (run_scenario), spawned from Python
            return _timed(_WORKER["ctx"], st, deps)
    finally:
        _WORKER["in_step"] = False
        if _WORKER.get("stopping"):
            os._exit(143)  # the step has unwound


def _gpu_devices(device: str) -> list[str] | None:
    if not str(device).startswith("cuda") or ":" in str(device):
        return None
    import torch

    n = torch.cuda.device_count()
    return [f"cuda:{i}" for i in range(n)] if n > 1 else None


@dataclass
class ProcessExecutor:
    """``jobs`` worker processes. ``auto`` (the command's default, not asked
    for): a plan of fewer than :data:`AUTO_MIN_TRAININGS` training steps per
    worker runs serially instead, in this process, as workers' start-up
    (importing torch and transformers) would cost more than they save."""

    jobs: int
    threads: int = 1
    auto: bool = False
    serial: bool = False  # an auto run found too little to spread

    def describe(self) -> dict:
        if self.serial:
            return {"name": "serial", "jobs": 1, "chosen": f"too few trainings for {self.jobs} workers"}
        return {
            "name": "processes",
            "jobs": self.jobs,
            "threads_per_job": threads_per_job(self.threads, self.jobs),
        }

    def computes_here(self, steps: list[Step], done: dict | None = None) -> bool:
        """Whether :meth:`run` of ``steps`` computes in this process (an auto
        run that found too little to spread), not in workers."""
        return not worth_workers(steps, self.jobs) if self.auto and not done else self.serial

    def run(self, steps: list[Step], ctx: StepContext, on_done, done: dict | None = None,
            on_start=None) -> dict:  # fmt: skip
        self.serial = self.computes_here(steps, done)  # decided on the plan's first batch, kept for a second
        if self.serial:
            return SerialExecutor().run(steps, ctx, on_done, done, on_start)
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        spawn = mp.get_context("spawn")
        gpus = _gpu_devices(str(ctx.device))
        devices = None
        if gpus:
            devices = spawn.Queue()
            for i in range(self.jobs):
                devices.put(gpus[i % len(gpus)])
        from concurrent.futures import Future
        from concurrent.futures.process import BrokenProcessPool

        # every worker started and the steps under way: to say which died, and during what
        workers: dict = {}
        under_way: dict = {}
        pools: list = []  # started at the first step that computes: a study read back starts none

        def submit(st, deps):
            if reads_back(ctx, st):  # milliseconds here; a worker's start is seconds (torch, transformers)
                future = Future()
                future.set_result(_timed(ctx, st, deps))
                return future
            first = not pools
            if first:
                pools.append(ProcessPoolExecutor(self.jobs, mp_context=spawn, initializer=_worker_init,
                                                 initargs=(ctx.payload(), threads_per_job(self.threads, self.jobs),
                                                           devices, os.getpid())))  # fmt: skip
            pool = pools[0]
            under_way[st.id] = st
            with _starting_workers():  # the pool starts a worker here, on demand
                future = pool.submit(_worker_run, st, deps)
                # the first step (a base build) often runs alone: start the other workers
                # the computing steps can use now, so their start-up runs beside it, not after
                others = min(self.jobs, sum(not reads_back(ctx, s) for s in steps)) - 1 if first else 0
                for _ in range(others):
                    pool.submit(_worker_started)
            workers.update(getattr(pool, "_processes", None) or {})
            return future

        def ended(st, outcome):
            under_way.pop(st.id, None)
            on_done(st, outcome)

        def wait_any(futures):
            finished, _ = wait(futures, return_when=FIRST_COMPLETED)
            return [(f, f.result()) for f in finished]

        try:
            out = _schedule(steps, submit, wait_any, ended, done, on_start, slots=self.jobs)
        except BaseException as e:
            for pool in pools:
                _stop(list({**workers, **(getattr(pool, "_processes", None) or {})}.values()))
                pool.shutdown(wait=True, cancel_futures=True)
            # a worker that could not unwind (kill -9, the out-of-memory killer, one killed by
            # _stop after STOP_SECONDS) left its temporary: removed here, as its owner is gone
            from .cache import remove_stale

            remove_stale(ctx.cache.root)
            if isinstance(e, BrokenProcessPool):  # and the run says so in a line
                line = _lost_worker(list(workers.values()), list(under_way.values()))
                raise LoramixError(None, line) from e
            raise
        for pool in pools:
            pool.shutdown(wait=True)
        return out


def _lost_worker(procs: list, under_way: list[Step]) -> str:
    """The line for a pool broken by a worker that died (not one stopped by
    :func:`_stop`, which leaves with 143): how it died and what was under way."""
    import signal

    codes = [p.exitcode for p in procs if p.exitcode not in (None, 0, 128 + signal.SIGTERM, -signal.SIGTERM)]
    how = "died"
    if codes and codes[0] < 0:
        try:
            how = f"was killed by {signal.Signals(-codes[0]).name}"
        except ValueError:
            how = f"was killed by signal {-codes[0]}"
        if codes[0] == -signal.SIGKILL:
            how += " (the out-of-memory killer, or kill -9)"
    elif codes:
        how = f"exited with status {codes[0]}"
    elif any(p.exitcode == 128 + signal.SIGTERM for p in procs):  # one unwound a SIGTERM (ours, or a kill)
        how = "was terminated (SIGTERM)"
    steps = ", ".join(f"{st.kind} {st.label}" for st in under_way[:3]) + (" ..." if len(under_way) > 3 else "")  # fmt: skip
    return (f"a worker process of the study {how}" + (f" (steps under way: {steps})" if steps else "") +
            "; the steps finished are cached, so a rerun resumes (with fewer --jobs if memory is short)")  # fmt: skip


def _stop(procs: list) -> None:
    """Terminate the workers: each removes its half-made artifact and exits
    (:func:`_worker_terminated`); one still there after
    :data:`STOP_SECONDS` (in a long native call) is killed, so the run never
    waits on it."""
    for p in procs:
        p.terminate()
    deadline = time.monotonic() + STOP_SECONDS
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(5)


# ------------------------------------------------------------------ ray

_RAY_CTX: dict = {}


def _ray_run(payload: dict, threads: int, st: Step, deps: dict) -> Outcome:
    import torch

    torch.set_num_threads(threads)
    key = payload["run"]
    if key not in _RAY_CTX:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        _RAY_CTX.clear()
        _RAY_CTX[key] = StepContext.from_payload(payload)
    from ..blas import openblas_threads

    with _stopped_by(_stop_flag(payload["cache_root"], key)), openblas_threads(1):
        return _timed(_RAY_CTX[key], st, deps)


#: seconds between a Ray task's looks for its run's stop flag
STOP_POLL_SECONDS = 0.2


def _stop_flag(cache_root, run: str):
    """The file whose existence tells a run's Ray tasks to stop (:func:`_stop_tasks`):
    in the cache folder, which the nodes share. ``run`` (:func:`_run_key`) ends with
    its process's :func:`~loramix.io.outputs.owner_tag`, so that the flag of a run
    killed while stopping is known for over (:func:`~.cache.remove_finished_stop_flags`)."""
    from pathlib import Path

    from .cache import STOP_PREFIX

    return Path(cache_root) / f"{STOP_PREFIX}{run}"


def _run_key() -> str:
    """A Ray run's key: ``<32 hex>.<owner tag>`` (:func:`_stop_flag`)."""
    import uuid

    from ..io.outputs import owner_tag

    return f"{uuid.uuid4().hex}.{owner_tag()}"


@contextmanager
def _stopped_by(flag, every: float = STOP_POLL_SECONDS):
    """Within: once ``flag`` exists, a KeyboardInterrupt in this (the main)
    thread, which unwinds the step (its half-made artifact removed), as
    ``ray.cancel`` does; a step that would start after it is not run. A
    thread looks every ``every`` seconds."""
    import _thread
    import threading

    if flag.exists():
        raise KeyboardInterrupt
    done = threading.Event()

    def watch():
        while not done.wait(every):
            if flag.exists():
                _thread.interrupt_main()
                return

    watcher = threading.Thread(target=watch, name="loramix-stop", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


def _ray_blocking(call: Callable, *args, **kwargs):
    """``call(*args, **kwargs)``, a Ray call that blocks (``ray.wait``, ``ray.get``): in the
    main thread, a SIGTERM ends it as Ctrl-C does, then goes to the handler
    it was meant for (loramix's raises :class:`loramix.cli.Terminated`:
    "terminated", 143; one that returns lets the call go on). Ray runs
    Python's signal handlers while it waits but passes on only
    KeyboardInterrupt and SystemExit: the exception loramix's handler raised
    was left pending while Ray went on waiting, until a step finished
    (minutes, or hours), then came out as a SystemError traceback, exit 1.
    Not raised in importlib's code, a C extension's start-up or a finalizer,
    where it could be lost and the wait go on (:mod:`loramix.stopping`)."""
    import signal
    import threading

    before = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or not callable(before):
        return call(*args, **kwargs)
    got: list = []

    def term(signum, frame):
        if deferred(signum, frame):
            return  # sent again shortly, to this handler or, the call over, to ``before``
        got.append(frame)
        raise KeyboardInterrupt  # what ends Ray's wait

    while True:
        got.clear()
        signal.signal(signal.SIGTERM, term)
        try:
            return call(*args, **kwargs)
        except KeyboardInterrupt:
            if not got:
                raise  # a Ctrl-C
        finally:
            signal.signal(signal.SIGTERM, before)
        before(signal.SIGTERM, got[0])


def _stop_tasks(ray, refs: list, flag, seconds: float = STOP_SECONDS) -> None:
    """Stop the Ray tasks still running when a run stops (an error, a Ctrl-C,
    a kill): ``flag`` is made, and each task, seeing it
    (:func:`_stopped_by`), unwinds its step (its half-made artifact removed)
    and ends; waited for at most ``seconds``. Without this, the end of the
    run's Ray job force-exited the workers mid-step, leaving their
    temporaries in the cache (on a cluster, for ever: another host's owner
    counts as alive). Not ``ray.cancel``: one that met a task just finishing
    (its reply received, not yet recorded) crashed this process in Ray's own
    check ("Tried to complete task that was not pending"), exit 1."""
    if not refs:
        return
    try:
        flag.touch()
    except OSError:  # the cache gone read-only: the tasks end with the instance
        return
    deadline = time.monotonic() + seconds
    left = refs
    try:
        while left and time.monotonic() < deadline:
            wait = max(0.0, deadline - time.monotonic())
            _, left = _ray_blocking(ray.wait, left, num_returns=len(left), timeout=wait)
    except Exception:
        pass


def import_ray():
    """``ray``, or a one-line error saying how to get it."""
    try:
        import ray
    except ImportError:
        raise UsageError("--executor", "ray is not installed; pip install 'loramix[ray]'") from None
    return ray


#: seconds to wait for a TCP connection to a Ray cluster's address before refusing it
PROBE_SECONDS = 10.0


def probe_ray_address(address: str, timeout: float = PROBE_SECONDS) -> None:
    """Refuse, in one line, an ``--address`` HOST:PORT (or ray://HOST:PORT)
    where nothing listens: ``ray.init`` would otherwise retry for minutes,
    printing a warning every few seconds. ``auto`` and forms without a port
    are left to Ray."""
    import socket

    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise UsageError("--address", f"no Ray cluster answers at {address} ({e.strerror or e}); start one with "
                         "`ray start --head` or leave --address out for a local instance") from None  # fmt: skip


@dataclass
class RayExecutor:
    jobs: int
    threads: int = 1
    address: str | None = None

    def describe(self) -> dict:
        return {"name": "ray", "jobs": self.jobs, "threads_per_job": threads_per_job(self.threads, self.jobs),
                "address": self.address or "local"}  # fmt: skip

    def run(self, steps: list[Step], ctx: StepContext, on_done, done: dict | None = None,
            on_start=None) -> dict:  # fmt: skip
        ray = import_ray()
        started = not ray.is_initialized()
        if started:
            import signal
            import threading

            main = threading.current_thread() is threading.main_thread()
            before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
            self._init(ray)
            # ray.init installs its own SIGTERM handler (a stack dump, then abort: exit 134);
            # give back loramix's, so a kill unwinds as in the other executors ("terminated", 143),
            # and Ctrl-C's (which Ray 2.60 leaves alone; kept in case another version does not)
            for s, handler in before.items():
                if callable(handler):
                    signal.signal(s, handler)
        per = threads_per_job(self.threads, self.jobs)
        gpu = 1 if str(ctx.device).startswith("cuda") else 0
        task = ray.remote(num_cpus=per, num_gpus=gpu, max_retries=0)(_ray_run)
        run = _run_key()  # one context per run and worker
        payload = ray.put({**ctx.payload(), "run": run})

        in_flight: set = set()  # the tasks submitted and not yet seen finished

        def submit(st, deps):
            ref = task.remote(payload, per, st, deps)
            in_flight.add(ref)
            return ref

        def wait_any(refs):
            ready, _ = _ray_blocking(ray.wait, refs, num_returns=1)
            in_flight.difference_update(ready)
            return [(r, _ray_blocking(ray.get, r)) for r in ready]

        stopped = False
        try:
            return _schedule(steps, submit, wait_any, on_done, done, on_start)
        except BaseException:
            stopped = True
            _stop_tasks(ray, list(in_flight), _stop_flag(ctx.cache.root, run))
            raise
        finally:
            if started:
                ray.shutdown()
            if stopped:
                try:
                    _stop_flag(ctx.cache.root, run).unlink(missing_ok=True)
                except OSError:  # not to hide the run's own error
                    pass
            if started and stopped:
                # a task that could not unwind (its worker force-exited with the instance, or a
                # Ctrl-C sent to the group, which holds the instance's raylet, stopped it first)
                # left its temporary: removed here, as its owner is gone
                from .cache import remove_stale

                remove_stale(ctx.cache.root)

    def _init(self, ray) -> None:
        import os
        from pathlib import Path

        if self.address:
            try:
                ray.init(address=self.address, logging_level="ERROR", log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise UsageError("--address", f"cannot join the Ray cluster at {self.address}: "
                                 f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None  # fmt: skip
            return
        # A local instance: workers import this checkout of loramix.
        root = str(Path(__file__).resolve().parents[2])
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        ray.init(num_cpus=max(1, self.jobs) * threads_per_job(self.threads, self.jobs), include_dashboard=False,
                 logging_level="ERROR", log_to_driver=False, runtime_env={"env_vars": env})  # fmt: skip


#: the most worker processes a run starts unasked (each holds its own copy of the model)
AUTO_JOBS_MAX = 4
#: training steps per worker below which a run not asked for workers stays serial
#: (a worker's start-up, a few seconds, is about one small training)
AUTO_MIN_TRAININGS = 4


def worth_workers(steps: list[Step], jobs: int) -> bool:
    """Whether ``jobs`` workers pay for their start-up on this plan: at
    least :data:`AUTO_MIN_TRAININGS` training steps (domain and merged-data
    adapters) each."""
    return sum(st.group == "train" for st in steps) >= AUTO_MIN_TRAININGS * jobs


def default_jobs(device) -> int:
    """The jobs of a run given neither ``--jobs``, ``--threads`` nor
    ``--executor``: ``$LORAMIX_JOBS`` where set (and not empty); else on the CPU one per
    usable core, at most :data:`AUTO_JOBS_MAX`, each with one torch thread (the
    results are byte-identical to a serial run's, as every job computes with
    the serial run's one thread); 1 on a GPU, whose memory the workers would
    share."""
    env = os.environ.get("LORAMIX_JOBS")
    if env is not None and env.strip():  # set to nothing (LORAMIX_JOBS=): as unset
        v = env.strip()  # ASCII digits only: str.isdigit() also takes "²", which int() refuses
        n = int(v) if v.isascii() and v.isdigit() else 0
        if n < 1:
            raise UsageError("LORAMIX_JOBS", f"must be a whole number of at least 1, got {env!r}")
        return check_workers(n, "LORAMIX_JOBS")
    if str(device) != "cpu":
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, AUTO_JOBS_MAX))


def make_executor(name: str | None = None, *, jobs: int | None = None, threads: int = 1,
                  address: str | None = None):  # fmt: skip
    """The executor ``name`` (serial, processes, ray); without a name,
    processes when ``jobs`` > 1, else serial."""
    if name is None:
        name = "processes" if jobs and jobs > 1 else "serial"
    if name not in EXECUTORS:
        raise UsageError("--executor", f"unknown executor {name!r}; use {', '.join(EXECUTORS)}")
    check_workers(jobs, "--jobs")
    if address and name != "ray":
        raise UsageError("--address", "applies to --executor ray only")
    if name == "serial" and jobs and jobs > 1:
        raise UsageError("--jobs", "the serial executor runs one job; use --executor processes or ray")
    if name == "processes":
        return ProcessExecutor(jobs or 2, threads)
    if name == "ray":
        import_ray()
        if address:
            probe_ray_address(address)
        return RayExecutor(jobs or 2, threads, address)
    return SerialExecutor()
