"""Checks at the core's edge: each failure is one FedmamlError naming the problem and the fix."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from fedmaml.errors import FedmamlError, NonFiniteError
from fedmaml.meta.params import InnerLR

Pair = tuple[Tensor, Tensor]


def check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise FedmamlError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")


def check_steps(inner_steps: int, minimum: int = 1) -> None:
    """Training needs >= 1 inner step; an adaptation curve may have 0 (the model as it is)."""
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < minimum:
        raise FedmamlError(f"inner_steps must be an integer >= {minimum} (got {inner_steps!r})")


def check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise FedmamlError(f"chunk_size must be an integer >= 1 (got {chunk_size!r})")


def check_inner_lr(inner_lr: InnerLR) -> None:
    if isinstance(inner_lr, Mapping):
        for name, a in inner_lr.items():
            if not torch.isfinite(a).all():
                raise NonFiniteError(f"learned inner step size for {name!r} is not finite")
        return
    if isinstance(inner_lr, bool) or not isinstance(inner_lr, float | int):
        raise FedmamlError(f"inner_lr must be a number or a dict of tensors (got {inner_lr!r})")
    if not math.isfinite(inner_lr) or inner_lr <= 0:
        raise FedmamlError(f"inner_lr (α) must be a finite number > 0 (got {inner_lr})")


def check_params(model: nn.Module, theta: Mapping[str, Tensor]) -> None:
    expected = {k: p.shape for k, p in model.named_parameters()}
    missing = sorted(set(expected) - set(theta))
    unexpected = sorted(set(theta) - set(expected))
    if missing or unexpected:
        raise FedmamlError(
            "params do not match the model's parameters "
            f"(missing: {missing or 'none'}; unexpected: {unexpected or 'none'}); "
            "pass dict(model.named_parameters()) of the same architecture"
        )
    for k, shape in expected.items():
        if theta[k].shape != shape:
            raise FedmamlError(
                f"param {k!r} has shape {tuple(theta[k].shape)} but the model expects "
                f"{tuple(shape)}; the parameters come from another architecture"
            )


def as_episodes(name: str, data: Pair | Sequence[Pair]) -> list[Pair]:
    """One (x, y) pair, or a sequence of pairs (several episodes), as a list of pairs."""
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
        episodes = [data]
    elif isinstance(data, Sequence) and all(isinstance(p, tuple) and len(p) == 2 for p in data):
        episodes = list(data)
    else:
        raise FedmamlError(f"{name} must be an (x, y) pair of tensors or a list of such pairs")
    if not episodes:
        raise FedmamlError(f"{name} holds no episodes; give at least one (x, y) pair")
    for x, y in episodes:
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise FedmamlError(
                f"{name} must hold tensors (got {type(x).__name__}, {type(y).__name__})"
            )
        if x.dim() == 0 or y.dim() == 0:
            raise FedmamlError(
                f"{name} inputs and labels need a leading example dimension (got shapes "
                f"{tuple(x.shape)} and {tuple(y.shape)}); stack the examples into a batch"
            )
        if x.shape[0] == 0:
            raise FedmamlError(f"{name} set is empty; every episode needs at least one example")
        if x.shape[0] != y.shape[0]:
            raise FedmamlError(
                f"{name} has {x.shape[0]} inputs but {y.shape[0]} labels; give one label per input"
            )
    for what, tensors in (
        ("inputs", [x for x, _ in episodes]),
        ("labels", [y for _, y in episodes]),
    ):
        if not _all_finite(tensors):
            raise NonFiniteError(f"{name} {what} contain NaN or Inf; clean the data first")
    return episodes


def _all_finite(tensors: list[Tensor]) -> bool:
    """One isfinite pass per group of equal-shaped floating tensors (usually one group: a
    per-episode check costs ~2 us each, a stack of 25 small episodes ~4 us)."""
    groups: dict[tuple[torch.device, torch.dtype, torch.Size], list[Tensor]] = {}
    for t in tensors:
        if torch.is_floating_point(t):
            groups.setdefault((t.device, t.dtype, t.shape), []).append(t)
    return all(bool(torch.isfinite(torch.stack(g)).all()) for g in groups.values())


def check_pairing(support: list[Pair], query: list[Pair]) -> None:
    if len(support) != len(query):
        raise FedmamlError(
            f"{len(support)} support sets but {len(query)} query sets; give one query per support"
        )
    for (sx, sy), (qx, qy) in zip(support, query, strict=True):
        if sx.shape[1:] != qx.shape[1:] or sy.shape[1:] != qy.shape[1:]:
            raise FedmamlError(
                f"support inputs {tuple(sx.shape[1:])} / labels {tuple(sy.shape[1:])} and query "
                f"inputs {tuple(qx.shape[1:])} / labels {tuple(qy.shape[1:])} differ in shape; "
                "both must come from the same task"
            )


def check_finite(what: str, tensors: Mapping[str, Tensor]) -> None:
    bad = [k for k, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteError(
            f"{what} is NaN or Inf (in {', '.join(bad[:5])}); lower inner_lr, or check the data "
            "for extreme values; nothing was updated"
        )
