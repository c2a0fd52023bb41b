"""Loading a local Hugging Face causal LM (GPT-2, Llama-style, ...) and its tokenizer.

Offline only (``local_files_only=True``). Every problem a user can cause is a
one-line :class:`~loramix.errors.BaseModelError` naming the folder: not a
folder, no ``config.json``, not a causal LM, no weights, weights lacking
parameters of the model ``config.json`` describes (transformers would fill
them at random), a ``config.json`` with another number of layers than the
weights hold (transformers would drop the rest) or another shape of a tensor,
key-value heads that do not divide the query heads (:func:`head_problem`)
or a head count that the ``head_dim`` it gives does not fit the attention
weights with (:func:`head_size_problem`; without ``head_dim`` a head count
edited so that every shape holds cannot be told apart),
a ``config.json`` that ties the head to the embedding over weights whose
``lm_head`` differs from it (transformers would drop that head), no
tokenizer, or a tokenizer whose vocabulary is larger than the model's
embedding.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import BaseModelError, UsageError
from .gguf_import import resolve_base
from .io.config_schema import load_json_file
from .options import DTYPE_NAMES as _DTYPES

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _causal_lm_names() -> tuple[set[str], set[str]]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def check_model_folder(path: str | os.PathLike) -> dict:
    """Validate ``path`` as a causal-LM folder (or a GGUF file, imported once into
    the cache: :func:`~loramix.gguf_import.resolve_base`) without loading
    weights; return its config dict."""
    p, cfg = read_model_config(path)
    model_types, classes = _causal_lm_names()
    mt = cfg.get("model_type")
    if mt not in model_types:
        raise BaseModelError(p, f"model_type {mt!r} is not a causal language model known to transformers")
    archs = cfg.get("architectures") or []
    if archs and not any(a in classes or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise BaseModelError(p, f"architecture {', '.join(archs)} is not a causal language model")
    if not any((p / f).is_file() for f in WEIGHT_FILES):
        raise BaseModelError(p, "no weights (model.safetensors or pytorch_model.bin)")
    if (why := head_problem(cfg)) is not None:
        raise BaseModelError(p / "config.json", why)
    return cfg


def _count(cfg: dict, key: str) -> int | None:
    v = cfg.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def head_problem(cfg: dict) -> str | None:
    """Why the attention ``config.json`` describes cannot be built, or None:
    with ``h`` query heads (``num_attention_heads``), ``g`` key-value heads
    (``num_key_value_heads``, default ``h``) and width ``w``
    (``hidden_size``), each key-value head serves ``h / g`` query heads, so
    ``g`` must divide ``h``; without a ``head_dim`` the head size is
    ``w / h``, so ``h`` must divide ``w``.

    transformers builds a model whose ``g`` does not divide ``h`` (Llama,
    Qwen2, Mistral) and fails in its first forward pass (a traceback: 'The
    size of tensor a (4) must match the size of tensor b (3)'); a Qwen2
    config whose ``h`` does not divide ``w`` is built with heads of
    ``w // h`` (narrower than the width, so never a checkpoint's). Configs
    without these keys (GPT-2's ``n_head``) are left to transformers."""
    heads, kv, width = (_count(cfg, k) for k in ("num_attention_heads", "num_key_value_heads", "hidden_size"))
    if heads is None:
        return None
    if heads < 1:
        return f"num_attention_heads {heads} is not a number of heads"
    if kv is not None and (kv < 1 or heads % kv):
        return (
            f"num_key_value_heads {kv} does not divide num_attention_heads {heads}: each key-value head "
            "serves a whole group of query heads, so the model cannot run"
        )
    if width is not None and cfg.get("head_dim") is None and width % heads:
        return (
            f"num_attention_heads {heads} does not divide hidden_size {width}, and no head_dim is given: "
            "the model has no head size"
        )
    return None


def head_size_problem(cfg: dict, shapes: dict, weights_name: str) -> str | None:
    """Why the heads ``config.json`` gives do not fit the attention weights
    the checkpoint holds, or None; torch-free, from the tensors' shapes
    (``{key: shape}``, a safetensors header's). For a Llama-family config
    (:func:`loramix.archs.parameter_shapes`'s ``block`` types) with ``h``
    heads, ``g`` key-value heads and head size ``d`` (``head_dim`` where
    given), ``q_proj`` holds ``h d`` rows and ``k_proj`` ``g d``.

    ``head_dim`` is a second record of the heads: a head count edited and
    ``head_dim`` left (9 heads of 64 written as 3, over ``head_dim`` 64) no longer
    fits ``q_proj``, and is named here (``scenario check`` included, which
    builds no model), where the model's build reports only a tensor of
    another shape. Without ``head_dim`` (or with it edited to match) nothing
    records the head size apart from the count: 9 heads of 64 written as 3
    heads of 192 (and 3 key-value heads as 1) keeps every shape, and the
    model builds and runs as another model (its attention split in other
    places) that no check can tell apart. Other model types, and a config
    without ``head_dim`` (whose default is the class's: ``hidden_size / h``,
    Qwen3's 128), are left to the build."""
    from .archs import arch

    a = arch(cfg.get("model_type"))
    heads, kv, hd = (_count(cfg, k) for k in ("num_attention_heads", "num_key_value_heads", "head_dim"))
    # without head_dim the size is the class's default (hidden_size / h, but Qwen3's 128): left to the build
    if a is None or a.block is None or hd is None or heads is None or head_problem(cfg) is not None:
        return None
    for proj, key, n in (
        ("q_proj", "num_attention_heads", heads),
        ("k_proj", "num_key_value_heads", kv or heads),
    ):
        name = next((k for k in shapes if k.endswith(f"layers.0.self_attn.{proj}.weight")), None)
        shape = shapes.get(name) if name else None
        if shape and len(shape) == 2 and shape[0] != n * hd:
            return (
                f"{key} {n} x head_dim {hd} = {n * hd}, but {name} in {weights_name} has {shape[0]} rows: "
                "a head count or head_dim the weights were not made with"
            )
    return None


def read_model_config(path: str | os.PathLike) -> tuple[Path, dict]:
    """``(folder, config dict)`` of a base (a GGUF file stands for its imported
    folder): a folder with a ``config.json`` holding a JSON object, else one
    :class:`BaseModelError` line naming the folder or the file. The first
    checks of :func:`check_model_folder` and of
    :class:`~loramix.io.model_folder.BaseModelFolder`, in one place; they
    need neither torch nor transformers, so a command refuses a mistyped base
    before it imports them."""
    p = resolve_base(path)
    if not p.exists():
        raise BaseModelError(p, "no such folder")
    if not p.is_dir():
        raise BaseModelError(
            p, "not a folder: a base model is a Hugging Face model folder (config.json + model.safetensors)"
        )
    cfg_path = p / "config.json"
    if not cfg_path.exists():
        # an adapter folder given as the base (--into or --base and an adapter swapped): say what it holds
        held = (
            "; it holds an adapter (adapter_config.json), not its base"
            if (p / "adapter_config.json").exists()
            else ""
        )
        raise BaseModelError(p, f"not a Hugging Face model folder: no config.json{held}")
    cfg = load_json_file(cfg_path, BaseModelError, constants=True)
    if not isinstance(cfg, dict):
        raise BaseModelError(cfg_path, "not valid JSON: not a JSON object")
    return p, cfg


def check_dtype_name(dtype) -> None:
    """Refuse a ``dtype`` spelling that :func:`load_causal_lm` would not take,
    without torch (a ``torch.dtype`` passes)."""
    if dtype is None or dtype == "auto" or type(dtype).__module__ == "torch":
        return
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        # "dtype": the CLI says --dtype (as sum and merge do); no where at all named nothing
        raise UsageError("dtype", f"unknown dtype {dtype!r}; choose float32, bfloat16, float16 or auto")


def _torch_dtype(dtype):
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return "auto"
    check_dtype_name(dtype)
    return getattr(torch, _DTYPES[dtype])


def load_tokenizer(path: str | os.PathLike):
    """``AutoTokenizer.from_pretrained(path, local_files_only=True)``; a tokenizer
    without a pad token gets its EOS as pad (pads are always masked)."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise BaseModelError(p, "no tokenizer files (tokenizer.json or tokenizer_config.json)")
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/... for broken files
        raise _load_error(p, "tokenizer", e) from None
    if tok.eos_token_id is None:
        raise BaseModelError(p, "tokenizer has no eos_token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _load_error(p: Path, what: str, e: Exception) -> BaseModelError:
    """The one line for ``what`` (the tokenizer, the model) of folder ``p``
    failing to load with ``e``: transformers reads ``config.json`` for both,
    so a field of the wrong type there (``"vocab_size": "x"``) failed the
    tokenizer; it is named as ``config.json``'s where transformers' own
    config class refuses it (only on this error path: it costs a read)."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(p), local_files_only=True)
    except Exception as ce:
        return BaseModelError(
            p / "config.json", f"not a valid transformers config: {type(ce).__name__}: {ce}"
        )
    return BaseModelError(p, f"{what} does not load: {type(e).__name__}: {e}")


def check_tokenizer(model, tokenizer, where) -> None:
    """The tokenizer's ids must all index the model's embedding."""
    n_emb = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_emb:
        raise BaseModelError(
            where,
            f"tokenizer does not match the model: {len(tokenizer)} tokens but the embedding has {n_emb} rows",
        )


def load_causal_lm(path: str | os.PathLike, *, device="cpu", dtype=None):
    """Load ``(model, tokenizer)`` from a local folder or GGUF file, model in eval mode on ``device``.

    ``dtype``: ``None`` gives float32 (exact CPU arithmetic), or a
    ``torch.dtype`` / ``"bfloat16"`` / ``"float16"`` / ``"auto"`` (the
    checkpoint's own). The tokenizer is the folder's, checked against the
    model's embedding.
    """
    from .devices import resolve_device

    p = resolve_base(path)
    check_model_folder(p)
    dev = resolve_device(device)
    tdtype = _torch_dtype(dtype)
    # the tokenizer first: quick, and a folder without one is refused before the model's load
    # prints transformers' warnings about its config
    tok = load_tokenizer(p)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    # transformers draws a "Loading weights" bar per load; loramix loads bases
    # many times in a study, so keep it quiet and restore the user's setting.
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    from .io.model_folder import quiet_transformers

    try:
        check_weights_hold_the_model(p)
        # quiet: transformers prints a table of missing and unexpected keys, where
        # a missing one is refused below in one line and an unexpected one is unused
        with quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(
                str(p), local_files_only=True, dtype=tdtype, output_loading_info=True
            )
    except BaseModelError:
        raise
    except Exception as e:
        raise _load_error(p, "model", e) from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise BaseModelError(
            p,
            f"the weights lack {len(missing)} tensor(s) of the model config.json describes ({missing[0]}, ...), "
            "which transformers would fill at random",
        )
    # a pickle checkpoint's blocks were not counted before the load: the ones it holds beyond
    # the config's are the keys transformers left unused
    from .io.model_folder import layer_disagreement

    held = [*model.state_dict(), *info["unexpected_keys"]]
    if (why := layer_disagreement(model.config.to_dict(), held, "the weights")) is not None:
        raise BaseModelError(p / "config.json", why)
    model.to(dev).eval()
    if getattr(model, "loss_type", None) is None:
        # GPT-2's class name maps to no loss type, so transformers warns on every
        # run and then uses ForCausalLM anyway; name it to say the same quietly.
        model.loss_type = "ForCausalLM"
    check_tokenizer(model, tok, p)
    return model, tok


def check_weights_hold_the_model(p: Path) -> None:
    """Refuse a ``config.json`` that does not describe the model the folder's
    safetensors weights hold, before transformers builds it: a number of
    blocks other than the weights' (:func:`~loramix.io.model_folder.layer_disagreement`),
    a tensor of another shape (a hidden size, vocabulary or head count that is
    not the weights'), or more parameters than the weights hold values.

    transformers drops the weights of blocks the config does not have (a
    truncated model evaluated without a word), fills every parameter the
    weights lack at random, and stops at a shape it cannot load with a
    report it prints and a line that points at it. A ``model_type`` or a size
    that does not match the weights (a GPT-2 folder whose config says
    ``llama`` gets Llama's defaults, 6.7e9 parameters) was built in full and
    killed for memory. The shapes and the count come from the model built on
    the meta device (tied parameters once; a tensor named with or without the
    model's ``base_model_prefix`` is the same one, as transformers reads it)
    against the safetensors headers; a quantized or pickle-only checkpoint
    is left to transformers. A model that ties its head to its embedding
    (``tie_word_embeddings``) over weights holding a head that differs from
    the embedding is refused too (:func:`_tied_head_problem`): transformers
    drops that head."""
    import math

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .io.filehash import INDEX_NAME, SINGLE_NAME
    from .io.model_folder import layer_disagreement, quiet_transformers
    from .io.st_header import read_safetensors_header

    cfg = load_json_file(p / "config.json", BaseModelError, constants=True)
    if cfg.get("quantization_config") is not None:
        return
    if (p / INDEX_NAME).is_file():
        weight_map = load_json_file(p / INDEX_NAME, BaseModelError).get("weight_map")
        names = weight_map.values() if isinstance(weight_map, dict) else [None]
        if not all(
            isinstance(v, str) and v not in ("", ".", "..") and "/" not in v and os.sep not in v
            for v in names
        ):
            return  # transformers says what is wrong with it; nothing outside the folder is read here
        files = sorted({p / v for v in weight_map.values()})
        weights_name = INDEX_NAME
    elif (p / SINGLE_NAME).is_file():
        files = [p / SINGLE_NAME]
        weights_name = SINGLE_NAME
    else:
        return
    shapes: dict[str, tuple[int, ...]] = {}
    where: dict[str, tuple] = {}  # key -> (file, offset, length, dtype): a tied head's bytes
    for f in files:
        if not f.is_file():
            return
        header, start = read_safetensors_header(f)
        for k, t in header.items():
            if k != "__metadata__":
                shapes[k] = tuple(t["shape"])
                begin, end = t["data_offsets"]
                where[k] = (f, start + begin, end - begin, t["dtype"])
    held = sum(math.prod(s) for s in shapes.values())
    if (why := layer_disagreement(cfg, shapes, weights_name)) is not None:
        raise BaseModelError(p / "config.json", why)
    if (why := head_size_problem(cfg, shapes, weights_name)) is not None:
        raise BaseModelError(p / "config.json", why)
    with torch.device("meta"), quiet_transformers():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(p), local_files_only=True))
    prefix = getattr(model, "base_model_prefix", "") or ""
    for name, t in model.state_dict().items():
        key = next(
            (k for k in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}") if k in shapes), None
        )
        if key is not None and shapes[key] != tuple(t.shape):
            raise BaseModelError(
                p / "config.json",
                f"describes {name} as {_dims(t.shape)}, {weights_name} holds {_dims(shapes[key])} "
                "(a hidden size, vocabulary or head count that does not match the weights?)",
            )
    if (why := _tied_head_problem(cfg, model, prefix, where, weights_name)) is not None:
        raise BaseModelError(p / "config.json", why)
    need = sum(t.numel() for t in model.parameters())
    if need > held:
        raise BaseModelError(
            p / "config.json",
            f"describes a model of {need:,} parameters but the weights hold {held:,} values "
            "(a model_type or size that does not match the weights?); transformers would fill the rest at random",
        )


