"""The layout PEFT uses for adapter folders, shared by the formats that follow it.

A folder with ``adapter_config.json`` and ``adapter_model.safetensors`` holding
``base_model.model.<module>.<part>.weight`` tensors; keys may carry an
adapter name (``lora_A.default.weight``). The parts of one module are its
kind's (:attr:`~loramix.kinds.base.AdapterKind.parts`: ``lora_A``/``lora_B``
for LoRA). Per-module rank and alpha follow PEFT's ``rank_pattern`` /
``alpha_pattern`` matching rule: a pattern key ``k`` applies to module ``m``
when ``re.match(rf"(.*\\.)?({k})$", m)``; the first matching key wins.

A path may be the folder or the ``.safetensors`` file with its
``adapter_config.json`` beside it. ``modules_to_save`` copies are kept as
full tensors (``Adapter.saved``); PEFT's copy of a targeted head's own weight
(``base_layer``) is skipped. Anything the kind does not define (LoRA biases,
conv LoRA, ...) is refused with a message naming the module and the feature,
never silently dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import save_file

from ...adapter import Adapter, ModuleDelta
from ...errors import AdapterError
from ...kinds import LORA, AdapterKind
from ...stopping import cleanup
from ..filehash import adapter_identity_of, cached_file_sha256
from ..outputs import (
    TMP_PREFIX,
    discard,
    make_parents,
    raise_naming,
    remove_made_parents,
    remove_stale_temporaries,
    temporary_file,
)
from ..peft_layout import (  # noqa: F401  (the torch-free parsing lives there; re-exported for the formats)
    CONFIG_NAME,
    PREFIX,
    WEIGHTS_NAME,
    adapter_name,
    check_config_rank,
    check_features,
    check_targets,
    checked_scale,
    embedding_as_weight_factors,
    module_rank_alpha,
    moved_base_init,
    parse_keys,
    read_config,
    read_parts,
    resolve_adapter_paths,
    saved_tensor_name,
    with_embedding_parts,
)
from ..safetensors_io import (
    FLOAT_CODES,
    CheckedSafetensors,
    canonicalize_header,
    check_output_finite,
    safetensors_metadata,
)


def common_rank_alpha(ranks: dict[str, int], alphas: dict[str, float]) -> tuple[int, float, dict, dict]:
    """Most common rank and alpha, plus patterns for the modules that differ."""
    from collections import Counter

    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    a = Counter(alphas.values()).most_common(1)[0][0] if alphas else float(r)
    rank_pattern = {m: v for m, v in ranks.items() if v != r}
    alpha_pattern = {m: v for m, v in alphas.items() if v != a}
    return r, a, rank_pattern, alpha_pattern


def clean_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def check_pair(out_dir: Path, module: str, B, A) -> None:
    """``B`` (out, r) and ``A`` (r, in): 2-D tensors sharing ``r`` >= 1, else an
    :class:`AdapterError` naming ``out_dir`` and ``module`` (the writers took
    any pair and wrote a file that :func:`~loramix.io.adapter_files.load_adapter`
    refuses)."""
    if not (isinstance(B, torch.Tensor) and isinstance(A, torch.Tensor) and B.dim() == 2 and A.dim() == 2):
        got = ", ".join(
            str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__ for t in (B, A)
        )
        raise AdapterError(
            out_dir, f"module {module}: B and A must be 2-D tensors, (out, r) and (r, in); got {got}"
        )
    if B.shape[1] != A.shape[0] or A.shape[0] < 1:
        raise AdapterError(
            out_dir,
            f"module {module}: B {tuple(B.shape)} and A {tuple(A.shape)} must be (out, r) and (r, in) with one r >= 1",
        )


def write_folder(
    out_dir: Path, tensors: dict[str, torch.Tensor], config: dict, provenance: dict | None
) -> Path:
    """Write ``tensors`` (canonical header, provenance in the metadata) and the config;
    a non-finite value refused naming its tensor, and no tensor at all naming
    ``out_dir`` (the readers refuse both), before ``out_dir`` is made.

    Each file is written beside its name (:func:`~loramix.io.outputs.temporary_file`)
    and the two are renamed into place together at the end: an error, a
    Ctrl-C or a library call's SIGTERM meanwhile leaves ``out_dir`` as it was
    (its files of those names kept, a folder made for it removed). Written in
    place, a SIGTERM there left the weights without their config; an OS error
    on the second rename (:func:`_put_in_place`) undoes the first."""
    if not tensors:
        raise AdapterError(out_dir, "no module to write: an adapter file holds at least one tensor")
    for key, t in tensors.items():
        check_output_finite(t, key)
    made = make_parents(out_dir)
    staged: dict[Path, Path] = {}  # final name -> its temporary
    try:
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            remove_stale_temporaries(out_dir, name)  # a killed write's (and its kept old files)
        weights = staged[out_dir / WEIGHTS_NAME] = temporary_file(out_dir / WEIGHTS_NAME)
        save_file(tensors, str(weights), metadata=safetensors_metadata(provenance))
        canonicalize_header(weights)
        cfg = staged[out_dir / CONFIG_NAME] = temporary_file(out_dir / CONFIG_NAME)
        cfg.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _put_in_place(staged)
    except BaseException as e:
        for tmp in staged.values():
            discard(tmp)
        remove_made_parents(out_dir, made)
        raise_naming(e, tuple(staged.values()), out_dir)
    return out_dir


@cleanup
def _put_in_place(staged: dict[Path, Path]) -> None:
    """Rename each temporary to its name, all or none: a signal meanwhile is
    held until all are (:func:`~loramix.stopping.cleanup`), and an OS error on
    one (a read-only or full file system, a name made a folder meanwhile)
    undoes the renames before it, so no folder has one file new and the
    other old. The file a rename replaces is kept until all are done, under a
    hard link named as a temporary (:func:`~loramix.io.outputs.temporary_file`:
    a run killed meanwhile leaves it to the next write's
    :func:`~loramix.io.outputs.remove_stale_temporaries`); a link costs no
    copy. Where the file system makes no hard links, the old file itself is
    renamed aside, and back on an error."""
    done: list[tuple[Path, Path | None]] = []  # (name, its old file kept aside, or None: there was none)
    try:
        for path, tmp in staged.items():
            kept, moved = _keep_aside(path, tmp)
            try:
                os.replace(tmp, path)
            except BaseException:
                if moved:
                    os.replace(kept, path)  # renamed aside: put back
                elif kept is not None:
                    kept.unlink(missing_ok=True)  # a link: ``path`` is unchanged
                raise
            done.append((path, kept))
    except BaseException:
        for path, kept in reversed(done):
            with contextlib.suppress(OSError):  # the error raised is the rename's; undo what can be
                if kept is None:
                    path.unlink()
                else:
                    os.replace(kept, path)
        raise
    for _, kept in done:
        if kept is not None:
            kept.unlink(missing_ok=True)


def _keep_aside(path: Path, tmp: Path) -> tuple[Path | None, bool]:
    """``(kept, moved)``: the file ``path`` (a symbolic link as itself) kept
    under a temporary name ``kept``, by a hard link (``path`` stays) or,
    where the file system refuses one, a rename (``moved``: ``path`` is gone);
    ``(None, False)`` where ``path`` is no file (absent, or a folder, whose
    rename fails as before). ``kept`` is ``path``'s temporary ``tmp`` with a
    ``k`` before its random part: it names the same target and owner (read
    from ``/proc`` again, :func:`~loramix.io.outputs.temporary_file` took a
    third of a small save's CPU time)."""
    kept = tmp.with_name(f"{TMP_PREFIX}k{tmp.name[len(TMP_PREFIX) :]}")
    try:
        os.link(path, kept, follow_symlinks=False)  # the common case in one call: no lstat first
        return kept, False
    except FileNotFoundError:
        return None, False
    except OSError:  # no hard links here (or none for this file): rename it aside, unless it is no file
        try:
            if stat.S_ISDIR(os.lstat(path).st_mode):
                return None, False
        except FileNotFoundError:
            return None, False
    os.rename(path, kept)
    return kept, True


def _dora_reader() -> bool:
    from . import FORMATS

    return any(getattr(r, "dora", False) for r in FORMATS.values())


class PeftLayoutFormat:
    """A reader for one adapter kind stored in PEFT's folder layout.

    Subclasses set ``name`` (of the format) and ``kind``; :meth:`detect` says
    whether a path holds this format (from the config's ``peft_type``),
    :meth:`read` loads it.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[AdapterKind]
    #: the config's ``peft_type`` this format reads (default: the kind's); set as a
    #: literal, it is read from the file for the error that lists the types read
    peft_type: ClassVar[str] = ""
    #: reads PEFT's ``use_dora: true`` adapters (and only those), else refuses them
    dora: ClassVar[bool] = False
    #: the ``init_lora_weights`` that moved the base this format reads (and only
    #: those, :func:`~loramix.io.peft_layout.moved_base_init`); the others leave them
    inits: ClassVar[frozenset[str]] = frozenset()

    def detect(self, path: str | Path) -> bool:
        try:
            _, cfg, _ = resolve_adapter_paths(path)
            config = read_config(cfg)
        except AdapterError:
            return False
        if str(config.get("peft_type", "")).upper() != (self.peft_type or self.kind.peft_type):
            return False
        if (init := moved_base_init(config)) is not None or self.inits:
            # an init that moved the base is its own reader's (which refuses DoRA beside it)
            return init in self.inits
        # A DoRA adapter is a PEFT LoRA with use_dora: its own reader claims it.
        return bool(config.get("use_dora")) == self.dora or (not self.dora and not _dora_reader())

    def read(self, path: str | Path, name: str | None = None) -> Adapter:
        """Load the adapter at ``path`` (folder or .safetensors file).

        Tensors are read one at a time with ``safe_open`` and kept as stored.
        Raises :class:`AdapterError` (one line naming the file) on bad input.
        """
        given, cfg_path, weights = resolve_adapter_paths(path)
        config = read_config(cfg_path)
        sha256 = cached_file_sha256(weights)
        identity = adapter_identity_of(config, sha256)  # before anything reads the config
        saved: dict[str, torch.Tensor] = {}
        raw = self._read_tensors(weights, config, cfg_path, saved)
        built = {m: self._module(m, fs, config, cfg_path, weights) for m, fs in raw.items()}
        modules = {m: d for m, d in built.items() if d is not None}
        if built and not modules and not saved:
            raise AdapterError(weights, "every module has rank 0: the adapter changes nothing")
        check_targets(modules, config, weights)
        if name is None:
            name = adapter_name(given)
        return Adapter(
            name=name,
            kind=self.kind,
            modules=modules,
            config=config,
            path=given,
            weights_path=weights,
            sha256=sha256,
            saved=saved,
            identity=identity,
        )

    def _read_tensors(self, weights: Path, config: dict, cfg_path: Path, saved: dict) -> dict[str, dict]:
        """``{module: {(factor, branch): tensor}}``, every key checked first;
        ``modules_to_save`` tensors go into ``saved`` (base tensor name -> tensor)."""
        with CheckedSafetensors(weights, AdapterError, dtypes=FLOAT_CODES) as f:
            keys = f.keys()
            if not keys:
                raise AdapterError(weights, "holds no tensors")
            to_save = config.get("modules_to_save")
            rest = []
            for key in keys:
                if (tname := saved_tensor_name(key, to_save)) is not None:
                    saved[tname] = f.get(key, check_finite=True)
                else:
                    rest.append(key)
            # Parse every key before reading any tensor or trusting the config:
            # an unsupported feature is then reported with the module it is on.
            parsed = parse_keys(rest, self.key_parts(), weights) if rest else []
            check_features(config, cfg_path, self.dora)
            return read_parts(parsed, lambda key: f.get(key, check_finite=True), weights)

    def key_parts(self) -> dict[str, tuple[str, str]]:
        """The tensor parts this format reads, ``{part: (factor, branch)}``: its
        kind's, with PEFT's embedding LoRA parts."""
        return with_embedding_parts(self.kind.parts)

    def _module(
        self, module: str, fs: dict, config: dict, cfg_path: Path, weights: Path
    ) -> ModuleDelta | None:
        """One module from its tensors: ranks checked against the config, then
        the kind builds it. None: a module that adds nothing, left out (a
        format whose modules may have rank 0: AdaLoRA's)."""
        r_cfg, alpha = module_rank_alpha(config, module)
        embedding = ("EA", "pos") in fs or ("EB", "pos") in fs
        if embedding:
            fs = embedding_as_weight_factors(fs, module, weights)
        try:
            m = self.kind.from_tensors(
                module, fs, config,
                scale=checked_scale(config, module, alpha, r_cfg, cfg_path), alpha=alpha,
                embedding=embedding,
            )  # fmt: skip
        except ValueError as e:
            raise AdapterError(weights, str(e)) from None
        if m.B.shape[1] != m.A.shape[0]:
            raise AdapterError(
                weights, f"module {module}: lora_A has rank {m.A.shape[0]} but lora_B has rank {m.B.shape[1]}"
            )
        check_config_rank(module, int(m.A.shape[0]), r_cfg, cfg_path, weights)
        return m


class LoraReading(PeftLayoutFormat):
    """A PEFT tuner read as LoRA: each module's delta is ``s B A`` once its
    stored parts are formed into ``B`` ``(out, k)`` and ``A`` ``(k, in)``
    (AdaLoRA, LoHa, LoKr; ``docs/adapters.md``), so every command takes it
    as it takes a LoRA.

    A subclass sets ``name``, ``peft_type``, ``parts`` (``{part: (factor,
    branch)}``, the tensors it reads), ``label`` and ``read_as`` (what
    ``loramix inspect`` says of it; read from the file as a literal), and
    defines :meth:`lora_factors`. The parts are cast to float32 first
    (float64 kept), as PEFT loads them into float32 parameters and forms its
    products there. ``lycoris`` (LoHa, LoKr): the config names its alpha
    ``alpha`` (default 8, as ``lora_alpha``'s), and a module on a
    convolution (``use_effective_conv2d``) is refused.
    """

    kind = LORA
    parts: ClassVar[dict[str, tuple[str, str]]] = {}
    label: ClassVar[str] = ""
    lycoris: ClassVar[bool] = False

    def key_parts(self) -> dict[str, tuple[str, str]]:
        return dict(self.parts)

    def rank_alpha(self, config: dict, module: str) -> tuple[int, float]:
        """``(r, alpha)`` of ``module`` by PEFT's patterns (:func:`module_rank_alpha`)."""
        return module_rank_alpha(
            {**config, "lora_alpha": config.get("alpha", 8)} if self.lycoris else config, module
        )

    def require_all(self, module: str, fs: dict, weights: Path) -> None:
        """Refuse, naming ``weights``, a module without every one of ``parts``."""
        if missing := [p for p, k in self.parts.items() if k not in fs]:
            raise AdapterError(weights, f"module {module} has no {' or '.join(missing)} "
                               f"({self.label} keeps all {len(self.parts)} parts)")  # fmt: skip

    def lora_factors(
        self, module: str, fs: dict, config: dict, cfg_path: Path, weights: Path
    ) -> tuple | None:
        """``(B, A, scale, alpha)`` of ``module`` from its parts ``fs`` (float32),
        checked against each other and the config; None where the module adds
        nothing (it is left out)."""
        raise NotImplementedError

    def _module(
        self, module: str, fs: dict, config: dict, cfg_path: Path, weights: Path
    ) -> ModuleDelta | None:
        if self.lycoris and config.get("use_effective_conv2d"):
            raise AdapterError(
                cfg_path, f"not supported: {self.label} on convolutions (use_effective_conv2d)"
            )
        fs = {k: t.to(torch.promote_types(t.dtype, torch.float32)) for k, t in fs.items()}
        if (got := self.lora_factors(module, fs, config, cfg_path, weights)) is None:
            return None
        B, A, scale, alpha = got
        try:
            return self.kind.from_tensors(module, {("A", "pos"): A, ("B", "pos"): B}, config, scale=scale,
                                          alpha=alpha)  # fmt: skip
        except ValueError as e:
            raise AdapterError(weights, str(e)) from None
