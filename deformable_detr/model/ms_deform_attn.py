"""The multi-scale deformable attention module (Zhu et al. 2020, sec. 4.1, eq. 3)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deformable_detr.device import upload
from deformable_detr.ops import ms_deform_attn


class MSDeformAttn(nn.Module):
    """Each query attends to ``num_points`` sampled positions per head and level around its reference point.

    Parameter names (``sampling_offsets``, ``attention_weights``, ``value_proj``, ``output_proj``) and the
    initialisation are the official ones, so official checkpoints load strictly.
    """

    def __init__(self, d_model: int = 256, num_levels: int = 4, num_heads: int = 8, num_points: int = 4,
                 backend: str = "auto") -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        for name, value in (("num_levels", num_levels), ("num_heads", num_heads), ("num_points", num_points)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.d_model = d_model
        self.num_levels = num_levels
        self.num_heads = num_heads
        self.num_points = num_points
        self.backend = backend
        self.sampling_offsets = nn.Linear(d_model, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(d_model, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Offsets start at zero weight and a bias that spreads each head in its own direction (angles 2*pi*m/M,
        # scaled to the unit square's border), with point k at distance k+1: a dilated star of initial samples.
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        # (heads, levels, points, 2)
        grid = directions.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        # Uniform attention at the start.
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def sampling_locations_and_weights(self, query: Tensor, reference_points: Tensor,
                                       spatial_shapes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        """Where each query samples and how much each sample weighs (eq. 3: p_q + delta p_mlqk and A_mlqk).

        ``forward`` calls this, and so can a hook that wants to show the samples (``ddetr predict
        --show-sampling-points``): both see the same numbers by construction.

        Args:
            query: (batch, num_queries, d_model), content plus position embedding.
            reference_points: (batch, num_queries, num_levels, 2) points (x, y) in [0, 1], or
                (batch, num_queries, num_levels, 4) boxes (cx, cy, w, h): offsets are then relative to the box size.
            spatial_shapes: (H_l, W_l) per level, Python ints.

        Returns:
            sampling_locations: (batch, num_queries, num_heads, num_levels, num_points, 2), (x, y) normalised to
            each level's (padded) map; attention_weights: (batch, num_queries, num_heads, num_levels, num_points),
            summing to 1 over levels and points of each head.
        """
        batch, num_queries, _ = query.shape
        if reference_points.dim() != 4 or reference_points.shape[-1] not in (2, 4):
            raise ValueError(
                "reference_points must have shape (batch, num_queries, num_levels, 2 or 4), "
                f"got {tuple(reference_points.shape)}"
            )
        if len(spatial_shapes) != self.num_levels:
            raise ValueError(f"spatial_shapes has {len(spatial_shapes)} levels, the module has {self.num_levels}")
        # (batch, queries, heads, levels, points, 2)
        sampling_offsets = self.sampling_offsets(query).view(
            batch, num_queries, self.num_heads, self.num_levels, self.num_points, 2
        )
        # softmax over the levels*points of each head -> (batch, queries, heads, levels, points)
        attention_weights = self.attention_weights(query).view(
            batch, num_queries, self.num_heads, self.num_levels * self.num_points
        )
        attention_weights = F.softmax(attention_weights, -1).view(
            batch, num_queries, self.num_heads, self.num_levels, self.num_points
        )
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: normalise by (W_l, H_l).
            offset_normalizer = upload(
                torch.tensor([[width, height] for height, width in spatial_shapes], dtype=query.dtype), query.device
            )
            sampling_locations = (
                reference_points[:, :, None, :, None, :]
                + sampling_offsets / offset_normalizer[None, None, None, :, None, :]
            )
        else:
            # Offsets are fractions of half the reference box, divided among the points.
            sampling_locations = (
                reference_points[:, :, None, :, None, :2]
                + sampling_offsets / self.num_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        return sampling_locations, attention_weights

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        spatial_shapes: list[tuple[int, int]],
        level_start_index: Tensor,
        input_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """
        Args:
            query: (batch, num_queries, d_model), content plus position embedding.
            reference_points: (batch, num_queries, num_levels, 2) points (x, y) in [0, 1], or
                (batch, num_queries, num_levels, 4) boxes (cx, cy, w, h): offsets are then relative to the box size.
            input_flatten: (batch, sum(H_l * W_l), d_model), the levels' features concatenated.
            spatial_shapes: (H_l, W_l) per level, Python ints.
            level_start_index: (num_levels,) int64.
            input_padding_mask: (batch, sum(H_l * W_l)) bool, True on padding (its values read as zero).

        Returns:
            (batch, num_queries, d_model)
        """
        sampling_locations, attention_weights = self.sampling_locations_and_weights(
            query, reference_points, spatial_shapes
        )
        batch, num_values, _ = input_flatten.shape
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        # (batch, values, heads, head_dim)
        value = value.view(batch, num_values, self.num_heads, self.d_model // self.num_heads)
        output = ms_deform_attn(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend=self.backend
        )
        return self.output_proj(output)
