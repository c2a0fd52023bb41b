"""The engine's seams: the plan, a second executor, a merge method from outside
the package (run through the CLI), the registry's refusals, the shared option
parser and the base identity. References are dense float64 math and the
serial executor's bytes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import loramix.methods as methods
from loramix.cli import main
from loramix.engine import (
    Buffers,
    CopyJob,
    ModuleJob,
    ModuleOutput,
    SerialExecutor,
    base_placeholder,
    execute_into_base,
    plan_into_base,
)
from loramix.errors import UsageError
from loramix.io.adapter_files import load_adapter
from loramix.io.model_folder import BaseModelFolder
from loramix.io.outputs import provenance
from loramix.kinds import KINDS
from loramix.methods import get_method, register
from loramix.methods.base import MergeMethod, Param, dense_deltas
from loramix.options import parse_dtype, parse_weights

from .factories import make_peft_adapter, save_base, tiny_gpt2


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    model = tiny_gpt2(seed=0)
    return dict(
        base=save_base(model, root / "base"),
        sharded=save_base(model, root / "sharded", max_shard_size="20KB"),
        adapters=[
            make_peft_adapter(model, root / "a0", seed=1, r=4, lora_alpha=8),
            make_peft_adapter(model, root / "a1", seed=2, r=2, lora_alpha=3, target_modules=["c_attn"]),
        ],
    )


def dense_lora(path) -> dict[str, torch.Tensor]:
    """module -> s B A in float64, from the adapter file's tensors."""
    ad = load_adapter(path)
    return {n: m.scale * (m.B.double() @ m.A.double()) for n, m in ad.modules.items()}


# ----------------------------------------------------------------------------- plan


def test_plan_covers_every_tensor_once_in_file_order(gpt2):
    base = BaseModelFolder(gpt2["sharded"])
    ads = [load_adapter(p) for p in gpt2["adapters"]]
    modules = list(dict.fromkeys(n for a in ads for n in a.modules))
    plan = plan_into_base(base, modules, ads, torch.bfloat16)
    jobs = [j for s in plan.shards for j in s.jobs]
    assert [j.info.key for j in jobs] == list(base.tensors)
    assert [s.name for s in plan.shards] == base.shards
    mj = [j for j in jobs if isinstance(j, ModuleJob)]
    assert sorted(j.module for j in mj) == sorted(modules)
    # GPT-2's projections are Conv1D: stored (in, out), so every module job is transposed.
    assert all(j.transposed for j in mj)
    for j in jobs:
        assert j.out_code == ("BF16" if j.info.is_float else j.info.dtype)
        assert isinstance(j, (CopyJob, ModuleJob))


# ----------------------------------------------------------------------------- a second executor


class ReversedExecutor(SerialExecutor):
    """Computes a shard's module jobs last to first, each in fresh buffers,
    then hands the results to the writer in plan order: what a parallel
    executor does, without threads."""

    def results(self, plan, shard, src, compute):
        done = {}
        for i in reversed(range(len(shard.jobs))):
            self.pool = Buffers()  # results must not share buffers
            done[i] = self.run_job(shard.jobs[i], src, compute)
        for i in range(len(shard.jobs)):
            yield done[i]


def _run(base_path, ads, out, executor):
    base = BaseModelFolder(base_path)
    plan = plan_into_base(base, list(dict.fromkeys(n for a in ads for n in a.modules)), ads)

    def compute(name, W0):
        B = torch.cat([a.modules[name].factors(dtype=W0.dtype)[0] for a in ads if name in a.modules], 1)
        A = torch.cat([a.modules[name].factors(dtype=W0.dtype)[1] for a in ads if name in a.modules], 0)
        return ModuleOutput((B, A), {"rank": A.shape[0]})

    record = provenance("test", {}, [base_placeholder(base)], created=None)
    return execute_into_base(plan, out, compute, record=record, executor=executor, progress=False)


