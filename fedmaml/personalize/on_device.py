"""On-device personalization: the ClientApp's entry point, which returns metrics only."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from fedmaml.checkpoint import Checkpoint
from fedmaml.errors import FedmamlError
from fedmaml.personalize.one_user import personalize
from fedmaml.tasks.episodes import ClientData


def personalize_client(
    params: Mapping[str, Tensor],
    model: str,
    client_data: ClientData,
    *,
    save_to: str | os.PathLike,
    model_kwargs: Mapping[str, int] | None = None,
    config: Mapping[str, Any] | None = None,
    steps: int | None = None,
    lr: float | None = None,
    support_size: int | None = None,
    seed: int = 0,
    recipe: Mapping[str, Any] | None = None,
    inputs: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """On-device personalization: adapt θ (∪ α) received from the server on the client's own
    training pool, evaluate on its held-out pool, save θ'_K to ``save_to`` on the device, and
    return only the metrics (no parameters or data leave the device).

    ``model`` is the registry name (e.g. ``cfg.model_name``) and ``config`` the run config
    mapping (``cfg.to_mapping()``). ``recipe``: the run's personalization recipe (its
    ``steps``, ``lr``, ``adapt``, chosen on validation clients), which gives the defaults; without
    one, the run's ``eval-steps`` and ``inner-lr`` do. ``steps`` and ``lr`` override both.
    ``inputs``: the run's input preprocessing, recorded in the saved model.
    """
    if client_data.x_test is None:
        raise FedmamlError(
            f"client {client_data.client_id!r} has no held-out pool to measure personalization "
            "on; give it a test split"
        )
    ckpt = Checkpoint(
        params=dict(params), model=model, model_kwargs=dict(model_kwargs or {}),
        config=dict(config or {}), recipe=dict(recipe) if recipe else None,
        inputs=dict(inputs) if inputs else None,
    )  # fmt: skip
    result = personalize(
        ckpt, client_data, steps=steps, lr=lr, support_size=support_size, seed=seed
    )
    result.save(save_to)
    return result.metrics()
