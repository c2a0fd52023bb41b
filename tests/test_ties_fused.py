"""TIES from factors merged into a bfloat16 base adds each tile of its
election to ``W0`` inside the one pass (methods.base.OnePassTies,
engine.add_delta): the same bytes as the delta formed whole and added by
the engine, on every way the pass can go (tiles formed by the kernel or
blocks formed into memory, a threshold outside what the pass recorded,
one thread or two), and a sum that overflows refused the same way."""

from __future__ import annotations

import pytest
import torch

import loramix.methods.base as mb
from loramix.cli import main
from loramix.native import bf16, ties

from .factories import make_peft_adapter, save_base, tiny_llama

pytestmark = pytest.mark.skipif(
    ties.kernels() is None or bf16.kernels() is None, reason="the native kernels are not built here"
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fused")
    model = tiny_llama(hidden=576, n_layer=2, n_head=4).to(torch.bfloat16)
    base = save_base(model, tmp / "base", max_shard_size="5MB")
    ads = [make_peft_adapter(model, tmp / f"a{k}", seed=k, r=16, lora_alpha=32) for k in range(3)]
    return base, ads


def _merge(tmp_path, name, base, ads, threads=2):
    out = tmp_path / name
    args = ["merge", "-m", "ties", "--density", "0.2", *ads, "--into", base, "--out", out,
            "--threads", threads, "--no-progress"]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


@pytest.fixture
def added(monkeypatch):
    """The modules whose delta the pass added to W0 itself (finished, not declined)."""
    done = []
    real = mb.OnePassTies.add_bf16

    def spy(self, *args):
        got = real(self, *args)
        if got is not None:
            done.append(self.shape)
        return got

    monkeypatch.setattr(mb.OnePassTies, "add_bf16", spy)
    return done


def _formed_whole(monkeypatch):
    """The reference: every delta formed whole first (the pass declines), then added by the engine."""
    monkeypatch.setattr(mb.OnePassTies, "add_bf16", lambda self, *args: None)


@pytest.mark.parametrize(("threads", "form"), [(1, "dispatched"), (2, "dispatched"), (2, "avx2")])
def test_added_in_the_pass_is_the_same_bytes(tmp_path, inputs, added, monkeypatch, threads, form):
    """As loramix runs (AVX-512 where the CPU has it), and in the AVX2 form (a CPU without)."""
    from loramix import native

    if form == "avx2":
        if not ties.has_avx2(native.library("ties")):
            pytest.skip("no AVX2 here: the AVX2 kernels cannot run")
        avx2 = ties.Ties(native.library("ties"), form="avx2")
        monkeypatch.setattr(ties, "kernels", lambda: avx2)
    base, ads = inputs
    fused = _merge(tmp_path, "fused", base, ads, threads)
    # q, o, gate, up and down of both layers (k and v, 576 x 144: brackets too wide for the one pass)
    assert len(added) == 2 * 5, added
    _formed_whole(monkeypatch)
    assert fused == _merge(tmp_path, "whole", base, ads, threads)


def test_blocks_formed_into_memory_are_the_same_bytes(tmp_path, inputs, added, monkeypatch):
    """Where the kernel's tiles would not have torch.mm's bits (forms_like_mm false),
    each block is formed by torch.mm, elected, then added."""
    base, ads = inputs
    monkeypatch.setattr(mb._OnePass, "formed", lambda self, r0, r1: None)
    fused = _merge(tmp_path, "fused", base, ads)
    assert added
    _formed_whole(monkeypatch)
    assert fused == _merge(tmp_path, "whole", base, ads)


def test_a_threshold_outside_the_records_reads_w0_again(tmp_path, inputs, added, monkeypatch):
    """The pass has written W0 + its provisional election in place; when the exact
    threshold turns out to lie outside the recorded band, W0 is read again and the
    delta formed whole: the same bytes."""
    base, ads = inputs
    real, seen = mb._OnePass.thresholds, []

    def first_misses(self, parts):
        # The pass's own call misses; materialize's runs as usual. The mark is on the
        # object, not its id(): a finished pass is freed and a later one may reuse its id.
        if not getattr(self, "_missed_once", False):
            self._missed_once = True
            seen.append(self)
            return None
        return real(self, parts)

    monkeypatch.setattr(mb._OnePass, "thresholds", first_misses)
    fused = _merge(tmp_path, "fused", base, ads)
    assert not added and seen
    monkeypatch.undo()
    _formed_whole(monkeypatch)
    assert fused == _merge(tmp_path, "whole", base, ads)


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_what_is_not_finite_is_refused_the_same_way(tmp_path, inputs, added, monkeypatch, capsys, value):
    """A result that is not finite (an infinite or NaN base weight) is refused, naming
    the tensor, and nothing is written, as when the engine adds."""
    from safetensors.torch import load_file, save_file

    base, ads = inputs
    big = tmp_path / "big"
    big.mkdir()
    for p in base.iterdir():
        if p.suffix == ".safetensors":
            t = load_file(p)
            for k in t:
                if k.endswith("layers.1.mlp.up_proj.weight"):
                    t[k][3, 5] = value
            save_file(t, big / p.name, metadata={"format": "pt"})
        else:
            (big / p.name).write_bytes(p.read_bytes())
    capsys.readouterr()
    args = [
        "merge",
        "-m",
        "ties",
        "--density",
        "0.2",
        *ads,
        "--into",
        big,
        "--out",
        tmp_path / "o1",
        "--no-progress",
    ]
    code = main([str(a) for a in args])
    said = capsys.readouterr().err
    assert code != 0 and "up_proj" in said and not (tmp_path / "o1").exists()
    assert added, "the pass added nothing"
    _formed_whole(monkeypatch)
    args[-2] = tmp_path / "o2"
    assert main([str(a) for a in args]) == code
    assert capsys.readouterr().err.replace("o2", "o1") == said