def parameter_count(path: str | os.PathLike) -> tuple[int | None, str | None]:
    """``(n, None)``: the number of values the base's safetensors weights hold
    (every tensor of the single file or of the index's shards, from their
    headers: nothing loaded, no torch), which is the model's parameter count
    (transformers saves a tied head once and counts it once; a checkpoint
    that stores both copies counts the head twice); or
    ``(None, why)`` where the count cannot be read so: a quantized
    checkpoint (``quantization_config``: its tensors are packed integers and
    scales, not one value per parameter) or pickle weights only
    (``pytorch_model.bin``, which loramix reads only through transformers,
    when it loads the model). A study's report states one or the other."""
    from .io.filehash import INDEX_NAME, SINGLE_NAME
    from .io.model_folder import BaseModelFolder

    p, cfg = read_model_config(path)
    quant = cfg.get("quantization_config")
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        how = f" ({method})" if isinstance(method, str) else ""
        return (
            None,
            f"not counted: its weights are quantized{how}, stored packed, not one value per parameter",
        )
    if not (p / INDEX_NAME).is_file() and not (p / SINGLE_NAME).is_file():
        held = next((f for f in WEIGHT_FILES if (p / f).is_file()), "no safetensors weights")
        return None, f"not counted: {held} only, which loramix reads only through transformers"
    return sum(math.prod(t.shape) for t in BaseModelFolder(p).tensors.values()), None


