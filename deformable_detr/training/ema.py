"""An exponential moving average (EMA) of the model's weights, kept next to the training model (``--ema``).

After the ``n``-th optimizer step (``n`` = 1, 2, ...) every trained parameter ``theta`` moves its average ``e``::

    d_n = decay * (1 - exp(-n / tau))          (tau = 0: d_n = decay, no warm-up)
    e  <- d_n * e + (1 - d_n) * theta          (torch.lerp(e, theta, 1 - d_n), one foreach pass over the tensors)

``e`` starts as a copy of the model's weights. This is the YOLOX formula that mmdetection ports as
``ExpMomentumEMA`` (``mmdet/models/layers/ema.py``: its ``momentum`` is ``1 - decay``, its ``gamma`` our ``tau``, its
momentum ``(1 - momentum) * exp(-(1 + steps) / gamma) + momentum`` is ``1 - d_n`` with ``n = steps + 1``; only at
the first update does mmengine's averaged model copy the weights, where this formula gives them weight
``1 - d_1``, 0.9995 with the defaults), with its defaults (decay 0.9998, tau 2000). ``tau`` 0 gives the constant
decay of detrex (``detrex/modeling/ema.py``, from d2go; its default decay is 0.999). The warm-up lets the average
follow the fast early changes of training instead of keeping the initial weights for thousands of steps.

What is not trained (the frozen batch norms' buffers, the frozen ResNet stem and layer1, any buffer) is copied from
the model at each update, not averaged: mmengine's default (``update_buffers=False``); detrex averages the buffers
too, which for these constant tensors gives the same values up to rounding. Integer tensors are copied.

An update belongs after each optimizer step that was applied; a step that the fp16 gradient scaler skipped (inf/nan
gradients) is no update (``train_one_epoch`` tells them apart). With DDP the average is of the unwrapped model, the
same on every process.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from deformable_detr.checkpoint import CheckpointError, load_model_state


def unwrap(model: nn.Module) -> nn.Module:
    """The model behind DistributedDataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers, in
    either order."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def ema_decay(updates: int, decay: float, tau: float) -> float:
    """``d_n`` of the module docstring for the ``updates``-th update (1-based): ``decay * (1 - exp(-n / tau))``,
    ``decay`` for ``tau`` 0."""
    return decay * (1.0 - math.exp(-updates / tau)) if tau > 0 else decay


class ModelEMA:
    """The moving average of ``model`` (see the module docstring): ``module`` is a copy of the model, in eval mode
    and without gradients, that holds the averaged weights; evaluate it, save its ``state_dict()``.

    ``decay`` in [0, 1); ``tau`` >= 0 (updates). ``updates``: how many updates the average has had (resumed from a
    checkpoint by :meth:`load_state_dict`).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998, tau: float = 2000.0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        if not 0.0 <= tau < math.inf:
            raise ValueError(f"tau must be a finite number >= 0, got {tau!r}")
        self.decay, self.tau = float(decay), float(tau)
        self.updates = 0
        self.module = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """The ``d_n`` the next update uses."""
        return ema_decay(self.updates + 1, self.decay, self.tau)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One update from ``model`` (the training model, wrapped or not), after an applied optimizer step."""
        source = unwrap(model)
        averaged, trained, copied, sources = [], [], [], []
        own_parameters = list(self.module.parameters())
        parameters = list(source.parameters())
        own_buffers, buffers = list(self.module.buffers()), list(source.buffers())
        if len(own_parameters) != len(parameters) or len(own_buffers) != len(buffers):
            raise ValueError(f"the model has {len(parameters)} parameters and {len(buffers)} buffers, its average "
                             f"{len(own_parameters)} and {len(own_buffers)}: not the model the average was made of")
        for own, parameter in zip(own_parameters, parameters):
            if parameter.requires_grad and parameter.is_floating_point():
                averaged.append(own)
                trained.append(parameter.detach())
            else:
                copied.append(own)
                sources.append(parameter.detach())
        copied += own_buffers
        sources += buffers
        self.updates += 1
        weight = 1.0 - ema_decay(self.updates, self.decay, self.tau)
        if averaged:
            torch._foreach_lerp_(averaged, trained, weight)
        if copied:
            torch._foreach_copy_(copied, sources)

    def state_dict(self) -> dict[str, Any]:
        """What the checkpoint keeps (its ``ema`` entry): ``{"model": the averaged state_dict, "updates": n,
        "decay": ..., "tau": ...}``; decay and tau are for information (a resumed run takes its flags')."""
        return {"model": self.module.state_dict(), "updates": self.updates, "decay": self.decay, "tau": self.tau}

    def load_state_dict(self, state: dict[str, Any], source: str = "checkpoint") -> None:
        """Restores the average and its update count from :meth:`state_dict`'s dict (a checkpoint's ``ema``)."""
        updates = state.get("updates") if isinstance(state, dict) else None
        if not isinstance(updates, int) or isinstance(updates, bool) or updates < 0 or not isinstance(
                state.get("model"), dict):
            raise CheckpointError(f"{source}: its 'ema' entry is unreadable (expected {{'model': state_dict, "
                                  f"'updates': int >= 0, ...}}, found {str(state)[:100]})")
        try:
            load_model_state(self.module, state["model"])
        except CheckpointError as error:
            raise CheckpointError(f"{source}: its EMA weights: {error}") from error
        self.updates = updates

