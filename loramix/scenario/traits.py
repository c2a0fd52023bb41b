"""What the study needs to know about adapter kinds and merge methods.

The study never asks by name: a merge method declares the kinds it applies to
(``MergeMethod.kinds``) and whether it equals the adapters applied together
in the forward (``MergeMethod.attachable``); an adapter kind declares whether
its delta depends on the base (``AdapterKind.needs_base``).
"""

from __future__ import annotations

from typing import NamedTuple

from ..methods.base import LORA


def trainable_kinds() -> tuple[str, ...]:
    """The kinds a study can train: those whose files do not set
    ``trainable = False`` (read from the files, torch-free:
    :func:`loramix.discovery.declared`), LoRA first, then by name."""
    from ..discovery import declared

    names = [n for n, d in declared("loramix.kinds", "AdapterKind").items() if d.get("trainable", True)]
    return tuple(sorted(names, key=lambda n: (n != LORA, n)))


# The kinds a study can train, as the package holds them (the schema's choices).
ADAPTER_KINDS = trainable_kinds()


INITS = ("data", "shared")


def parse_label(label: str) -> tuple[str, str | None, str | None]:
    """A study's adapter label ``KIND[@R][:INIT]`` (that kind, at rank ``R``,
    initialised by ``INIT``) as ``(KIND, R or None, INIT or None)``."""
    head, _, init = label.partition(":")
    kind, _, rank = head.partition("@")
    return kind, rank or None, init or None


def kind_of(label: str) -> str:
    """The adapter kind of a label (:func:`parse_label`)."""
    return parse_label(label)[0]


def rank_of(label: str, default: int) -> int:
    """The rank of a label: ``R`` for ``KIND@R``, else ``default``."""
    r = parse_label(label)[1]
    return int(r) if r else default


def init_of(label: str, default: str) -> str:
    """The initialisation of a label: ``INIT`` for ``KIND:INIT``, else ``default``."""
    return parse_label(label)[2] or default


def _method(name: str):
    from ..methods import get_method

    return get_method(name)


def applies_to(merge_method: str, adapter_kind: str) -> bool:
    """Whether ``merge_method`` can merge adapters of ``adapter_kind``."""
    return _method(merge_method).applies_to(kind_of(adapter_kind))


def kinds_for(merge_method: str) -> list[str]:
    """The trainable adapter kinds ``merge_method`` applies to."""
    return [k for k in trainable_kinds() if applies_to(merge_method, k)]


def needs_base(adapter_kind: str) -> bool:
    """Whether an adapter's delta depends on the base weights (D2-LoRA's
    projection): the study then also reports the cosine of the effective deltas.
    Until the kinds are imported, their files say it (``scenario check``, a plan,
    needs no torch); ``AdapterKind.needs_base`` is False unless a kind sets it."""
    return kind_traits(adapter_kind).needs_base


class KindTraits(NamedTuple):
    """What the study says of an adapter kind (the attributes of :class:`~loramix.kinds.base.AdapterKind`)."""

    label: str
    options: dict
    needs_base: bool


def kind_traits(adapter_kind: str) -> KindTraits:
    """The label, options (``tau``, ...) and ``needs_base`` of a label's kind.
    Until the kinds are imported, read from their files (literals; unset: the
    base class's defaults), so a plan or a report of a study read back from
    the cache imports no torch; then from the registry."""
    import sys

    name = kind_of(adapter_kind)
    if "loramix.kinds" not in sys.modules:
        from ..discovery import declared

        if (d := declared("loramix.kinds", "AdapterKind").get(name)) is not None:
            return KindTraits(
                d.get("label", ""), dict(d.get("options", {})), bool(d.get("needs_base", False))
            )
    from ..kinds import get_kind

    k = get_kind(name)
    return KindTraits(k.label, dict(k.options), bool(k.needs_base))


def applied_on_the_fly(merge_method: str) -> bool:
    """Whether the study evaluates the merge without writing it: a merge equal to
    the adapters loaded together (``W0 + sum_i dW_i`` in the forward)."""
    return _method(merge_method).attachable
