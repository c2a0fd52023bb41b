"""Damaged GGUF files, given where a base model is expected: one line naming
the file, exit code 2, no traceback, and nothing left in ``--out`` or in the
cache's ``bases/``. The files are a tiny Llama GGUF (``llama_gguf``, 52 kB)
damaged at each part of its layout, and prefixes of the real SmolLM2 file."""

from __future__ import annotations

import os
import resource
import struct
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from loramix.cli import main

from .factories import SMOL_GGUF
from .test_realmodel import llama_gguf

_WIDTH = {0: 1, 1: 1, 7: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 10: 8, 11: 8, 12: 8}


def _layout(b: bytes) -> dict:
    """Offsets in a well-formed GGUF: ``kv[key]`` (start of its value) and
    ``tensor[name]`` (``dims``, ``type``, ``offset``: where those fields are),
    ``tensors`` (start of the tensor entries) and ``data`` (start of the data)."""

    def skip(pos, t):
        if t in _WIDTH:
            return pos + _WIDTH[t]
        if t == 8:
            return pos + 8 + struct.unpack_from("<Q", b, pos)[0]
        et, n = struct.unpack_from("<IQ", b, pos)
        pos += 12
        for _ in range(n):
            pos = skip(pos, et)
        return pos

    n_t, n_kv = struct.unpack_from("<QQ", b, 8)
    pos, kv, tensor = 24, {}, {}
    for _ in range(n_kv):
        (n,) = struct.unpack_from("<Q", b, pos)
        key = b[pos + 8 : pos + 8 + n].decode()
        (t,) = struct.unpack_from("<I", b, pos + 8 + n)
        kv[key] = pos + 12 + n
        pos = skip(pos + 12 + n, t)
    first = pos
    for _ in range(n_t):
        (n,) = struct.unpack_from("<Q", b, pos)
        name = b[pos + 8 : pos + 8 + n].decode()
        (nd,) = struct.unpack_from("<I", b, pos + 8 + n)
        dims = pos + 12 + n
        tensor[name] = {"ndims": dims - 4, "dims": dims, "type": dims + 8 * nd, "offset": dims + 8 * nd + 4}
        pos = dims + 8 * nd + 12
    return {"kv": kv, "tensor": tensor, "tensors": first, "data": -(-pos // 32) * 32, "size": len(b)}


def _put(b: bytes, off: int, fmt: str, v) -> bytes:
    out = bytearray(b)
    struct.pack_into(fmt, out, off, v)
    return bytes(out)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[bytes, dict]:
    p = llama_gguf(tmp_path_factory.mktemp("tiny") / "good.gguf", tokenizer=True)
    b = p.read_bytes()
    return b, _layout(b)


def _damage(name: str, b: bytes, L: dict) -> bytes:
    """The tiny file damaged as ``name`` says."""
    kv, t = L["kv"], L["tensor"]
    norm, embd = t["output_norm.weight"], t["token_embd.weight"]
    last = t["blk.0.ffn_down.weight"]
    if name.startswith("cut-"):  # truncated inside: the header, the metadata, the tensor entries, the data
        part, at = name[4:].rsplit("+", 1)
        return b[: {"header": 0, "kv": kv["tokenizer.ggml.tokens"], "tensors": L["tensors"],
                    "data": L["data"], "last": L["size"] - 1}[part] + int(at)]  # fmt: skip
    return {
        "magic": lambda: b"GGUX" + b[4:],
        "version-1": lambda: _put(b, 4, "<I", 1),
        "version-4": lambda: _put(b, 4, "<I", 4),
        "big-endian": lambda: _put(b, 4, ">I", 3),
        "kv-count-2^62": lambda: _put(b, 16, "<Q", 2**62),
        "tensor-count-2^62": lambda: _put(b, 8, "<Q", 2**62),
        # fixed-width arrays: the reader looped over 2**40 elements past the end (gigabytes, a hang)
        "u8-array-2^40": lambda: _put(
            _put(b, kv["tokenizer.ggml.token_type"], "<I", 0),
            kv["tokenizer.ggml.token_type"] + 4,
            "<Q",
            2**40,
        ),  # fmt: skip
        "f32-array-1e9": lambda: _put(b, kv["tokenizer.ggml.scores"] + 4, "<Q", 10**9),
        "string-array-2^62": lambda: _put(b, kv["tokenizer.ggml.tokens"] + 4, "<Q", 2**62),
        "string-length-2^62": lambda: _put(b, kv["general.architecture"], "<Q", 2**62),
        "value-type-99": lambda: _put(b, kv["llama.block_count"] - 4, "<I", 99),
        "array-of-arrays": lambda: _put(b, kv["tokenizer.ggml.scores"], "<I", 9),
        "offset-past-end": lambda: _put(b, last["offset"], "<Q", L["size"]),
        "offset-2^63": lambda: _put(b, last["offset"], "<Q", 2**63),
        # accepted: two tensors read from the same bytes
        "overlap": lambda: _put(b, norm["offset"], "<Q", 64),
        "type-99": lambda: _put(b, norm["type"], "<I", 99),
        "type-I8": lambda: _put(b, norm["type"], "<I", 24),
        "dims-0": lambda: _put(b, norm["ndims"], "<I", 0),
        "dims-5": lambda: _put(b, norm["ndims"], "<I", 5),
        "dim-zero": lambda: _put(b, embd["dims"], "<Q", 0),
        # 2**63+1024 x 2 wraps round to 2048 elements in uint64
        "shape-overflow": lambda: _put(_put(b, embd["dims"], "<Q", 2**63 + 1024), embd["dims"] + 8, "<Q", 2),
        "nan-f32": lambda: _put(
            b, L["data"] + 8192, "<f", float("nan")
        ),  # output_norm.weight follows token_embd
        "inf-f32": lambda: _put(b, L["data"] + 40, "<f", float("inf")),
        "key-not-utf8": lambda: _put(b, 24 + 8, "<B", 0xFF),
        # the same 4 bytes read as a float: the layout holds, the metadata is of the wrong kind
        "head-count-f32": lambda: _put(b, kv["llama.attention.head_count"] - 4, "<I", 6),
        # the names were listed block by block from it: minutes, before and after the notice
        "block-count-1e9": lambda: _put(b, kv["llama.block_count"], "<I", 10**9),
        # a tokenizer the import cannot write whole: no end-of-sequence token (the folder was written and
        # every command refused it), one past the vocabulary, a BPE without its merges or their scores (a KeyError)
        "no-eos": lambda: _rename(b, kv, "tokenizer.ggml.eos_token_id"),
        "eos-99": lambda: _put(b, kv["tokenizer.ggml.eos_token_id"], "<I", 99),
        "no-merges": lambda: _rename(b, kv, "tokenizer.ggml.scores"),  # the tiny file has no merges
        "empty": lambda: b"",
    }[name]()


def _rename(b: bytes, kv: dict, key: str) -> bytes:
    """``b`` with the metadata key ``key`` renamed (its last letter changed): the file
    no longer holds ``key``."""
    at = kv[key] - 4 - 1  # the key's last byte, before its 4-byte value type
    return _put(b, at, "<B", ord("Z"))


CASES = {
    **{f"cut-{p}+{d}": ["corrupt or truncated"] for p in ("kv", "tensors", "data") for d in (0, 5)},
    "cut-header+7": ["24-byte header"],
    "cut-header+20": ["24-byte header"],
    "cut-last+0": ["corrupt or truncated", "blk.0.ffn_down.weight's data"],
    "magic": ["is not a GGUF file: it does not start with the GGUF magic"],
    "version-1": ["GGUF version 1"],
    "version-4": ["GGUF version 4"],
    "big-endian": ["big-endian"],
    "kv-count-2^62": ["corrupt or truncated", "metadata key 14 of 4611686018427387904"],
    "tensor-count-2^62": ["has 0 dimensions"],
    "u8-array-2^40": ["corrupt or truncated", "1099511627776 values of tokenizer.ggml.token_type"],
    "f32-array-1e9": ["corrupt or truncated", "1000000000 values of tokenizer.ggml.scores"],
    "string-array-2^62": ["corrupt or truncated", "strings of tokenizer.ggml.tokens"],
    "string-length-2^62": ["corrupt or truncated", "general.architecture"],
    "value-type-99": ["llama.block_count has value type 99"],
    "array-of-arrays": ["array of arrays"],
    "offset-past-end": ["corrupt or truncated", "blk.0.ffn_down.weight's data"],
    "offset-2^63": ["corrupt or truncated", "blk.0.ffn_down.weight's data"],
    "overlap": ["tensors token_embd.weight and output_norm.weight overlap"],
    "type-99": ["ggml type 99"],
    "type-I8": ["quantised as I8"],
    "dims-0": ["output_norm.weight has 0 dimensions"],
    "dims-5": ["output_norm.weight has 5 dimensions"],
    "dim-zero": ["token_embd.weight has a zero dimension"],
    "shape-overflow": ["corrupt or truncated", "token_embd.weight's data"],
    "nan-f32": ["output_norm.weight holds 1 nan or inf"],
    "inf-f32": ["token_embd.weight holds 1 nan or inf"],
    "key-not-utf8": ["is not UTF-8"],
    "head-count-f32": ["llama.attention.head_count is FLOAT32 in its metadata; loramix reads an integer"],
    "block-count-1e9": ["llama.block_count 1000000000 is not a number of blocks its 11 tensors can fill"],
    "empty": ["is empty"],
    "no-eos": ["has no tokenizer.ggml.eos_token_id (an integer) in its metadata"],
    "eos-99": ["tokenizer.ggml.eos_token_id 99 is not one of its 64 tokens"],
    "no-merges": ["has a gpt2 (byte-level BPE) tokenizer with neither its merges", "tokenizer.ggml.scores"],
}


def _one_line(capsys, argv, path, needles, exit_code: int = 2) -> None:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == exit_code and len(lines) == 1 and lines[0].startswith("loramix: error: "), (code, err)
    assert "Traceback" not in out + err and str(path) in lines[0], err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_gguf_import_is_one_line(case, tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "m.gguf"
    path.write_bytes(_damage(case, *tiny))
    _one_line(capsys, ["base", "import", path, "--out", tmp_path / "out"], path, CASES[case])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no --out, no temporary, no cache


#: a few through the commands that import a GGUF base into the cache (``resolve_base``), and
#: ``scenario check``, which reads the header instead and refuses what the import would
BASE_CASES = ["cut-data+5", "u8-array-2^40", "overlap", "nan-f32", "dims-5", "version-4", "head-count-f32",
              "block-count-1e9", "no-eos"]  # fmt: skip


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A LoRA on the tiny Llama's q/v, for ``sum --into``."""
    from transformers import AutoModelForCausalLM

    from loramix.gguf_import import import_gguf

    from .factories import make_peft_adapter

    root = tmp_path_factory.mktemp("adapter")
    import_gguf(llama_gguf(root / "tiny.gguf", tokenizer=True), out=root / "base")
    model = AutoModelForCausalLM.from_pretrained(root / "base")
    return make_peft_adapter(model, root / "lora", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])


def _inputs(tmp_path: Path, base: Path) -> tuple[Path, Path]:
    """A data file and a scenario on ``base``, for the commands that read a base."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "ab", "answer": "cd"}\n' * 2)
    scenario = tmp_path / "s.toml"
    scenario.write_text(f'name = "v"\n[base]\npath = "{base}"\n[domains.a]\ndata = "synthetic:arith"\n'
                        'train = 10\neval = 5\n[domains.b]\ndata = "synthetic:units"\ntrain = 10\neval = 5\n'
                        "[adapters]\nrank = 4\n")  # fmt: skip
    return data, scenario


def _reading_argv(command: str, tmp_path: Path, path: Path) -> list:
    """The command line of ``command`` reading the GGUF ``path`` without an
    adapter: its import into ``tmp_path/out``, ``eval`` on it (through the
    cache), ``scenario check`` of a study on it."""
    data, scenario = _inputs(tmp_path, path)
    return {
        "base-import": ["base", "import", path, "--out", tmp_path / "out"],
        "eval": ["eval", "--base", path, "--data", data, "--no-progress"],
        "scenario-check": ["scenario", "check", scenario],
    }[command]


@pytest.mark.parametrize("command", ["eval", "sum", "scenario"])
@pytest.mark.parametrize("case", BASE_CASES)
def test_damaged_gguf_base_leaves_no_cache(case, command, tiny, tmp_path, capsys, monkeypatch, request):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(cache))
    path = tmp_path / "m.gguf"
    path.write_bytes(_damage(case, *tiny))
    data, scenario = _inputs(tmp_path, path)
    argv = {
        "eval": lambda: ["eval", "--base", path, "--data", data, "--no-progress"],
        "sum": lambda: ["sum", request.getfixturevalue("adapter"), "--into", path, "-o", tmp_path / "out"],
        "scenario": lambda: ["scenario", "check", scenario],
    }[command]()
    _one_line(capsys, argv, path, CASES[case])
    assert not (tmp_path / "out").exists()
    assert not (cache / "bases").exists() or not list((cache / "bases").iterdir())


def _not_gguf(kind: str, path: Path) -> list[str]:
    """Make ``path`` (a ``.gguf`` name) something that is no GGUF file; the
    words of its refusal. Real files only: as root, chmod 000 does not stop a
    read, so the unreadable ones are a link to ``/proc/self/mem`` (its first
    page is never mapped: EIO: the machine's failure, exit 1) and a
    symbolic-link loop (ELOOP)."""
    if kind == "empty":
        path.write_bytes(b"")
        return ["is empty"]
    if kind == "text":
        path.write_text("this is not a model\n")
        return ["is not a GGUF file: it does not start with the GGUF magic"]
    if kind == "fifo":  # never opened: a read would wait for a writer
        os.mkfifo(path)
        return ["is not a regular file (a FIFO)"]
    if kind == "dangling":
        path.symlink_to(path.with_name("nowhere.gguf"))
        return ["is a symbolic link to", "which does not exist"]
    if kind == "loop":
        path.symlink_to(path.name)
        return ["symlink loop"]  # the output checks of sum and merge may say it first
    assert kind == "unreadable"
    path.symlink_to("/proc/self/mem")
    return ["Input/output error; the disk or its file system failed"]


NOT_GGUF = ["empty", "text", "fifo", "dangling", "loop", "unreadable"]


@pytest.mark.parametrize(
    "command", ["base-import", "eval", "sum", "merge", "similarity", "train", "scenario-check"]
)
@pytest.mark.parametrize("kind", NOT_GGUF)
def test_a_gguf_name_that_is_no_gguf_file_is_refused_as_one(
    kind, command, tmp_path, capsys, monkeypatch, request
):
    """A path ending in ``.gguf`` means a GGUF file: one that is empty, not a
    regular file, unreadable or without the magic is refused as a GGUF file
    by every entry point (was: 'not a folder', from eval, sum --into and
    scenario; an unreadable one 'not a GGUF file'), exit 2, nothing written;
    one the disk fails to read (EIO) is that failure, one line, exit 1 (it
    was ``cannot be read: Input/output error``, exit 2)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(cache))
    path = tmp_path / "m.gguf"
    needles = _not_gguf(kind, path)
    data, scenario = _inputs(tmp_path, path)
    out, a = tmp_path / "out", lambda: request.getfixturevalue("adapter")
    argv = {
        "base-import": lambda: ["base", "import", path, "--out", out],
        "eval": lambda: ["eval", "--base", path, "--data", data, "--no-progress"],
        "sum": lambda: ["sum", a(), "--into", path, "-o", out],
        "merge": lambda: ["merge", a(), a(), "-m", "sum", "--into", path, "-o", out],
        "similarity": lambda: ["similarity", a(), a(), "--base", path],
        "train": lambda: ["train", "--base", path, "--data", data, "--out", out, "--no-progress"],
        "scenario-check": lambda: ["scenario", "check", scenario],
    }[command]()
    _one_line(capsys, argv, path, needles, exit_code=1 if kind == "unreadable" else 2)
    assert not out.exists() and not (cache / "bases").exists()


def test_a_folder_named_gguf_is_a_folder(tmp_path, capsys):
    """A folder whose name ends in ``.gguf`` is a model folder, whatever its name."""
    path = tmp_path / "m.gguf"
    path.mkdir()
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "ab", "answer": "cd"}\n')
    _one_line(capsys, ["eval", "--base", path, "--data", data, "--no-progress"], path, ["no config.json"])
    _one_line(
        capsys, ["base", "import", path, "--out", tmp_path / "out"], path, ["is a folder, not a GGUF file"]
    )


def test_a_file_refused_after_the_lock_leaves_no_lock(tmp_path, monkeypatch):
    """A file refused while writing the import (a tokenizer transformers
    cannot convert: found only after the lock is taken) left its lock file
    ``bases/<sha256>.lock`` behind; the refusal now removes it."""
    from loramix.errors import BaseModelError
    from loramix.gguf_import import resolve_base

    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(tmp_path / "cache"))
    path = llama_gguf(tmp_path / "m.gguf", tokenizer_model="xyz", token_list=[chr(33 + i) for i in range(64)],
                      eos_token_id=0)  # fmt: skip
    with pytest.raises(BaseModelError, match="its tokenizer does not convert"):
        resolve_base(path)
    assert list((tmp_path / "cache" / "bases").iterdir()) == []


