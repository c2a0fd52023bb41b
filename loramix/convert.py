"""An adapter whose delta needs its base, written as the plain LoRA that delta is.

PEFT VeRA (``peft_type: VERA``; Kopiczko et al. 2024) shares one pair of
frozen random matrices across all the modules it adapts: ``vera_A`` ``(r,
in_max)`` and ``vera_B`` ``(out_max, r)``, saved once as
``base_model.vera_A`` / ``base_model.vera_B`` (``save_projection``, PEFT's
default). Each module keeps two vectors, ``vera_lambda_b`` ``(out,)`` and
``vera_lambda_d`` ``(r,)``, and PEFT applies (``VeraLayer.get_delta_weight``)::

    dW = (lambda_b[:, None] * vera_B[:out]) @ (lambda_d[:, None] * vera_A[:, :in])     (out, in)

with no scale: the LoRA of rank ``r`` with

    B = lambda_b[:, None] * vera_B[:out]   (out, r)      A = lambda_d[:, None] * vera_A[:, :in]   (r, in)

and ``s = 1``, formed in float32 as PEFT forms them. The file gives each
module's ``out`` (the length of ``lambda_b``) but not its ``in``: ``vera_A``
is as wide as the widest module adapted, and PEFT cuts it to each module's
in-features, which only the base knows (a Llama adapter on ``q_proj`` and
``down_proj`` cuts it to ``hidden`` for one and keeps ``intermediate`` for
the other). So loramix reads VeRA with its base only, here, and writes the
LoRA: :func:`convert_adapter` (``loramix convert``). Every command then
takes the converted folder as the LoRA it is; the others refuse a VeRA
folder, naming this conversion.

A PEFT LoRA whose init moved the base (PiSSA, OLoRA, saved unconverted:
:mod:`loramix.kinds.moved_base`) has the delta ``s (B A - B0 A0)``, ``B0
A0`` computed from the base weight; it is written as the rank-``2r`` LoRA
``s [B, -B0]``, ``[A; A0]`` (the pair PEFT's own conversion writes), so that
the commands without a base (similarity, adapter outputs) take it too.
``docs/adapters.md`` has the math.
"""

from __future__ import annotations

from pathlib import Path

from .errors import AdapterError, BaseModelError

#: the shared projections' keys, as PEFT saves them (``save_projection``)
SHARED = {"vera_A": "base_model.vera_A", "vera_B": "base_model.vera_B"}
#: the per-module vectors, as parts of the PEFT layout
PARTS = {"vera_lambda_b": ("B", "pos"), "vera_lambda_d": ("A", "pos")}


