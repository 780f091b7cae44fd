"""Triton forward and backward kernels for multi-scale deformable attention (MSDA).

The numerics are those of ``reference.py`` (bilinear sampling, zero padding, ``align_corners=False``): a sample at
normalised (x, y) on a level of size (H, W) reads pixel coordinates (x * W - 0.5, y * H - 0.5), and neighbours outside
the map read 0.

Work decomposition (both kernels): one program per (query block, head, batch element). A program holds a
(BLOCK_Q, BLOCK_D) tile (queries x head channels), loops over levels and points, and for every (level, point) gathers
the four bilinear neighbours as (BLOCK_Q, BLOCK_D) tiles. Each neighbour row is ``head_dim`` contiguous values of one
head at one pixel, so the loads are coalesced along D. BLOCK_D is ``head_dim`` rounded up to a power of two (Triton
ranges must be powers of two) and the padding lanes are masked off, so any ``head_dim`` works.

* Forward: accumulates sum_{l,p} A_{lp} * bilinear(V_l, p_{lp}) in registers (float32, or float64 for float64 input)
  and writes one output tile; nothing of size batch x queries x heads x levels x points x head_dim is materialised.
* Backward: per (level, point) it reduces grad_output . neighbour over D once per neighbour (4 dot products per
  query), from which the gradients of the attention weight and of both coordinates follow by scalar arithmetic;
  those values are owned by exactly one program and are stored directly. grad_value receives
  A * bilinear_weight * grad_output at each neighbour, and several queries (and programs) hit the same pixel, so it is
  scattered with atomic adds into a float32 (float64 for float64 input) buffer that is cast to the input dtype at the
  end. The order of atomic adds varies between runs, and so may the last bits of grad_value.
* Deterministic backward (``deterministic=True``; the op asks for it under ``torch.use_deterministic_algorithms``):
  instead of the atomic adds the backward kernel records each neighbour's grad_value row and weight; a stable sort
  groups the records by row, and ``_gather_grad_value_kernel`` (one program per grad_value row) adds them up in the
  sorted order, which is fixed, so grad_value is the same bits on every run.

NaN and inf propagate as in the reference on CPU, with the guarantees that ``cpu.py`` states, except that in the
forward an infinite attention weight gives NaN where the reference gives +-inf (see the forward kernel).

Half-precision inputs (float16 / bfloat16) are loaded and up-cast: all arithmetic is float32, results are rounded once
when stored. On a machine without a GPU, set ``TRITON_INTERPRET=1`` before importing Triton to run these kernels on CPU
tensors (that is how CI tests them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["msda_backward", "msda_forward"]


@triton.jit
def _bilinear_corners(loc_ptr, loc_offsets, q_mask, height, width, level_start, ACC_DTYPE: tl.constexpr):
    """Bilinear set-up of one (level, point) for a block of queries, (BLOCK_Q,) each.

    Returns the fractional parts (lx, ly) of the pixel coordinates, the row of the top-left neighbour in value's
    pixel axis (level start + y0 * W + x0; the other three neighbours are one pixel right, one row down, or both) and
    the validity of the four neighbours (top-left, top-right, bottom-left, bottom-right): neighbours outside the map
    are invalid, so they read 0 and receive no gradient.
    """
    width_f = width.to(ACC_DTYPE)
    height_f = height.to(ACC_DTYPE)
    x = tl.load(loc_ptr + loc_offsets, mask=q_mask, other=0.0).to(ACC_DTYPE) * width_f - 0.5
    y = tl.load(loc_ptr + loc_offsets + 1, mask=q_mask, other=0.0).to(ACC_DTYPE) * height_f - 0.5
    x0_f = tl.floor(x)
    y0_f = tl.floor(y)
    # Anything left of -1 or right of W has all four neighbours outside (reads 0, gradient 0), so clamping to
    # [-2, W + 1] changes no index that is read but keeps the float->int conversion in range for wild locations;
    # NaN fails the comparison and goes to -2. The fractional parts come from the unclamped x and y: a NaN/inf
    # location gives NaN bilinear weights, which make the output and gradients NaN where the reference's are.
    x0 = tl.where(x0_f > -2.0, tl.minimum(x0_f, width_f + 1.0), -2.0).to(tl.int32)
    y0 = tl.where(y0_f > -2.0, tl.minimum(y0_f, height_f + 1.0), -2.0).to(tl.int32)

    # Column / row validity is shared by two neighbours each: 8 comparisons instead of 16.
    col0 = (x0 >= 0) & (x0 < width)
    col1 = (x0 >= -1) & (x0 < width - 1)
    row0 = q_mask & (y0 >= 0) & (y0 < height)
    row1 = q_mask & (y0 >= -1) & (y0 < height - 1)
    # level_start is int64, so the row is int64 (and so are the offsets made from it: maps times heads times
    # head_dim can exceed 2**31).
    row00 = level_start + y0 * width + x0
    return x - x0_f, y - y0_f, row00, row0 & col0, row0 & col1, row1 & col0, row1 & col1


@triton.jit
def _neighbour_tiles(row00, v00, v01, v10, v11, width, row_stride, d_offsets, d_mask):
    """The four neighbours of :func:`_bilinear_corners` as (BLOCK_Q, BLOCK_D) offsets from the head's base in value,
    and their masks. The masked-off offsets may be out of range; they are never read."""
    o00 = (row00 * row_stride)[:, None] + d_offsets[None, :]
    o01 = o00 + row_stride
    o10 = o00 + width * row_stride
    o11 = o10 + row_stride
    m00 = v00[:, None] & d_mask[None, :]
    m01 = v01[:, None] & d_mask[None, :]
    m10 = v10[:, None] & d_mask[None, :]
    m11 = v11[:, None] & d_mask[None, :]
    return o00, m00, o01, m01, o10, m10, o11, m11


@triton.jit
def _bilinear_neighbours(
    loc_ptr,
    loc_offsets,
    q_mask,
    height,
    width,
    level_start,
    row_stride,
    d_offsets,
    d_mask,
    ACC_DTYPE: tl.constexpr,
):
    """:func:`_bilinear_corners` with the neighbours as tiles (:func:`_neighbour_tiles`)."""
    lx, ly, row00, v00, v01, v10, v11 = _bilinear_corners(
        loc_ptr, loc_offsets, q_mask, height, width, level_start, ACC_DTYPE
    )
    o00, m00, o01, m01, o10, m10, o11, m11 = _neighbour_tiles(
        row00, v00, v01, v10, v11, width, row_stride, d_offsets, d_mask
    )
    return lx, ly, o00, m00, o01, m01, o10, m10, o11, m11


@triton.jit
def _msda_forward_kernel(
    value_ptr,
    spatial_shapes_ptr,
    level_start_index_ptr,
    loc_ptr,
    attn_ptr,
    out_ptr,
    num_values,
    num_queries,
    num_heads,
    HEAD_DIM: tl.constexpr,
    NUM_LEVELS: tl.constexpr,
    NUM_POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    # Query blocks on axis 0 (the only axis with a 2**31 limit); neighbouring programs then share (batch, head) and
    # sample nearby pixels of the same value slice, which helps the L2 cache.
    pid_q = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)

    q_offsets = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q_offsets < num_queries
    d_offsets = tl.arange(0, BLOCK_D)
    d_mask = d_offsets < HEAD_DIM

    row_stride = num_heads * HEAD_DIM  # between consecutive pixels of value (batch, S, heads, head_dim)
    value_base = value_ptr + batch * num_values * row_stride + head * HEAD_DIM
    # Index of (batch, query, head, level 0, point 0) in attention_weights (batch, queries, heads, levels, points).
    attn_row = ((batch * num_queries + q_offsets) * num_heads + head) * (NUM_LEVELS * NUM_POINTS)

    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=ACC_DTYPE)
    for level in range(NUM_LEVELS):
        height = tl.load(spatial_shapes_ptr + 2 * level).to(tl.int32)
        width = tl.load(spatial_shapes_ptr + 2 * level + 1).to(tl.int32)
        level_start = tl.load(level_start_index_ptr + level).to(tl.int64)
        # Points are few (4 in the paper): unrolling lets the four gathers of successive points overlap.
        for point in tl.static_range(NUM_POINTS):
            attn_offsets = attn_row + level * NUM_POINTS + point
            attn = tl.load(attn_ptr + attn_offsets, mask=q_mask, other=0.0).to(ACC_DTYPE)
            lx, ly, o00, m00, o01, m01, o10, m10, o11, m11 = _bilinear_neighbours(
                loc_ptr, 2 * attn_offsets, q_mask, height, width, level_start, row_stride, d_offsets, d_mask, ACC_DTYPE
            )
            hx = 1.0 - lx
            hy = 1.0 - ly
            # The attention weight is folded into the four (BLOCK_Q,) corner weights, which saves tile multiplies. The
            # price: an infinite weight gives NaN (inf * 0 at a corner of bilinear weight 0, or corners of opposite
            # signs) where the reference, which weights the bilinear sample, gives +-inf. Weighting the sample made
            # this kernel 6% slower on an H200, and the model's weights come from a softmax, never infinite.
            acc += (attn * hy * hx)[:, None] * tl.load(value_base + o00, mask=m00, other=0.0).to(ACC_DTYPE)
            acc += (attn * hy * lx)[:, None] * tl.load(value_base + o01, mask=m01, other=0.0).to(ACC_DTYPE)
            acc += (attn * ly * hx)[:, None] * tl.load(value_base + o10, mask=m10, other=0.0).to(ACC_DTYPE)
            acc += (attn * ly * lx)[:, None] * tl.load(value_base + o11, mask=m11, other=0.0).to(ACC_DTYPE)

    # output (batch, queries, heads * head_dim)
    out_offsets = ((batch * num_queries + q_offsets) * row_stride + head * HEAD_DIM)[:, None] + d_offsets[None, :]
    tl.store(
        out_ptr + out_offsets,
        acc.to(out_ptr.dtype.element_ty),
        mask=q_mask[:, None] & d_mask[None, :],
    )


@triton.jit
def _msda_backward_kernel(
    grad_output_ptr,
    value_ptr,
    spatial_shapes_ptr,
    level_start_index_ptr,
    loc_ptr,
    attn_ptr,
    grad_value_ptr,
    grad_loc_ptr,
    grad_attn_ptr,
    corner_target_ptr,
    corner_weight_ptr,
    num_values,
    num_queries,
    num_heads,
    HEAD_DIM: tl.constexpr,
    NUM_LEVELS: tl.constexpr,
    NUM_POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
):
    pid_q = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)

    q_offsets = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q_offsets < num_queries
    d_offsets = tl.arange(0, BLOCK_D)
    d_mask = d_offsets < HEAD_DIM

    row_stride = num_heads * HEAD_DIM
    value_offset = batch * num_values * row_stride + head * HEAD_DIM
    value_base = value_ptr + value_offset
    # grad_value has value's layout (it is a contiguous buffer of the same shape), so the same offsets address it.
    grad_value_base = grad_value_ptr + value_offset
    attn_row = ((batch * num_queries + q_offsets) * num_heads + head) * (NUM_LEVELS * NUM_POINTS)

    # The grad_output tile is reused by every (level, point): load it once. Padding lanes read 0, so they add
    # nothing to the reductions over D below.
    go_offsets = ((batch * num_queries + q_offsets) * row_stride + head * HEAD_DIM)[:, None] + d_offsets[None, :]
    grad_out = tl.load(grad_output_ptr + go_offsets, mask=q_mask[:, None] & d_mask[None, :], other=0.0).to(ACC_DTYPE)

    for level in range(NUM_LEVELS):
        height = tl.load(spatial_shapes_ptr + 2 * level).to(tl.int32)
        width = tl.load(spatial_shapes_ptr + 2 * level + 1).to(tl.int32)
        level_start = tl.load(level_start_index_ptr + level).to(tl.int64)
        for point in tl.static_range(NUM_POINTS):
            attn_offsets = attn_row + level * NUM_POINTS + point
            attn = tl.load(attn_ptr + attn_offsets, mask=q_mask, other=0.0).to(ACC_DTYPE)
            lx, ly, row00, v00, v01, v10, v11 = _bilinear_corners(
                loc_ptr, 2 * attn_offsets, q_mask, height, width, level_start, ACC_DTYPE
            )
            o00, m00, o01, m01, o10, m10, o11, m11 = _neighbour_tiles(
                row00, v00, v01, v10, v11, width, row_stride, d_offsets, d_mask
            )
            hx = 1.0 - lx
            hy = 1.0 - ly
            # g_c = <grad_output, V(corner c)> over D: everything per query below is scalar arithmetic on these.
            g00 = tl.sum(grad_out * tl.load(value_base + o00, mask=m00, other=0.0).to(ACC_DTYPE), axis=1)
            g01 = tl.sum(grad_out * tl.load(value_base + o01, mask=m01, other=0.0).to(ACC_DTYPE), axis=1)
            g10 = tl.sum(grad_out * tl.load(value_base + o10, mask=m10, other=0.0).to(ACC_DTYPE), axis=1)
            g11 = tl.sum(grad_out * tl.load(value_base + o11, mask=m11, other=0.0).to(ACC_DTYPE), axis=1)

            # d out / d A = the bilinear sample dotted with grad_output.
            grad_attn = hy * hx * g00 + hy * lx * g01 + ly * hx * g10 + ly * lx * g11
            tl.store(grad_attn_ptr + attn_offsets, grad_attn.to(grad_attn_ptr.dtype.element_ty), mask=q_mask)
            # d sample / d x_pixel = hy (V01 - V00) + ly (V11 - V10), and x_pixel = x * W - 0.5 brings the factor W.
            grad_x = attn * width.to(ACC_DTYPE) * (hy * (g01 - g00) + ly * (g11 - g10))
            grad_y = attn * height.to(ACC_DTYPE) * (hx * (g10 - g00) + lx * (g11 - g01))
            tl.store(grad_loc_ptr + 2 * attn_offsets, grad_x.to(grad_loc_ptr.dtype.element_ty), mask=q_mask)
            tl.store(grad_loc_ptr + 2 * attn_offsets + 1, grad_y.to(grad_loc_ptr.dtype.element_ty), mask=q_mask)

            if DETERMINISTIC:
                # Record each neighbour's grad_value row ((batch, pixel, head) in value's layout; -1 outside the map)
                # and its weight A * bilinear weight; _gather_grad_value_kernel sums them in a fixed order.
                row = (batch * num_values + row00) * num_heads + head
                corner = 4 * attn_offsets
                tl.store(corner_target_ptr + corner, tl.where(v00, row, -1), mask=q_mask)
                tl.store(corner_target_ptr + corner + 1, tl.where(v01, row + num_heads, -1), mask=q_mask)
                tl.store(corner_target_ptr + corner + 2, tl.where(v10, row + width * num_heads, -1), mask=q_mask)
                tl.store(corner_target_ptr + corner + 3, tl.where(v11, row + (width + 1) * num_heads, -1),
                         mask=q_mask)
                tl.store(corner_weight_ptr + corner, attn * hy * hx, mask=q_mask)
                tl.store(corner_weight_ptr + corner + 1, attn * hy * lx, mask=q_mask)
                tl.store(corner_weight_ptr + corner + 2, attn * ly * hx, mask=q_mask)
                tl.store(corner_weight_ptr + corner + 3, attn * ly * lx, mask=q_mask)
            else:
                # Scatter A * bilinear weight * grad_output to the four neighbours; the masks drop those outside
                # the map.
                tl.atomic_add(grad_value_base + o00, (attn * hy * hx)[:, None] * grad_out, mask=m00, sem="relaxed")
                tl.atomic_add(grad_value_base + o01, (attn * hy * lx)[:, None] * grad_out, mask=m01, sem="relaxed")
                tl.atomic_add(grad_value_base + o10, (attn * ly * hx)[:, None] * grad_out, mask=m10, sem="relaxed")
                tl.atomic_add(grad_value_base + o11, (attn * ly * lx)[:, None] * grad_out, mask=m11, sem="relaxed")


@triton.jit
def _gather_grad_value_kernel(
    grad_output_ptr,
    order_ptr,
    segment_start_ptr,
    corner_weight_ptr,
    grad_value_ptr,
    HEAD_DIM: tl.constexpr,
    CORNERS_PER_ROW: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    # One program per grad_value row (batch, pixel, head): the neighbour records that name it, in the order of the
    # stable sort (that is, by (query, level, point, corner)), each adding weight * grad_output of its query and head.
    # The order of the additions is fixed, so the sum is the same bits on every run.
    target = tl.program_id(0).to(tl.int64)
    d_offsets = tl.arange(0, BLOCK_D)
    d_mask = d_offsets < HEAD_DIM
    start = tl.load(segment_start_ptr + target)
    end = tl.load(segment_start_ptr + target + 1)
    acc = tl.zeros((BLOCK_D,), dtype=ACC_DTYPE)
    for i in range(start, end):
        corner = tl.load(order_ptr + i)
        weight = tl.load(corner_weight_ptr + corner)
        # A record's index is (((batch * queries + query) * heads + head) * levels * points + ...) * 4 + corner, and
        # grad_output (batch, queries, heads * head_dim) has one head_dim row per (batch, query, head).
        source = corner // CORNERS_PER_ROW
        acc += weight * tl.load(grad_output_ptr + source * HEAD_DIM + d_offsets, mask=d_mask, other=0.0).to(ACC_DTYPE)
    tl.store(grad_value_ptr + target * HEAD_DIM + d_offsets, acc.to(grad_value_ptr.dtype.element_ty), mask=d_mask)


def _accumulator_dtype(dtype: torch.dtype) -> tl.dtype:
    # float64 input (gradcheck, the float64 reference file) keeps float64 end to end; everything else accumulates in
    # float32, which is what half-precision training needs and costs nothing extra for float32.
    return tl.float64 if dtype == torch.float64 else tl.float32


# Below this many programs a GPU (an H100 has 132 SMs) would sit partly idle and could not hide the latency of the
# gathers behind other programs, so small problems (a decoder's few hundred queries) get smaller query blocks.
_MIN_PROGRAMS = 512
# Off a GPU (Triton's interpreter) there is neither a register budget nor SMs to fill, but every program and every
# operation costs Python overhead: use few, large blocks. (A module constant so that tests can force several blocks.)
_INTERPRETER_MAX_BLOCK_Q = 64


def _launch_config(
    num_queries: int, batch_heads: int, head_dim: int, tile_elements: int, on_gpu: bool
) -> tuple[int, int, int]:
    """(BLOCK_Q, BLOCK_D, num_warps) for a (queries x head channels) tile of at most ``tile_elements`` values.

    On a GPU the tile is bounded so that the gathered neighbour tiles (and, in backward, the grad_output tile) stay
    in registers at about 8 values per thread, and it shrinks (down to 8 queries) while the launch would have fewer
    than ``_MIN_PROGRAMS`` programs. A block never exceeds the number of queries rounded up to a power of two.
    """
    block_d = triton.next_power_of_2(head_dim)
    if not on_gpu:
        return min(_INTERPRETER_MAX_BLOCK_Q, triton.next_power_of_2(num_queries)), block_d, 1
    block_q = max(1, min(64, tile_elements // block_d, triton.next_power_of_2(num_queries)))
    while block_q > 8 and triton.cdiv(num_queries, block_q) * batch_heads < _MIN_PROGRAMS:
        block_q //= 2
    num_warps = max(1, min(8, block_q * block_d // 256))
    return block_q, block_d, num_warps


@contextlib.contextmanager
def _on_device_of(tensor: Tensor) -> Iterator[None]:
    # Triton launches on the current CUDA device: make it the inputs' one (they may live on cuda:1 and so on).
    if tensor.is_cuda:
        with torch.cuda.device(tensor.device):
            yield
    else:
        yield


def msda_forward(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention forward, sum over levels l and points p of A_{lp} * V_l(p_{lp}).

    Inputs are assumed validated by the caller (``deformable_detr.ops``); non-contiguous ones are made contiguous here
    (a copy only when needed), because the kernels address them by their dense row-major layout.

    Args:
        value: (batch, sum(H_l * W_l), num_heads, head_dim), float16 / bfloat16 / float32 / float64.
        spatial_shapes: (num_levels, 2) integer (H_l, W_l), on value's device (read by the kernel: no host sync).
        level_start_index: (num_levels,) integer offset of each level on dim 1 of ``value``, on value's device.
        sampling_locations: (batch, num_queries, num_heads, num_levels, num_points, 2) normalised (x, y), value's dtype
            or float32 (with a half value: the precision policy of ``deformable_detr.ops``).
        attention_weights: (batch, num_queries, num_heads, num_levels, num_points), as sampling_locations.

    Returns:
        (batch, num_queries, num_heads * head_dim) in value's dtype, accumulated in float32 (float64 for float64).
    """
    value = value.contiguous()
    spatial_shapes = spatial_shapes.contiguous()
    level_start_index = level_start_index.contiguous()
    sampling_locations = sampling_locations.contiguous()
    attention_weights = attention_weights.contiguous()
    batch, num_values, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape

    output = value.new_empty(batch, num_queries, num_heads * head_dim)
    if output.numel() == 0:
        return output.zero_()  # a grid with a zero dimension is not a valid launch
    block_q, block_d, num_warps = _launch_config(
        num_queries, batch * num_heads, head_dim, tile_elements=2048, on_gpu=value.is_cuda
    )
    grid = (triton.cdiv(num_queries, block_q), num_heads, batch)
    with _on_device_of(value):
        _msda_forward_kernel[grid](
            value,
            spatial_shapes,
            level_start_index,
            sampling_locations,
            attention_weights,
            output,
            num_values,
            num_queries,
            num_heads,
            HEAD_DIM=head_dim,
            NUM_LEVELS=num_levels,
            NUM_POINTS=num_points,
            BLOCK_Q=block_q,
            BLOCK_D=block_d,
            ACC_DTYPE=_accumulator_dtype(value.dtype),
            num_warps=num_warps,
        )
    return output


