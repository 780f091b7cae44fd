"""Sine position encoding of the feature maps (Vaswani et al. 2017, extended to 2-D as in DETR)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """2-D sine/cosine encoding of the pixel coordinates, counted over the valid (unpadded) pixels only.

    Deformable DETR normalises each coordinate to (0, scale] with a half-pixel shift (``offset`` 0.5), so that the
    encoding of a pixel does not depend on how much padding its image received in the batch; DETR normalises the
    pixel count itself (``offset`` 0: ``count / last count * scale``).
    """

    def __init__(
        self, num_pos_feats: int = 128, temperature: float = 10000.0, normalize: bool = True,
        scale: float = 2 * math.pi, offset: float = 0.5,
    ) -> None:
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be even (sin/cos pairs), got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.offset = offset
        # Computed once on the CPU and moved with the module: CUDA's pow differs from the CPU's by an ulp, and the
        # padded pixels' coordinates (-0.5 / 1e-6 * scale, about -3e6) turn that ulp into sines that differ by 1e-2.
        # Those pixels never reach the outputs (masked in the attention), but their encoder features did differ
        # between devices (seen on an H200 against the CPU-made reference files). Not saved in the state_dict.
        exponents = 2 * (torch.arange(num_pos_feats, dtype=torch.float32) // 2) / num_pos_feats
        self.register_buffer("dim_t", temperature**exponents, persistent=False)

    def forward(self, mask: Tensor) -> Tensor:
        """mask: (batch, H, W) bool, True on padding -> (batch, 2 * num_pos_feats, H, W) float32, (y, x) halves."""
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            # x - 0.0 is x exactly: DETR's numbers are unchanged by the subtraction.
            y_embed = (y_embed - self.offset) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed - self.offset) / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = self.dim_t.float()
        # (batch, H, W, num_pos_feats), sin on even features and cos on odd ones, interleaved
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
