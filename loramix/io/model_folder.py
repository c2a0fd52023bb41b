"""A Hugging Face model folder, read lazily (docs/merging.md, "Outputs").

A base folder holds ``config.json`` and its weights as ``model.safetensors``,
or sharded as ``model-0000i-of-0000N.safetensors`` with
``model.safetensors.index.json``. :class:`BaseModelFolder` checks it (every
shard present and as long as its header says), lists every tensor from the
safetensors headers without reading any weight, and maps adapter modules to
base tensors.

Layout. Adapters are always ``(out, in)`` (``nn.Linear``). A GPT-2 ``Conv1D``
stores its weight ``(in, out)``, so its base tensor is the transpose. In an
architecture the table knows, the table decides (an adapter that fits a
weight only the other way is refused: its factors are transposed). Otherwise
a non-square weight tells its layout by its shape (against the adapter's ``A``,
``r x in``, and ``B``, ``out x r``); a square one (GPT-2's ``attn.c_proj``,
768 x 768) cannot, and is decided, in this order, by the per-architecture
table (:func:`loramix.archs.is_conv1d`: the numbered blocks of a ``Conv1D``
architecture are ``Conv1D``, its heads ``nn.Linear``), by the adapter's own
``fan_in_fan_out``, and only for an architecture the table does not know and
an adapter that does not say, by the model skeleton: the model built from
``config.json`` on the meta device (no weights; importing the modeling code
costs seconds, so the answer is cached on disk per ``config.json`` and
transformers version), announced by a one-line notice on stderr.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..archs import arch, is_conv1d
from ..errors import BaseModelError, raise_machine_fault
from .config_schema import load_json_file
from .filehash import (
    INDEX_NAME,
    SINGLE_NAME,
    cache_dir,
    cached_file_sha256,
)
from .outputs import atomic_write, normalized_path
from .st_header import read_safetensors_header

if TYPE_CHECKING:  # torch is imported where a tensor or a dtype is made: the headers are plain JSON
    import torch

CONFIG_NAME = "config.json"
PEFT_PREFIX = "base_model.model."

# Weight files of other formats: never read (pickle) and never copied into an
# output, since they would hold the unmerged weights.
OTHER_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".safetensors")

LINEAR, CONV1D = "linear", "conv1d"

# Names of output heads and of the input embeddings they are tied to.
OUTPUT_HEADS = ("lm_head", "embed_out")
INPUT_EMBEDDINGS = ("wte", "embed_tokens", "embed_in", "word_embeddings", "tok_embeddings", "shared")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its safetensors header describes it.

    ``start``/``end`` are absolute byte offsets in the shard file.
    """

    key: str
    shard: str
    dtype: str  # safetensors code, e.g. "F32"
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype | None:
        from .safetensors_io import ST_DTYPES

        return ST_DTYPES.get(self.dtype)

    @property
    def is_float(self) -> bool:
        dt = self.torch_dtype
        return dt is not None and dt.is_floating_point


#: the config.json fields that give a model's number of blocks, by family (the first present counts)
LAYER_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def _block_lists(keys: Iterable[str]) -> dict[str, tuple[int, set[int]]]:
    """``{list: (tensors, block indices)}`` of each numbered list of blocks the
    tensor names run through (``transformer.h`` in
    ``transformer.h.3.attn.c_attn.weight``: the part before a name's first
    number), most tensors first."""
    lists: dict[str, tuple[int, set[int]]] = {}
    for key in keys:
        toks = key.split(".")
        i = next((j for j, t in enumerate(toks) if t.isdigit()), None)
        if i is None or i == 0:
            continue
        head = ".".join(toks[:i])
        n, idx = lists.get(head, (0, set()))
        idx.add(int(toks[i]))
        lists[head] = (n + 1, idx)
    return dict(sorted(lists.items(), key=lambda kv: -kv[1][0]))