def convert_adapter(adapter, base, out, *, force: bool = False) -> dict:
    """Write the VeRA or PiSSA/OLoRA adapter at ``adapter`` as a PEFT LoRA
    folder ``out`` whose delta is the same on the base model folder ``base``
    (module docstring); ``force`` replaces an existing ``out``. Returns
    ``out``, ``modules`` (their number), ``rank`` (the largest) and ``kind``,
    what was converted (``"vera"``, ``"pissa"`` or ``"olora"``).

    Bad input (an adapter that needs no conversion, VeRA's projections not
    saved, a module the base lacks or whose shape does not fit) raises
    :class:`~loramix.errors.AdapterError` or
    :class:`~loramix.errors.BaseModelError` naming the file, before anything
    is written."""
    from .io.adapter_files import WEIGHTS_NAME, save_peft_adapter
    from .io.filehash import cached_file_sha256
    from .io.model_folder import BaseModelFolder
    from .io.outputs import atomic_output_dir, normalized_path, provenance, write_provenance
    from .io.peft_layout import moved_base_init, read_config, resolve_adapter_paths
    from .io.safetensors_io import canonicalize_header, file_record
    from .models import base_provenance

    given, cfg_path, weights = resolve_adapter_paths(adapter)
    config = read_config(cfg_path)
    init = moved_base_init(config)
    if str(config.get("peft_type", "")).upper() != "VERA" and init is None:
        raise AdapterError(cfg_path, f"peft_type {config.get('peft_type')!r}: loramix convert writes VeRA "
                           "(peft_type VERA) and PiSSA/OLoRA adapters as LoRA; a LoRA needs no conversion, and "
                           "no LoRA holds a DoRA or D2-LoRA delta (merge those into their base: sum --into)")  # fmt: skip
    folder = base if isinstance(base, BaseModelFolder) else BaseModelFolder(base)
    if init is None:
        config, vectors, shared, saved = read_vera(given)
        factors, kind = vera_factors(config, vectors, shared, folder, weights), "vera"
    else:
        (factors, saved), kind = moved_base_factors(given, folder, weights), init
    rank = max(int(A.shape[0]) for _, A in factors.values())
    record = provenance(
        "convert",
        {"from": kind, "rank": rank},
        [
            {"role": "adapter", "path": normalized_path(given), "sha256": cached_file_sha256(weights)},
            # as a training records its base: the conversion is for this base (loramix.trained_base)
            {**base_provenance(folder.path), "role": "base"},
        ],
        output="adapter",
    )
    with atomic_output_dir(out, force=force, inputs=[given, folder.path]) as tmp:
        save_peft_adapter(
            tmp,
            factors,
            base_model_name_or_path=config.get("base_model_name_or_path"),
            fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
            provenance=file_record(record),
            extra_config={"task_type": config.get("task_type")},
            saved=saved,
            full_names=True,
        )
        canonicalize_header(tmp / WEIGHTS_NAME)
        write_provenance(tmp, record)
    return {"out": str(out), "modules": len(factors), "rank": rank, "kind": kind}


def moved_base_factors(path, base, weights: Path) -> tuple[dict, dict]:
    """``({module: (B, A)}, saved)``: float32 ``(out, 2r)`` and ``(2r, in)``,
    ``s [B, -B0]`` and ``[A; A0]`` of each module of the PiSSA/OLoRA adapter
    at ``path``, ``B0 A0`` from ``base``'s weight as PEFT computes it
    (:meth:`~loramix.kinds.moved_base.MovedBaseKind.based_factors`), and its
    ``modules_to_save`` copies."""
    import torch

    from .io.adapter_files import load_adapter

    ad = load_adapter(path)
    factors = {}
    for name, m in ad.modules.items():
        try:  # the merge's lookup: the module's shape checked, the layout from the adapter's fan_in_fan_out
            key, transposed = base.module_weight_key(name, m.shape, ad.config.get("fan_in_fan_out"))
        except BaseModelError as e:
            raise AdapterError(weights, f"does not fit the base: {e.message}") from None
        W0 = base.read_tensor(key)  # as stored; the init takes it in float32
        factors[name] = m.kind.based_factors(m, W0.T if transposed else W0, dtype=torch.float32)
    return factors, dict(ad.saved)


