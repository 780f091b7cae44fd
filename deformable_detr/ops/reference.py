"""Pure-PyTorch multi-scale deformable attention: the specification every other backend is tested against.

Each level is sampled with one ``F.grid_sample`` call (bilinear, zero padding, ``align_corners=False``), which is
the formulation of the paper (eq. 3) and of the official ``ms_deform_attn_core_pytorch``. It works for any float
dtype (float64 included, for gradcheck) and on any device, and autograd gives its backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def ms_deform_attn_reference(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention, sum over levels l and points k of A_{lk} * V_l(p_{lk}).

    Args:
        value: (batch, sum(H_l * W_l), num_heads, head_dim), levels concatenated in ``spatial_shapes`` order.
        spatial_shapes: (H_l, W_l) per level, as Python ints.
        sampling_locations: (batch, num_queries, num_heads, num_levels, num_points, 2), (x, y) normalised so
            that (0, 0) is the top-left corner of the map and (1, 1) the bottom-right one.
        attention_weights: (batch, num_queries, num_heads, num_levels, num_points).

    Returns:
        (batch, num_queries, num_heads * head_dim)
    """
    batch, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    value_per_level = value.split([height * width for height, width in spatial_shapes], dim=1)
    # grid_sample wants [-1, 1] coordinates.
    sampling_grids = 2 * sampling_locations - 1
    sampled_per_level = []
    for level, (height, width) in enumerate(spatial_shapes):
        # (batch, H*W, heads, head_dim) -> (batch*heads, head_dim, H, W)
        value_level = value_per_level[level].flatten(2).transpose(1, 2)
        value_level = value_level.reshape(batch * num_heads, head_dim, height, width)
        # (batch, queries, heads, points, 2) -> (batch*heads, queries, points, 2)
        grid_level = sampling_grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # (batch*heads, head_dim, queries, points)
        sampled_per_level.append(
            F.grid_sample(value_level, grid_level, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # (batch, queries, heads, levels, points) -> (batch*heads, 1, queries, levels*points)
    weights = attention_weights.transpose(1, 2).reshape(batch * num_heads, 1, num_queries, num_levels * num_points)
    # (batch*heads, head_dim, queries, levels*points) -> (batch*heads, head_dim, queries)
    output = (torch.stack(sampled_per_level, dim=-2).flatten(-2) * weights).sum(-1)
    # (batch, heads*head_dim, queries) -> (batch, queries, heads*head_dim)
    return output.view(batch, num_heads * head_dim, num_queries).transpose(1, 2).contiguous()
