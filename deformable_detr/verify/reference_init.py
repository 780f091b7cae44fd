"""The "ddetr-init-v1" weights of the reference vectors: every state_dict entry drawn from a generator seeded by
the CRC32 of its name, so that two implementations with the same parameter names get the same weights."""

from __future__ import annotations

import math
import zlib

import torch
from torch import Tensor, nn


def draw_ddetr_init_v1(name: str, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """The float32 CPU tensor that ddetr-init-v1 assigns to state_dict entry ``name`` of ``shape``."""
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    shape = tuple(shape)
    if name.endswith("running_var"):
        return 0.5 + torch.rand(shape, generator=generator)
    if name.endswith("running_mean"):
        return 0.1 * torch.randn(shape, generator=generator)
    if len(shape) == 1 and name.endswith(".weight"):
        return 1 + 0.1 * torch.randn(shape, generator=generator)
    if len(shape) <= 1:
        return 0.02 * torch.randn(shape, generator=generator)
    return torch.randn(shape, generator=generator) / math.sqrt(math.prod(shape[1:]))


def apply_ddetr_init_v1(model: nn.Module) -> None:
    """Loads ddetr-init-v1 into ``model`` (strictly). Tied entries end up with the draw of their last name in
    state_dict order, as ``load_state_dict`` copies entries in that order."""
    state = model.state_dict()
    drawn = {
        name: draw_ddetr_init_v1(name, tensor.shape).to(tensor.dtype)
        for name, tensor in state.items()
        if not name.endswith("num_batches_tracked")
    }
    model.load_state_dict(drawn, strict=True)