def _tied_head_problem(cfg: dict, model, prefix: str, where: dict, weights_name: str) -> str | None:
    """Why the head the weights hold is not the one ``model`` (built from
    ``config.json`` on the meta device) will use, or None: the config ties
    the head to the input embedding (``tie_word_embeddings``, said or the
    model type's default), so transformers drops a head the weights hold
    and uses the embedding, while the weights' head differs from their
    embedding (another dtype, or other bytes). Equal bit for bit, or no head
    in the weights (the usual tied checkpoint): None. The bytes are compared
    block by block (:func:`~loramix.io.model_folder.same_tensor_bytes`), each
    read once, stopping at the first that differs; a head of another dtype
    than the embedding is compared by value, as transformers would load both."""
    from .io.model_folder import same_tensor_bytes

    try:
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        return None
    if out is None or inp is None or getattr(out, "weight", None) is not getattr(inp, "weight", object()):
        return None
    names = {id(m): n for n, m in model.named_modules()}
    if id(out) not in names or id(inp) not in names:
        return None

    def held(name: str) -> str | None:  # as the shape check finds it: with or without the prefix
        return next(
            (k for k in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}") if k in where), None
        )

    head, emb = held(f"{names[id(out)]}.weight"), held(f"{names[id(inp)]}.weight")
    if head is None or emb is None or head == emb:
        return None
    if where[head][3] == where[emb][3]:
        if same_tensor_bytes(where[head], where[emb]):
            return None
    else:
        from safetensors import safe_open

        def value(k):
            with safe_open(str(where[k][0]), framework="pt") as f:
                return f.get_tensor(k).double()

        if torch_equal(value(head), value(emb)):
            return None
    tie = cfg.get("tie_word_embeddings")
    says = ("says tie_word_embeddings: true" if tie is True else
            f"ties the head to the embedding (tie_word_embeddings unset: {cfg.get('model_type')}'s default is true)")  # fmt: skip
    return (f"{says}, but {weights_name} holds a {head} that differs from its {emb}: transformers would drop "
            "it and use the embedding as the head, another model than the file holds; set tie_word_embeddings "
            f"to false, or remove {head}")  # fmt: skip


