"""The native kernels (loramix/native): the bits of the eager code they
replace, NaN, infinities, signed zeros and ties included; and the eager code
(with one notice) where no compiler builds them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loramix import native
from loramix.methods import base as mb
from loramix.native import ties

EDGE = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-45, -1e-45, 0.5, -0.5, 0.25, -0.25]


# Each portable loop is compiled in three forms (target_clones: AVX-512, AVX2,
# x86-64 baseline) and the CPU runs the widest it has; so the others are built
# here alone (-DLORAMIX_ONE_FORM: no clones, only the flags' own form) and
# checked as the dispatched one is.
FORMS = {"baseline": (), "avx2": ("-mavx2",), "avx512f": ("-mavx512f",)}
_ONE_FORM: dict = {}


def one_form(name: str, form: str, tmp_path_factory):
    """``<name>.c`` built in ``form`` only (see FORMS), loaded; skips where
    this machine cannot build or run it."""
    import ctypes
    import platform
    import subprocess
    from pathlib import Path

    if native.library(name) is None:
        pytest.skip("the native kernels are not built here (no C compiler, or LORAMIX_NATIVE=0)")
    if platform.machine() != "x86_64" or not Path("/proc/cpuinfo").exists():
        pytest.skip("the forms are x86-64's (target_clones), told apart by Linux's /proc/cpuinfo")
    cpu = Path("/proc/cpuinfo").read_text().split("\nflags", 1)[-1].split("\n", 1)[0].split()
    if form != "baseline" and form not in cpu:
        pytest.skip(f"no {form} on this CPU: its form cannot run here")
    if (name, form) not in _ONE_FORM:
        so = tmp_path_factory.mktemp("forms") / f"{name}-{form}.so"
        flags = (*native.FLAGS, "-march=x86-64", "-DLORAMIX_ONE_FORM", *FORMS[form])
        subprocess.run(
            [*native._compiler().split(), *flags, "-o", str(so), str(native.HERE / f"{name}.c")], check=True
        )
        _ONE_FORM[name, form] = ctypes.CDLL(str(so))
    return _ONE_FORM[name, form]


@pytest.fixture(scope="module", params=["dispatched", "generic", "avx2", "generic:baseline", "generic:avx2"])
def kernels(request, tmp_path_factory):
    """The kernels as loramix calls them (AVX-512 where the CPU has it, else
    AVX2), the portable loops (the form the CPU picks), the AVX2 forms (what a
    CPU without AVX-512 runs) where the CPU has AVX2, and the portable loops'
    baseline and AVX2 forms, built alone."""
    k = ties.kernels()
    if k is None:
        pytest.skip("the native kernels are not built here (no C compiler, or LORAMIX_NATIVE=0)")
    if request.param == "avx2" and not ties.has_avx2(native.library("ties")):
        pytest.skip("no AVX2 here (not an x86-64 CPU with AVX2): the AVX2 kernels cannot run")
    if request.param.startswith("generic:"):
        return ties.Ties(one_form("ties", request.param.split(":")[1], tmp_path_factory), form="generic")
    return k if request.param == "dispatched" else ties.Ties(native.library("ties"), form=request.param)


@pytest.fixture(scope="module", params=["dispatched", "baseline", "avx2", "avx512f"])
def dare_kernels(request, tmp_path_factory):
    """``dare.c`` as loramix calls it (its widest form here), and each form
    built alone."""
    from loramix.native import dare

    k = dare.kernels()
    if k is None:
        pytest.skip("the native kernels are not built here (no C compiler, or LORAMIX_NATIVE=0)")
    return (
        k if request.param == "dispatched" else dare.Dare(one_form("dare", request.param, tmp_path_factory))
    )


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int64)


def _blocks(n: int, m: int, dtype, seed: int) -> list[torch.Tensor]:
    """``n`` blocks of ``m`` entries: normal values, exact ties with the
    lambdas, and every edge value, scattered."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(m, generator=g, dtype=dtype) * 0.4
        at = torch.randint(0, m, (m // 4,), generator=g)
        x[at] = torch.tensor(EDGE, dtype=dtype)[torch.randint(0, len(EDGE), (m // 4,), generator=g)]
        out.append(x)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
@pytest.mark.parametrize(("sign", "divide"), [("mass", "count"), ("count", "weight"), ("mass", "weight")])
def test_elect_kernel_has_the_eager_bits(kernels, dtype, n, sign, divide):
    """hardshrink then ``_elect`` (eager torch) against the fused kernel, on
    lengths that are and are not a multiple of its chunk, with and without a
    trim per adapter, negative and fractional weights."""
    weights = [1.0, -0.5, 2.0, 0.3, -1.7][:n]
    lams = [0.25, None, 0.0, float(np.nextafter(np.float32(0.5), np.float32(0))), 1e-45][:n]
    for m in (1, 255, 256, 1000, 4099):
        xs = _blocks(n, m, dtype, seed=m + n)
        ref_in = [x.clone() for x in xs]
        for x, lam in zip(ref_in, lams):
            if lam is not None:
                torch.hardshrink(x, lam, out=x)
        ref = mb._elect(ref_in, weights, sign, divide, torch.empty_like(xs[0]), torch.empty_like(xs[0]),
                        torch.empty_like(xs[0]))  # fmt: skip
        got = torch.full_like(xs[0], 7.0)
        before = [x.clone() for x in xs]
        kernels.elect(xs, lams, weights, sign == "mass", divide == "count", got)
        assert torch.equal(_bits(got), _bits(ref)), (m, n)
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(xs, before))  # inputs untouched


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_count_kernel_counts_and_collects_as_numpy(kernels, dtype):
    """``#{|x| > hi}`` and the ``|x|`` in ``[lo, hi]`` (as a multiset; NaN in
    neither), with infinite ends and ends tied with entries."""
    rng = np.random.default_rng(0)
    for m in (1, 31, 32, 33, 1000, 70_001):
        x = rng.standard_normal(m).astype(dtype)
        x[rng.integers(0, m, m // 5)] = rng.choice(np.array(EDGE, dtype=dtype), m // 5)
        a = np.abs(x)
        for lo, hi in (
            (0.25, 0.5),
            (-np.inf, 0.25),
            (0.5, np.inf),
            (-np.inf, np.inf),
            (0.0, 0.0),
            (3.0, 2.0),
        ):
            lo, hi = dtype(lo), dtype(hi)
            window = np.empty(m, dtype)
            above, got = kernels.count(x, lo, hi, window)
            assert above == int(np.count_nonzero(a > hi))
            want = a[(a >= lo) & (a <= hi)]
            assert got.dtype == want.dtype and np.array_equal(np.sort(got), np.sort(want))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_window_appends_stay_in_order_and_inside_their_buffer(kernels, dtype):
    """*count* and *pass* append the window's magnitudes in the entries'
    order, and write nothing past the ``m`` entries their buffers hold, even
    with every entry in the window (the AVX-512 forms store whole vectors
    there, up to ``W - 1`` lanes of junk after the appended ones): a
    sentinel after each buffer stays. NaNs (in no window) make the appends
    lag the entries by a few, the lengths end inside a vector and on one."""
    rng = np.random.default_rng(5)
    sentinel, pad = dtype(-7.0), 64
    for m in (1, 7, 15, 16, 17, 31, 33, 1000, 4099):
        x = rng.standard_normal(m).astype(dtype)
        x[rng.integers(0, m, m // 9)] = np.nan
        a = np.abs(x)
        want = a[~np.isnan(a)]
        buf = np.full(m + pad, sentinel, dtype)
        above, got = kernels.count(x, dtype(-np.inf), dtype(np.inf), buf[:m])
        assert above == 0 and np.array_equal(got.view(np.uint8), want.view(np.uint8)), m
        assert (buf[m:] == sentinel).all(), m
        bufs: dict = {}

        def space(role, size, dt, bufs=bufs):
            bufs[role] = np.full(size + pad, sentinel if dt == dtype else 7, dt)
            return bufs[role][:size]

        ends = np.array([-np.inf, -np.inf], dtype), np.array([np.inf, np.inf], dtype)
        one = kernels.one_pass(*ends, np.zeros(2, dtype), *ends, np.ones(2, dtype), True, True, space)
        xs = [torch.from_numpy(x), torch.from_numpy(-x)]
        one.run(xs, torch.empty_like(xs[0]))
        for i in range(2):
            assert np.array_equal(one.windows[i][: one.n_window[i]].view(np.uint8), want.view(np.uint8)), m
        assert all((b[-pad:] == (sentinel if b.dtype == dtype else 7)).all() for b in bufs.values()), m


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("sign", "divide"), [("mass", "count"), ("count", "weight")])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])  # 1 .. 4: a copy of the AVX-512 pass each; 5: the general one
def test_one_pass_kernel_counts_elects_and_records(kernels, dtype, sign, divide, n):
    """*pass*: the counts of *count*, the election of *elect* trimmed at
    ``prov``, and the records: every position where some block is in its
    band, in order, with every block's value there."""
    rng = np.random.default_rng(1)
    weights = np.array([1.0, -0.5, 2.0, 0.75, 1.0][:n], dtype=dtype)
    for m in (1, 17, 256, 1000, 4099):
        xs = _blocks(n, m, torch.float64 if dtype == np.float64 else torch.float32, seed=m)
        top = 0.3 + rng.random()
        # windows with finite ends, [-inf, 0], and one of a single value ([0.5, 0.5])
        lo = np.array([0.25, -np.inf, 0.3, 0.5, 0.0][:n], dtype=dtype)
        hi = np.array([0.5, 0.0, top, 0.5, 0.25][:n], dtype=dtype)
        prov = np.array([0.3, 0.0, top, 0.5, 0.25][:n], dtype=dtype)  # a provisional trim inside each window
        out = torch.empty_like(xs[0])
        rlo = np.array([0.28, -np.inf, top, 0.5, 0.1][:n], dtype=dtype)
        rhi = np.array([0.4, 0.0, top, 0.5, 0.2][:n], dtype=dtype)
        one = kernels.one_pass(lo, hi, prov, rlo, rhi, weights, sign == "mass", divide == "count",
                               lambda role, size, dt: np.full(size, 7, dt))  # fmt: skip
        one.run([x[:1] for x in xs], out[:1])  # a smaller block first: the arrays grow
        records = one.run(xs, out)
        above, n_window, windows, vals, pos = one.above, one.n_window, one.windows, one.vals, one.pos
        inside = np.zeros(m, bool)
        for i, x in enumerate(xs):
            want_above, want_window = kernels.count(x.numpy(), lo[i], hi[i], np.empty(m, dtype))
            assert above[i] == want_above
            assert np.array_equal(np.sort(windows[i][: n_window[i]]), np.sort(want_window))
            a = np.abs(x.numpy())
            inside |= (a >= rlo[i]) & (a <= rhi[i])
        want = torch.empty_like(out)
        kernels.elect(xs, prov.tolist(), weights.tolist(), sign == "mass", divide == "count", want)
        assert torch.equal(_bits(out), _bits(want))
        assert np.array_equal(pos[:records], np.flatnonzero(inside))
        for i, x in enumerate(xs):
            assert np.array_equal(vals[i][:records].view(np.uint8), x.numpy()[inside].view(np.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("sign", "divide"), [("mass", "count"), ("count", "weight")])
def test_fixup_turns_a_provisional_election_into_the_exact_one(kernels, dtype, sign, divide):
    """Elected with provisional trims, then *fixup* with the exact ones: the
    exact election's bits at every record, whichever were elected again."""
    n, m, weights = 3, 5000, [1.0, -0.5, 2.0]
    xs = _blocks(n, m, dtype, seed=7)
    prov, lams = [0.3, 0.25, -1.0], [0.31, None, 0.0]  # tighter, looser (not trimmed), the same
    out, want = torch.empty_like(xs[0]), torch.empty_like(xs[0])
    kernels.elect(xs, prov, weights, sign == "mass", divide == "count", out)
    kernels.elect(xs, lams, weights, sign == "mass", divide == "count", want)
    vals = [x.numpy() for x in xs]
    fixed = kernels.fixup(vals, np.array(prov, dtype=vals[0].dtype), lams, weights, sign == "mass",
                          divide == "count", np.arange(m, dtype=np.int64), out)  # fmt: skip
    assert 0 < fixed < m
    assert torch.equal(_bits(out), _bits(want))


def _round32(x) -> np.float32:
    """The float32 nearest to the rational ``x`` (ties to even), +0 for 0."""
    from fractions import Fraction

    f = np.float32(float(x))  # rounded twice: the answer or a neighbour of it
    best = None
    for c in (np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))):
        d = abs(Fraction(float(c)) - x)
        even = not int(np.array(c).view(np.int32)) & 1
        if best is None or d < best[0] or (d == best[0] and even):
            best = (d, c)
    return np.float32(0.0) if x == 0 else best[1]


def _fma_chain(B: np.ndarray, A: np.ndarray) -> np.ndarray:
    """``B @ A`` with every entry the chain ``acc = +0; acc = fma(B[r, k],
    A[k, c], acc)``, each step the exact value rounded once (rationals)."""
    from fractions import Fraction

    out = np.empty((B.shape[0], A.shape[1]), np.float32)
    for r in range(B.shape[0]):
        for c in range(A.shape[1]):
            acc = np.float32(0.0)
            for k in range(B.shape[1]):
                acc = _round32(Fraction(float(B[r, k])) * Fraction(float(A[k, c])) + Fraction(float(acc)))
            out[r, c] = acc
    return out


@pytest.mark.parametrize(("rows", "cols", "k"), [(9, 70, 16), (6, 37, 5), (4, 64, 2)])
def test_form_makes_each_entry_the_fma_chain(kernels, rows, cols, k):
    """The one pass's own block product (``ties.c`` *form*, AVX-512 and AVX2,
    every path: 4-row groups and single rows, whole vector groups and a
    masked tail) is, entry by entry, the fused multiply-add chain along
    ``k`` from +0 (what MKL's sgemm kernels compute), checked against
    exact rational arithmetic: zeros of both signs, subnormal products."""
    if kernels._form is None:
        pytest.skip("the portable form has no block product (the one pass reads blocks torch.mm formed)")
    g = torch.Generator().manual_seed(rows * cols + k)
    B, A = torch.randn(rows, k, generator=g), torch.randn(k, cols, generator=g)
    B[0], B[1], B[2] = 0.0, -0.0, B[2] * 1e-36
    A[:, 3] = -A[:, 3].abs()
    out = torch.full((rows, cols), float("nan"))
    assert kernels.form(B, A, out)
    want = torch.from_numpy(_fma_chain(B.numpy(), A.numpy()))
    assert torch.equal(_bits(out), _bits(want))
    assert kernels.forms_like_mm(rows, cols, k) == torch.equal(_bits(torch.mm(B, A)), _bits(want))


def test_merge_same_bits_with_and_without_kernels(kernels, monkeypatch):
    """TIES from factors and the dense way, in a streaming run, with the
    kernels (in each form) and with ``LORAMIX_NATIVE=0``: the same bits."""
    from loramix.adapter import ModuleDelta

    monkeypatch.setattr(ties, "kernels", lambda: kernels if native.enabled() else None)
    from loramix.engine import Buffers, cpu_threads

    class Run:
        device = torch.device("cpu")
        helpers = None

    g = torch.Generator().manual_seed(3)
    mods = [ModuleDelta(name="m", B=torch.randn(700, 8, generator=g) * 0.02, A=torch.randn(8, 300, generator=g),
                        scale=1.0, alpha=8.0) for _ in range(3)]  # fmt: skip
    weights = [1.0, 0.5, -1.0]

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        ctx = mb.ModuleContext("m", (0, 1, 2), scratch=Buffers())
        with cpu_threads(Run):
            fact = mb.ties_from_factors(ctx, mods, weights, 0.2, "mass", "count").clone()
            dense = mb.trim_and_elect(mb.dense_deltas(ctx, mods, None, weights), weights, 0.2, "mass", "count",
                                      Buffers()).clone()  # fmt: skip
        return fact, dense

    monkeypatch.setattr(mb, "ONE_PASS_MAX_SHARE", 1.0)  # a small module's wide brackets: many records
    monkeypatch.setattr(mb, "FORM_TILE_ENTRIES", 300 * 7)  # blocks formed by the kernels in 7-row tiles
    passes, formed = [], []
    real = ties.Ties.one_pass
    monkeypatch.setattr(ties.Ties, "one_pass", lambda self, *a: passes.append(1) or real(self, *a))
    real_formed = ties.OnePass.run_formed
    monkeypatch.setattr(
        ties.OnePass, "run_formed", lambda self, *a: formed.append(real_formed(self, *a)) or formed[-1]
    )
    one_pass = run()
    assert passes  # the one pass was taken, both ways
    if kernels._form is not None and kernels.forms_like_mm(700, 300, 8):
        assert formed and None not in formed  # from the factors, the pass formed the blocks itself
    else:
        assert all(f is None for f in formed)
    monkeypatch.setattr(mb, "ONE_PASS_BAND", 0.0)  # records at the estimate only: the threshold is outside
    passes.clear()
    outside = run()
    assert passes  # taken, then the two passes
    monkeypatch.setattr(mb, "ONE_PASS_BAND", 4.0)
    monkeypatch.setattr(mb, "ONE_PASS_MAX_SHARE", -1.0)  # brackets "too wide": two passes, kernels
    passes.clear()
    two_passes = run()
    assert not passes
    monkeypatch.setenv("LORAMIX_NATIVE", "0")
    assert ties.kernels() is None
    eager = run()
    for got in (one_pass, outside, two_passes):
        for a, b in zip(got, eager):
            assert torch.equal(_bits(a), _bits(b))
    assert torch.equal(_bits(eager[0]), _bits(eager[1]))


@pytest.mark.parametrize("method", ["ties", "dare-ties", "dare-linear", "magnitude", "della", "sum"])
def test_merge_writes_the_same_bytes_with_and_without_kernels(method, monkeypatch, tmp_path):
    """A merge into a bfloat16 base through the command line, with the
    kernels and with ``LORAMIX_NATIVE=0``: the same bytes (DELLA: the keep
    by ``dare.c``, each row ranked by its radix sort). DARE's deltas
    are formed and dropped block by block by ``dare.c`` (each block's mask
    drawn from the generator's state there, applied as drawn) against the
    dense deltas and torch's ``mul_(mask).div_(density)``."""
    from loramix.cli import main
    from loramix.native import bf16, dare

    from .factories import make_peft_adapter, save_base, tiny_llama

    if ties.kernels() is None:
        pytest.skip("the native kernels are not built here (no C compiler, or LORAMIX_NATIVE=0)")
    model = tiny_llama(seed=0, hidden=256).to(torch.bfloat16)  # 256 x 520 MLP modules: the streaming way
    base = save_base(model, tmp_path / "base")
    ads = [make_peft_adapter(model.float(), tmp_path / f"ad{i}", seed=i + 1, r=4) for i in range(2)]
    calls = []
    taken = ((ties.Ties, "elect"), (ties.Ties, "count"), (ties.Ties, "one_pass"), (bf16.Bf16, "add"),
             (dare.Dare, "drop"), (dare.Dare, "drop_from"), (dare.Dare, "della_keep_from"))  # fmt: skip
    for cls, name in taken:
        real = getattr(cls, name)
        monkeypatch.setattr(
            cls, name, lambda self, *a, real=real, name=name: calls.append(name) or real(self, *a)
        )
    outs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("LORAMIX_NATIVE", flag)
        calls.clear()
        out = tmp_path / f"out{flag}"
        density = [] if method == "sum" else ["--density", "0.3"]
        assert main(["merge", "-m", method, *density, *map(str, ads), "--into", str(base), "--out",
                     str(out), "--no-progress"]) == 0  # fmt: skip
        outs[flag] = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
        assert bool(calls) == (flag == "1")  # the kernels are taken, and LORAMIX_NATIVE=0 takes none
        assert ("drop_from" in calls) == (flag == "1" and method.startswith("dare")), calls  # from factors
        assert ("della_keep_from" in calls) == (flag == "1" and method == "della"), calls
    assert outs["1"] and outs["1"] == outs["0"]


def test_sum_into_bfloat16_by_pieces_writes_the_bytes_of_one_product(monkeypatch, tmp_path):
    """The fused bfloat16 step forms a block's product by pieces of rows
    (``engine.FUSED_PIECE_ELEMENTS``, here as small as it goes: 16 rows and
    more): the bytes of the eager ``addmm_`` of the whole block."""
    from loramix import engine
    from loramix.cli import main
    from loramix.native import bf16

    from .factories import make_peft_adapter, save_base, tiny_llama

    if bf16.kernels() is None:
        pytest.skip("the native kernels are not built here (no C compiler, or LORAMIX_NATIVE=0)")
    model = tiny_llama(seed=0, hidden=256).to(torch.bfloat16)
    base = save_base(model, tmp_path / "base")
    ads = [make_peft_adapter(model.float(), tmp_path / f"ad{i}", seed=i + 1, r=4) for i in range(3)]
    monkeypatch.setattr(engine, "FUSED_PIECE_ELEMENTS", 1)
    sizes = []
    real = bf16.Bf16.add
    monkeypatch.setattr(
        bf16.Bf16, "add", lambda self, w0, d, out: sizes.append(d.shape[0]) or real(self, w0, d, out)
    )
    outs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("LORAMIX_NATIVE", flag)
        out = tmp_path / f"out{flag}"
        assert main(["sum", *map(str, ads), "--into", str(base), "--out", str(out), "--no-progress"]) == 0
        outs[flag] = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    assert sizes and min(sizes) >= engine.MIN_ROWS and max(sizes) <= 2 * engine.MIN_ROWS  # pieces taken
    assert outs["1"] and outs["1"] == outs["0"]


def test_no_compiler_means_eager_code_and_one_notice(monkeypatch, tmp_path, capsys):
    """``CC`` that does not exist: one notice, no library, and a build that
    fails leaves no file behind."""
    monkeypatch.setattr(native, "_LOADED", {})
    monkeypatch.setattr(native, "_SAID", set())
    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-here")
    assert native.library("ties") is None
    assert native.library("ties") is None  # remembered: said once
    err = capsys.readouterr().err
    assert err.count("native kernels off") == 1 and "no-such-compiler-here" in err

    monkeypatch.setattr(native, "_LOADED", {})
    monkeypatch.setattr(native, "_SAID", set())
    monkeypatch.setenv("CC", "false")  # found, and fails every build
    assert native.library("ties") is None
    assert "building ties.c" in capsys.readouterr().err
    assert not list((tmp_path / "native").glob("*"))


def test_unwritable_cache_means_eager_code_and_a_notice(monkeypatch, tmp_path, capsys):
    """A cache that cannot hold the build (here a file where its folder
    would be): a notice naming it, the eager code, no exception."""
    if native._compiler() is None or not native.enabled():
        pytest.skip("no C compiler here, or LORAMIX_NATIVE=0")
    (tmp_path / "native").write_text("not a folder")
    monkeypatch.setattr(native, "_LOADED", {})
    monkeypatch.setattr(native, "_SAID", set())
    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(tmp_path))
    assert native.library("ties") is None
    err = capsys.readouterr().err
    assert "native kernels off" in err and str(tmp_path / "native") in err


def test_build_is_cached_per_source(monkeypatch, tmp_path):
    """A fresh cache builds the library once, into ``<cache>/native``; a
    second process (here: a cleared registry) loads the same file."""
    if native._compiler() is None or not native.enabled():
        pytest.skip("no C compiler here, or LORAMIX_NATIVE=0")
    monkeypatch.setattr(native, "_LOADED", {})
    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(tmp_path))
    said: list[str] = []
    with native.announcing(said.append):
        assert native.library("ties") is not None
    built = list((tmp_path / "native").glob("ties-*.so"))
    assert len(built) == 1
    assert len(said) == 1 and "ties.c" in said[0] and str(tmp_path / "native") in said[0]
    mtime = built[0].stat().st_mtime_ns
    monkeypatch.setattr(native, "_LOADED", {})
    with native.announcing(said.append):
        assert native.library("ties") is not None
    kept = sorted(p.name for p in (tmp_path / "native").iterdir())
    assert kept == sorted([built[0].name, built[0].stem + ".sha256"])  # the library and its digest
    assert built[0].stat().st_mtime_ns == mtime
    assert len(said) == 1  # loaded, not built: nothing to announce


@pytest.mark.parametrize("progress", [True, False])
@pytest.mark.parametrize("cmd", [["sum"], ["merge", "-m", "ties", "--density", "0.5"]])
def test_a_merge_says_it_is_compiling_above_its_progress_bar(cmd, progress, monkeypatch, tmp_path, capfd):
    """The first merge on a machine builds the kernels it takes; with a
    progress bar (the default of sum and merge alike: merge had none, and
    built its kernels without a word), one line per kernel says so (the bar
    stops meanwhile); with ``--no-progress``, nothing is said."""
    from loramix.cli import main

    from .factories import make_peft_adapter, save_base, tiny_llama

    if native._compiler() is None or not native.enabled():
        pytest.skip("no C compiler here, or LORAMIX_NATIVE=0")
    monkeypatch.setattr(native, "_LOADED", {})
    monkeypatch.setattr(native, "_BOUND", {})
    model = tiny_llama(seed=0, hidden=256).to(torch.bfloat16)  # bfloat16: the sum takes bf16.c
    base = save_base(model, tmp_path / "base")
    ad = make_peft_adapter(model.float(), tmp_path / "ad", seed=1, r=4)
    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(tmp_path / "cache"))
    capfd.readouterr()
    flag = [] if progress else ["--no-progress"]
    assert main([*cmd, str(ad), "--into", str(base), "--out", str(tmp_path / "out"), *flag]) == 0
    kernels = ["bf16", *(["ties"] if "ties" in cmd else [])]
    assert all(list((tmp_path / "cache" / "native").glob(f"{k}-*.so")) for k in kernels)
    said = [line for line in capfd.readouterr().err.splitlines() if "compiling" in line]
    assert sorted(k for k in kernels if any(f"{k}.c" in line for line in said)) == (
        kernels if progress else []
    )
    assert len(said) == (len(kernels) if progress else 0)


@pytest.mark.parametrize("seed", [0, 5489, 2**32 + 7, 2**63 - 1])
def test_dare_mask_kernel_draws_what_torch_draws(dare_kernels, seed, monkeypatch):
    """``dare.c``'s mask is ``torch.rand(generator seeded with seed) < density``
    bit for bit: seeds past 32 bits, lengths around the twister's 624-word
    refills, densities at the ends and between two float32 values."""
    k = dare_kernels
    for m in (1, 623, 624, 625, 1249, 50_000):
        for density in (0.0, 1e-8, 0.2, 0.5, 1 / 3, 0.9, 1.0):
            g = torch.Generator().manual_seed(seed)
            want = torch.rand(m, generator=g, dtype=torch.float32).lt_(density)
            got = torch.full((m,), 7.0)
            k.mask(seed, density, got)
            assert torch.equal(_bits(got), _bits(want)), (m, density)
    # what the merges call, both ways (a 2-D mask, into a work tensor and fresh)
    monkeypatch.setenv("LORAMIX_NATIVE", "0")
    eager = mb.dare_mask((300, 7), 0.3, seed)
    monkeypatch.setenv("LORAMIX_NATIVE", "1")
    assert torch.equal(_bits(mb.dare_mask((300, 7), 0.3, seed)), _bits(eager))
    assert torch.equal(_bits(mb.dare_mask((300, 7), 0.3, seed, out=torch.empty(300, 7))), _bits(eager))


@pytest.mark.parametrize("seed", [0, 2**32 + 7])
def test_dare_drop_kernel_is_torchs_mul_and_div(dare_kernels, seed):
    """``dare.c``'s drop is ``x.mul_(mask).div_(density)`` with the mask above,
    bit for bit: dropped negatives give -0, infinities NaN, and a density
    that float32 cannot hold divides as torch divides by it."""
    k = dare_kernels
    g = torch.Generator().manual_seed(1)
    for m in (1, 623, 625, 50_000):
        x = torch.randn(m, generator=g) * 10
        x[::7] *= -1e-30  # tiny and subnormal quotients
        x[: min(m, 4)] = torch.tensor([float("inf"), -0.0, float("-inf"), -3.0])[: min(m, 4)]
        for density in (1e-8, 0.2, 1 / 3, 0.7, 1.0):
            mask = torch.rand(m, generator=torch.Generator().manual_seed(seed)).lt_(density).float()
            want, got = x.clone().mul_(mask).div_(density), x.clone()
            k.drop(seed, density, got)
            assert torch.equal(_bits(got), _bits(want)), (m, density)


def test_dare_drop_from_states_is_the_whole_drop_by_blocks(dare_kernels):
    """``states`` and ``drop_from``: blocks of rows of a delta dropped from
    the generator's state at each block's first entry, in any order, give
    the whole delta's drop, across the twister's 624-word refills."""
    k = dare_kernels
    x = torch.randn(300, 77, generator=torch.Generator().manual_seed(3))
    for seed in (0, 2**32 + 7):
        want = x.clone()
        k.drop(seed, 0.3, want)
        bounds = [(0, 8), (8, 9), (9, 17), (17, 200), (200, 300)]  # 17 x 77 = 1309: a refill inside
        states = k.states(seed, [r0 * 77 for r0, _ in bounds])
        got = x.clone()
        for b, (r0, r1) in reversed(list(enumerate(bounds))):
            k.drop_from(states, b, 0.3, got[r0:r1])
        assert torch.equal(_bits(got), _bits(want)), seed


def _della_rows() -> dict[str, torch.Tensor]:
    """Deltas for DELLA's keep: normal values; values rounded to bfloat16 and
    small integers (many equal magnitudes in a row: torch's unstable sort
    ranks those its own way); rows of zeros of both signs; infinities and
    NaNs; one, five and a hundred columns (numpy sums fewer than 8 entries,
    and up to 128, its own ways); rows across the twister's 624-word
    refills."""
    g = torch.Generator().manual_seed(4)
    special = torch.randn(40, 333, generator=g)
    special[3, 5], special[7, 9], special[7, 10] = float("inf"), float("nan"), -float("nan")
    special[1, :100], special[2, :50] = 0.0, -0.0
    special[5, :] = -0.0
    mixed = torch.randn(30, 625, generator=g)
    mixed[::3] = torch.randint(-3, 4, (10, 625), generator=g).float()  # every third row has ties
    return {
        "normal": torch.randn(64, 517, generator=g),
        "bf16": torch.randn(50, 300, generator=g).to(torch.bfloat16).float(),
        "ints": torch.randint(-4, 5, (20, 623), generator=g).float(),
        "zeros": torch.zeros(9, 700),
        "special": special,
        "mixed": mixed,
        "one column": torch.randn(9, 1, generator=g),
        "few columns": torch.randn(11, 5, generator=g),  # numpy sums fewer than 8 one by one
        "short rows": torch.randn(10, 100, generator=g),  # and up to 128 in eight running sums
    }


@pytest.mark.parametrize("name", list(_della_rows()))
def test_della_keep_kernel_is_torchs_bernoulli_by_rank(dare_kernels, name):
    """``dare.c``'s DELLA keep, by blocks from the generator's states in any
    order: ``x * bernoulli(della_keep_probs(x))`` bit for bit, equal
    magnitudes included. Rows whose equal magnitudes the radix sort would
    rank otherwise than torch where it changes a keep are ranked again by
    std::sort's steps: small integers make nearly every row so (rows with
    ties of 30-140 entries), normal values none."""
    from loramix.methods.della import della_keep_probs, della_table

    k, x = dare_kernels, _della_rows()[name]
    rows, n = x.shape
    for seed, density, eps in ((0, 0.5, 0.2), (2**32 + 7, 0.2, 0.15)):
        p = della_keep_probs(x, density, eps)
        want = x * torch.bernoulli(p, generator=torch.Generator().manual_seed(seed))
        table = della_table(n, density, eps)
        bounds = [(r0, min(rows, r0 + 7)) for r0 in range(0, rows, 7)]
        states = k.states(seed, [r0 * n for r0, _ in bounds])
        got, again = x.clone(), 0
        sums = np.full((2, rows), np.nan, dtype=np.float32)
        keep = np.full((rows, (n + 7) // 8), 0xA5, dtype=np.uint8)  # every byte written
        for b, (r0, r1) in reversed(list(enumerate(bounds))):
            if b % 2:  # the norms and the bits are optional
                again += k.della_keep_from(states, b, table, got[r0:r1], bits=keep[r0:r1])
            else:
                again += k.della_keep_from(states, b, table, got[r0:r1], sums[0, r0:r1], sums[1, r0:r1])
                k.della_keep_from(states, b, table, x[r0:r1].clone(), bits=keep[r0:r1])
        assert torch.equal(_bits(got), _bits(want)), (name, seed)
        # the keep as bits, applied again to the same entries: the keep's bits, and torch's
        # x.mul_(scale) after it (DELLA from factors keeps each block twice)
        unpacked = np.unpackbits(keep, axis=1, bitorder="little")
        assert not unpacked[:, n:].any(), name  # the last byte's bits past the row are clear
        plain = (torch.isfinite(x) & (x != 0)).numpy()  # there, kept is want != 0
        assert np.array_equal(unpacked[:, :n][plain].astype(bool), (want != 0).numpy()[plain]), name
        for scale in (None, 0.37, 3.0e38):
            y = x.clone()
            k.della_apply(keep, y, scale)
            assert torch.equal(_bits(y), _bits(want if scale is None else want * scale)), (name, scale)
        # each row's L1 norm before and after as numpy sums it (della.l1_norm), to the bit
        even = [r for b, (r0, r1) in enumerate(bounds) if b % 2 == 0 for r in range(r0, r1)]
        for i, t in enumerate((x, got)):
            assert np.array_equal(
                sums[i, even].view(np.int32), np.add.reduce(np.abs(t.numpy()[even]), axis=1).view(np.int32)
            ), (name, seed, i)
        if name == "ints":
            assert again >= rows - 2, again  # std::sort's own order, nearly every row
        if name in ("normal", "zeros", "one column", "short rows"):
            assert again == 0
    # no rows, no columns: nothing to keep, nothing read
    assert k.della_keep_from(k.states(0, [0]), 0, della_table(n, 0.5, 0.2), x[:0]) == 0
    assert k.della_keep_from(k.states(0, [0]), 0, della_table(0, 0.5, 0.2), torch.empty(3, 0)) == 0


def test_della_checks_once_that_its_sort_is_torchs(dare_kernels, monkeypatch):
    """Each form's std::sort steps rank equal magnitudes as this torch's
    argsort does (its own check says so); where the check says otherwise
    (a torch built with another C++ library), DELLA keeps by torch's way,
    the kernel untouched."""
    from loramix.methods import della
    from loramix.native import dare

    assert dare_kernels.sorts_as_torch()
    k = dare.kernels()
    monkeypatch.setattr(k, "_sorts_as_torch", False)
    monkeypatch.setattr(dare.Dare, "della_keep_from", lambda *a: pytest.fail("the kernel was taken"))
    x = torch.randn(20, 300, generator=torch.Generator().manual_seed(1))
    assert not della._kept_by_kernel([x.clone()], 0.5, 0.2, [3])
    got = della.della_prune_(x.clone(), 0.5, 0.2, 3)
    monkeypatch.setenv("LORAMIX_NATIVE", "0")
    assert torch.equal(_bits(got), _bits(della.della_prune_(x.clone(), 0.5, 0.2, 3)))


def test_della_keeps_by_torch_where_its_table_would_not_rise(monkeypatch):
    """The kernel's bounds on each rank decide a keep only for a table that
    rises with the rank (della_table's float32 steps do); a table that did
    not would be kept by torch's way, the kernel untouched."""
    from loramix.methods import della
    from loramix.native import dare

    if dare.kernels() is None:
        pytest.skip("the native kernels are not built here (no C compiler, or LORAMIX_NATIVE=0)")
    x = torch.randn(20, 300, generator=torch.Generator().manual_seed(1))
    assert della._kept_by_kernel([x.clone()], 0.5, 0.2, [3]) is not None
    falling = della.della_table
    monkeypatch.setattr(della, "della_table", lambda n, d, e: falling(n, d, e).flip(0))
    monkeypatch.setattr(dare.Dare, "della_keep_from", lambda *a: pytest.fail("the kernel was taken"))
    assert della._kept_by_kernel([x.clone()], 0.5, 0.2, [3]) is None
    got = della.della_prune_(x.clone(), 0.5, 0.2, 3)
    monkeypatch.setenv("LORAMIX_NATIVE", "0")
    assert torch.equal(_bits(got), _bits(della.della_prune_(x.clone(), 0.5, 0.2, 3)))


def test_della_prune_has_the_same_bits_with_and_without_kernels(monkeypatch):
    """``della_prune_all`` (the keep by the kernel, tied rows by torch's
    ranks, then the L1 rescale) against the eager code, on every delta of
    :func:`_della_rows` at once, with weights of both signs and zero."""
    from loramix.methods.della import della_prune_all

    xs = list(_della_rows().values())
    weights = [1.0, -0.5, 2.0, 0.0, 1.0, 0.3, 1.0]
    out = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("LORAMIX_NATIVE", flag)
        ys = [x.clone() for x in xs]
        della_prune_all(ys, 0.4, 0.15, list(range(len(ys))), weights)
        out[flag] = ys
    for a, b in zip(out["1"], out["0"]):
        assert torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("lam", ["1", "0.7"])
@pytest.mark.parametrize("method", ["dare-ties", "dare-linear", "della", "della:count", "della:weight:gpt2"])
def test_merges_from_factors_by_small_blocks_write_the_dense_ways_bytes(method, lam, monkeypatch, tmp_path):
    """DARE and DELLA from factors with blocks of 8 rows (many blocks, each
    one's draws from its own state), each block added to the bfloat16 base
    as it is combined (no float32 delta): the bytes of the dense deltas
    dropped or kept by torch and added by the engine. DELLA forms each block
    twice, keeping it first (its keep saved as bits, its rows' L1 norms
    summed) and then by those bits, rescaled. On GPT-2 (``Conv1D``, stored
    ``(in, out)``) the merged delta is formed whole from its blocks
    (``materialize``) and added by the engine."""
    from loramix.cli import main
    from loramix.methods import base as methods_base
    from loramix.methods import dare as dare_method
    from loramix.methods import della as della_method
    from loramix.native import dare

    from .factories import make_peft_adapter, save_base, tiny_gpt2, tiny_llama

    if ties.kernels() is None:
        pytest.skip("the native kernels are not built here (no C compiler, or LORAMIX_NATIVE=0)")
    name, divide, arch = (method.split(":") + ["", ""])[:3]
    model = (tiny_gpt2(n_embd=256) if arch == "gpt2" else tiny_llama(seed=0, hidden=256)).to(torch.bfloat16)
    base = save_base(model, tmp_path / "base")
    ads = [make_peft_adapter(model.float(), tmp_path / f"ad{i}", seed=i + 1, r=4) for i in range(3)]
    monkeypatch.setattr(methods_base, "_row_step", lambda src: 8)
    materialized, real_m = [], methods_base.FactorBlocks.materialize
    monkeypatch.setattr(
        methods_base.FactorBlocks, "materialize", lambda self: materialized.append(1) or real_m(self)
    )
    spied = {"dare": ("drop_from", 1), "della": ("della_apply", None)}[name.split("-")[0]]
    blocks, real = [], getattr(dare.Dare, spied[0])
    monkeypatch.setattr(
        dare.Dare,
        spied[0],
        lambda self, *a: blocks.append(a[1] if spied[1] else a[1].shape[0]) or real(self, *a),
    )
    cls = dare_method.FactorDrops if name.startswith("dare") else della_method.FactorKeeps
    added, real_add = [], cls.add_bf16
    monkeypatch.setattr(cls, "add_bf16", lambda self, *a: added.append(real_add(self, *a)) or added[-1])
    extra = ["--divide", divide] if divide else []
    outs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("LORAMIX_NATIVE", flag)
        out = tmp_path / f"out{flag}"
        assert main(["merge", "-m", name, "--density", "0.4", "--seed", "3", *map(str, ads), "--into",
                     str(base), "--out", str(out), "--weights", "1,0.5,2", "--lambda", lam, *extra,
                     "--no-progress"]) == 0  # fmt: skip
        outs[flag] = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    if spied[1]:
        assert max(blocks) >= 31  # 256 rows in blocks of 8: from factors, every block from its own state
    else:
        assert blocks and max(blocks) == 8  # DELLA's blocks kept again by their bits, 8 rows each
    if arch == "gpt2":
        assert materialized and not added  # every module transposed: formed from its blocks, then added
    else:
        assert added and all(added) and not materialized  # each block added to W0 by the merge's own
    assert outs["1"] and outs["1"] == outs["0"]


@pytest.mark.parametrize("form", ["dispatched", "generic", "generic:baseline", "generic:avx2"])
def test_bf16_add_kernel_has_torchs_bits(form, tmp_path_factory):
    """``bf16.c``: ``(w0.float() + d).bfloat16()`` bit for bit for every
    bfloat16 ``w0`` that is a number, with deltas that tie (round to even),
    carry to infinity, are subnormal or zero of either sign; not finite
    (NaN or infinity in, or an overflow) is reported, on lengths on and off
    the vector width, in place or not; by the kernel as loramix calls it
    (AVX-512 where the CPU has it) and by the portable loop, in the form the
    CPU picks and in its baseline and AVX2 forms, built alone."""
    from loramix.native import bf16

    k = bf16.kernels()
    if k is None:
        pytest.skip("the native kernels are not built here (no C compiler, or LORAMIX_NATIVE=0)")
    if form != "dispatched":
        lib = (
            native.library("bf16")
            if form == "generic"
            else one_form("bf16", form.split(":")[1], tmp_path_factory)
        )
        k = bf16.Bf16(lib, generic=True)
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    w0 = bits.view(torch.bfloat16)
    w0 = w0[~torch.isnan(w0)]
    g = torch.Generator().manual_seed(0)
    w = w0.float()
    deltas = [
        torch.zeros_like(w),
        -torch.zeros_like(w),
        torch.randn(w.shape, generator=g) * w.abs().clamp_min(1e-30),  # the same scale as w0: every rounding
        torch.full_like(w, 1e-45),
        (w * 2.0**-8).neg(),  # about half a bfloat16 step: exact ties where w0 is a power of two
        torch.full_like(w, 3.0e38),  # overflows where w0 is large
    ]
    for d in deltas:
        want = (w + d).bfloat16()
        got = torch.empty_like(w0)
        finite = k.add(w0.contiguous(), d.contiguous(), got)
        assert finite == bool(torch.isfinite(want).all())
        ok = ~torch.isnan(want)  # a NaN result's bits are unspecified (the merge raises)
        assert torch.equal(got[ok].view(torch.int16), want[ok].view(torch.int16))
    for m in (1, 15, 16, 17, 1000):  # in place (out is w0), lengths off the vector width
        x, d = w0[:m].clone(), deltas[2][:m].contiguous()
        want = (x.float() + d).bfloat16()
        assert k.add(x, d, x) and torch.equal(x.view(torch.int16), want.view(torch.int16))
    inf = torch.tensor([1.0, float("inf")]).bfloat16()
    assert not k.add(inf, torch.zeros(2), torch.empty_like(inf))
    ones = torch.ones(33, dtype=torch.bfloat16)
    for at in (0, 5, 15, 16, 31, 32):  # in a whole vector of 16 and in the rest
        for bad in (float("inf"), -float("inf"), float("nan"), -float("nan")):
            d = torch.zeros(33)
            d[at] = bad
            assert not k.add(ones, d, torch.empty_like(ones)), (at, bad)
        assert k.add(ones, torch.zeros(33), torch.empty_like(ones))


def test_addmm_adds_the_finished_product():
    """What the fused bfloat16 step relies on for the engine's bits:
    ``W.addmm_(B, A)`` is ``W + B @ A`` (the product rounded, then added
    once), for the engine's block shapes and a transposed ``B``."""
    g = torch.Generator().manual_seed(0)
    for out_f, in_f, r in ((1024, 4096, 48), (64, 11008, 48), (256, 768, 8)):
        Bt, A = torch.randn(r, out_f, generator=g), torch.randn(r, in_f, generator=g)
        W = torch.randn(out_f, in_f, generator=g)
        for B in (Bt.T, Bt.T.contiguous()):
            assert torch.equal(W.clone().addmm_(B, A), W + B @ A)


def test_a_killed_builds_temporary_is_removed_by_the_next_build(monkeypatch, tmp_path):
    """kill -9 while compiling leaves the compiler's output beside the
    library; its name says whose it was, so the next build removes it."""
    import subprocess
    import sys
    from pathlib import Path

    if native._compiler() is None or not native.enabled():
        pytest.skip("no C compiler here, or LORAMIX_NATIVE=0")
    monkeypatch.setattr(native, "_LOADED", {})
    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(tmp_path))
    assert native.library("ties") is not None
    (lib,) = (tmp_path / "native").glob("*.so")
    kept = sorted(p.name for p in (tmp_path / "native").iterdir())  # the library and its digest
    code = "import sys; from pathlib import Path; from loramix.io.outputs import temporary_file; "
    code += "t = temporary_file(Path(sys.argv[1])); t.write_text('half'); print(t)"
    dead = Path(subprocess.run([sys.executable, "-c", code, str(lib)], capture_output=True, text=True,
                               check=True).stdout.strip())  # fmt: skip
    assert dead.exists()
    lib.unlink()
    monkeypatch.setattr(native, "_LOADED", {})
    assert native.library("ties") is not None
    assert sorted(p.name for p in (tmp_path / "native").iterdir()) == kept


@pytest.mark.parametrize("size", [0, 5000])
def test_a_damaged_library_in_the_cache_is_built_again(size, monkeypatch, tmp_path):
    """A cached library cut short (a disk that filled, a crash before its
    pages reached the disk): the loader refused an empty one (the kernels off
    in every run after) and faulted on a truncated one (SIGBUS: every merge
    died). It is built again, and loaded. In a process of its own: the
    fault kills it."""
    import shutil
    import subprocess
    import sys

    if native._compiler() is None or not native.enabled():
        pytest.skip("no C compiler here, or LORAMIX_NATIVE=0")
    built = native._build("ties")  # the session cache's, built once
    assert built is not None
    (tmp_path / "native").mkdir()
    lib = tmp_path / "native" / built.name
    for f in built.parent.glob(built.stem + ".*"):  # the library and what is kept beside it
        shutil.copy(f, tmp_path / "native" / f.name)
    with open(lib, "r+b") as f:
        f.truncate(size)
    code = "from loramix.native import ties; print(ties.kernels() is not None)"
    env = {**__import__("os").environ, "LORAMIX_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "True", "")
    assert lib.read_bytes() == built.read_bytes()
