"""The streaming engine computes the next module's delta while the helpers add this
one's (engine.SerialExecutor.results, "ahead"): the same bytes as one module at a
time, each delta computed once and in module order, errors raised in their turn."""

from __future__ import annotations

import pytest
import torch

from loramix import engine
from loramix.cli import main

from .factories import make_peft_adapter, save_base, tiny_llama


@pytest.fixture
def counted(monkeypatch):
    """How many deltas were computed ahead, by the engine's own hook."""
    calls = []
    real = engine.SerialExecutor._compute_ahead

    def spy(ahead, i, job, compute):
        calls.append(job.module)
        return real(ahead, i, job, compute)

    monkeypatch.setattr(engine.SerialExecutor, "_compute_ahead", staticmethod(spy))
    return calls


def _merge(tmp_path, name, method, ads, base, threads=2):
    out = tmp_path / name
    args = ["merge", "-m", *method, *ads, "--into", base, "--out", out, "--threads", threads, "--no-progress"]
    assert main([str(a) for a in args]) == 0
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


@pytest.mark.parametrize(
    "method",
    [
        ["ties", "--density", "0.2"],
        ["sum"],
        ["dare-ties", "--density", "0.5"],
        ["magnitude", "--density", "0.3"],
    ],
)
def test_a_merge_computed_ahead_is_the_same_bytes(tmp_path, method, counted, monkeypatch):
    """576 wide (TIES from the factors in one pass, the bf16 add) into a bfloat16 base in two shards:
    the same files with the deltas computed ahead as one at a time."""
    model = tiny_llama(hidden=576, n_layer=2, n_head=4).to(torch.bfloat16)
    base = save_base(model, tmp_path / "base", max_shard_size="5MB")
    ads = [make_peft_adapter(model, tmp_path / f"a{k}", seed=k, r=16, lora_alpha=32) for k in range(3)]
    ahead = _merge(tmp_path, "ahead", method, ads, base)
    assert counted, "no delta was computed ahead"
    monkeypatch.setattr(engine.SerialExecutor, "_ahead_ok", lambda self, job, compute: False)
    counted.clear()
    serial = _merge(tmp_path, "serial", method, ads, base)
    assert not counted
    assert ahead and ahead == serial


def test_one_thread_computes_nothing_ahead(tmp_path, counted):
    """--threads 1: no helpers, so nothing runs beside the additions."""
    model = tiny_llama(hidden=64, n_layer=1, n_head=4)
    base = save_base(model, tmp_path / "base")
    ads = [make_peft_adapter(model, tmp_path / f"a{k}", seed=k, r=4) for k in range(2)]
    _merge(tmp_path, "one", ["ties", "--density", "0.5"], ads, base, threads=1)
    assert not counted


def _plan(tmp_path):
    from loramix.io.model_folder import BaseModelFolder

    model = tiny_llama(hidden=64, n_layer=2, n_head=4)
    folder = save_base(model, tmp_path / "base")
    base = BaseModelFolder(folder)
    modules = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")]
    return base, modules, engine.plan_into_base(base, modules)


def _run(tmp_path, compute, out="out"):
    base, _, plan = _plan(tmp_path)
    executor = engine.SerialExecutor("cpu")
    old = torch.get_num_threads()
    torch.set_num_threads(2)  # a helper thread: the deltas are computed ahead
    try:
        return engine.execute_into_base(plan, tmp_path / out, compute, record={"inputs": [{}]},
                                        executor=executor, progress=False)  # fmt: skip
    finally:
        torch.set_num_threads(old)


def test_each_delta_is_computed_once_in_module_order_and_an_error_in_its_turn(tmp_path, counted):
    """A compute that fails for the third module: the first two are added (their deltas computed
    once each, in order, the second and third ahead), the error is the third's, raised in its turn,
    and nothing is left behind."""
    base, modules, plan = _plan(tmp_path)
    order = [j.module for j in plan.module_jobs]
    shapes = {j.module: j.info.shape for j in plan.module_jobs}
    seen = []

    def compute(name, W0):
        seen.append(name)
        if name == order[2]:
            raise ValueError(f"no delta for {name}")
        return engine.ModuleOutput(torch.zeros(shapes[name]))

    compute.needs_base = lambda name: False
    compute.one_thread = lambda name: True
    compute.ahead = True
    added = []
    real = engine.add_delta

    def add(stored, job, *a, **k):
        added.append(job.module)
        return real(stored, job, *a, **k)

    import unittest.mock

    with unittest.mock.patch.object(engine, "add_delta", add), pytest.raises(ValueError, match=order[2]):
        _run(tmp_path, compute)
    assert seen == order[:3]  # the third computed ahead (while the second was added), once
    assert counted == order[1:3]
    assert added == order[:3]  # the third's turn came: its error, not an earlier one
    assert not (tmp_path / "out").exists()


def test_a_compute_that_does_not_say_ahead_is_run_in_turn(tmp_path, counted):
    """Without ``compute.ahead`` (a caller whose result lives in one reused buffer) each delta is
    computed in its own turn."""
    shapes = {j.module: j.info.shape for j in _plan(tmp_path / "shapes")[2].module_jobs}
    seen = []

    def compute(name, W0):
        seen.append(name)
        return engine.ModuleOutput(torch.zeros(shapes[name]))

    compute.needs_base = lambda name: False
    compute.one_thread = lambda name: True
    res = _run(tmp_path, compute)
    assert not counted and len(seen) == 4 and res.tensors > 4