def torch_equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and bool(torch.equal(a, b))


def _dims(shape) -> str:
    return " x ".join(map(str, shape)) or "a scalar"


#: the files transformers reads a tokenizer from, whichever a base folder has
TOKENIZER_FILES = ("added_tokens.json", "chat_template.jinja", "chat_template.json", "merges.txt",
                   "special_tokens_map.json", "spiece.model", "tokenizer.json", "tokenizer.model",
                   "tokenizer_config.json", "vocab.json", "vocab.txt")  # fmt: skip


def tokenizer_files(folder: str | os.PathLike) -> dict[str, str]:
    """``{name: sha256}`` of the :data:`TOKENIZER_FILES` a model folder holds,
    by name: what a training or an evaluation reads its text through, which the
    folder's identity (config and weights) leaves out."""
    from .io.st_header import file_sha256  # torch-free (safetensors_io re-exports it)

    folder = Path(folder)
    return {n: file_sha256(folder / n) for n in TOKENIZER_FILES if (folder / n).is_file()}


def base_provenance(path: str | os.PathLike) -> dict:
    """The record of a base in an output's provenance: ``path`` resolved to an
    absolute folder (a relative path typed elsewhere would not find it), the
    path as ``given`` when that differs, ``sha256`` of its weight files (in name
    order, hashed together, so a changed checkpoint changes the record),
    ``tokenizer``: :func:`tokenizer_files` (the data was read through them) and,
    for a GGUF, the file and its own sha256."""
    import hashlib

    from .io.filehash import cached_file_sha256

    p = resolve_base(path)
    files = sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".bin") and f.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        # cached on disk: the identity below hashes the same files (a cold run read the 538 MB of
        # SmolLM2 twice), and every later training of this base hashed them again
        h.update(cached_file_sha256(f).encode())
    rec = {
        "path": str(p.resolve()),
        "kind": "base_model",
        "sha256": h.hexdigest(),
        "tokenizer": tokenizer_files(p),
    }
    if str(path) != rec["path"]:
        rec["given"] = str(path)
    if p != Path(path):
        rec["gguf"] = str(Path(path).resolve())
        rec["gguf_sha256"] = p.name.split("-")[0]
    try:  # the hash merges and the scenario cache also record for this base
        from .io.model_folder import BaseModelFolder

        rec["identity"] = BaseModelFolder(p).identity()
    except BaseModelError:  # pickle weights only: no identity
        pass
    return rec
