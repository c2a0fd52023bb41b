"""The top-level API: plain functions, exported lazily, the same object on every access."""

import importlib
import subprocess
import sys
import types

import loramix

FUNCTIONS = [
    "similarity",
    "merge",
    "evaluate",
    "predict",
    "load_adapter",
    "sum_into_base",
    "sum_adapters",
    "train_adapter",
    "build_base",
    "run_scenario",
    "save_peft_adapter",
    "save_d2_adapter",
    "plan",
    "fit_evaluations",
    "inspect_adapter",
    "import_gguf",
]


def test_exports_are_functions_and_stable():
    for name in FUNCTIONS:
        first = getattr(loramix, name)
        assert callable(first) and not isinstance(first, types.ModuleType), name
        # importing the defining module must not rebind the package attribute to a module
        importlib.import_module(first.__module__)
        assert getattr(loramix, name) is first, name
    assert set(FUNCTIONS) <= set(loramix.__all__)


def test_no_module_shadows_an_exported_function():
    # a submodule named like an exported function would replace it once imported
    import pkgutil

    subs = {m.name for m in pkgutil.iter_modules(loramix.__path__)}
    assert not subs & set(FUNCTIONS), subs & set(FUNCTIONS)


def test_predict_is_a_function_in_a_fresh_interpreter():
    code = (
        "import loramix, types; a = loramix.predict; b = loramix.predict; "
        "assert a is b and not isinstance(a, types.ModuleType)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_attribute():
    import pytest

    with pytest.raises(AttributeError):
        loramix.no_such_thing  # noqa: B018


def test_dir_lists_the_lazy_api():
    """A notebook completes ``loramix.<TAB>`` from ``dir``: the lazily
    imported functions must be in it before any of them is touched."""
    code = "import loramix; missing = set(loramix.__all__) - set(dir(loramix)); assert not missing, missing"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_help_shows_each_exports_parameters():
    """``help(loramix.X)`` in a notebook shows the real parameters and
    docstring: ``run_scenario`` was a ``(*args, **kwargs)`` forwarder whose
    help said only "See :func:`loramix.scenario.runner.run_scenario`"."""
    import inspect

    for name in FUNCTIONS:
        f = getattr(loramix, name)
        kinds = {p.kind for p in inspect.signature(f).parameters.values()}
        assert inspect.Parameter.VAR_POSITIONAL not in kinds, name
        assert not f.__doc__.lstrip().startswith("See "), name


def test_help_says_what_each_parameter_is():
    """``help(loramix.X)`` names every parameter of ``X`` in its text (as
    ````name```` or ````name=...````), not only in the signature: a notebook user read nothing
    of ``train_adapter``'s ``rank``, ``lr``, ``limit`` or ``on``, of
    ``sum_into_base``'s ``weights`` or ``force``, of ``evaluate``'s
    ``weights`` or ``build_base``'s ``seed`` (what it seeds)."""
    import inspect

    for name in FUNCTIONS:
        f = getattr(loramix, name)
        doc = f.__doc__
        unsaid = [
            p for p in inspect.signature(f).parameters if f"``{p}``" not in doc and f"``{p}=" not in doc
        ]
        assert not unsaid, (name, unsaid)


def test_an_adapter_and_a_merge_echo_in_one_line(tmp_path):
    """A notebook echoes ``loramix.load_adapter(p)``: one line with the name,
    kind, size and path, each module its shape and scale (the dataclass repr
    printed every factor: 1,000 lines for a two-block GPT-2 adapter); and a
    merge's result without its provenance record and module lists (7,000
    characters for three SmolLM2 adapters on two blocks)."""
    from .factories import make_peft_adapter, save_base, tiny_gpt2

    model = tiny_gpt2()
    a = loramix.load_adapter(make_peft_adapter(model, tmp_path / "a", r=4, lora_alpha=8))
    assert repr(a) == (
        f"Adapter('a', kind='lora', modules=8, rank=4, parameters={a.num_parameters}, path='{tmp_path / 'a'}')"
    )
    m = a.modules["transformer.h.0.attn.c_attn"]
    assert repr(m) == (
        "ModuleDelta('transformer.h.0.attn.c_attn', kind='lora', shape=(96, 32), rank=4, scale=2, dtype=torch.float32)"
    )
    b = make_peft_adapter(model, tmp_path / "b", seed=1, r=4, lora_alpha=8)
    base = save_base(model, tmp_path / "base")
    results = [
        loramix.merge([a, b], "ties", out=tmp_path / "t", density=0.5, out_rank=2),
        loramix.merge([a, b], "sum", into=base, out=tmp_path / "m"),
        loramix.sum_into_base([a, b], into=base, out=tmp_path / "s", progress=False),
    ]
    for r in results:
        assert "\n" not in repr(r) and len(repr(r)) < 600 and "loramix_version" not in repr(r), repr(r)


def test_the_writers_refuse_what_the_reader_refuses_before_making_the_folder(tmp_path):
    """``save_peft_adapter`` wrote a folder for factors whose ranks differ, an
    empty dict or a non-finite factor (load_adapter then refused it, or the
    folder stayed empty); ``save_d2_adapter`` raised a bare ValueError for a
    LoRA module. Each is now a one-line LoramixError naming the folder, and
    no folder is made; a good pair still reads back exactly."""
    import pytest
    import torch

    from loramix.adapter import ModuleDelta

    B, A = torch.randn(6, 2), torch.randn(2, 5)
    bad = {
        "ranks differ": {"m": (torch.randn(6, 3), A)},
        "1-D": {"m": (torch.randn(6), A)},
        "not a pair": {"m": B},
        "nothing": {},
        "nan": {"m": (B, torch.full((2, 5), float("nan")))},
    }
    for case, factors in bad.items():
        out = tmp_path / case.replace(" ", "-")
        with pytest.raises(loramix.LoramixError) as e:
            loramix.save_peft_adapter(out, factors)
        assert "\n" not in str(e.value) and not out.exists(), case
    lora = ModuleDelta("m", B, A, scale=1.0, alpha=2.0)
    with pytest.raises(loramix.LoramixError, match="D2-LoRA"):
        loramix.save_d2_adapter(tmp_path / "d2", {"m": lora}, r=2, lora_alpha=2, tau=0.5)
    assert not (tmp_path / "d2").exists()
    back = loramix.load_adapter(loramix.save_peft_adapter(tmp_path / "good", {"m": (B, A)})).modules["m"]
    assert torch.equal(back.B, B) and torch.equal(back.A, A) and back.scale == 1.0


def test_training_keeps_the_callers_random_stream(tmp_path):
    """``train_adapter`` and ``build_base`` seed torch's global generator for
    their dropout and initial weights; a notebook's own stream (what it draws
    next) was reset to theirs. It is now as the caller left it."""
    import torch

    data = "synthetic:arith?n=80"
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    loramix.build_base(data, out=tmp_path / "base", steps=2, device="cpu", progress=False)
    assert torch.equal(torch.get_rng_state(), state), "build_base"
    loramix.train_adapter(tmp_path / "base", data, out=tmp_path / "a", steps=2, batch=4, eval_size=0, device="cpu",
                          progress=False)  # fmt: skip
    assert torch.equal(torch.get_rng_state(), state), "train_adapter"


def _returned_names(doc: str, start: str) -> set[str]:
    """The ``names`` in the paragraph of ``doc`` that begins with ``start`` (not file names)."""
    import re

    para = doc[doc.index(start) :].split("\n\n")[0]
    return {n for span in re.findall(r"``([^`.]+)``", para) for n in re.findall(r"[a-z_]+", span)}


def test_the_docstrings_name_the_fields_returned(tmp_path):
    """What ``help()`` says a function returns is there: ``train_adapter``'s
    docstring promised ``seconds`` (the dict has ``train_seconds``,
    ``setup_seconds``, ``prefix_seconds``)."""
    built = loramix.build_base(
        "synthetic:arith?n=80", out=tmp_path / "base", steps=2, device="cpu", progress=False
    )
    trained = loramix.train_adapter(tmp_path / "base", "synthetic:arith?n=40", out=tmp_path / "a", steps=1, batch=4,
                                    device="cpu", progress=False)  # fmt: skip
    table = loramix.evaluate(tmp_path / "base", data=["synthetic:arith?n=8"])
    assert _returned_names(loramix.train_adapter.__doc__, "Returns ``out``") - set(trained) == set()
    in_record = {"results"}  # build_base: "also stored under ``results`` in loramix.json"
    assert _returned_names(loramix.build_base.__doc__, "Returns a") - set(built) == in_record
    assert (
        _returned_names(loramix.evaluate.__doc__, "Returns a pandas") - set(table.columns) - {"union"}
        == set()
    )


def test_a_similarity_echoes_its_rms_matrix_and_names_its_tables(tmp_path):
    """A notebook cell ending with ``loramix.similarity(ads)`` showed the
    dataclass repr: every table in full inside one call-like line (22 lines,
    1,090 characters for two SmolLM2 adapters on four modules). Now a header
    naming the adapters' kinds, the deltas and the tables, then the RMS
    cosine matrix, as ``loramix similarity`` prints it first."""
    from .factories import make_peft_adapter, tiny_gpt2

    model = tiny_gpt2()
    ads = [
        loramix.load_adapter(make_peft_adapter(model, tmp_path / n, seed=i, r=2)) for i, n in enumerate("ab")
    ]
    sim = loramix.similarity(ads, per_module=True, progress=False)
    lines = repr(sim).splitlines()
    assert lines[0] == (
        "SimilarityResult: 2 adapters (lora; residual deltas); tables .rms, .mean, .coverage, .shared, .norms, "
        ".per_module"
    )
    assert lines[1] == "RMS cosine:" and lines[2:] == sim.rms.round(4).to_string().splitlines()
    assert len(lines) == 6


def test_every_function_says_what_it_returns(tmp_path):
    """``help(loramix.X)`` said nothing of what ``merge`` and ``similarity``
    return (a notebook's next cell reads it), and ``evaluate``'s list of its
    DataFrame's columns left out ``prefix_seconds``."""
    from .factories import write_jsonl
    from .test_train import make_tiny_base

    for name in FUNCTIONS:
        doc = getattr(loramix, name).__doc__
        assert "Return" in doc or "return" in doc, name
    base = make_tiny_base(tmp_path / "base", "gpt2")
    data = write_jsonl(tmp_path / "d.jsonl", [{"question": "1+1?", "answer": "2"}] * 3)
    df = loramix.evaluate(base, data=[data], device="cpu", progress=False)
    said = loramix.evaluate.__doc__.split("columns ``", 1)[1].split("``", 1)[0]
    assert [c.strip() for c in said.split(",")] == list(df.columns)
