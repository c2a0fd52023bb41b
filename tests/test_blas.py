"""numpy's OpenBLAS on one thread for the length of loramix's library calls
(:mod:`loramix.blas`): a notebook has loaded numpy, with OpenBLAS's default
threads, before it calls loramix, so the commands' ``OPENBLAS_NUM_THREADS=1``
comes too late; the calls lower the loaded library's count and give it back."""

from __future__ import annotations

import pytest

from loramix.blas import _controls, _loaded_openblas, openblas_threads

from .factories import make_peft_adapter, tiny_gpt2


def _openblas():
    for path in _loaded_openblas():
        if (c := _controls(path)) is not None:
            return c
    pytest.skip("no OpenBLAS with a thread-count symbol in this process (another BLAS, or not Linux)")


@pytest.fixture
def threads(monkeypatch):
    """OpenBLAS's thread count, set to 3 as a notebook's numpy on a multi-core
    machine has it (whatever this process was started with), put back after."""
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    get, put = _openblas()
    before = get()
    put(3)
    if get() != 3:
        put(before)
        pytest.skip("this OpenBLAS runs fewer threads than asked for")
    yield get
    put(before)


def test_one_thread_within_and_the_count_back_after(threads):
    with openblas_threads(1):
        assert threads() == 1
        with openblas_threads(1):  # nested: the outer count comes back at the outer end
            assert threads() == 1
        assert threads() == 1
    assert threads() == 3
    with pytest.raises(ZeroDivisionError):
        with openblas_threads(2):
            assert threads() == 2
            raise ZeroDivisionError
    assert threads() == 3
    with openblas_threads(4):  # never raised
        assert threads() == 3


def test_no_library_or_no_symbol_is_a_no_op(threads, tmp_path):
    libc = next((p for p in open("/proc/self/maps").read().split() if "/libc.so" in p or "/libc-" in p), None)
    missing = [str(tmp_path / "libopenblas.so"), *([libc] if libc else [])]
    with openblas_threads(1, libraries=missing):
        assert threads() == 3
    with openblas_threads(1, libraries=[]):
        assert threads() == 3
    assert threads() == 3


def test_openblas_num_threads_set_is_kept(threads, monkeypatch):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    with openblas_threads(1):
        assert threads() == 3


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d, model = tmp_path_factory.mktemp("blas"), tiny_gpt2()
    return [make_peft_adapter(model, d / n, seed=i, r=4, lora_alpha=8) for i, n in enumerate("ab")]


def _seen(monkeypatch, module, name, get, seen):
    real = getattr(module, name)

    def watched(*args, **kwargs):
        seen.append(get())
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, watched)


def test_the_library_calls_run_openblas_on_one_thread(threads, pair, tmp_path, monkeypatch):
    """``loramix.similarity``, ``loramix.predict`` and ``loramix.run_scenario``
    from Python: one OpenBLAS thread where their numpy work runs; the count
    the caller had after."""
    import json

    import loramix.fit
    import loramix.overlap
    import loramix.scenario.runner

    seen: list = []
    _seen(monkeypatch, loramix.overlap, "_module_inner_products", threads, seen)
    loramix.similarity(pair, progress=False)
    assert seen and set(seen) == {1} and threads() == 3

    seen.clear()
    _seen(monkeypatch, loramix.fit, "composition_cosine", threads, seen)
    fit = {"adapter_method": "lora", "merge_method": "sum", "x": [0.1, 0.2, 0.3], "y": [1.0, 2.5, 2.9]}
    line = loramix.fit.fit_line(fit["x"], fit["y"]).to_dict()
    (tmp_path / "fit.json").write_text(json.dumps({"fits": [{**fit, **line}]}))
    loramix.predict(pair, tmp_path / "fit.json")
    assert seen[-1] == 1 and threads() == 3

    seen.clear()
    _seen(monkeypatch, loramix.scenario.runner, "load_scenario", threads, seen)
    with pytest.raises(loramix.LoramixError):
        loramix.run_scenario(tmp_path / "missing.toml", out=tmp_path / "r")
    assert seen == [1] and threads() == 3