@pytest.mark.parametrize("command", ["base-import", "eval"])
def test_a_tokenizer_that_does_not_convert_is_refused_before_the_notice(
    command, tmp_path, capsys, monkeypatch
):
    """A tokenizer transformers cannot convert was found while writing the
    import, after its notice: two lines through the cache (``eval --base``).
    The conversion now runs before the notice (and is saved after): one
    line, nothing written, no lock left."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(cache))
    path = llama_gguf(tmp_path / "m.gguf", tokenizer_model="xyz", token_list=[chr(33 + i) for i in range(64)],
                      eos_token_id=0)  # fmt: skip
    _one_line(capsys, _reading_argv(command, tmp_path, path), path, ["its tokenizer does not convert"])
    assert not (tmp_path / "out").exists()
    assert not (cache / "bases").exists() or list((cache / "bases").iterdir()) == []


@pytest.mark.parametrize("command", ["base-import", "eval"])
@pytest.mark.parametrize("damage", ["lacks", "shape"])
def test_a_missing_or_misshapen_tensor_is_refused_before_the_notice(
    damage, command, tmp_path, capsys, monkeypatch
):
    """A file lacking a parameter of the model, or holding one of another
    shape than its metadata imply, was found after de-quantising, after the
    import's notice: two lines through the cache (``eval --base``). Now
    refused from the header's shapes before the notice: one line, nothing
    written. (``scenario check`` reads no config, so no shapes: the run's
    import refuses such a file, before any work.)"""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(cache))
    path, needle = {
        "lacks": lambda: (llama_gguf(tmp_path / "m.gguf", tokenizer=True, drop="blk.0.ffn_up.weight"),
                          "lacks 1 tensor(s) of a llama model, e.g. model.layers.0.mlp.up_proj.weight"),
        "shape": lambda: (llama_gguf(tmp_path / "m.gguf", tokenizer=True,
                                     put={"blk.0.ffn_up.weight": np.ones((48, 32), np.float32)}),
                          "tensor model.layers.0.mlp.up_proj.weight has shape (48, 32); the config implies (64, 32)"),
    }[damage]()  # fmt: skip
    _one_line(capsys, _reading_argv(command, tmp_path, path), path, [needle])
    assert not (tmp_path / "out").exists() and not (cache / "bases").exists()


@pytest.mark.parametrize("command", ["base-import", "eval", "scenario-check"])
@pytest.mark.parametrize("extra", ["blk.0.extra.weight", "blk.0.attn_q.bias"])
def test_a_tensor_with_no_place_is_refused_before_the_notice(extra, command, tmp_path, capsys, monkeypatch):
    """A tensor no parameter of the model takes (a name gguf's table does not
    know; a bias Llama's config has none for) was found while de-quantising,
    after the import's notice: two lines through the cache (``eval
    --base``), and ``scenario check`` passed the file. Now refused from the
    parameter names (:func:`loramix.archs.parameter_names`) before the
    notice, by every entry point: one line, nothing written."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(cache))
    shape = (32,) if extra.endswith(".bias") else (4, 32)
    path = llama_gguf(tmp_path / "m.gguf", tokenizer=True, put={extra: np.ones(shape, np.float32)})
    argv = _reading_argv(command, tmp_path, path)
    _one_line(capsys, argv, path, [f"tensor {extra} has no place in a llama model"])
    assert not (tmp_path / "out").exists() and not (cache / "bases").exists()