def test_another_executor_writes_the_same_bytes(gpt2, tmp_path):
    ads = [load_adapter(p) for p in gpt2["adapters"]]
    a = _run(gpt2["sharded"], ads, tmp_path / "serial", SerialExecutor("cpu"))
    b = _run(gpt2["sharded"], ads, tmp_path / "reversed", ReversedExecutor("cpu"))
    assert a.facts == b.facts and a.facts["transformer.h.0.attn.c_attn"] == {"rank": 6}
    for shard in BaseModelFolder(gpt2["sharded"]).shards:
        assert (tmp_path / "serial" / shard).read_bytes() == (tmp_path / "reversed" / shard).read_bytes()
    # and the result is W0 + sum of the deltas
    refs = [dense_lora(p) for p in gpt2["adapters"]]
    base, out = BaseModelFolder(gpt2["sharded"]), BaseModelFolder(tmp_path / "serial")
    for name in refs[0]:
        expect = base.read_module_weight(name, dtype=torch.float64) + sum(r[name] for r in refs if name in r)
        got = out.read_module_weight(name, dtype=torch.float64)
        assert (got - expect).abs().max() <= 1e-5 * expect.abs().max(), name


def _leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_interrupt_leaves_nothing(gpt2, tmp_path, exc):
    ads = [load_adapter(p) for p in gpt2["adapters"]]
    base = BaseModelFolder(gpt2["sharded"])
    plan = plan_into_base(base, list(dict.fromkeys(n for a in ads for n in a.modules)), ads)
    seen = []

    def compute(name, W0):
        seen.append(name)
        if len(seen) == 3:
            raise exc("stop")
        return ModuleOutput(torch.zeros_like(W0))

    record = provenance("test", {}, [base_placeholder(base)], created=None)
    with pytest.raises(exc):
        execute_into_base(plan, tmp_path / "out", compute, record=record, progress=False)
    assert len(seen) == 3
    assert _leftovers(tmp_path, "out") == []


# ----------------------------------------------------------------------------- a method from outside


class ScaledNorm(MergeMethod):
    """Test-only: ``merged = gain * sum_i w_i dW_i``; reports ||merged||_F per module."""

    name = "scaled-norm"
    summary = "test method"
    params = (Param("gain", float, None, "factor of the sum", required=True),)

    def merged(self, ctx, module_deltas, weights, W0, params):
        d = sum(dense_deltas(ctx, module_deltas, W0, weights)) * params["gain"]
        return d, {"norm": float(torch.linalg.vector_norm(d))}

    def summarize(self, facts):
        return {"max_norm": max(f["norm"] for f in facts.values())}

    def describe(self, summary):
        return [f"largest merged delta norm {summary['max_norm']:.6g}"]


@pytest.fixture
def scaled_norm():
    register(ScaledNorm)
    yield ScaledNorm
    methods._REGISTRY.pop(ScaledNorm.name)


