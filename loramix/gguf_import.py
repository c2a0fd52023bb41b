"""Importing a GGUF checkpoint (llama.cpp, Ollama, LM Studio) as a transformers folder.

``import_gguf(FILE.gguf, out=DIR)`` writes ``config.json``, ``model.safetensors``
and the tokenizer files, so that ``AutoModelForCausalLM.from_pretrained(out)``
and ``AutoTokenizer.from_pretrained(out)`` load it offline. The ecosystem's
readers do the parsing: the ``gguf`` package (``GGUFReader`` for the header and
tensors, ``gguf.quants.dequantize`` for the blocks) and transformers' GGUF
support (the config, the GGUF -> transformers tensor-name map, the tokenizer).

What loramix adds is checking and writing:

* **De-quantisation.** Each tensor is de-quantised to float32
  (``Q4_0``/``Q4_1``/``Q5_0``/``Q5_1``/``Q8_0``, the K-quants ``Q2_K`` ... ``Q6_K``,
  ``F16``/``BF16``/``F32``) and stored as ``--dtype`` (float32 or bfloat16).
  float32 keeps every value of the file exactly (an F16 or BF16 weight, a
  block's ``d * q + m`` as llama.cpp computes it in float32); bfloat16 (8
  significant bits) halves the folder and rounds what does not fit, F16's
  11 bits and most de-quantised values, with a warning naming the types.
  GGUF lists a 2-D tensor's shape as ``(in, out)`` (ggml's fastest axis
  first); the de-quantised array is already ``(out, in)``, transformers' order.
* **Q/K un-permutation (Llama family).** llama.cpp's converter stores
  ``W_q`` (``n_head * d x hidden``) with each head's rows reordered from
  rotate-half pairs ``(i, i + d/2)`` to interleaved pairs ``(2i, 2i + 1)``:
  ``W.reshape(h, 2, d/2, in).swapaxes(1, 2)``. The inverse,
  ``W.reshape(h, d/2, 2, in).swapaxes(1, 2)``, is transformers'
  ``LlamaTensorProcessor`` (``h = num_key_value_heads`` for ``W_k``). Getting it
  wrong leaves the model loadable but wrong (perplexity in the thousands), so
  the real-model test checks perplexity, not shapes.
* **Tied embeddings** stay tied: a GGUF without ``output.weight`` gets
  ``tie_word_embeddings = true`` and no ``lm_head.weight`` tensor.
* **Provenance**: the GGUF's sha256, architecture and the quantisation of its
  tensors, in ``loramix.json`` and in the safetensors metadata.

* **RoPE scaling** is refused: a ``rope_freqs`` tensor other than all ones
  (llama.cpp's form of Llama 3.1's scaled frequencies), a
  ``{arch}.rope.scaling.type`` other than ``none``, or without a type a
  ``rope.scaling.factor`` (``rope.scale_linear``) other than 0 or 1, which
  llama.cpp reads as linear scaling. transformers' GGUF support
  drops both, so the model written would not be the model in the file.

* **Head size**: llama.cpp's is ``attention.key_length``, else
  ``embedding_length / head_count``; transformers' GGUF support reads no key
  length (Llama's ``head_dim`` comes from ``rope.dimension_count`` alone) and
  leaves ``Qwen3Config``'s default ``head_dim = 128``, so the import sets it
  for qwen3, and for llama and qwen2 where it is not ``width / heads``. A
  ``value_length`` other than the key length (given, or by default ``width /
  heads``) is refused: llama.cpp's graphs for these architectures refuse it. Qwen2 and Qwen3 store Q/K unpermuted (llama.cpp runs them
  with rotate-half RoPE, as transformers does); the un-permutation is Llama's alone.
  The config's head counts are the metadata's, checked against the tensors:
  the key and value projections hold ``head_count_kv * d`` rows, so a kv
  count the weights were not made with is refused naming it. A head count
  that keeps every shape (SmolLM2's 9 heads of 64 and 3 kv heads written as
  3 of 192 and 1) is caught only by ``rope.dimension_count`` or
  ``key_length`` (64, not 192), and the line names ``attention.head_count``
  beside the key that disagrees; a file that gives neither, or gives them
  edited to match, imports as another model that nothing in it can tell
  apart (so edited, SmolLM2 scored perplexity 38,294 on 8 math records
  against its own 4.77).

Supported architectures: the Llama family (``llama``, which covers SmolLM and
llama.cpp's Mistral, ``qwen2``, with its q/k/v biases, and ``qwen3``, with its
per-head q/k RMSNorm). Anything else, a file that is not a GGUF, a
damaged one (:mod:`loramix.gguf_layout` checks its layout against its size
before the reader parses it), metadata of the wrong kind, no vocabulary, nan
or inf weights, a tensor with no place in the model, one missing or of
another shape than the metadata imply, or a quantisation outside
:data:`SUPPORTED_TYPES` is a one-line :class:`~loramix.errors.BaseModelError`.
What can be checked before de-quantising is (:func:`check_gguf`), so that
nothing is written then; nothing is left at ``out`` in any case.

:func:`resolve_base` lets every command take a GGUF file where it takes a base
folder: the file is imported once into
``cache_dir()/bases/<sha256>-float32-r<IMPORT_RULE>``; a file refused leaves
nothing there (its lock file is removed).
"""

from __future__ import annotations

import errno
import functools
import glob
import json
import os
import shutil
import stat
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from .errors import BaseModelError, raise_machine_fault

GGUF_MAGIC = b"GGUF"
# general.architecture values read: llama.cpp writes Mistral as "llama" and knows
# no "mistral" (nor does gguf's tensor-name table, which maps the names)
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")
# ggml types gguf.quants.dequantize handles and loramix has checked, on real files
# or (IQ4_NL, IQ4_XS) against their block layouts (tests/test_realmodel.py). The
# other i-quants read lattice tables; without a file to check them on, refused.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")  # fmt: skip
DTYPES = ("float32", "bfloat16")
#: the version of what an import writes from a given file, in the name of
#: :func:`resolve_base`'s cached folder (2: a Mistral-named llama GGUF without a
#: sliding window in its metadata gets none, not MistralConfig's 4096; 3: nor
#: with one, which llama.cpp does not read for a llama GGUF)
IMPORT_RULE = 3
# GGUF metadata only: tokenizer bookkeeping transformers copies into the config.
_DROP_CONFIG_KEYS = ("_model_name_or_path",)