@pytest.mark.parametrize("command", ["base-import", "eval", "scenario-check"])
def test_a_nan_block_is_refused_before_the_notice(command, tiny, tmp_path, capsys, monkeypatch):
    """A Q8_0 block whose float16 scale is nan or inf is refused from its
    scale, before the import's notice and before the cache is touched: one
    line (was two: the notice, then the error once de-quantised), no numpy
    warning, the count the de-quantised tensor would give."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(cache))
    b, L = tiny
    path = tmp_path / "m.gguf"
    path.write_bytes(_put(b, L["tensor"]["token_embd.weight"]["type"], "<I", 8))  # float32 bytes read as Q8_0
    argv = _reading_argv(command, tmp_path, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # numpy's, printed before the one line
        _one_line(capsys, argv, path, ["token_embd.weight holds 64 nan or inf values"])
    assert not (tmp_path / "out").exists() and not (cache / "bases").exists()


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                                  "IQ4_NL", "IQ4_XS"])  # fmt: skip
def test_block_scales_are_where_gguf_reads_them(kind):
    """:data:`BLOCK_SCALES` against gguf's own de-quantisation: blocks of
    random bytes with no float16 nan or inf anywhere (the largest finite
    scales among them) de-quantise to finite values; a nan or an inf
    written at an offset makes non-finite values exactly at the listed
    offsets, and then exactly ``block_size`` of them, the count
    :func:`nonfinite_count` gives from the bytes."""
    from types import SimpleNamespace

    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    from loramix.gguf_import import BLOCK_SCALES, nonfinite_count

    qtype = GGMLQuantizationType[kind]
    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (64, size), dtype=np.uint8)
    blocks[(blocks & 0x7C) == 0x7C] &= 0xBF  # no byte is a float16's high byte of nan or inf
    for off in BLOCK_SCALES[kind]:
        blocks[:8, off : off + 2] = np.frombuffer(
            np.float16([65504, -65504] * 4).tobytes(), np.uint8
        ).reshape(8, 2)
    with np.errstate(all="ignore"):
        assert np.isfinite(dequantize(blocks, qtype)).all()
        hits = []
        for off in range(size - 1):
            for bad in (np.inf, np.nan):
                damaged = blocks.copy()
                damaged[3, off : off + 2] = np.frombuffer(np.float16(bad).tobytes(), np.uint8)
                n = int(np.count_nonzero(~np.isfinite(dequantize(damaged, qtype))))
                t = SimpleNamespace(tensor_type=qtype, data=damaged)
                assert nonfinite_count(t) == n, (off, bad)
                if n:
                    assert n == block, (off, bad, n)
                    hits.append(off)
    assert sorted(set(hits)) == list(BLOCK_SCALES[kind])


def test_a_removed_lock_is_locked_anew(tmp_path):
    """A waiter that gets the lock of a file its holder removed locks the
    path anew: else it and a third process, which created a new lock file,
    held 'the' lock at once."""
    from loramix.gguf_import import _lock

    path = tmp_path / "x.lock"
    got = threading.Event()
    inodes = []

    def waiter():
        with _lock(path) as lk:
            inodes.append((os.fstat(lk.f.fileno()).st_ino, os.stat(path).st_ino))
            got.set()

    with _lock(path) as held:
        t = threading.Thread(target=waiter)
        t.start()
        assert not got.wait(0.3)  # it waits
        held.remove()
    t.join(10)
    assert got.is_set() and inodes[0][0] == inodes[0][1]


def test_huge_array_length_is_bounded_in_a_real_process(tiny, tmp_path):
    """An array length of 2**40 in a 52 kB file: the reader looped over it,
    growing past 4 GB in two minutes. Under a 3 GB address-space limit, the
    CLI answers in one line at once."""
    b, L = tiny
    path = tmp_path / "m.gguf"
    path.write_bytes(_damage("u8-array-2^40", b, L))

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    env = {**os.environ, "LORAMIX_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "loramix", "base", "import", str(path), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120, preexec_fn=limit, env=env)  # fmt: skip
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "1099511627776 values" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def smol_layout():
    if not SMOL_GGUF.is_file():
        pytest.skip(f"real model not found at {SMOL_GGUF} (see README: Real model)")
    with open(SMOL_GGUF, "rb") as f:
        head = f.read(8 << 20)  # the header (4 MB: the vocabulary and merges) and the first tensors
    L = _layout(head)
    L["norm"] = L["data"] + struct.unpack_from("<Q", head, L["tensor"]["output_norm.weight"]["offset"])[0]
    return L


@pytest.mark.parametrize(
    "where",
    # a nan is found after the header is parsed and the config made (seconds)
    [
        "header",
        "vocabulary",
        "tensor-entries",
        "data",
        "last-byte",
        pytest.param("nan-norm", marks=pytest.mark.slow),
    ],
)
def test_damaged_real_smollm2_is_one_line(where, smol_layout, tmp_path, capsys, monkeypatch):
    """Copies of the real SmolLM2 GGUF cut inside each part, or with a nan
    in a norm (an F32 tensor): refused from the header, before any
    de-quantisation."""
    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "smol.gguf"
    size = SMOL_GGUF.stat().st_size
    cut = {"header": 20, "vocabulary": 1 << 20, "tensor-entries": smol_layout["tensors"] + 100,
           "data": smol_layout["data"] + 1000, "last-byte": size - 1, "nan-norm": size}[where]  # fmt: skip
    with open(SMOL_GGUF, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read(cut))
    if where == "nan-norm":
        with open(path, "r+b") as f:
            f.seek(smol_layout["norm"] + 4 * 7)
            f.write(np.float32("nan").tobytes())
    needles = {"header": ["24-byte header"], "nan-norm": ["output_norm.weight holds 1 nan"]}
    _one_line(capsys, ["base", "import", path, "--out", tmp_path / "out"], path,
              needles.get(where, ["corrupt or truncated"]))  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smol.gguf"]


@pytest.mark.parametrize("command", ["base-import", "eval", "scenario-check"])
def test_rope_frequency_factors_are_refused_before_the_notice(command, tmp_path, capsys, monkeypatch):
    """A ``rope_freqs`` tensor other than all ones (RoPE scaling, which
    transformers' GGUF support drops) was found while de-quantising, after the
    import's notice: two lines through the cache (``eval --base``), and
    ``scenario check`` passed the file. Now refused from the tensor before
    the notice, by every entry point: one line, nothing in the cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(cache))
    path = llama_gguf(tmp_path / "m.gguf", put={"rope_freqs.weight": np.linspace(1, 8, 8, dtype=np.float32)},
                      tokenizer=True)  # fmt: skip
    argv = _reading_argv(command, tmp_path, path)
    _one_line(capsys, argv, path, ["tensor rope_freqs.weight scales the RoPE frequencies"])
    assert not (tmp_path / "out").exists() and not (cache / "bases").exists()
