"""What the study needs to know about adapter kinds and merge methods.

The one place the scenario package asks a question about a kind or a method
by name. Once adapter kinds carry ``needs_base`` and merge methods declare the
kinds they apply to (see docs/scenarios.md, "Methods that do not apply"),
these functions read those properties instead of the tables below.
"""

from __future__ import annotations

ADAPTER_KINDS = ("lora", "d2lora")

# Merges that do not apply to a kind of adapter (the merge methods refuse them):
# svd recompresses LoRA factors; d2-signed needs D2-LoRA adapters.
_NOT_APPLICABLE = {"svd": {"d2lora"}, "d2-signed": {"lora"}}


def applies_to(merge_method: str, adapter_kind: str) -> bool:
    """Whether ``merge_method`` can merge adapters of ``adapter_kind``."""
    return adapter_kind not in _NOT_APPLICABLE.get(merge_method, set())


def kinds_for(merge_method: str) -> list[str]:
    """The adapter kinds ``merge_method`` applies to."""
    return [k for k in ADAPTER_KINDS if applies_to(merge_method, k)]


def needs_base(adapter_kind: str) -> bool:
    """Whether an adapter's delta depends on the base weights (D2-LoRA's
    projection): the study then also reports the cosine of the effective deltas."""
    return adapter_kind == "d2lora"


def applied_on_the_fly(merge_method: str) -> bool:
    """Whether the study evaluates the merge without writing it: the naive sum
    is the adapters loaded together (``W0 + sum_i dW_i`` in the forward)."""
    return merge_method == "sum"