def read_vera(path) -> tuple[dict, dict, dict, dict]:
    """``(config, vectors, shared, saved)`` of the VeRA adapter at ``path``
    (folder or ``.safetensors`` file): ``vectors`` ``{module: {(factor,
    branch): tensor}}`` (``("B", "pos")``: ``lambda_b``, ``("A", "pos")``:
    ``lambda_d``), ``shared`` ``{"vera_A": ..., "vera_B": ...}`` and
    ``modules_to_save`` copies, every tensor checked finite and cast to
    float32 (float64 kept), as PEFT forms its products."""
    import torch

    from .io.peft_layout import (
        check_features,
        check_targets,
        parse_keys,
        read_config,
        read_parts,
        resolve_adapter_paths,
        saved_tensor_name,
    )
    from .io.safetensors_io import FLOAT_CODES, CheckedSafetensors

    _, cfg_path, weights = resolve_adapter_paths(path)
    config = read_config(cfg_path)
    if str(config.get("peft_type", "")).upper() != "VERA":
        raise AdapterError(cfg_path, f"peft_type {config.get('peft_type')!r}: loramix convert reads VeRA "
                           "adapters (peft_type VERA); a LoRA needs no conversion")  # fmt: skip
    if config.get("save_projection", True) is not True:
        raise AdapterError(cfg_path, "save_projection is false: the shared vera_A and vera_B are not in the "
                           "file (PEFT draws them again from projection_prng_key); save the adapter with "
                           "save_projection true")  # fmt: skip
    check_features(config, cfg_path)

    def cast(t):
        return t.to(torch.promote_types(t.dtype, torch.float32))

    with CheckedSafetensors(weights, AdapterError, dtypes=FLOAT_CODES) as f:
        keys = f.keys()
        shared = {name: cast(f.get(key, check_finite=True)) for name, key in SHARED.items() if key in keys}
        if missing := [key for key in SHARED.values() if key not in keys]:
            raise AdapterError(weights, f"has no {' or '.join(missing)} (VeRA's shared projections)")
        saved, rest = {}, []
        for key in keys:
            if key in SHARED.values():
                continue
            if (tname := saved_tensor_name(key, config.get("modules_to_save"))) is not None:
                saved[tname] = f.get(key, check_finite=True)
            else:
                rest.append(key)
        vectors = (
            read_parts(parse_keys(rest, PARTS, weights), lambda k: cast(f.get(k, check_finite=True)), weights,
                       vectors=("A", "B"))
            if rest else {}
        )  # fmt: skip
    if not vectors:
        raise AdapterError(weights, "holds no VeRA module (vera_lambda_b / vera_lambda_d)")
    for module, fs in vectors.items():
        if missing := [p for p, k in PARTS.items() if k not in fs]:
            raise AdapterError(weights, f"module {module} has no {' or '.join(missing)}")
    check_targets(vectors, config, weights)
    return config, vectors, shared, saved


def vera_factors(config: dict, vectors: dict, shared: dict, base, weights: Path) -> dict:
    """``{module: (B, A)}``, float32 ``(out, r)`` and ``(r, in)``, with ``B @
    A`` each module's VeRA delta on ``base`` (a
    :class:`~loramix.io.model_folder.BaseModelFolder`), its ``in`` read from
    the base's tensor (module docstring)."""
    vA, vB = shared["vera_A"], shared["vera_B"]
    r = int(vA.shape[0])
    if vA.ndim != 2 or vB.ndim != 2 or int(vB.shape[1]) != r:
        raise AdapterError(weights, f"vera_A is {list(vA.shape)} and vera_B {list(vB.shape)}: they must be "
                           "(r, in) and (out, r), one r")  # fmt: skip
    if "r" in config and int(config["r"]) != r:
        raise AdapterError(weights, f"vera_A has rank {r} but adapter_config.json says r = {config['r']}")
    fan_in_fan_out = config.get("fan_in_fan_out")
    factors = {}
    for module, fs in vectors.items():
        lam_b, lam_d = fs[("B", "pos")], fs[("A", "pos")]
        out_f = int(lam_b.shape[0])
        if int(lam_d.shape[0]) != r:
            raise AdapterError(
                weights, f"module {module}: vera_lambda_d has {lam_d.shape[0]} entries, not r = {r}"
            )
        if out_f > vB.shape[0]:
            raise AdapterError(weights, f"module {module}: vera_lambda_b has {out_f} entries, more than vera_B's "
                               f"{vB.shape[0]} rows")  # fmt: skip
        try:
            key, transposed = base.module_weight_key(module, None, fan_in_fan_out)
        except BaseModelError as e:
            raise AdapterError(weights, f"does not fit the base: {e.message}") from None
        rows, cols = (int(n) for n in base.tensors[key].shape)
        w_out, in_f = (cols, rows) if transposed else (rows, cols)
        if w_out != out_f or in_f > vA.shape[1]:
            raise AdapterError(weights, f"module {module}: the base's {key} is {w_out} x {in_f} (out x in), "
                               f"but vera_lambda_b has {out_f} entries and vera_A {vA.shape[1]} columns")  # fmt: skip
        factors[module] = (lam_b[:, None] * vB[:out_f], lam_d[:, None] * vA[:, :in_f])
    return factors