def msda_backward(
    grad_output: Tensor,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    deterministic: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``msda_forward`` with respect to value, sampling_locations and attention_weights.

    Args:
        grad_output: (batch, num_queries, num_heads * head_dim), any float dtype (up-cast in the kernel).
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights: as in ``msda_forward``.
        deterministic: sum grad_value in a fixed order instead of with atomic adds, so that it is the same bits on
            every run. The backward kernel then records, for each (query, head, level, point) and bilinear
            neighbour, the grad_value row it feeds and its weight (12 bytes each with float32, 16 with float64); a
            stable sort groups the records by row, and one program per grad_value row adds them up in the sorted
            order. This costs the records, the sort and a second kernel.

    Returns:
        grad_value (batch, sum(H_l * W_l), num_heads, head_dim),
        grad_sampling_locations (batch, num_queries, num_heads, num_levels, num_points, 2),
        grad_attention_weights (batch, num_queries, num_heads, num_levels, num_points),
        each contiguous and in its input's dtype. grad_value is accumulated in float32 (float64 for float64); with
        atomic adds (``deterministic=False``) its last bits may vary from run to run on a GPU, since the order of
        the additions is not fixed. The location and weight gradients are deterministic either way.
    """
    grad_output = grad_output.contiguous()
    value = value.contiguous()
    spatial_shapes = spatial_shapes.contiguous()
    level_start_index = level_start_index.contiguous()
    sampling_locations = sampling_locations.contiguous()
    attention_weights = attention_weights.contiguous()
    batch, num_values, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape

    accumulate_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    # Atomic adds into half precision would round at every addition: accumulate in a wider buffer, cast once.
    grad_value = torch.zeros(value.shape, dtype=accumulate_dtype, device=value.device)
    # The neighbour records of the deterministic path (an unused 1-element stand-in otherwise).
    records = (batch, num_queries, num_heads, num_levels, num_points, 4) if deterministic else (1,)
    corner_target = torch.empty(records, dtype=torch.int64, device=value.device)
    corner_weight = torch.empty(records, dtype=accumulate_dtype, device=value.device)
    # Every location / weight gradient is written by exactly one program (zeros only matter for an empty launch).
    grad_locations = torch.zeros_like(sampling_locations)
    grad_weights = torch.zeros_like(attention_weights)
    if grad_output.numel() > 0 and value.numel() > 0:
        block_q, block_d, num_warps = _launch_config(
            num_queries, batch * num_heads, head_dim, tile_elements=1024, on_gpu=value.is_cuda
        )
        grid = (triton.cdiv(num_queries, block_q), num_heads, batch)
        with _on_device_of(value):
            _msda_backward_kernel[grid](
                grad_output,
                value,
                spatial_shapes,
                level_start_index,
                sampling_locations,
                attention_weights,
                grad_value,
                grad_locations,
                grad_weights,
                corner_target,
                corner_weight,
                num_values,
                num_queries,
                num_heads,
                HEAD_DIM=head_dim,
                NUM_LEVELS=num_levels,
                NUM_POINTS=num_points,
                BLOCK_Q=block_q,
                BLOCK_D=block_d,
                ACC_DTYPE=_accumulator_dtype(value.dtype),
                DETERMINISTIC=deterministic,
                num_warps=num_warps,
            )
            if deterministic:
                _gather_grad_value(grad_output, corner_target, corner_weight, grad_value, block_d)
    return grad_value.to(value.dtype), grad_locations, grad_weights


def _gather_grad_value(grad_output: Tensor, corner_target: Tensor, corner_weight: Tensor, grad_value: Tensor,
                       block_d: int) -> None:
    """Sums the neighbour records into ``grad_value`` (batch, num_values, num_heads, head_dim) in a fixed order.

    corner_target / corner_weight: (batch, num_queries, num_heads, num_levels, num_points, 4), the grad_value row
    ((batch * num_values + pixel) * num_heads + head, or -1 outside the map) and the weight of each record.
    """
    batch, num_values, num_heads, head_dim = grad_value.shape
    num_rows = batch * num_values * num_heads
    # A stable sort keeps records of one row in their original order, which fixes the order of the additions; the
    # records outside the map (-1) sort first and belong to no row.
    sorted_target, order = torch.sort(corner_target.view(-1), stable=True)
    rows = torch.arange(num_rows + 1, dtype=torch.int64, device=grad_value.device)
    segment_start = torch.searchsorted(sorted_target, rows)  # records of row r: [start[r], start[r + 1])
    corners_per_row = corner_target.shape[3] * corner_target.shape[4] * 4
    _gather_grad_value_kernel[(num_rows,)](
        grad_output,
        order,
        segment_start,
        corner_weight,
        grad_value,
        HEAD_DIM=head_dim,
        CORNERS_PER_ROW=corners_per_row,
        BLOCK_D=block_d,
        ACC_DTYPE=_accumulator_dtype(grad_value.dtype),
        num_warps=1,
    )