def is_gguf(path: str | os.PathLike) -> bool:
    """True when ``path`` is a regular file that starts with the GGUF magic
    bytes. A file the user cannot read is not one (its reader says why); a
    read the machine fails (EIO) raises its OSError: taken as no GGUF, a
    failing file named ``base`` was refused as no model folder."""
    p = Path(path)
    if not p.is_file():  # never opened otherwise: reading a FIFO waits for a writer
        return False
    try:
        with open(p, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError as e:
        raise_machine_fault(e, p)
        return False


def means_gguf(path: str | os.PathLike) -> bool:
    """Whether a base path given by the user means a GGUF file: one that starts
    with the magic (whatever its name), or a name ending in ``.gguf`` (any
    case) that is not a folder (a missing, empty, unreadable or special file
    so named is refused as a GGUF file by :func:`check_gguf_file`, not as a
    model folder). A folder is a folder, whatever its name."""
    p = Path(path)
    return is_gguf(p) or (p.suffix.lower() == ".gguf" and not p.is_dir())


_SPECIAL = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"))  # fmt: skip


def check_gguf_file(path: str | os.PathLike) -> Path:
    """Refuse a path that is no GGUF file in one line, from its first bytes
    (the header itself is not parsed): missing (or a symbolic link to nothing),
    a folder, not a regular file (a FIFO is never opened: that would wait for a
    writer), unreadable (the OS's reason, not 'not a GGUF'), empty, or without
    the GGUF magic."""
    from .userpaths import non_path

    if (said := non_path(path)) is not None:
        raise BaseModelError(None, f"a GGUF file is a path, not {said}")
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        if os.path.islink(p):
            raise BaseModelError(p, f"is a symbolic link to {os.readlink(p)}, which does not exist") from None
        raise BaseModelError(p, "no such file") from None
    except OSError as e:  # ELOOP: the words of the output checks (loramix.io.outputs), which may come first
        loop = " (a symlink loop, or under one)" if e.errno == errno.ELOOP else ""
        raise BaseModelError(p, f"cannot be read: {e.strerror or e}{loop}") from None
    if stat.S_ISDIR(st.st_mode):
        raise BaseModelError(p, "is a folder, not a GGUF file (a .gguf model file)")
    if not stat.S_ISREG(st.st_mode):
        kind = next((what for test, what in _SPECIAL if test(st.st_mode)), "a special file")
        raise BaseModelError(p, f"is not a regular file ({kind}); a GGUF model is a file")
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise BaseModelError(p, f"cannot be read: {e.strerror or e}") from None
    if not head:
        raise BaseModelError(p, "is empty: a GGUF file starts with the GGUF magic bytes")
    if head != GGUF_MAGIC:
        raise BaseModelError(p, "is not a GGUF file: it does not start with the GGUF magic bytes")
    return p


def open_gguf(path: str | os.PathLike):
    """``gguf.GGUFReader(path)`` with every failure turned into one line naming the file.
    The layout is checked against the file's size first (:mod:`loramix.gguf_layout`):
    the reader trusts its counts and offsets, and looped for minutes, taking
    gigabytes, over an array length past the end of the file."""
    p = check_gguf_file(path)
    from .gguf_layout import check_layout

    check_layout(p)
    try:
        return _reader_class()(str(p))
    except Exception as e:  # the reader raises ValueError/IndexError/... on a damaged file
        raise BaseModelError(
            p, f"not a valid GGUF file (corrupt or truncated): {type(e).__name__}: {e}"
        ) from None


@functools.cache
def _reader_class():
    """``gguf.GGUFReader`` reading a plain ``ndarray`` view of its memory map.
    The reader slices its ``np.memmap`` once or more per metadata value, and
    each slice of a memmap is a memmap whose ``__array_finalize__`` runs in
    Python: SmolLM2's vocabulary and merges made 1.3 million of them, 2.7 s
    of the reader's 3.9 s CPU. A view of the same bytes gives the same
    fields and tensors (the same dtypes, shapes and values); tensors' data
    are read-only ndarray views of the map instead of memmaps."""
    import numpy as np
    from gguf.gguf_reader import GGUFReader

    class Reader(GGUFReader):
        @property
        def data(self):
            return self._mapped

        @data.setter
        def data(self, mapped):  # the one assignment, in GGUFReader.__init__
            self._mapped = mapped.view(np.ndarray)

    return Reader


def _field(reader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


# GGUFValueType ids: the integers (UINT8 ... INT32, UINT64, INT64) and the numbers (those, FLOAT32, FLOAT64)
_INTEGERS = (0, 1, 2, 3, 4, 5, 10, 11)
_NUMBERS = (*_INTEGERS, 6, 12)
#: ``{arch}.KEY`` metadata read as one integer, and as one number
INTEGER_KEYS = ("block_count", "context_length", "embedding_length", "feed_forward_length",
                "attention.head_count", "attention.head_count_kv", "attention.key_length",
                "attention.value_length", "rope.dimension_count")  # fmt: skip
NUMBER_KEYS = (
    "attention.layer_norm_rms_epsilon",
    "rope.freq_base",
    "rope.scaling.factor",
    "rope.scale_linear",
)


def check_metadata(reader, path, gguf_arch: str) -> None:
    """Refuse in one line metadata of the wrong kind: a head count given as
    text or as a per-layer array (``int()`` of it was a traceback)."""
    for keys, kinds, what in ((INTEGER_KEYS, _INTEGERS, "an integer"), (NUMBER_KEYS, _NUMBERS, "a number")):
        for key in (f"{gguf_arch}.{k}" for k in keys):
            f = reader.fields.get(key)
            if f is not None and [int(t) for t in f.types] not in [[k] for k in kinds]:
                given = "/".join(t.name for t in f.types)
                raise BaseModelError(path, f"{key} is {given} in its metadata; loramix reads {what}")


def check_block_count(reader, path, gguf_arch: str) -> None:
    """Refuse a block count the file's tensors cannot fill (a block of these
    architectures holds nine or more): the parameter names are listed block
    by block from it (:func:`loramix.archs.parameter_names`, and gguf's
    name table), which ran for minutes over a damaged count of 10**9."""
    n = _field(reader, f"{gguf_arch}.block_count")
    if n is not None and not 0 <= int(n) <= len(reader.tensors):
        raise BaseModelError(path, f"{gguf_arch}.block_count {int(n)} is not a number of blocks its "
                             f"{len(reader.tensors)} tensors can fill")  # fmt: skip


def check_vocabulary(reader, path) -> None:
    """Refuse a file without a vocabulary (``tokenizer.ggml.tokens``):
    transformers then sized the embedding by its default vocabulary (32,000
    for Llama) and the import failed after de-quantising, on a tensor shape;
    and a byte-level BPE (``gpt2``) with neither its merges nor the scores
    transformers rebuilds them from. Its end-of-sequence token is
    :func:`check_eos_token`'s, which runs earlier (:func:`_check_kind`)."""
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None or [int(t) for t in tokens.types] != [9, 8]:
        raise BaseModelError(path, "has no tokenizer (no tokenizer.ggml.tokens list in its metadata), "
                             "which an import writes beside the weights")  # fmt: skip
    # a byte-level BPE without its merges: transformers rebuilds them from the tokens' scores, and
    # without those either failed with "its tokenizer does not convert: KeyError: 'scores'"
    if _field(reader, "tokenizer.ggml.model") == "gpt2" and not {"tokenizer.ggml.merges",
                                                                 "tokenizer.ggml.scores"} & set(reader.fields):  # fmt: skip
        raise BaseModelError(path, "has a gpt2 (byte-level BPE) tokenizer with neither its merges "
                             "(tokenizer.ggml.merges) nor the scores to rebuild them from (tokenizer.ggml.scores)")  # fmt: skip


def check_eos_token(reader, path) -> None:
    """Refuse a vocabulary (where there is one: :func:`check_vocabulary`) without
    an end-of-sequence token (``tokenizer.ggml.eos_token_id``) or with one
    outside it. Without one the import was written (half a GB for SmolLM2) and
    every command then refused the folder ('tokenizer has no eos_token'); one
    outside it made transformers' config speak before the line. Checked before
    the config is read (:func:`_check_kind`)."""
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None or [int(t) for t in tokens.types] != [9, 8]:
        return
    eos = reader.fields.get("tokenizer.ggml.eos_token_id")
    if eos is None or [int(t) for t in eos.types] not in [[k] for k in _INTEGERS]:
        raise BaseModelError(path, "has no tokenizer.ggml.eos_token_id (an integer) in its metadata: loramix "
                             "ends and pads every record with the end-of-sequence token")  # fmt: skip
    if not 0 <= int(eos.contents()) < len(tokens.data):
        raise BaseModelError(path, f"tokenizer.ggml.eos_token_id {int(eos.contents())} is not one of its "
                             f"{len(tokens.data)} tokens")  # fmt: skip


#: byte offsets of the float16 scales in a block of each quantised type
#: (``d``, and ``m`` or ``dmin`` where the type has one: gguf.quants' layouts,
#: checked against its de-quantisation in tests/test_gguf_damage.py). Every
#: value of a block is a product with each of its scales (a sum of such
#: products), and the integers and 6-bit scales beside them are finite, so a
#: block de-quantises to nan or inf values, all of them, exactly where a scale
#: is nan or inf.
BLOCK_SCALES = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
                "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,),
                "IQ4_XS": (0,)}  # fmt: skip


def nonfinite_count(t) -> int:
    """How many nan or inf values the reader's tensor ``t`` holds de-quantised,
    from its stored bytes (nothing de-quantised): a float's exponent bits all
    ones (float32, float16, bfloat16); for blocks, ``block_size`` per block
    with a scale whose float16 exponent bits (``0x7C`` of its high byte,
    little-endian) are all ones (:data:`BLOCK_SCALES`). A type outside both
    (refused by :func:`check_quantisation`) counts 0."""
    import numpy as np
    from gguf.constants import GGML_QUANT_SIZES

    kind = t.tensor_type.name
    if kind == "BF16":  # the reader gives its bytes
        return int(np.count_nonzero(t.data.view(np.uint16) & 0x7F80 == 0x7F80))
    if kind in ("F32", "F16"):
        return int(np.count_nonzero(~np.isfinite(t.data)))
    if kind not in BLOCK_SCALES:
        return 0
    block, type_size = GGML_QUANT_SIZES[t.tensor_type]
    blocks = t.data.reshape(-1, type_size)
    bad = np.zeros(len(blocks), dtype=bool)
    for off in BLOCK_SCALES[kind]:  # one byte per scale per block is read: no pass over the quants
        bad |= blocks[:, off + 1] & 0x7C == 0x7C
    return int(np.count_nonzero(bad)) * block


def check_finite_tensors(reader, path) -> None:
    """Refuse a tensor that de-quantises to a nan or an inf (a damaged file:
    a real model holds none) before the long de-quantisation and the notice
    that announces it, from the stored floats and block scales
    (:func:`nonfinite_count`). The de-quantised tensors are checked again
    (:func:`_tensors`), the same count."""
    for t in reader.tensors:
        bad = nonfinite_count(t)
        if bad:
            raise BaseModelError(path, f"tensor {t.name} holds {bad} nan or inf values")


def check_rope_freqs(reader, path) -> None:
    """Refuse per-frequency RoPE factors other than all ones (llama.cpp stores
    Llama 3.1's scaling so) before the de-quantisation and the notice that
    announces it: transformers' GGUF support drops them, so the import would
    not be the file's model. The tensor is ``head_dim / 2`` floats."""
    for t in reader.tensors:
        if t.name.startswith("rope_freqs"):
            _refuse_rope_scaling(t, path)


def _refuse_rope_scaling(t, path) -> None:
    import numpy as np

    if not np.all(_dequantized(t) == 1):
        raise BaseModelError(path, f"tensor {t.name} scales the RoPE frequencies (as llama.cpp stores "
                                   "Llama 3.1's), which loramix cannot import: transformers' GGUF support "
                                   "drops it")  # fmt: skip


def gguf_architecture(reader, path) -> str:
    """The transformers ``model_type`` of a GGUF, refusing what loramix does not import."""
    arch = _field(reader, "general.architecture")
    if not isinstance(arch, str):
        raise BaseModelError(path, "has no general.architecture; not a model GGUF")
    if arch not in GGUF_ARCHITECTURES:
        raise BaseModelError(
            path,
            f"architecture {arch!r} is not supported; loramix imports the Llama family "
            "(llama, which covers llama.cpp's Mistral files, qwen2 and qwen3)",
        )
    name = str(_field(reader, "general.name") or "").lower()
    return "mistral" if arch == "llama" and "mistral" in name else arch


def check_quantisation(reader, path) -> dict[str, int]:
    """``{ggml type: tensor count}``; a type outside :data:`SUPPORTED_TYPES` is refused."""
    counts: dict[str, int] = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            raise BaseModelError(
                path,
                f"tensor {t.name} is quantised as {kind}, which loramix cannot import "
                f"(supported: {', '.join(SUPPORTED_TYPES)})",
            )
        counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


_HANDOVER = threading.Lock()


@contextmanager
def _reader_handed_over(reader, path: Path):
    """Within it, ``gguf.GGUFReader(path)`` gives ``reader``, the file's header
    already parsed: transformers' ``load_gguf_checkpoint`` opens its own reader
    by that name, and parsed the header a second time (SmolLM2's 49,152-token
    vocabulary: 1.5 s of an 8 s import); it reads the same fields from ours.
    Any other path or argument gets a new reader as usual. One import at a
    time swaps it (a lock): two overlapping in threads would otherwise
    restore each other's stand-in and leave it in place."""
    import gguf

    with _HANDOVER:
        made = gguf.GGUFReader

        def reader_for(p, *args, **kwargs):
            if not args and not kwargs and os.fspath(p) == os.fspath(path):
                return reader
            return made(p, *args, **kwargs)

        gguf.GGUFReader = reader_for
        try:
            yield
        finally:
            gguf.GGUFReader = made


#: the tokenizer's lists, which transformers' metadata read parses value by value
#: (SmolLM2's: 0.8 s CPU) into its tokenizer record, not into the config: the
#: config needs only the vocabulary's length, and the tokenizer is written from
#: transformers' own read of them (:func:`_converted_tokenizer`)
_TOKENIZER_LISTS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores",
                    "tokenizer.ggml.token_type")  # fmt: skip


