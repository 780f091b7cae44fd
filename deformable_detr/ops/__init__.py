"""Multi-scale deformable attention (MSDA), one public call with per-device backends.

``ms_deform_attn`` validates its inputs and dispatches to a backend. ``reference`` (pure PyTorch, in
``reference.py``) is always importable and is the specification the faster backends are tested against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from deformable_detr.ops.reference import ms_deform_attn_reference

BACKENDS = ("reference",)


def _check_inputs(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]] | Tensor,
    level_start_index: Tensor | None,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> list[tuple[int, int]]:
    """Checks ranks, sizes and dtypes; returns ``spatial_shapes`` as a list of Python (H, W) pairs."""
    if isinstance(spatial_shapes, Tensor):
        # A tensor costs one device->host copy here; callers that care pass a list.
        spatial_shapes = [tuple(int(s) for s in hw) for hw in spatial_shapes.tolist()]
    shapes = [tuple(hw) for hw in spatial_shapes]
    if not shapes or any(len(hw) != 2 or hw[0] < 1 or hw[1] < 1 for hw in shapes):
        raise ValueError(f"spatial_shapes must be a non-empty list of positive (H, W) pairs, got {spatial_shapes}")
    if value.dim() != 4:
        raise ValueError(
            f"value must have shape (batch, sum(H_l * W_l), num_heads, head_dim), got {tuple(value.shape)}"
        )
    if not value.is_floating_point():
        raise ValueError(f"value must be a floating-point tensor, got {value.dtype}")
    batch, num_values, num_heads, _ = value.shape
    expected_values = sum(h * w for h, w in shapes)
    if num_values != expected_values:
        raise ValueError(
            f"value has {num_values} positions on dim 1 but spatial_shapes {shapes} sum to {expected_values}"
        )
    num_levels = len(shapes)
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            "sampling_locations must have shape (batch, num_queries, num_heads, num_levels, num_points, 2), "
            f"got {tuple(sampling_locations.shape)}"
        )
    if sampling_locations.shape[0] != batch or sampling_locations.shape[2] != num_heads:
        raise ValueError(
            f"sampling_locations {tuple(sampling_locations.shape)} does not match value {tuple(value.shape)} "
            "in batch (dim 0) or num_heads (dim 2)"
        )
    if sampling_locations.shape[3] != num_levels:
        raise ValueError(
            f"sampling_locations has {sampling_locations.shape[3]} levels on dim 3, spatial_shapes has {num_levels}"
        )
    expected_weights = tuple(sampling_locations.shape[:5])
    if tuple(attention_weights.shape) != expected_weights:
        raise ValueError(
            "attention_weights must have shape (batch, num_queries, num_heads, num_levels, num_points) = "
            f"{expected_weights}, got {tuple(attention_weights.shape)}"
        )
    for name, tensor in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if tensor.dtype != value.dtype:
            raise ValueError(f"{name} has dtype {tensor.dtype}, value has {value.dtype}; they must agree")
        if tensor.device != value.device:
            raise ValueError(f"{name} is on {tensor.device}, value on {value.device}; they must agree")
    if level_start_index is not None and level_start_index.shape != (num_levels,):
        raise ValueError(f"level_start_index must have shape ({num_levels},), got {tuple(level_start_index.shape)}")
    return shapes


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]] | Tensor,
    level_start_index: Tensor | None,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    backend: str = "auto",
) -> Tensor:
    """Multi-scale deformable attention (Zhu et al. 2020, eq. 3).

    Args:
        value: (batch, sum(H_l * W_l), num_heads, head_dim).
        spatial_shapes: (num_levels, 2) as a list of (H_l, W_l) ints (preferred: no device sync) or an int64 tensor.
        level_start_index: (num_levels,) start of each level on dim 1 of ``value``; only checked here (the
            reference derives it from ``spatial_shapes``), kept so that kernels taking it share the signature.
        sampling_locations: (batch, num_queries, num_heads, num_levels, num_points, 2), (x, y) in [0, 1] on the
            map (points outside read zeros).
        attention_weights: (batch, num_queries, num_heads, num_levels, num_points).
        backend: ``"auto"`` or one of ``BACKENDS``.

    Returns:
        (batch, num_queries, num_heads * head_dim), dtype of ``value``.
    """
    shapes = _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"unknown MSDA backend {backend!r}; valid: 'auto', " + ", ".join(map(repr, BACKENDS)))
    return ms_deform_attn_reference(value, shapes, sampling_locations, attention_weights)


def level_start_index_of(spatial_shapes: list[tuple[int, int]], device: torch.device | None = None) -> Tensor:
    """(num_levels,) int64: offset of each level in the concatenated (sum(H_l * W_l)) axis."""
    starts, total = [], 0
    for height, width in spatial_shapes:
        starts.append(total)
        total += height * width
    return torch.tensor(starts, dtype=torch.long, device=device)


__all__ = ["BACKENDS", "level_start_index_of", "ms_deform_attn", "ms_deform_attn_reference"]