def layer_disagreement(config: dict, keys: Iterable[str], weights: str) -> str | None:
    """Why ``config`` (``config.json``) and the tensor names ``keys`` of the
    file ``weights`` do not describe the same number of blocks, or None.

    ``config``'s count ``n`` is its first of :data:`LAYER_FIELDS` (an int);
    the weights agree where one of their numbered lists of blocks
    (:func:`_block_lists`; a vision tower's may be another) holds blocks
    ``0 .. n-1``, or ``n`` plus the multi-token-prediction blocks stored after
    them (DeepSeek-V3's ``num_nextn_predict_layers``). Otherwise the list of
    the most tensors is named: a config with fewer blocks is built smaller and
    transformers drops the rest of the weights; one with more has blocks
    transformers fills at random. Neither side stated, nothing is said."""
    field = next((f for f in LAYER_FIELDS if f in config), None)
    n = config.get(field)
    lists = _block_lists(keys)
    if field is None or isinstance(n, bool) or not isinstance(n, int) or not lists:
        return None
    extra = config.get("num_nextn_predict_layers") or 0
    ok = {n, n + extra} if isinstance(extra, int) and not isinstance(extra, bool) else {n}
    if any(idx == set(range(len(idx))) and len(idx) in ok for _, idx in lists.values()):
        return None
    head, (_, idx) = next(iter(lists.items()))
    says, held = f"says {n} layer{'s' * (n != 1)} ({field})", max(idx) + 1
    if held in ok:  # as many as the config says, one between them missing
        missing = min(set(range(held)) - idx)
        return f"{says}, {weights} holds {len(idx)}: it lacks {head}.{missing}"
    return f"{says}, {weights} holds {held} ({head}.0 to {head}.{held - 1})"


#: where a tensor's bytes lie: (file, absolute offset, length, dtype) (:func:`same_tensor_bytes`)
TensorBytes = tuple[Path, int, int, str]


def same_tensor_bytes(a: TensorBytes, b: TensorBytes, chunk: int = 8 << 20) -> bool:
    """Whether two safetensors tensors (where their bytes lie in their files,
    :data:`TensorBytes`) hold the same bytes: same dtype, length and content.
    Read side by side in ``chunk``-sized blocks (memcmp of each pair), so each
    is read once, and stopped at the first block that differs: a head that
    differs from its embedding is told at its first block (a file's first
    megabytes), one equal to it reads both once."""
    (fa, oa, na, da), (fb, ob, nb, db) = a, b
    if (na, da) != (nb, db):
        return False
    buf_a, buf_b = bytearray(chunk), bytearray(chunk)
    with open(fa, "rb") as ra, open(fb, "rb") as rb:
        ra.seek(oa)
        rb.seek(ob)
        left = na
        while left:
            k = min(chunk, left)
            if k < chunk:  # the last block: bytearrays of its size (a memoryview's == compares item by item)
                buf_a, buf_b = bytearray(k), bytearray(k)
            if ra.readinto(buf_a) != k or rb.readinto(buf_b) != k:
                return False  # shorter than its header says: the header check reports it
            if buf_a != buf_b:
                return False
            left -= k
    return True


