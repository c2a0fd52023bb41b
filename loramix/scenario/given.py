"""Adapters trained elsewhere: a study of ``[domains.NAME] adapter = "PATH"``.

With every domain's adapter given, nothing is trained: the study's plan
holds one uncached adapter step per domain (like a base given as a folder)
whose key is a content hash of the adapter's files (:func:`given_key`), so
every merge, evaluation and similarity downstream is cached under it and
made again when those files change. Each adapter is read and checked
against the base when the scenario is loaded (:func:`check_given`), from the
safetensors headers, without torch where the numpy reader reads the adapter:
one kind for all (the study's adapter label), every adapted module a weight
of the base with a fitting shape.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import LoramixError


def given_key(path: str | Path) -> str:
    """The key of a given adapter: its identity
    (:func:`~loramix.io.filehash.adapter_identity`), the content of its
    config (canonical JSON) and weights files, the one identity that
    ``eval --format json`` records and a merge's provenance keeps. Names are
    not in it: a renamed copy is the same adapter. The weights' hashes are
    the base's: cached on disk by path, inode, size and times
    (:func:`~loramix.io.filehash.cached_file_sha256`), so a rerun reads them back."""
    from ..io.filehash import adapter_identity

    return adapter_identity(path)


def _read(path: Path, name: str):
    """The adapter's modules as numpy factors, lazily (headers only); an
    adapter with a feature only the torch readers read (a head's or an
    embedding's LoRA, ``modules_to_save``) is read by them and viewed as numpy
    (:func:`~loramix.io.np_factors.load_np_adapter`)."""
    from ..io.np_factors import load_np_adapter

    return load_np_adapter(path, name=name, lazy=True)


def base_folder(ctx, base):
    """The base's :class:`~loramix.io.model_folder.BaseModelFolder`, built once
    for every adapter's checks; None for a GGUF base not imported yet (a
    check that does not import it reads its header instead)."""
    from ..gguf_import import imported_base, is_gguf, resolve_base
    from ..io.model_folder import BaseModelFolder
    from .config import check_heads

    if not ctx.import_gguf and is_gguf(base.path) and imported_base(base.path) is None:
        return None
    folder = BaseModelFolder(resolve_base(base.path))
    check_heads(folder)
    return folder


def _base_fits(folder, base):
    """A function ``(adapter) -> None`` raising :class:`LoramixError` where an
    adapter module has no weight of fitting shape in the base: ``folder``'s
    :meth:`~loramix.io.model_folder.BaseModelFolder.module_weight_key`
    (:func:`base_folder`; None, a GGUF base not imported yet: its header's
    weights, by name and shape)."""
    from ..errors import AdapterError
    from ..gguf_import import import_preview
    from ..io.peft_layout import check_default_targets

    if folder is None:
        pre = import_preview(base.path)
        weights, model_type = pre["weights"], pre["model_type"]

        def fits(ad) -> None:
            check_default_targets([ad], model_type)
            for name, m in ad.modules.items():
                hit = next((n for n in weights if n == name or name.endswith("." + n) or n.endswith("." + name)),
                           None)  # fmt: skip
                if hit is None:
                    raise AdapterError(ad.path, f"the base has no weight for adapter module {name}")
                if sorted(weights[hit]) != sorted(m.shape):
                    raise AdapterError(ad.path, f"module {name} is {list(m.shape)}, the base's {hit} is "
                                       f"{list(weights[hit])}")  # fmt: skip

        return fits

    def fits(ad) -> None:
        check_default_targets([ad], folder.config.get("model_type"))
        for name, m in ad.modules.items():
            folder.module_weight_key(name, tuple(m.shape), (ad.config or {}).get("fan_in_fan_out"))

    return fits


def _notice_other_base(ctx, where: str, path: Path, base_path, own) -> None:
    """Warn (one line) where the adapter's provenance names another base than
    the study's (:func:`loramix.trained_base.other_base`; ``own``: the base's
    keys, read once; a GGUF base not imported yet is compared by its file's
    hash only): its shapes fit, so the study goes on. Nothing for an adapter
    that records none."""

    from ..errors import warn
    from ..trained_base import other_base

    if (seen := other_base(path, base_path, own)) is not None:
        warn(f"{ctx.path}: {where}: {path} was trained on another base ({seen}) than base.path; its "
             f"modules fit the base's shapes, so it is studied on it")  # fmt: skip


def check_given(ctx, domains: dict, base) -> tuple[str, dict[str, int]]:
    """Read every domain's given adapter and check it against the base:
    ``(kind, {domain: rank})`` (a module's smallest rank). A problem is one
    line naming the domain's key and the adapter's file."""
    import functools

    from ..trained_base import base_keys

    folder = base_folder(ctx, base)
    fits = _base_fits(folder, base)
    # read once, and only where an adapter records a base to compare it with
    own = functools.cache(functools.partial(base_keys, base.path))
    kinds: dict[str, str] = {}
    ranks: dict[str, int] = {}
    for d, spec in domains.items():
        where = f"domains.{d}.adapter"
        try:
            ad = _read(spec.adapter, d)
        except LoramixError as e:
            raise ctx.error(where, e.message) from None
        first = next(iter(kinds.items()), None)
        if first is not None and ad.kind != first[1]:
            raise ctx.error(where, f"{spec.adapter} is a {ad.kind} adapter, domains.{first[0]}.adapter a "
                            f"{first[1]} one: a study compares adapters of one kind")  # fmt: skip
        if not ad.modules:
            raise ctx.error(where, f"{spec.adapter} adapts no module")
        try:
            fits(ad)
        except LoramixError as e:
            raise ctx.error(where, f"{spec.adapter} does not fit the base: {e.problem}") from None
        _notice_other_base(ctx, where, spec.adapter, base.path, own)
        kinds[d] = ad.kind
        ranks[d] = min(int(m.rank) for m in ad.modules.values())
    return next(iter(kinds.values())), ranks