def _config_view(reader):
    """What transformers' ``load_gguf_checkpoint`` reads of ``reader``
    (``fields``, ``tensors``), less :data:`_TOKENIZER_LISTS`."""
    from types import SimpleNamespace

    fields = {k: f for k, f in reader.fields.items() if k not in _TOKENIZER_LISTS}
    return SimpleNamespace(fields=fields, tensors=reader.tensors)


def _hf_config(reader, path: Path, model_type: str, dtype: str):
    """The transformers config transformers' GGUF support derives from the
    metadata, which must shape the model (:func:`check_shape`)."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from .io.model_folder import quiet_transformers

    try:
        # its warnings about a file we then refuse in one line
        with quiet_transformers(), _reader_handed_over(_config_view(reader), path):
            parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    except Exception as e:
        raise BaseModelError(
            path, f"transformers cannot read its metadata: {type(e).__name__}: {e}"
        ) from None
    cfg = {k: v for k, v in parsed["config"].items() if k not in _DROP_CONFIG_KEYS}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if "vocab_size" not in cfg and tokens is not None:  # transformers' rule, from the list it was not given
        cfg["vocab_size"] = len(tokens.data)
    cfg.pop("model_type", None)
    gguf_arch = _field(reader, "general.architecture")
    head_dim = check_shape(reader, path, cfg, gguf_arch)
    if gguf_arch == "qwen3" or head_dim != int(cfg["hidden_size"]) // int(cfg["num_attention_heads"]):
        # transformers' GGUF map reads no key_length: Qwen3Config's default 128 would
        # stand for every qwen3 file, width / heads for a llama file without
        # rope.dimension_count or any qwen2 one (whose config then gains the key)
        cfg["head_dim"] = head_dim
    scaling = _field(reader, f"{gguf_arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise BaseModelError(path, f"its RoPE is scaled ({gguf_arch}.rope.scaling.type = {scaling!r}), "
                                   "which loramix cannot import: transformers' GGUF support drops it")  # fmt: skip
    if scaling is None:
        # llama.cpp reads a factor without a type as linear scaling (the type
        # defaults to "linear"; rope.scale_linear is older converters' key); 0 and 1
        # scale nothing. transformers' GGUF support drops the factor as well.
        for key in (f"{gguf_arch}.rope.scaling.factor", f"{gguf_arch}.rope.scale_linear"):
            factor = _field(reader, key)
            if factor is not None:
                if float(factor) not in (0.0, 1.0):
                    raise BaseModelError(path, f"its RoPE is scaled ({key} = {float(factor)}, linear as llama.cpp "
                                               "reads it), which loramix cannot import: transformers' GGUF "
                                               "support drops it")  # fmt: skip
                break  # llama.cpp reads the older key only where the newer is absent
    if model_type == "mistral":
        # llama.cpp runs a "llama" GGUF with full attention: it reads no sliding
        # window for that architecture, even where the metadata state one. Neither
        # MistralConfig's default window (4096) nor the file's may be kept.
        cfg["sliding_window"] = None
    try:
        config = AutoConfig.for_model(model_type, **cfg)
    except Exception as e:
        raise BaseModelError(
            path, f"its metadata make no valid {model_type} config: {type(e).__name__}: {e}"
        ) from None
    config.architectures = [config.__class__.__name__.replace("Config", "ForCausalLM")]
    config.dtype = dtype
    return config


#: metadata a model GGUF must give (``{arch}.KEY``): without them transformers
#: would fill in its defaults, which do not fit the file's tensors, or (the norm's
#: epsilon) which change its outputs where llama.cpp refuses the file
REQUIRED_KEYS = (
    "block_count",
    "embedding_length",
    "attention.head_count",
    "attention.layer_norm_rms_epsilon",
)


def check_shape(reader, path: Path, cfg: dict, gguf_arch: str) -> int:
    """Refuse in one line a GGUF whose metadata cannot shape its model: a
    missing :data:`REQUIRED_KEYS` entry, heads that do not divide the width
    (``embedding_length``) or whose key-value heads do not divide them
    (``cfg``: the config keys transformers reads from the metadata), or head
    sizes llama.cpp does not run. Returns llama.cpp's head size ``d``:
    ``attention.key_length``, else ``width / heads``.

    llama.cpp reads the key and the value head sizes apart
    (``attention.key_length``, ``attention.value_length``, each defaulting to
    ``width / heads``) and the rotated dimensions (``rope.dimension_count``,
    default the key size); its llama, qwen2 and qwen3 graphs assert that all
    three are one size ``d``, and transformers' models have one ``head_dim``."""
    for key in REQUIRED_KEYS:
        if _field(reader, f"{gguf_arch}.{key}") is None:
            raise BaseModelError(path, f"has no {gguf_arch}.{key} in its metadata")
    width, heads = int(cfg.get("hidden_size") or 0), int(cfg.get("num_attention_heads") or 0)
    kv = int(cfg.get("num_key_value_heads") or heads)
    if heads < 1 or width % heads:
        raise BaseModelError(path, f"{gguf_arch}.attention.head_count {heads} does not divide its "
                             f"embedding_length {width}")  # fmt: skip
    if kv < 1 or heads % kv:
        raise BaseModelError(path, f"{gguf_arch}.attention.head_count_kv {kv} does not divide its "
                             f"attention.head_count {heads}")  # fmt: skip
    # llama.cpp rotates only the first rope.dimension_count dimensions of each head;
    # transformers' Llama, Qwen2 and Qwen3 rotate all of them, so a smaller count is another model
    # (transformers takes head_dim from the rotated count itself: the head size is the key length)
    rot = _field(reader, f"{gguf_arch}.rope.dimension_count")
    key = _field(reader, f"{gguf_arch}.attention.key_length")
    head_dim = int(key or width // heads)
    value = _field(reader, f"{gguf_arch}.attention.value_length")
    # a head size taken from width / heads is the head count's: a count the weights were not
    # made with (shapes kept: 9 heads of 64 as 3 of 192) shows only against a key or rotated size
    count = (f"; width / heads is {gguf_arch}.embedding_length {width} / {gguf_arch}.attention.head_count "
             f"{heads}: a head count the weights were not made with shows here too")  # fmt: skip
    if int(value or width // heads) != head_dim:
        given = (
            f"value_length {int(value)}" if value else f"no value_length (so {width // heads}, width / heads)"
        )
        raise BaseModelError(path, f"{gguf_arch}.attention.key_length {head_dim} with {given}: llama.cpp's "
                             f"{gguf_arch} needs one head size for keys and values and refuses it"
                             f"{'' if value else count}")  # fmt: skip
    if rot is not None and int(rot) != head_dim:
        raise BaseModelError(path, f"{gguf_arch}.rope.dimension_count {int(rot)} rotates part of each head "
                             f"(head size {head_dim}), which transformers' {gguf_arch} cannot run"
                             f"{'' if key else count}")  # fmt: skip
    return head_dim


def _name_map(config, gguf_arch: str) -> tuple[dict[str, str], object, dict[str, tuple[int, ...]]]:
    """GGUF tensor name -> transformers parameter name (:func:`gguf_name_map`),
    transformers' tensor processor for the architecture (Llama's un-permutes
    q/k) and the model's ``{parameter name: shape}`` (:func:`_hf_shapes`)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    shapes = _hf_shapes(config)
    name_map = gguf_name_map(shapes, gguf_arch, config.num_hidden_layers)
    processor = TENSOR_PROCESSORS.get(gguf_arch, TensorProcessor)(config=config.to_dict())
    return name_map, processor, shapes


def _hf_shapes(config) -> dict[str, tuple[int, ...]]:
    """``{state_dict() name: shape}`` of the model ``config`` makes: from the
    config (:func:`loramix.archs.parameter_shapes`: no model is built, whose
    modelling code was 1 to 2 s of an import's CPU), else, for an
    architecture that table does not know (none of
    :data:`GGUF_ARCHITECTURES`), from a meta-device skeleton transformers builds."""
    from .archs import parameter_shapes

    shapes = parameter_shapes(config)
    if shapes is not None:
        return shapes
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}


def gguf_name_map(hf_names, gguf_arch: str, n_layers: int) -> dict[str, str]:
    """GGUF tensor name -> transformers parameter name for the parameters
    ``hf_names``: ``gguf``'s own tensor-name table for ``gguf_arch``
    (``model.layers.N.self_attn.q_proj`` -> ``blk.N.attn_q``), the suffix
    (``weight``, ``bias``) kept. A name the table does not know has no GGUF name."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch_id = next(k for k, v in MODEL_ARCH_NAMES.items() if v == gguf_arch)
    table = get_tensor_name_map(arch_id, n_layers)
    name_map = {}
    for hf in hf_names:
        stem, dot, suffix = hf.rpartition(".")
        g = table.get_name(stem)
        if g is not None:
            name_map[f"{g}.{suffix}"] = hf
    return name_map


def check_places(reader, path, model_type: str, name_map: dict[str, str]) -> None:
    """Refuse a tensor that has no place in the model (no transformers
    parameter takes it, :func:`gguf_name_map`) before the de-quantisation and
    the notice that announces it. ``rope_freqs`` is not a parameter:
    :func:`check_rope_freqs` checks it."""
    for t in reader.tensors:
        if t.name not in name_map and not t.name.startswith("rope_freqs"):
            raise BaseModelError(path, f"tensor {t.name} has no place in a {model_type} model")


def _tensors(reader, path: Path, config, gguf_arch: str, dtype: str, progress: bool = False) -> dict:
    """De-quantised, renamed, un-permuted tensors as ``{hf name: torch tensor}``;
    ``progress``: a bar of the file's tensor bytes, on stderr where it is a terminal."""
    import sys

    import numpy as np
    import torch

    from .progress import progress_bar

    name_map, processor, shapes = _name_map(config, gguf_arch)
    arch = config.model_type
    tdtype = getattr(torch, dtype)
    out = {}
    rounded: dict[str, int] = {}  # ggml type -> tensors whose values the --dtype changed
    # the longest part of an import (minutes for a 7B file), which said nothing until it ended
    bar = progress_bar(total=sum(int(t.n_bytes) for t in reader.tensors), unit="B", unit_scale=True,
                       desc="de-quantising", file=sys.stderr, progress=progress, leave=False, dynamic_ncols=True)  # fmt: skip
    for t in reader.tensors:
        hf = name_map.get(t.name)
        if hf is None:
            if t.name.startswith("rope_freqs"):  # per-frequency RoPE factors: all ones is no scaling
                _refuse_rope_scaling(t, path)  # checked before the notice too (check_rope_freqs)
                bar.update(int(t.n_bytes))
                continue
            # found by check_places first; kept in case a caller skipped check_gguf
            raise BaseModelError(path, f"tensor {t.name} has no place in a {arch} model")
        try:
            w = _dequantized(t)
        except Exception as e:
            raise BaseModelError(
                path, f"tensor {t.name} does not de-quantise: {type(e).__name__}: {e}"
            ) from None
        try:
            w = processor.process(weights=w, name=t.name).weights
        except (ValueError, ZeroDivisionError) as e:  # q/k un-permuted by heads the shape does not fit
            raise BaseModelError(path, f"tensor {t.name} does not fit the metadata's heads: {e}") from None
        w = np.array(w, dtype=np.float32)  # a copy of its own, writable, for torch
        if not np.isfinite(w).all():  # found by check_finite_tensors first; kept in case a layout is not
            raise BaseModelError(
                path, f"tensor {t.name} holds {int((~np.isfinite(w)).sum())} nan or inf values"
            )
        out[hf] = torch.from_numpy(w).to(tdtype)
        if tdtype != torch.float32 and not torch.equal(out[hf].float(), torch.from_numpy(w)):
            kind = t.tensor_type.name
            rounded[kind] = rounded.get(kind, 0) + 1
        bar.update(int(t.n_bytes))
    bar.close()
    if rounded:
        _warn_rounded(path, dtype, rounded)
    # found by check_tensor_shapes first; kept in case a caller skipped check_gguf
    check_expected(path, config, shapes, {k: tuple(v.shape) for k, v in out.items()})
    return {k: out[k] for k in sorted(out) if not (config.tie_word_embeddings and k == "lm_head.weight")}


def _warn_rounded(path: Path, dtype: str, rounded: dict[str, int]) -> None:
    """Say that ``--dtype`` rounded tensors of the file (``rounded``: ggml
    type -> tensor count). bfloat16 keeps 8 significant bits (relative
    error up to 2^-8 per weight); an F16 weight has 11 and a de-quantised
    block's ``d * q + m`` (float32, as llama.cpp computes it) up to 24, so
    only BF16 tensors (and F32 or de-quantised ones whose values happen to
    fit) come through unchanged. The rounding is what ``--dtype`` asks for
    (one dtype for the whole model, as ``from_pretrained`` loads it:
    keeping F16 tensors as float16 would only defer the rounding to the
    load), so it is a warning, not a refusal; float32 keeps every value."""
    from .errors import warn

    kinds = ", ".join(f"{n} {k}" for k, n in rounded.items())
    warn(f"{path}: --dtype {dtype} rounded the values of {sum(rounded.values())} tensor(s) ({kinds}) "
         f"to {dtype}'s 8 significant bits; --dtype float32 keeps the file's values exactly")  # fmt: skip


def check_tensor_shapes(reader, path, config, name_map: dict[str, str], shapes: dict) -> None:
    """:func:`check_expected` of the file's tensors from its header, before
    the de-quantisation and the notice that announces it. GGUF lists a shape
    innermost first: ``(in, out)`` reversed is transformers' ``(out, in)``,
    which the de-quantised (and, for Llama's q/k, un-permuted) tensor has."""
    got = {
        name_map[t.name]: tuple(int(x) for x in reversed(t.shape))
        for t in reader.tensors
        if t.name in name_map
    }
    check_expected(path, config, shapes, got)


def check_expected(path, config, shapes: dict, got: dict) -> None:
    """Refuse ``got`` (``{parameter name: shape}``) lacking a parameter of
    ``shapes`` (the model's; the head only where untied) or holding one of
    another shape."""
    expected = {k: s for k, s in shapes.items() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    missing = sorted(set(expected) - set(got))
    if missing:
        raise BaseModelError(
            path, f"lacks {len(missing)} tensor(s) of a {config.model_type} model, e.g. {missing[0]}"
        )
    for k, shape in expected.items():
        if got[k] != shape:
            raise BaseModelError(path, f"tensor {k} has shape {got[k]}; the config implies {shape}"
                                       f"{_heads_behind(config, k)}")  # fmt: skip


def _heads_behind(config, name: str) -> str:
    """Where an attention projection's expected shape comes from, for its
    refusal: ``h * d`` (query, output) or ``g * d`` (key, value) with the
    metadata's ``attention.head_count`` ``h``, ``attention.head_count_kv``
    ``g`` and head size ``d``; a head count that disagrees with the weights
    shows here. '' for other tensors."""
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for parts, key, n in (
        (("k_proj.", "v_proj."), "attention.head_count_kv", config.num_key_value_heads),
        (("q_proj.", "o_proj."), "attention.head_count", config.num_attention_heads),
    ):
        if any(f".{part}" in name for part in parts):
            return f" (its metadata's {key} {n} x head size {d})"
    return ""


def _dequantized(t):
    """``t`` de-quantised; a damaged block's nan or inf is reported after, in
    one line, not by numpy's warnings on stderr before it."""
    import numpy as np
    from gguf.quants import dequantize

    with np.errstate(all="ignore"):
        return dequantize(t.data, t.tensor_type)


def _converted_tokenizer(path: Path):
    """transformers' GGUF tokenizer conversion, which :func:`write_folder` saves
    as ``tokenizer.json`` and its config; run before the import's notice, so
    that a tokenizer that does not convert is refused in one line."""
    from transformers import TokenizersBackend
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    try:
        arch, tok_dict, tok_config = get_gguf_tokenizer(str(path))
        backend, extra = convert_gguf_tokenizer(arch, tok_dict)
        return TokenizersBackend(tokenizer_object=backend, **{**tok_config, **extra})
    except Exception as e:
        raise BaseModelError(path, f"its tokenizer does not convert: {type(e).__name__}: {e}") from None


def _check_dtype(dtype) -> None:
    if dtype not in DTYPES:
        raise BaseModelError("--dtype", f"{dtype!r} is not one of {', '.join(DTYPES)}")


def check_gguf(path: Path, reader, dtype: str = "float32") -> tuple[str, dict, object]:
    """Everything an import checks before it de-quantises, so that a bad file
    is refused before anything is written (``--out``, the cache's ``bases/``):
    ``(model_type, {ggml type: tensor count}, transformers config)``."""
    _check_dtype(dtype)
    arch, quants = _check_kind(reader, path)
    config = _hf_config(reader, path, arch, dtype)
    shapes = _hf_shapes(config)
    name_map = gguf_name_map(shapes, _field(reader, "general.architecture"), config.num_hidden_layers)
    _check_contents(reader, path, arch, name_map)
    check_tensor_shapes(reader, path, config, name_map, shapes)
    return arch, quants, config


def _check_kind(reader, path) -> tuple[str, dict]:
    """:func:`check_gguf`'s checks of what the file is (architecture,
    quantisation, metadata types): ``(model_type, {ggml type: count})``."""
    arch = gguf_architecture(reader, path)
    quants = check_quantisation(reader, path)
    check_metadata(reader, path, _field(reader, "general.architecture"))
    check_block_count(reader, path, _field(reader, "general.architecture"))
    check_eos_token(reader, path)
    return arch, quants


def _check_contents(reader, path, model_type: str, name_map: dict[str, str] | None) -> None:
    """:func:`check_gguf`'s checks of what the file holds (no nan or inf weight,
    no RoPE frequency factors, a vocabulary, no tensor without a place in the
    model: ``name_map``, :func:`gguf_name_map`, where known)."""
    check_finite_tensors(reader, path)
    check_rope_freqs(reader, path)
    check_vocabulary(reader, path)
    if name_map is not None:
        check_places(reader, path, model_type, name_map)


def write_folder(gguf_path: str | os.PathLike, folder: str | os.PathLike, *, dtype: str = "float32",
                 sha256: str | None = None, say=None, reader=None, checked=None,
                 progress: bool = False) -> dict:  # fmt: skip
    """Write the transformers folder for ``gguf_path`` into the existing empty ``folder``.

    Returns the provenance record (also written as ``loramix.json``).
    ``say``: called once the file's metadata are checked, before the long
    de-quantisation (a notice). ``reader``: the file's :func:`open_gguf`
    where the caller has one (parsing the header again costs seconds);
    ``checked``: its :func:`check_gguf` where the caller has it;
    ``progress``: a bar of the de-quantisation. Not
    atomic by itself: :func:`import_gguf` and :func:`resolve_base` write
    into a temporary folder and rename it.
    """
    from safetensors.torch import save_file

    from .io.outputs import provenance, write_provenance
    from .io.safetensors_io import canonicalize_header, file_sha256, safetensors_metadata

    path, folder = Path(gguf_path), Path(folder)
    reader = open_gguf(path) if reader is None else reader
    arch, quants, config = check_gguf(path, reader, dtype) if checked is None else checked
    tok = _converted_tokenizer(path)  # refused before the notice, not after it (two lines)
    if say is not None:
        say()
    tensors = _tensors(reader, path, config, _field(reader, "general.architecture"), dtype, progress=progress)
    rec = provenance(
        "gguf-import",
        {"dtype": dtype},
        [{"path": str(path.resolve()), "kind": "gguf", "sha256": sha256 or file_sha256(path)}],
        architecture=arch,
        quantisation=quants,
        tie_word_embeddings=bool(config.tie_word_embeddings),
    )
    save_file(tensors, str(folder / "model.safetensors"), metadata=safetensors_metadata(rec))
    canonicalize_header(folder / "model.safetensors")
    config.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    write_provenance(folder, rec)
    return rec


def import_gguf(gguf_path: str | os.PathLike, *, out: str | os.PathLike, dtype: str = "float32",
                force: bool = False, progress: bool = True) -> dict:  # fmt: skip
    """``loramix base import``: the GGUF file ``gguf_path`` de-quantised into
    the transformers folder ``out`` (written atomically; ``dtype``
    ``"float32"`` or ``"bfloat16"``; ``force`` replaces an existing ``out``).
    Returns a dict, path-like (``os.fspath(result)`` is ``out``): ``out``,
    ``seconds``, ``architecture``, ``quantisation`` (GGUF type -> tensor
    count), ``tie_word_embeddings`` and the rest of what the folder's
    ``loramix.json`` records. ``progress``: a bar of the de-quantisation
    (:func:`_tensors`), on a terminal. Where a base is taken, the ``.gguf``
    path itself also works (imported once into the cache)."""
    from .io.outputs import atomic_output_dir, check_output

    t0 = time.perf_counter()
    path = check_gguf_file(gguf_path)
    # an --out that exists, or a dtype from Python that is none (the command's is a choice), is
    # refused before the header is parsed (4 s for SmolLM2's vocabulary)
    _check_dtype(dtype)
    check_output(out, force=force, inputs=[path])
    reader = open_gguf(path)  # a bad file is refused before an output folder is created
    checked = check_gguf(path, reader, dtype)
    with atomic_output_dir(out, force=force, inputs=[path]) as tmp:
        rec = write_folder(path, tmp, dtype=dtype, reader=reader, checked=checked, progress=progress)
    from .results import OutputDict

    return OutputDict({"out": str(out), "seconds": time.perf_counter() - t0, **rec})


def imported_base(path: str | os.PathLike) -> Path | None:
    """The whole import of the GGUF file ``path`` (:func:`resolve_base`'s folder),
    or None where it was never imported (or its import is damaged); nothing is
    imported (``scenario check``: a command that reads). The file's sha256 is
    recorded in the hash cache, as any run records it."""
    from .io.filehash import cache_dir, cached_file_sha256

    target = cache_dir() / "bases" / f"{cached_file_sha256(path)}-float32-r{IMPORT_RULE}"
    return target if _whole_import(target) else None


#: the transformers names (Llama's: also Mistral's, Qwen2's and Qwen3's) of the
#: GGUF's 2-D weights an adapter can target: ``blk.N.<part>`` -> ``model.layers.N.<name>``
_HF_BLOCK_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                   "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                   "ffn_down": "mlp.down_proj"}  # fmt: skip
_HF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output": "lm_head"}


def import_preview(path: str | os.PathLike) -> dict:
    """What importing the GGUF file ``path`` would give, from its header alone
    (nothing de-quantised, nothing written; ``scenario check`` before the
    run's import): ``model_type``; ``weights``, ``{module: (out, in)}`` of its
    2-D weights under their transformers names (GGUF stores a shape innermost
    first: reversed); ``arch``, ``model_type:layers:width:vocab`` (the
    estimate's architecture of a base folder, :mod:`loramix.scenario.estimate`);
    ``tokenizer``, whether it holds one; ``bytes``, its float32 import's
    weights. The file is refused as the import refuses it before
    de-quantising (:func:`check_gguf`: nan or inf weights too, from the
    quantised blocks' scales, :func:`check_finite_tensors`), but for
    transformers' reading of its config, which imports torch: so that
    ``scenario check`` does not pass a file that the run's import refuses.
    Parsed once per file (its size and time): the header of SmolLM2's
    49,152-token vocabulary takes seconds, and check asks twice."""
    p = Path(path)
    st = p.stat()
    got = _import_preview(str(p.resolve()), st.st_size, st.st_mtime_ns)
    return {**got, "weights": dict(got["weights"])}  # the cached dict stays as parsed


@functools.lru_cache(maxsize=4)
def _import_preview(path: str, size: int, mtime_ns: int) -> dict:
    import math

    reader = open_gguf(path)
    p = Path(path)
    model_type, _ = _check_kind(reader, p)
    _check_contents(reader, p, model_type, _preview_name_map(reader, model_type))
    weights, numel = {}, 0
    for t in reader.tensors:
        numel += math.prod(int(x) for x in t.shape)
        stem, _, suffix = t.name.rpartition(".")
        parts = stem.split(".")
        if suffix != "weight" or len(t.shape) != 2:
            continue
        if len(parts) == 3 and parts[0] == "blk" and parts[2] in _HF_BLOCK_NAMES:
            weights[f"model.layers.{parts[1]}.{_HF_BLOCK_NAMES[parts[2]]}"] = tuple(
                int(x) for x in t.shape[::-1]
            )
        elif stem in _HF_TOP_NAMES:
            weights[_HF_TOP_NAMES[stem]] = tuple(int(x) for x in t.shape[::-1])
    gguf_arch = _field(reader, "general.architecture")
    layers, width = (
        _field(reader, f"{gguf_arch}.block_count"),
        _field(reader, f"{gguf_arch}.embedding_length"),
    )
    vocab = weights.get("model.embed_tokens", (None,))[0]
    return {"model_type": model_type, "weights": weights, "arch": f"{model_type}:{layers}:{width}:{vocab}",
            "tokenizer": _field(reader, "tokenizer.ggml.model") is not None, "bytes": 4 * numel}  # fmt: skip


def _preview_name_map(reader, model_type: str) -> dict[str, str] | None:
    """:func:`gguf_name_map` from the metadata, without transformers' config
    (which imports torch): the parameters' names need only the model type,
    the block count and the bias flags, which transformers' GGUF config never
    sets for these architectures (each config's default, False). None
    without a block count (the import refuses the file for it, :func:`check_shape`)."""
    from .archs import parameter_names

    gguf_arch = _field(reader, "general.architecture")
    blocks = _field(reader, f"{gguf_arch}.block_count")
    if blocks is None:
        return None
    names = parameter_names({"model_type": model_type, "num_hidden_layers": int(blocks)})
    return None if names is None else gguf_name_map(names, gguf_arch, int(blocks))


def resolve_base(path: str | os.PathLike) -> Path:
    """A base model folder for ``path``: the folder itself, or for a GGUF file
    (:func:`means_gguf`: a name ending in ``.gguf`` that is no GGUF file is
    refused as one, :func:`check_gguf_file`, not taken for a folder) its
    import in ``cache_dir()/bases/<sha256>-float32-r<IMPORT_RULE>``, made on
    first use (an import by an older rule, ``<sha256>-float32[-rN]``, is
    removed then).

    Concurrent-safe: an importer holds a lock file while it writes into a
    private temporary folder and renames it into place; a second process waits
    for the lock and then finds the folder. The key is the file's content, so
    a changed file is imported anew; an import whose config or weights are
    cut short (:func:`_whole_import`) is imported again.
    """
    from .userpaths import non_path

    if (said := non_path(path)) is not None:  # a base given from Python as a DataFrame, say
        raise BaseModelError(None, f"a base is a model folder or a .gguf file, not {said}")
    p = Path(path)
    if not means_gguf(p):
        return p
    check_gguf_file(p)  # a .gguf name that is no GGUF file: refused as one, not as a folder
    from .io.filehash import cache_dir, cached_file_sha256  # torch-free (model_folder re-exports them)
    from .io.outputs import discard, sync_published, sync_tree, usual_modes

    sha = cached_file_sha256(p)
    root = cache_dir() / "bases"
    target = root / f"{sha}-float32-r{IMPORT_RULE}"
    if _whole_import(target):
        return target
    # a bad file is refused before the cache is written to (a process that waits
    # below for another's import of the same file has parsed the header for nothing)
    reader = open_gguf(p)
    checked = check_gguf(p, reader)
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / f"{sha}.lock") as lock:
        if _whole_import(target):  # another process imported it meanwhile
            return target
        damaged = (target / "config.json").is_file()
        why = " again (the import there is damaged)" if damaged else " (once per file)"
        # an importer killed while it wrote (the lock was its: no one else writes them now)
        for old in root.glob(f".{glob.escape(target.name)}.tmp-*"):
            shutil.rmtree(old, ignore_errors=True)
        tmp = root / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()

        def say() -> None:  # seconds of work (0.5 GB for SmolLM2) not asked for by name: say so
            print(f"loramix: importing {p} into {target}{why}", file=sys.stderr, flush=True)

        try:
            write_folder(p, tmp, dtype="float32", sha256=sha, say=say, reader=reader, checked=checked)
            usual_modes(tmp)
            sync_tree(tmp)  # an import that exists is used: its bytes reach the disk before its name
            discard(target)  # a leftover without config.json, or damaged
            os.replace(tmp, target)
            sync_published(target)
        except BaseException:
            lock.remove()  # a refused file leaves nothing in bases/
            raise
        finally:
            discard(tmp)
        for old in older_imports(root, sha):  # superseded (half a GB for SmolLM2 each)
            shutil.rmtree(old, ignore_errors=True)
    return target


def _whole_import(target: Path) -> bool:
    """Whether ``target`` holds an import whose config and weights are whole:
    ``config.json`` parses and ``model.safetensors``' header covers the file
    (a few milliseconds). A cut-short one (a disk that filled; a crash
    before the data reached the disk, when imports were renamed into place
    unsynced, as an older loramix's were) failed every command given the
    GGUF until its folder was found and removed by hand; it is imported
    again instead. One the disk fails to read (``EIO``) raises that OSError:
    imported again, the minutes of it went into the disk that failed."""
    from .errors import LoramixError, raise_machine_fault
    from .io.st_header import read_safetensors_header

    config = target / "config.json"
    try:
        json.loads(config.read_text())
        read_safetensors_header(target / "model.safetensors")
    except (OSError, ValueError, LoramixError) as e:
        raise_machine_fault(e, config)  # a read's error names no file; the header's names its own
        return False
    return True


def older_imports(root: Path, sha: str) -> list[Path]:
    """The imports of the file ``sha`` in ``root`` by a rule older than
    :data:`IMPORT_RULE` (``<sha>-float32``, ``<sha>-float32-rN``, N smaller);
    not a newer rule's, which a newer loramix sharing the cache made (and may
    be reading now)."""
    out = []
    for d in [root / f"{sha}-float32", *root.glob(f"{glob.escape(sha)}-float32-r*")]:
        rule = d.name[len(f"{sha}-float32-r") :] if d.name != f"{sha}-float32" else "0"
        if rule.isascii() and rule.isdigit() and int(rule) < IMPORT_RULE and d.is_dir():
            out.append(d)
    return sorted(out)


def remove_stale_imports() -> list[Path]:
    """Remove the temporary folders of GGUF imports that were killed
    (``cache_dir()/bases/.<sha256>-...tmp-*``) where no process is importing
    that file now (its lock is free); returns them. :func:`resolve_base`
    removes a file's own when it imports it again."""
    from .io.filehash import cache_dir  # torch-free (model_folder re-exports it)

    root = cache_dir() / "bases"
    out = []
    for tmp in sorted(root.glob(".*.tmp-*")) if root.is_dir() else []:
        sha = tmp.name[1:].split("-", 1)[0]
        with _lock(root / f"{sha}.lock", wait=False) as lock:
            if lock.held and tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
                out.append(tmp)
    return out


class _lock:
    """An exclusive ``flock`` on ``path`` (a no-op where fcntl is missing).
    ``wait=False``: do not wait for another holder; ``held`` says whether
    the lock was taken (never where fcntl is missing: no one can tell).
    Its holder may delete the file (:meth:`remove`): a waiter that then
    gets the lock of the deleted file sees that ``path`` is no longer that
    file and locks ``path`` anew, so no two hold it at once."""

    def __init__(self, path: Path, wait: bool = True):
        self.path, self.wait = path, wait
        self.f = None
        self.held = False

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # Windows: fall back to the rename's atomicity alone
            return self
        while True:
            self.f = open(self.path, "a")
            try:
                fcntl.flock(self.f, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
            except BlockingIOError:
                return self
            try:
                if os.stat(self.path).st_ino == os.fstat(self.f.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            self.f.close()  # its holder removed it while this process waited
        self.held = True
        return self

    def remove(self) -> None:
        """Delete the lock file, while it is held (else leave it)."""
        if self.held:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def __exit__(self, *exc):
        if self.f is not None:
            self.f.close()  # closing releases the lock