class BaseModelFolder:
    """A Hugging Face model folder, checked on construction, read lazily.

    Attributes: ``path``, ``config`` (``config.json`` as a dict), ``shards``
    (weight file names in order), ``index`` (the parsed index or None),
    ``tensors`` (key -> :class:`TensorInfo`, in streaming order: shard by
    shard, by offset). Nothing is loaded until asked for.
    """

    def __init__(self, path: str | os.PathLike):
        from ..models import read_model_config  # a GGUF file stands for its imported folder

        self.path, self.config = read_model_config(path)
        self.config_bytes = (self.path / CONFIG_NAME).read_bytes()
        self.index, self.shards = self._find_shards()
        self.tensors, self.metadata = self._read_headers()
        why = layer_disagreement(self.config, self.tensors, self.shards[0] if not self.index else INDEX_NAME)
        if why is not None:
            raise BaseModelError(self.path / CONFIG_NAME, why)
        self._skeleton: dict | None = None
        self._leads: list[str] | None = None
        self._sha: dict[str, str] | None = None

    def _find_shards(self) -> tuple[dict | None, list[str]]:
        """``(index, weight files)``: the parsed index and the files it names
        (each a file name in the folder that exists, and every ``model-*-of-*``
        file beside it named), else ``(None, ["model.safetensors"])``."""
        index_path = self.path / INDEX_NAME
        if index_path.exists():
            index = load_json_file(index_path, BaseModelError)
            try:
                weight_map = index["weight_map"]
                if not isinstance(weight_map, dict) or not weight_map:
                    raise ValueError("weight_map is empty or not an object")
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
                raise BaseModelError(index_path, f"not a valid safetensors index: {e}") from None
            # each value checked before the set is sorted: a number or a list among the
            # names would raise TypeError there (a traceback), not this line
            for shard in weight_map.values():
                # a shard is a file name in the folder (transformers' rule): no folders, no ../
                if not isinstance(shard, str) or shard in ("", ".", "..") or "/" in shard or os.sep in shard:
                    raise BaseModelError(index_path, f"names the shard {shard!r}, which is not a file name in "
                                         "the base folder")  # fmt: skip
            shards = sorted(set(weight_map.values()))
            for p in sorted(self.path.glob("model-*-of-*.safetensors")):
                if p.name not in shards:
                    raise BaseModelError(index_path, f"does not name the shard {p.name} beside it")
            for shard in shards:
                if not (self.path / shard).is_file():
                    raise BaseModelError(index_path, f"names the shard {shard}, which does not exist")
            return index, shards
        if (self.path / SINGLE_NAME).exists():
            return None, [SINGLE_NAME]
        pickles = sorted(p.name for p in self.path.glob("*.bin"))
        if pickles:
            raise BaseModelError(
                self.path, f"has only pickle weights ({pickles[0]}); loramix reads safetensors only"
            )
        raise BaseModelError(self.path, f"no weights: neither {SINGLE_NAME} nor {INDEX_NAME}")

    def _read_headers(self) -> tuple[dict[str, TensorInfo], dict[str, dict]]:
        """Every shard's header: ``(tensors, metadata)``, tensors in streaming
        order; a key in two shards, an index that does not list exactly what
        the shards hold, or no tensor at all is refused."""
        tensors: dict[str, TensorInfo] = {}
        metadata: dict[str, dict] = {}
        for shard in self.shards:
            header, data_start = read_safetensors_header(self.path / shard)
            metadata[shard] = header.pop("__metadata__", None) or {}
            items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
            for key, info in items:
                if key in tensors:
                    raise BaseModelError(self.path / shard, f"tensor {key} is also in {tensors[key].shard}")
                b, e = info["data_offsets"]
                tensors[key] = TensorInfo(
                    key,
                    shard,
                    info["dtype"],
                    tuple(int(d) for d in info["shape"]),
                    data_start + b,
                    data_start + e,
                )
        if self.index is not None:
            index_path = self.path / INDEX_NAME
            for key, info in tensors.items():  # the index must list every tensor, exactly
                if key not in self.index["weight_map"]:
                    raise BaseModelError(index_path, f"does not list tensor {key}, which {info.shard} holds")
            for key, shard in self.index["weight_map"].items():
                info = tensors.get(key)
                if info is None or info.shard != shard:
                    raise BaseModelError(
                        index_path, f"says {key} is in {shard}, but that shard does not hold it"
                    )
        if not tensors:
            raise BaseModelError(self.path / self.shards[0], "holds no tensors")
        return tensors, metadata

    # ---- listing -----------------------------------------------------------

    def __repr__(self) -> str:
        return (
            f"BaseModelFolder({str(self.path)!r}, {len(self.shards)} shard(s), {len(self.tensors)} tensors)"
        )

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __iter__(self):
        """``(key, shard)`` in streaming order (shard by shard, by file offset)."""
        return ((k, t.shard) for k, t in self.tensors.items())

    def iter_shards(self):
        """``(shard, [TensorInfo, ...])`` per weight file, tensors by offset."""
        for shard in self.shards:
            yield shard, [t for t in self.tensors.values() if t.shard == shard]

    @property
    def sharded(self) -> bool:
        return self.index is not None

    @property
    def weight_files(self) -> list[str]:
        return [*self.shards, INDEX_NAME] if self.sharded else list(self.shards)

    @property
    def prefix(self) -> str | None:
        """The model's ``base_model_prefix`` (``transformer``, ``model``, ``bert``, ...),
        read off the tensor names when the skeleton is not built: the first
        name part that leads most tensors, where what follows is a submodule
        (``bert.encoder...``), not a block index (``layers.0``) or a weight.
        None when no part leads more than half of them (a bare model)."""
        if self._skeleton is not None:
            return self._skeleton.get("prefix")
        counts: dict[str, int] = {}
        for key in self.tensors:
            toks = key.split(".")
            if len(toks) >= 3 and not toks[1].isdigit():
                counts[toks[0]] = counts.get(toks[0], 0) + 1
        if not counts:
            return None
        best = max(counts, key=counts.get)
        if counts[best] * 2 <= len(self.tensors) or best in ("encoder", "decoder"):
            return None
        return best

    @property
    def dtype(self) -> torch.dtype | None:
        """The floating dtype holding the most parameters (the base's dtype)."""
        from .safetensors_io import ST_DTYPES

        counts: dict[str, int] = {}
        for t in self.tensors.values():
            if t.is_float:
                counts[t.dtype] = counts.get(t.dtype, 0) + t.nbytes
        return ST_DTYPES[max(counts, key=counts.get)] if counts else None

    def other_files(self) -> list[Path]:
        """Files and folders to copy into an output as they are (config,
        tokenizer, generation config, ...): everything but the weights, weight
        files of other formats, hidden files and an old ``loramix.json``."""
        skip = set(self.weight_files) | {"loramix.json"}
        out = []
        for p in sorted(self.path.iterdir()):
            if p.name in skip or p.name.startswith("."):
                continue
            if p.is_file() and p.name.endswith(OTHER_WEIGHT_SUFFIXES):
                continue
            out.append(p)
        return out

    # ---- provenance -----------------------------------------------------------

    def file_sha256s(self, stop: threading.Event | None = None) -> dict[str, str]:
        """sha256 of each weight file (and the index), computed once, and
        remembered on disk by (path, inode, size, change time, mtime) as git's index does,
        so that merging many adapters into one base hashes it once."""
        if self._sha is None:
            self._sha = {name: cached_file_sha256(self.path / name, stop) for name in self.weight_files}
        return self._sha

    def provenance(self, stop: threading.Event | None = None) -> dict:
        """An input record: ``path``, ``sha256`` (of the single weight file, or
        of the list of ``name:sha256`` lines of a sharded folder), ``files``.
        Setting ``stop`` (from another thread) abandons the hashing with
        :class:`HashingStopped`."""
        files = self.file_sha256s(stop)
        if self.sharded:
            manifest = "".join(f"{n}:{files[n]}\n" for n in sorted(files))
            digest = hashlib.sha256(manifest.encode()).hexdigest()
        else:
            digest = files[SINGLE_NAME]
        ident = self.identity(stop)
        path = normalized_path(self.path)
        return {"role": "base", "path": path, "sha256": digest, "identity": ident, "files": files}

    def identity(self, stop: threading.Event | None = None) -> str:
        """The hash that names this base wherever loramix records one (merge
        and training provenance, the scenario cache key)::

            sha256("config.json:" sha256(config.json) "\n" + "name:sha256\n" per weight file, by name)

        It changes with the weights or the config and nothing else (not with
        the folder's path or its tokenizer files), and is cheap to recompute:
        the files' hashes are cached on disk (:meth:`file_sha256s`)."""
        files = self.file_sha256s(stop)
        lines = [f"{CONFIG_NAME}:{hashlib.sha256(self.config_bytes).hexdigest()}\n"]
        lines += [f"{n}:{files[n]}\n" for n in sorted(files)]
        return hashlib.sha256("".join(lines).encode()).hexdigest()

    # ---- adapter modules -> base tensors ------------------------------------

    def _candidates(self, name: str) -> list[str]:
        """Where adapter module ``name`` may live in this checkpoint, most
        likely first: as named; without its first part (an adapter trained on
        a model with a head, merged into the bare model); with the base's
        prefix, or any other leading part of the base's tensor names, before
        it (a bare-model adapter merged into a model with a head:
        ``encoder.layer.0...`` -> ``bert.encoder.layer.0...``)."""
        name = name.removeprefix(PEFT_PREFIX).removesuffix(".weight")
        cands = [name]
        if "." in name:
            cands.append(name.split(".", 1)[1])
        if self._leads is None:
            self._leads = list(dict.fromkeys(k.split(".", 1)[0] for k in self.tensors if "." in k))
        leads = dict.fromkeys([self.prefix, *self._leads])
        cands += [f"{t}.{name}" for t in leads if t and not name.startswith(t + ".")]
        return cands

    def tensor_key(self, module: str, param: str = "weight") -> str | None:
        """The key of ``module``'s ``param`` under this checkpoint's naming
        (:meth:`_candidates`), or None."""
        return next(
            (f"{c}.{param}" for c in self._candidates(module) if f"{c}.{param}" in self.tensors), None
        )

    def module_weight_key(
        self, name: str, shape: tuple[int, int] | None = None, fan_in_fan_out: bool | None = None
    ) -> tuple[str, bool]:
        """``(key, transposed)``: the base tensor of adapter module ``name``.

        ``key`` is ``name.weight``, with the model's ``base_model_prefix``
        stripped or added when the checkpoint names it the other way (GPT-2
        checkpoints saved from ``GPT2Model`` lack ``transformer.``).
        ``transposed`` is True when the tensor is stored ``(in, out)``
        (``Conv1D``). ``shape`` is the adapter's ``(out, in)``; when given, a
        tensor that fits neither way is an error, and so, in an architecture
        the table knows, is one that fits only against the table's layout;
        elsewhere a non-square one decides the layout. The rest is decided by
        :meth:`module_layout`, which takes the adapter's ``fan_in_fan_out``
        (None: not stated).
        """
        cands = self._candidates(name)
        key = next((c + ".weight" for c in cands if c + ".weight" in self.tensors), None)
        if key is None:
            tied = self._tied_to(cands)
            if tied:  # the cause first: the head is the embedding, not a missing file
                raise BaseModelError(
                    self.path,
                    f"adapter module {name} is the output head, tied to {tied} (the folder stores no "
                    f"{cands[0]}.weight): merging would change both (untie the weights, or leave the "
                    "module out of the adapter)",
                )
            raise BaseModelError(
                self.path,
                f"has no tensor for adapter module {name} (looked for {cands[0]}.weight): "
                "the adapter was made for another base",
            )
        tied = self._tied_with(key)
        if tied is not None:
            raise BaseModelError(
                self.path,
                f"adapter module {name} targets {key}, which is tied to {tied}: merging would change "
                "both (untie the weights, or leave the module out of the adapter)",
            )
        info = self.tensors[key]
        if len(info.shape) != 2:
            raise BaseModelError(
                self.path / info.shard,
                f"tensor {key} has shape {list(info.shape)}, not a 2-D weight for module {name}",
            )
        rows, cols = info.shape
        if shape is not None:
            out_f, in_f = shape
            if (rows, cols) not in ((out_f, in_f), (in_f, out_f)):
                raise BaseModelError(
                    self.path / info.shard,
                    f"tensor {key} is {rows}x{cols}, which does not fit adapter module {name} ({out_f}x{in_f}, out x in)",
                )
            if out_f != in_f and arch(self.config.get("model_type")) is None:
                return key, (rows, cols) == (in_f, out_f)
        transposed = self.module_layout(key.removesuffix(".weight"), fan_in_fan_out) == CONV1D
        if shape is not None and (rows, cols) != ((in_f, out_f) if transposed else (out_f, in_f)):
            # A known architecture's layout is a fact: an adapter that fits only the other way
            # has its factors transposed (PEFT refuses it, and so does eval, which checks the
            # modules); merged, its non-square modules were turned and its square ones not.
            raise BaseModelError(
                self.path / info.shard,
                f"tensor {key} is {rows}x{cols}, stored {'in x out (Conv1D)' if transposed else 'out x in'}, "
                f"so adapter module {name} ({out_f}x{in_f}, out x in) fits it only transposed: its lora_A "
                "and lora_B are transposed (PEFT's are r x in and out x r)",
            )
        return key, transposed

    def module_layout(self, module_key: str, fan_in_fan_out: bool | None = None) -> str:
        """``"conv1d"`` or ``"linear"`` for a checkpoint module name, without
        building the model where the facts decide (see the module docstring):
        the architecture table, else the adapter's ``fan_in_fan_out``, else
        the skeleton (with a notice: it imports the modeling code)."""
        model_type = self.config.get("model_type")
        if arch(model_type) is not None:
            # Conv1D architectures (GPT-2 and kin) use Conv1D inside the numbered
            # blocks only; their heads (lm_head, score, summary) are nn.Linear.
            in_block = any(part.isdigit() for part in module_key.split("."))
            return CONV1D if is_conv1d(model_type) and in_block else LINEAR
        if fan_in_fan_out is not None:
            return CONV1D if fan_in_fan_out else LINEAR
        return self._skeleton_layout(module_key)

    def _skeleton_layout(self, module_key: str) -> str:
        if self._skeleton is None:
            print(
                f"loramix: note: {self.path}: model type {self.config.get('model_type')!r} is not in "
                f"loramix's architecture table and the adapter does not state fan_in_fan_out; building "
                f"the model skeleton to find the layout of square module {module_key}",
                file=sys.stderr,
            )
        sk = self.skeleton()
        layouts = sk["layouts"]
        name = module_key
        if name not in layouts:
            prefix = sk.get("prefix")
            alt = f"{prefix}.{name}" if prefix and not name.startswith(prefix + ".") else None
            if prefix and name.startswith(prefix + "."):
                alt = name[len(prefix) + 1 :]
            name = alt if alt in layouts else name
        # Not a Linear/Conv1D in the skeleton (or no skeleton): a Linear is what
        # every architecture outside the table uses.
        return layouts.get(name, LINEAR)

    def _tied_with(self, key: str) -> str | None:
        """The parameter ``key`` shares its storage with in the model (a head
        tied to the input embeddings), or None. Tied parameters are output
        heads and input embeddings (:data:`OUTPUT_HEADS`,
        :data:`INPUT_EMBEDDINGS`), outside the numbered blocks: any other key
        (a block's module, a classifier ``score`` head) does not build the
        skeleton."""
        toks = key.split(".")
        if any(t.isdigit() for t in toks) or len(toks) < 2 or toks[-2] not in OUTPUT_HEADS + INPUT_EMBEDDINGS:
            return None
        # Without tie_word_embeddings only an encoder-decoder ties (its embeddings to ``shared``).
        if not self.config.get("tie_word_embeddings", True) and not self.config.get("is_encoder_decoder"):
            return None
        try:
            tied = self.skeleton().get("tied", {})
        except Exception:  # no skeleton: nothing known about ties
            return None
        prefix = self.prefix
        alts = {key, key.removeprefix(f"{prefix}.") if prefix else key, f"{prefix}.{key}" if prefix else key}
        for a, b in tied.items():
            if a in alts or b in alts:
                return b if a in alts else a
        return None

    def tied_to(self, module: str) -> str | None:
        """The tensor that ``module``, an output head absent from the
        checkpoint, shares (the input embeddings), or None."""
        return self._tied_to(self._candidates(module))

    def _tied_to(self, cands: list[str]) -> str | None:
        """The tensor an absent output head shares: with ``tie_word_embeddings``
        (transformers' default) a checkpoint stores only the input embedding."""
        if not self.config.get("tie_word_embeddings", True):
            return None
        if not any(c.rsplit(".", 1)[-1] in OUTPUT_HEADS for c in cands):
            return None
        emb = (k for k in self.tensors if k.endswith(".weight") and k.split(".")[-2] in INPUT_EMBEDDINGS)
        return next(emb, "the input embeddings")

    def skeleton(self) -> dict:
        """``{"prefix", "layouts": {module: layout}, "tied": {param: param}}``
        from the model class built on the meta device, cached on disk."""
        if self._skeleton is None:
            self._skeleton = _cached_skeleton(self.path, self.config_bytes)
        return self._skeleton

    # ---- reading ---------------------------------------------------------------

    def read_tensor(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """One tensor as stored (dtype, layout)."""
        from .safetensors_io import CheckedSafetensors

        info = self.tensors.get(key)
        if info is None:
            raise BaseModelError(self.path, f"has no tensor {key}")
        with CheckedSafetensors(self.path / info.shard, BaseModelError) as f:
            return f.get(key).to(device)

    def read_module_weight(
        self, name: str, dtype: torch.dtype | str | None = "float32", device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        """The base weight of adapter module ``name`` as ``(out, in)``
        (``nn.Linear`` layout; a ``Conv1D`` weight is transposed), contiguous,
        in ``dtype`` (a torch dtype or its name; None: as stored)."""
        import torch

        key, transposed = self.module_weight_key(name)
        W = self.read_tensor(key, device=device)
        if dtype is not None:
            W = W.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        return W.T.contiguous() if transposed else W


# ---- the skeleton and its cache -------------------------------------------------


def _transformers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return "none"


def _skeleton_ok(sk) -> bool:
    """Whether a cached entry has the form :func:`build_skeleton` writes. One
    that parses but has another (edited, or damaged into other JSON) failed
    later with a bare KeyError or TypeError, in every run; it is built again."""
    return (
        isinstance(sk, dict)
        and sk.get("built") is True
        and isinstance(sk.get("prefix"), (str, type(None)))
        and all(isinstance(sk.get(k), dict) for k in ("layouts", "tied"))
    )


def _cached_skeleton(folder: Path, config_bytes: bytes) -> dict:
    key = hashlib.sha256(config_bytes + b"\0" + _transformers_version().encode()).hexdigest()[:24]
    path = cache_dir() / "layouts" / f"{key}.json"
    try:
        sk = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # absent or torn: built again; a failing disk is said
        raise_machine_fault(e, path)
        sk = None
    if _skeleton_ok(sk):
        return sk
    sk = build_skeleton(folder)
    if sk.get("built"):  # cache only a real answer, not the fallback
        try:
            with atomic_write(path) as f:  # its temporary names its writer: see `cache clean`
                f.write(json.dumps(sk, sort_keys=True))
        except OSError as e:
            raise_machine_fault(e, path)  # a read-only home only costs the rebuild; a failing disk is said
    return sk


@contextlib.contextmanager
def quiet_transformers():
    """transformers' logging at error level and Python warnings off, restored after."""
    import warnings

    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def build_skeleton(folder: Path) -> dict:
    """Build the model on the meta device from its config and record, for
    each ``nn.Linear``/``Conv1D`` submodule, its layout; plus tied parameters
    and ``base_model_prefix``. Never reads weights, never uses the network."""
    import torch
    import torch.nn as nn

    try:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
        from transformers.pytorch_utils import Conv1D

        cfg = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        model = None
        # A head class built from a bare model's config logs advice (BERT: "add
        # is_decoder=True"); it is about using the model, not about its layout,
        # and it would break the CLI's one-line promise.
        with torch.device("meta"), quiet_transformers():
            for auto in (AutoModelForCausalLM, AutoModel):
                try:
                    model = auto.from_config(cfg)
                    break
                except (ValueError, KeyError):
                    continue
    except Exception:  # an unknown model class: fall back on shapes and model type
        model = None
    if model is None:
        return {"built": False, "prefix": None, "layouts": {}, "tied": {}}
    layouts = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Conv1D):
            layouts[name] = CONV1D
        elif isinstance(mod, nn.Linear):
            layouts[name] = LINEAR
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[pname] = first[id(p)]
        else:
            first[id(p)] = pname
    return {
        "built": True,
        "prefix": getattr(model, "base_model_prefix", None) or None,
        "layouts": layouts,
        "tied": tied,
    }
