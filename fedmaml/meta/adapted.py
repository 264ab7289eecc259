"""Which parameters the inner loop adapts: all of them (MAML), the head (ANIL), or named ones.

Writing h for the adapted parameters and b for the rest (the body), one inner step is

    θ'_h = θ_h − α ⊙ ∇_h L_S(θ),   θ'_b = θ_b

so head-only adaptation leaves the body exactly as it was (the same tensors), and only the
adapted parameters get an inner gradient: the inner backward pass stops at the head.
"""

from __future__ import annotations

from collections.abc import Collection

from torch import nn

from fedmaml.errors import FedmamlError
from fedmaml.meta.choices import ADAPTED

Adapted = str | Collection[str]


def head_names(model: nn.Module) -> tuple[str, ...]:
    """The parameter names of the model's head: the last module, in registration order, that
    owns parameters (the output layer of an ``nn.Sequential``, as every built-in model is)."""
    head: tuple[str, list[str]] | None = None
    for prefix, module in model.named_modules():
        own = [name for name, _ in module.named_parameters(recurse=False)]
        if own:
            head = (prefix, own)
    if head is None:
        raise FedmamlError("the model has no parameters to adapt")
    prefix, own = head
    return tuple(f"{prefix}.{name}" if prefix else name for name in own)


def adapted_names(model: nn.Module, adapted: Adapted) -> tuple[str, ...] | None:
    """The names of the parameters to adapt, in the model's order; None when that is all of
    them (the inner loop's plain path)."""
    if isinstance(adapted, str):
        if adapted == "all":
            return None
        if adapted == "head":
            return head_names(model)
        raise FedmamlError(
            f"unknown adapted parameters {adapted!r}; choose one of {', '.join(ADAPTED)} or "
            "give a collection of parameter names"
        )
    names = set(adapted)
    known = [name for name, _ in model.named_parameters()]
    if not names:
        raise FedmamlError("no parameters to adapt; give 'all', 'head' or parameter names")
    unknown = sorted(names - set(known))
    if unknown:
        raise FedmamlError(
            f"the model has no parameter(s) {unknown} to adapt; give names from "
            f"model.named_parameters(): {', '.join(known)}"
        )
    chosen = tuple(name for name in known if name in names)
    return None if len(chosen) == len(known) else chosen
