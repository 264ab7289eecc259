"""The outer update: a torch optimizer over the meta-parameters, fed with averaged meta-gradients.

    SGD:  θ ← θ − β ḡ          (MAML's outer step, ḡ the mean meta-gradient of the meta-batch)
    Adam: θ ← Adam(θ, ḡ; β)    (moments kept across steps)

One class serves centralized meta-training and the Flower server alike, so both apply exactly
the same update; its state dict goes into every checkpoint. A step whose result is not finite
(θ, or the optimizer's state: Adam's second moment overflows on a huge but finite gradient) is
rolled back, so θ and the state stay those of the last good step.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from fedmaml.errors import FedmamlError, NonFiniteError
from fedmaml.meta.choices import META_OPTIMIZERS
from fedmaml.meta.params import Params
from fedmaml.meta.validate import check_choice, check_finite


class MetaOptimizer:
    """Owns θ (∪ α) as leaf tensors and applies one optimizer step per averaged meta-gradient."""

    def __init__(self, params: Mapping[str, Tensor], kind: str = "adam", lr: float = 1e-3) -> None:
        check_choice("meta-optimizer", kind, META_OPTIMIZERS)
        if not lr > 0:
            raise FedmamlError(f"meta learning rate must be > 0 (got {lr})")
        self.kind = kind
        self.params = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
        tensors = list(self.params.values())
        self.optimizer: torch.optim.Optimizer = (
            torch.optim.Adam(tensors, lr=lr) if kind == "adam" else torch.optim.SGD(tensors, lr=lr)
        )

    def step(self, grads: Mapping[str, Tensor]) -> Params:
        """Apply one update with ``grads`` (same keys as the params); return the new params.

        Non-finite or mismatched gradients raise before anything changes; a step that leaves θ
        or the optimizer state non-finite is undone and raises :class:`NonFiniteError`.
        """
        if set(grads) != set(self.params):
            missing = sorted(set(self.params) - set(grads))
            extra = sorted(set(grads) - set(self.params))
            raise FedmamlError(
                f"meta-gradient keys do not match the meta-parameters (missing {missing}, "
                f"unexpected {extra})"
            )
        for k, g in grads.items():
            if g.shape != self.params[k].shape:
                raise FedmamlError(
                    f"meta-gradient {k!r} has shape {tuple(g.shape)}, expected "
                    f"{tuple(self.params[k].shape)}"
                )
        check_finite("the averaged meta-gradient", dict(grads))
        saved = self.current(), copy.deepcopy(self.optimizer.state_dict())
        for k, p in self.params.items():
            p.grad = grads[k].detach().to(p.device, p.dtype).clone()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        bad = [k for k, p in self.params.items() if not _finite(p, self.optimizer.state.get(p))]
        if bad:
            self._restore(*saved)
            raise NonFiniteError(
                f"the meta-update made {', '.join(bad[:5])} (or its optimizer state) NaN or Inf; "
                "it was undone, θ and the optimizer state are those before it"
            )
        return self.current()

    def _restore(self, params: Params, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(params[k])
        self.optimizer.load_state_dict(state)

    def set_lr(self, lr: float) -> float:
        """Use step size ``lr`` from now on (e.g. after loading a state dict, which restores the
        saved one); return the one it replaces."""
        old = float(self.optimizer.param_groups[0]["lr"])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return old

    def current(self) -> Params:
        return {k: v.detach().clone() for k, v in self.params.items()}

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.optimizer.load_state_dict(state)
        except (ValueError, KeyError) as exc:
            raise FedmamlError(
                f"the checkpoint's meta-optimizer state does not fit this run ({exc}); resume "
                "with the same meta-optimizer and model, or start a new run"
            ) from None


def _finite(param: Tensor, state: Mapping[str, Any] | None) -> bool:
    """θ and every tensor of its optimizer state (Adam's moments) are finite."""
    tensors = [param, *(v for v in (state or {}).values() if isinstance(v, Tensor))]
    return all(bool(torch.isfinite(t).all()) for t in tensors)