def test_method_registered_from_outside_runs_through_the_cli(gpt2, scaled_norm, tmp_path, capsys):
    a = [str(p) for p in gpt2["adapters"]]
    assert main(["merge", "--help"]) == 0
    helptext = capsys.readouterr().out
    # every method's parameters are options, once each, the help option last
    for flag in ("--gain", "--density", "--rank", "--lambda FLOAT"):
        assert flag in helptext, flag
    assert helptext.count("--help") == 1 and "--lambda-" not in helptext
    out = tmp_path / "o"
    args = [
        "merge",
        "-m",
        "scaled-norm",
        *a,
        "--gain",
        "0.5",
        "--weights",
        "1,-2",
        "--into",
        str(gpt2["base"]),
    ]
    assert main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    refs = [dense_lora(p) for p in gpt2["adapters"]]
    base, res = BaseModelFolder(gpt2["base"]), BaseModelFolder(out)
    norms = []
    for name in refs[0]:
        d = 0.5 * (refs[0][name] - 2 * refs[1].get(name, 0))
        norms.append(float(d.norm()))
        expect = base.read_module_weight(name, dtype=torch.float64) + d
        got = res.read_module_weight(name, dtype=torch.float64)
        assert (got - expect).abs().max() <= 1e-5 * expect.abs().max(), name
    rec = json.loads((out / "loramix.json").read_text())
    assert rec["method"] == "scaled-norm" and rec["parameters"]["gain"] == 0.5
    assert rec["summary"]["max_norm"] == pytest.approx(max(norms), rel=1e-5)
    assert f"largest merged delta norm {rec['summary']['max_norm']:.6g}" in printed
    # its parameter is checked like a built-in's, one line, exit 2
    code = main([*(x for x in args if x not in ("--gain", "0.5")), "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("loramix: error:") and "--gain" in err and "\n" not in err


def test_registry_refuses_duplicates_and_clashing_params():
    class Other(MergeMethod):
        name = "sum"

    with pytest.raises(ValueError, match="already registered"):
        register(Other)
    register(type(get_method("sum")))  # the same class again is not a duplicate

    class Clash(MergeMethod):
        name = "clash"
        params = (Param("weights", float),)

    with pytest.raises(ValueError, match="clashes"):
        register(Clash)
    assert "clash" not in methods.available_methods()


def test_every_method_module_registers_a_method():
    import importlib
    import pkgutil

    mods = {m.name for m in pkgutil.iter_modules(methods.__path__)} - {"base", "params", "runner"}
    owners = {cls.__module__.rsplit(".", 1)[1] for cls in methods.method_classes().values()}
    assert mods <= owners, mods - owners
    for name, cls in methods.method_classes().items():
        importlib.import_module(cls.__module__)
        assert cls.name == name and (cls.kinds is None or all(k in KINDS for k in cls.kinds))


# ----------------------------------------------------------------------------- options


def test_option_errors_name_the_parameter(capsys, gpt2, tmp_path):
    with pytest.raises(UsageError) as e:
        parse_weights("1,x", 2)
    assert e.value.where == "weights"
    with pytest.raises(UsageError) as e:
        parse_weights([1.0], 2)
    assert e.value.where == "weights" and "got 1 weight for 2 adapters;" in e.value.problem
    with pytest.raises(UsageError) as e:
        parse_weights([1.0, float("nan")], 2)
    assert e.value.where == "weights"
    assert parse_weights(None, 3) == [1.0, 1.0, 1.0] and parse_weights("1, -0.5", 2) == [1.0, -0.5]
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("auto") is None
    with pytest.raises(UsageError) as e:
        parse_dtype("int8")
    assert e.value.where == "dtype"
    # the CLI says the flag
    a = [str(p) for p in gpt2["adapters"]]
    for cmd in (["sum"], ["merge", "-m", "sum"]):
        assert main([*cmd, *a, "--dtype", "int8", "--out", str(tmp_path / "o")]) == 2
        assert capsys.readouterr().err.startswith("loramix: error: --dtype: unknown dtype")


def test_the_weight_count_line_says_one_in_the_singular():
    """The line of a weight count that does not match the adapters counts
    each noun as English does: it said "got 1 weights for 2 adapters" (and
    "2 weights for 1 adapters")."""
    for weights, n, line in [
        ([1.0], 2, "got 1 weight for 2 adapters; give one per adapter"),
        ([1.0, 2.0], 1, "got 2 weights for 1 adapter; give one per adapter"),
        ("1,2,3", 2, "got 3 weights for 2 adapters; give one per adapter"),
    ]:
        with pytest.raises(UsageError) as e:
            parse_weights(weights, n)
        assert (e.value.where, e.value.problem) == ("weights", line)


# ----------------------------------------------------------------------------- base identity


def test_base_identity_links_merge_training_and_cache(gpt2, tmp_path):
    from loramix.models import base_provenance

    ident = BaseModelFolder(gpt2["base"]).identity()
    # the same weights and config elsewhere: the same identity; the path is not part of it
    copy = shutil.copytree(gpt2["base"], tmp_path / "copy")
    assert BaseModelFolder(copy).identity() == ident
    assert base_provenance(copy)["identity"] == ident
    # a sharded folder holds other files: another identity
    assert BaseModelFolder(gpt2["sharded"]).identity() != ident
    cfg = json.loads((copy / "config.json").read_text())
    cfg["layer_norm_epsilon"] = 1e-6
    (copy / "config.json").write_text(json.dumps(cfg))
    assert BaseModelFolder(copy).identity() != ident
    # merge provenance records it
    res = methods.merge([str(p) for p in gpt2["adapters"]], "sum", into=gpt2["base"], out=tmp_path / "m")
    (b,) = [i for i in res.record["inputs"] if i["role"] == "base"]
    assert b["identity"] == ident


def test_method_declarations_import_no_torch():
    """The merge command's options come from the methods' declarations, which
    load without torch (``loramix merge --help`` stays quick)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys; from loramix.cli.merge_cmd import method_options; "
        "opts = method_options(); "
        "print(len(opts), sorted(m.split('.')[0] for m in sys.modules if m.split('.')[0] == 'torch')[:1])"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    n, torch_seen = p.stdout.split(" ", 1)
    assert int(n) >= 7 and torch_seen.strip() == "[]", p.stdout
    # the kind names spelled in methods/base.py are the adapter's
    from loramix import adapter
    from loramix.methods import base

    assert (base.LORA, base.D2LORA) == (adapter.LORA, adapter.D2LORA)


@pytest.mark.parametrize(
    "merge, key, words",
    [
        ('[merge]\nmethods = ["svd"]\nsvd = { rank = 2, energy = 0.5 }\n', "merge.svd", "exactly one of"),
        ('[merge]\nmethods = ["svd"]\n', "merge.svd", "exactly one of"),
        (
            '[merge]\nmethods = ["ties"]\nties = { density = 0.5, sign = "vote" }\n',
            "merge.ties",
            "mass, count",
        ),
        ('[merge]\nmethods = ["d2-signed"]\n', "merge.methods", "does not apply to lora"),
    ],
)
def test_scenario_validation_runs_the_methods_checks(tmp_path, capsys, merge, key, words):
    from .test_scenario import GOOD

    p = tmp_path / "s.toml"
    p.write_text(GOOD + merge)
    assert main(["scenario", "check", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("loramix: error:") and key in err and words in err and "\n" not in err, err


# ----------------------------------------------------------------------------- blocks and threads


@pytest.mark.parametrize(
    "method",
    [
        ["sum"],
        ["ties", "--density", "0.3"],
        ["dare-linear", "--density", "0.4", "--lambda", "0.7"],
        ["dare-ties", "--density", "0.4"],
    ],
)
def test_blocks_and_threads_do_not_change_bytes(gpt2, tmp_path, monkeypatch, method):
    """The elementwise passes by blocks of rows (here many),
    shared out with helper threads, the methods' own blocks and bracket, and
    one thread or two: the same files."""
    import loramix.engine as engine
    import loramix.methods.base as mb

    def run(name, threads):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            ads = [str(p) for p in gpt2["adapters"]]
            assert (
                main(
                    [
                        "merge",
                        "-m",
                        *method,
                        *ads,
                        "--into",
                        str(gpt2["sharded"]),
                        "--out",
                        str(tmp_path / name),
                    ]
                )
                == 0
            )
        finally:
            torch.set_num_threads(old)
        return {p.name: p.read_bytes() for p in sorted((tmp_path / name).glob("*.safetensors"))}

    whole = run("whole", 1)
    # blocks of MIN_ROWS rows (9 x 32 entries: 9 rows where a row has 32 entries, rounded down to
    # a multiple of MIN_ROWS; one row where it has more, raised to MIN_ROWS); MIN_ROWS as shipped:
    # shorter blocks, or blocks that start inside a tile, may take other BLAS kernels (engine.MIN_ROWS)
    monkeypatch.setattr(engine, "BLOCK_ELEMENTS", 9 * 32)
    monkeypatch.setattr(engine, "MAX_BLOCK_ELEMENTS", 9 * 32)  # not grown for a large tensor
    monkeypatch.setattr(mb, "ROW_BLOCK_ELEMENTS", 9 * 32)
    monkeypatch.setattr(mb, "BRACKET_MIN", 256)  # the tiny model's deltas take the bracket and the blocks
    assert run("blocks", 2) == whole


def test_method_math_runs_on_the_threads_torch_had(gpt2, tmp_path, monkeypatch):
    """During a streaming merge torch runs on one thread, but a method's math
    (whose reductions round by how they are split) runs on the threads torch
    had, unless the method is marked thread-independent."""
    seen = {}

    class Probe(MergeMethod):
        name = "probe-threads"
        summary = "test method"
        uses_base = False

        def merged(self, ctx, module_deltas, weights, W0, params):
            seen.setdefault(self.thread_independent, set()).add(torch.get_num_threads())
            return sum(dense_deltas(ctx, module_deltas, W0, weights)), {}

    class ProbeOne(Probe):
        name = "probe-one-thread"
        thread_independent = True

    register(Probe)
    register(ProbeOne)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ads = [str(p) for p in gpt2["adapters"]]
        for name in (Probe.name, ProbeOne.name):
            args = ["merge", "-m", name, *ads, "--into", str(gpt2["base"]), "--out", str(tmp_path / name)]
            assert main(args) == 0
    finally:
        torch.set_num_threads(old)
        methods._REGISTRY.pop(Probe.name)
        methods._REGISTRY.pop(ProbeOne.name)
    assert seen == {False: {2}, True: {1}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [3, 16, 48, 200])
def test_row_blocks_of_a_factor_product_give_the_whole_products_bits(k, dtype):
    """What the engine's blocked ``addmm_`` relies on (add_delta, MIN_ROWS):
    the rows of ``W + B @ A``, and of ``B @ A`` (methods.base._FactorRows),
    computed a block of ``MIN_ROWS`` or more rows at a time from a multiple
    of ``MIN_ROWS`` (to one, or to the last row), on one thread as the
    engine computes them, are bit for bit those of one product over the
    whole tensor, on one thread or two (methods.base.dense_deltas). Blocks
    on two threads are not: BLAS may split one into parts too short for its
    kernel (on an AMD EPYC, 9 rows into 8 and 1). Nor, in float64 on an AMD
    EPYC, are blocks that end inside a tile of 4 rows."""
    from loramix.engine import MIN_ROWS

    g = torch.Generator().manual_seed(k)
    W, B, A = (torch.randn(*s, generator=g, dtype=dtype) for s in ((301, 2304), (301, k), (k, 2304)))
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            whole, product = W.clone().addmm_(B, A), B @ A
            torch.set_num_threads(1)
            for r0, r1 in ((0, MIN_ROWS), (MIN_ROWS, 72), (72, 296), (296 - MIN_ROWS, 301), (288, 301)):
                assert torch.equal(W[r0:r1].clone().addmm_(B[r0:r1], A), whole[r0:r1]), (r0, r1, threads)
                assert torch.equal(torch.mm(B[r0:r1], A), product[r0:r1]), (r0, r1, threads)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("threads", [0, 1])
def test_blocks_cover_every_row_once(threads):
    """Every row in exactly one block, in order, none shorter than
    ``min_rows <= step`` unless the tensor is: over many heights and steps,
    with a short last block joined to the one before. Tapered, each block
    starts on a multiple of ``min_rows``, none is taller than ``step``, and
    they never grow (the last, joined, apart)."""
    from loramix.engine import Helpers, _by_blocks

    helpers = Helpers(threads) if threads else None
    try:
        for rows in (0, 1, 7, 8, 9, 85, 768, 769, 3072, 11008):
            for step in (1, 3, 8, 85, 341, 1000, 1024):
                for min_rows in (m for m in (1, 8) if m <= step):  # the engine's steps are >= MIN_ROWS
                    for taper in (0, *(t for t in (min_rows, 16, 128) if t <= step and t % min_rows == 0)):
                        if taper and step % min_rows:
                            continue  # the engine's steps are multiples of min_rows where it tapers
                        at = (rows, step, min_rows, taper)
                        got = _by_blocks(
                            rows, step, helpers, lambda r0, r1, k: (r0, r1), min_rows, taper=taper
                        )
                        flat = [r for r0, r1 in got for r in range(r0, r1)]
                        assert flat == list(range(rows)), at
                        assert all(r1 - r0 >= min(min_rows, rows) for r0, r1 in got), at
                        if taper and threads:
                            heights = [r1 - r0 for r0, r1 in got[:-1]]
                            assert all(r0 % min_rows == 0 for r0, _ in got), at
                            assert all(taper <= h <= step for h in heights), at
                            assert heights == sorted(heights, reverse=True), at
                            if rows >= 4 * step:  # large: it starts with whole steps and ends with the least
                                assert heights[0] == step and heights[-1] == taper, (at, heights)
    finally:
        if helpers is not None:
            helpers.pool.shutdown()
