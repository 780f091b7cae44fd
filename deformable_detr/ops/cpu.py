"""Numba CPU kernels for multi-scale deformable attention (MSDA): exact forward and backward, float32 and float64.

The numerics are those of ``reference.py`` (``F.grid_sample``, bilinear, zero padding, ``align_corners=False``): a
sample at normalised (x, y) on a level of size (H, W) reads pixel coordinates (x * W - 0.5, y * H - 0.5), and
neighbours outside the map read 0. The gradient with respect to the locations is the derivative of the bilinear blend
inside the sample's cell, as autograd through ``grid_sample`` gives it (a neighbour outside the map contributes 0).
Arithmetic is in the dtype of ``value``; other dtypes are cast by the dispatcher (``deformable_detr.ops``).

Work decomposition:

* Forward: ``prange`` over (batch, query). A task owns the output rows of its query for every head and accumulates
  sum_{l,p} A_{lp} * bilinear(V_l, p_{lp}) straight into them (``head_dim`` contiguous values per neighbour, a loop
  LLVM vectorises). Tasks write disjoint rows, so there is nothing to synchronise.
* Backward: ``prange`` over (batch, head). A task owns ``grad_value[n, :, m, :]`` (every query of that head scatters
  only there) and the ``grad_sampling_locations`` / ``grad_attention_weights`` entries of its head, so grad_value is
  accumulated with plain adds: no atomics, no per-thread copies of grad_value, and the result does not depend on the
  number of threads (bitwise reproducible). The parallelism is batch * num_heads (8 or more in Deformable DETR),
  enough for the few-core machines the CPU path is for. When samples outnumber value rows (the encoder), value and
  grad_value are used in head-major copies (batch, heads, pixels, head_dim) so that a task's slice is compact (see
  ``msda_backward``). Per sample the kernel takes the four dot products grad_output . V(neighbour) once; the weight
  and location gradients follow from them by scalar arithmetic.

Nothing of size batch x queries x heads x levels x points x head_dim is allocated: the forward allocates the output,
the backward the three gradients and, in the head-major case, two value-sized copies. Kernels take C-contiguous
numpy views of the tensors: ``value``-like tensors as (rows, head_dim) with explicit row indices, the small
per-sample tensors flat, which keeps the inner loops free of array-view bookkeeping.

Exactness: no fast-math in the kernels (no FMA contraction), except reassociation inside the head_dim-long dot
products of the backward (see ``_dot``).

NaN and inf propagate as in the reference on CPU (``F.grid_sample``'s CPU kernel), the oracle of the tests: the output
has its NaN, +inf and -inf entries exactly; the gradients have its non-finite entries, and its NaN ones too unless an
attention weight is infinite (then the location gradient of that sample, here the weight times a sum, there a sum of
products with the weight, may be NaN where the reference's is +-inf or the reverse). In particular a NaN or +-inf
sampling location makes its query's output for that head NaN in every channel: its bilinear weights are NaN
(x - floor(x)) and multiply the zeros read off the map. Its weight gradient is NaN, its location gradient NaN in the
other coordinate and (for a finite weight) 0 in its own, and value gets none from it. A NaN/inf attention weight on a
sample off the map gives NaN the same way (0 * inf), and NaN location gradients. (``grid_sample`` on CUDA moves
non-finite coordinates off the map instead, so the reference there gives zeros.)

Threads: a call runs on ``min(torch.get_num_threads(), NUMBA_NUM_THREADS, samples / 4096)`` threads, so
``torch.set_num_threads`` governs this op as it governs the rest of the model, and small calls stay on one thread.
Unless ``NUMBA_THREADING_LAYER`` says otherwise, this module selects Numba's workqueue threading layer (see the
comment at the top of the code for why).

Compilation: ``cache=True`` stores the machine code beside this file (or in ``NUMBA_CACHE_DIR``), so the JIT cost (a
few seconds per dtype) is paid once per machine, not per process. The first call in a process prepares (compiles or
loads) both kernels for its dtype between two lines on stderr (see ``_prepare_kernels``).
"""

from __future__ import annotations

import math
import os
import sys
import time

import numba
import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

__all__ = ["SUPPORTED_DTYPES", "msda_backward", "msda_forward"]

# Numba would otherwise pick GNU OpenMP where it is installed, whose idle workers spin-wait: next to PyTorch's own
# OpenMP pool the two sets of threads take turns stealing each other's cores. Measured on a busy 2-core machine: a
# trivial parallel launch took 8 ms instead of 60 us, and PyTorch ops in the same process ran up to 14x slower. The
# workqueue layer's workers sleep when idle. Its limitation, no concurrent launches from several Python threads,
# cannot bite here because these kernels hold the GIL. NUMBA_THREADING_LAYER, or numba.config.THREADING_LAYER set
# before this import, still decides; the layer is fixed at the first parallel launch in the process.
if "NUMBA_THREADING_LAYER" not in os.environ and numba.config.THREADING_LAYER == "default":
    numba.config.THREADING_LAYER = "workqueue"

SUPPORTED_DTYPES = (torch.float32, torch.float64)

# fastmath stays off: no reassociation (results do not depend on vector width), NaN/inf propagate as in the reference.
# error_model="numpy" drops Python's ZeroDivisionError checks, which would otherwise block vectorisation.
_JIT = dict(parallel=True, fastmath=False, cache=True, error_model="numpy", boundscheck=False)


# The one fast-math flag in this file, scoped to this helper: reassociation lets LLVM vectorise the reduction (an
# in-order float sum is a serial dependency chain). It changes only the summation order of a head_dim-term dot
# product; the result does not depend on the thread count, but may differ in the last bits between CPUs with
# different vector widths.
@njit(fastmath={"reassoc"}, cache=True, error_model="numpy", boundscheck=False)
def _dot(a, a_row, b, b_row, length):  # pragma: no cover - compiled
    """sum_d a[a_row, d] * b[b_row, d]."""
    total = a.dtype.type(0.0)
    for d in range(length):
        total += a[a_row, d] * b[b_row, d]
    return total


@njit(**_JIT)
def _forward_kernel(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, output,
    batch, num_values, num_queries, num_heads, head_dim, num_levels, num_points,
):  # pragma: no cover - compiled
    """value (batch*S*M, D), spatial_shapes (L, 2) int64, level_start_index (L,) int64,
    sampling_locations (batch*Lq*M*L*P*2,), attention_weights (batch*Lq*M*L*P,), output (batch*Lq*M, D) zeroed.

    Rows of ``value`` are (batch, pixel, head) and the head-dim index ``d`` comes straight from ``range``: LLVM then
    knows every index is non-negative, drops Numba's negative-index wraparound, and vectorises the ``d`` loops."""
    ftype = value.dtype.type
    one = ftype(1.0)
    half = ftype(0.5)
    nan = ftype(np.nan)
    for task in prange(batch * num_queries):
        n = task // num_queries
        for m in range(num_heads):
            out_row = task * num_heads + m
            head_row = n * num_values * num_heads + m
            for level in range(num_levels):
                height = spatial_shapes[level, 0]
                width = spatial_shapes[level, 1]
                height_f = ftype(height)
                width_f = ftype(width)
                level_row = head_row + level_start_index[level] * num_heads
                for point in range(num_points):
                    k = ((task * num_heads + m) * num_levels + level) * num_points + point
                    x = sampling_locations[2 * k] * width_f - half
                    y = sampling_locations[2 * k + 1] * height_f - half
                    weight = attention_weights[k]
                    # Outside (-1, W) x (-1, H) all four neighbours are off the map; NaN fails the test too.
                    if not (x >= -one and x < width_f and y >= -one and y < height_f):
                        # The reference still multiplies the zeros it reads by the bilinear and attention weights: a
                        # NaN/inf location (NaN bilinear weights) or weight makes every channel NaN.
                        if not (math.isfinite(x) and math.isfinite(y) and math.isfinite(weight)):
                            for d in range(head_dim):
                                output[out_row, d] = nan
                        continue
                    x0_f = np.floor(x)
                    y0_f = np.floor(y)
                    x0 = int(x0_f)
                    y0 = int(y0_f)
                    lx = x - x0_f
                    ly = y - y0_f
                    hx = one - lx
                    hy = one - ly
                    w00 = weight * hy * hx
                    w01 = weight * hy * lx
                    w10 = weight * ly * hx
                    w11 = weight * ly * lx
                    p00 = level_row + (y0 * width + x0) * num_heads
                    p01 = p00 + num_heads
                    p10 = p00 + width * num_heads
                    p11 = p10 + num_heads
                    if x0 >= 0 and x0 + 1 < width and y0 >= 0 and y0 + 1 < height:
                        # All four neighbours on the map: one fused pass (the common case).
                        for d in range(head_dim):
                            output[out_row, d] += (
                                w00 * value[p00, d] + w01 * value[p01, d] + w10 * value[p10, d]
                                + w11 * value[p11, d]
                            )
                        continue
                    # On the border: skip the neighbours off the map (never read them: zero padding).
                    if y0 >= 0:
                        if x0 >= 0:
                            for d in range(head_dim):
                                output[out_row, d] += w00 * value[p00, d]
                        if x0 + 1 < width:
                            for d in range(head_dim):
                                output[out_row, d] += w01 * value[p01, d]
                    if y0 + 1 < height:
                        if x0 >= 0:
                            for d in range(head_dim):
                                output[out_row, d] += w10 * value[p10, d]
                        if x0 + 1 < width:
                            for d in range(head_dim):
                                output[out_row, d] += w11 * value[p11, d]


# Not in _forward_kernel: as code in its loop (inline or a call) this made the loop 6 to 9% slower on ordinary inputs,
# and even a test of the weight there that skips the sample costs 2 to 3%.
@njit(cache=True, error_model="numpy", boundscheck=False)
def _add_infinite_weight_samples(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, output,
    batch, num_values, num_queries, num_heads, head_dim, num_levels, num_points,
):  # pragma: no cover - compiled
    """Adds A * bilinear sample for the samples with an infinite weight A (arrays as in ``_forward_kernel``, which
    must not have seen them), in the reference's order: +-inf where the sample is non-zero, NaN where it is 0, in
    every channel off the map (0 * inf) or at a NaN/inf location. ``_forward_kernel`` folds A into the four corner
    weights, where inf * 0 (a corner of bilinear weight 0) or corners of opposite signs would give NaN. That these
    samples come last in the sums changes no result: once a +-inf or NaN is added, the order does not matter."""
    ftype = value.dtype.type
    one = ftype(1.0)
    half = ftype(0.5)
    for task in range(batch * num_queries):
        n = task // num_queries
        for m in range(num_heads):
            out_row = task * num_heads + m
            head_row = n * num_values * num_heads + m
            for level in range(num_levels):
                height = spatial_shapes[level, 0]
                width = spatial_shapes[level, 1]
                level_row = head_row + level_start_index[level] * num_heads
                for point in range(num_points):
                    k = ((task * num_heads + m) * num_levels + level) * num_points + point
                    weight = attention_weights[k]
                    x = sampling_locations[2 * k] * ftype(width) - half
                    y = sampling_locations[2 * k + 1] * ftype(height) - half
                    if not math.isinf(weight):
                        continue
                    if not (x >= -one and x < width and y >= -one and y < height):
                        for d in range(head_dim):
                            output[out_row, d] = np.nan
                        continue
                    x0_f = np.floor(x)
                    y0_f = np.floor(y)
                    x0 = int(x0_f)
                    y0 = int(y0_f)
                    lx = x - x0_f
                    ly = y - y0_f
                    hx = one - lx
                    hy = one - ly
                    for d in range(head_dim):
                        sample = ftype(0.0)
                        if y0 >= 0 and x0 >= 0:
                            sample += (hy * hx) * value[level_row + (y0 * width + x0) * num_heads, d]
                        if y0 >= 0 and x0 + 1 < width:
                            sample += (hy * lx) * value[level_row + (y0 * width + x0 + 1) * num_heads, d]
                        if y0 + 1 < height and x0 >= 0:
                            sample += (ly * hx) * value[level_row + ((y0 + 1) * width + x0) * num_heads, d]
                        if y0 + 1 < height and x0 + 1 < width:
                            sample += (ly * lx) * value[level_row + ((y0 + 1) * width + x0 + 1) * num_heads, d]
                        output[out_row, d] += sample * weight


@njit(**_JIT)
def _backward_kernel(
    grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
    grad_value, grad_sampling_locations, grad_attention_weights, head_stride, pixel_stride,
    batch, num_values, num_queries, num_heads, head_dim, num_levels, num_points,
):  # pragma: no cover - compiled
    """Arrays as in ``_forward_kernel``; ``value`` and ``grad_value`` are (batch*S*M, D) with the row of (n, pixel,
    head m) at n * S * M + m * head_stride + pixel * pixel_stride: (1, M) in the (pixel, head) layout of the inputs,
    (S, 1) in a head-major copy. grad_output is (batch*Lq*M, D); grad_sampling_locations and grad_attention_weights
    are flat. All three gradients are zeroed."""
    ftype = value.dtype.type
    zero = ftype(0.0)
    one = ftype(1.0)
    half = ftype(0.5)
    for task in prange(batch * num_heads):
        # This task owns grad_value[n, :, m, :] and every (n, :, m, :, :) entry of the two small gradients.
        n = task // num_heads
        m = task - n * num_heads
        head_row = n * num_values * num_heads + m * head_stride
        for q in range(num_queries):
            nqm = (n * num_queries + q) * num_heads + m
            for level in range(num_levels):
                height = spatial_shapes[level, 0]
                width = spatial_shapes[level, 1]
                height_f = ftype(height)
                width_f = ftype(width)
                level_row = head_row + level_start_index[level] * pixel_stride
                for point in range(num_points):
                    k = (nqm * num_levels + level) * num_points + point
                    x = sampling_locations[2 * k] * width_f - half
                    y = sampling_locations[2 * k + 1] * height_f - half
                    weight = attention_weights[k]
                    if not (x >= -one and x < width_f and y >= -one and y < height_f):
                        if not (math.isfinite(x) and math.isfinite(y) and math.isfinite(weight)):
                            # The formulas below with every g_ij = 0 (what the reference computes on the zeros it
                            # reads): NaN where a bilinear weight (lx, ly) or the weight is NaN/inf, else 0.
                            lx = x - np.floor(x)
                            ly = y - np.floor(y)
                            grad_attention_weights[k] = (lx + ly) * zero
                            grad_sampling_locations[2 * k] = weight * ly * zero
                            grad_sampling_locations[2 * k + 1] = weight * lx * zero
                        continue
                    x0_f = np.floor(x)
                    y0_f = np.floor(y)
                    x0 = int(x0_f)
                    y0 = int(y0_f)
                    lx = x - x0_f
                    ly = y - y0_f
                    hx = one - lx
                    hy = one - ly
                    w00 = weight * hy * hx
                    w01 = weight * hy * lx
                    w10 = weight * ly * hx
                    w11 = weight * ly * lx
                    p00 = level_row + (y0 * width + x0) * pixel_stride
                    p01 = p00 + pixel_stride
                    p10 = p00 + width * pixel_stride
                    p11 = p10 + pixel_stride
                    # g_ij = grad_output . V(neighbour ij); the neighbours off the map read 0, so their g is 0.
                    g00 = zero
                    g01 = zero
                    g10 = zero
                    g11 = zero
                    if x0 >= 0 and x0 + 1 < width and y0 >= 0 and y0 + 1 < height:
                        g00 = _dot(grad_output, nqm, value, p00, head_dim)
                        g01 = _dot(grad_output, nqm, value, p01, head_dim)
                        g10 = _dot(grad_output, nqm, value, p10, head_dim)
                        g11 = _dot(grad_output, nqm, value, p11, head_dim)
                        for d in range(head_dim):
                            g = grad_output[nqm, d]
                            grad_value[p00, d] += w00 * g
                            grad_value[p01, d] += w01 * g
                            grad_value[p10, d] += w10 * g
                            grad_value[p11, d] += w11 * g
                    else:
                        if y0 >= 0:
                            if x0 >= 0:
                                g00 = _dot(grad_output, nqm, value, p00, head_dim)
                                for d in range(head_dim):
                                    grad_value[p00, d] += w00 * grad_output[nqm, d]
                            if x0 + 1 < width:
                                g01 = _dot(grad_output, nqm, value, p01, head_dim)
                                for d in range(head_dim):
                                    grad_value[p01, d] += w01 * grad_output[nqm, d]
                        if y0 + 1 < height:
                            if x0 >= 0:
                                g10 = _dot(grad_output, nqm, value, p10, head_dim)
                                for d in range(head_dim):
                                    grad_value[p10, d] += w10 * grad_output[nqm, d]
                            if x0 + 1 < width:
                                g11 = _dot(grad_output, nqm, value, p11, head_dim)
                                for d in range(head_dim):
                                    grad_value[p11, d] += w11 * grad_output[nqm, d]
                    grad_attention_weights[k] = (hy * hx) * g00 + (hy * lx) * g01 + (ly * hx) * g10 + (ly * lx) * g11
                    # d/dx of the blend (hx = 1 - lx, lx = x - x0), times dx/dloc_x = W; likewise for y.
                    grad_x = weight * (hy * (g01 - g00) + ly * (g11 - g10))
                    grad_y = weight * (hx * (g10 - g00) + lx * (g11 - g01))
                    grad_sampling_locations[2 * k] = grad_x * width_f
                    grad_sampling_locations[2 * k + 1] = grad_y * height_f


def _prepare(
    value: Tensor, spatial_shapes: list[tuple[int, int]], sampling_locations: Tensor, attention_weights: Tensor
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[int, ...]]:
    """Checks what the kernels rely on for memory safety; returns the level tables (spatial shapes (L, 2), level
    starts (L,)), flat numpy views of the locations and weights, and the sizes."""
    if value.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the cpu MSDA kernels take float32 or float64, got {value.dtype}")
    for name, tensor in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if tensor.dtype != value.dtype or tensor.device.type != "cpu" or value.device.type != "cpu":
            raise ValueError(f"{name} ({tensor.dtype}, {tensor.device}) must match value ({value.dtype}, cpu)")
    batch, num_values, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    if sum(h * w for h, w in spatial_shapes) != num_values or len(spatial_shapes) != num_levels:
        raise ValueError(f"spatial_shapes {spatial_shapes} do not match value {tuple(value.shape)}")
    if tuple(sampling_locations.shape) != (batch, num_queries, num_heads, num_levels, num_points, 2) or tuple(
        attention_weights.shape
    ) != (batch, num_queries, num_heads, num_levels, num_points):
        raise ValueError(
            f"sampling_locations {tuple(sampling_locations.shape)} / attention_weights "
            f"{tuple(attention_weights.shape)} do not match value {tuple(value.shape)}"
        )
    shapes = np.asarray(spatial_shapes, dtype=np.int64).reshape(num_levels, 2)
    starts = np.zeros(num_levels, dtype=np.int64)
    starts[1:] = np.cumsum(shapes[:, 0] * shapes[:, 1])[:-1]
    sizes = (batch, num_values, num_queries, num_heads, head_dim, num_levels, num_points)
    return shapes, starts, _flat(sampling_locations), _flat(attention_weights), sizes


def _flat(tensor: Tensor) -> np.ndarray:
    """A 1-D C-contiguous numpy view (a copy only when ``tensor`` is not contiguous)."""
    return tensor.detach().contiguous().numpy().reshape(-1)


def _rows(tensor: Tensor, head_dim: int) -> np.ndarray:
    """(numel / head_dim, head_dim) C-contiguous numpy view (a copy only when ``tensor`` is not contiguous)."""
    return tensor.detach().contiguous().numpy().reshape(-1, head_dim)


# Waking worker threads costs tens of microseconds on an idle machine and up to a scheduler time slice (milliseconds)
# on a busy one, while a sample costs about 25 ns (forward, head_dim 32): below this many samples per thread the
# extra threads cost more than they save (gradcheck and tiny test shapes run on one thread; a 300-query decoder
# layer, 38k samples, uses every thread).
_MIN_SAMPLES_PER_THREAD = 4096
# The backward works on head-major copies of value and grad_value when there are at least this many samples per value
# row (see msda_backward); measured on the encoder shape (16 per row) they save a quarter of the time.
_HEAD_MAJOR_SAMPLES_PER_ROW = 4


def _set_threads(sizes: tuple[int, ...]) -> None:
    """Runs the next kernel on min(torch.get_num_threads(), NUMBA_NUM_THREADS, samples / 4096) threads."""
    batch, _, num_queries, num_heads, _, num_levels, num_points = sizes
    samples = batch * num_queries * num_heads * num_levels * num_points
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS, samples // _MIN_SAMPLES_PER_THREAD)
    numba.set_num_threads(max(1, threads))


# Whether this process has prepared the kernels. The first call of a kernel compiles it (seconds per kernel on a
# fresh machine, more on a busy one) or loads it from the cache, inside the first training iteration and with nothing
# on screen: users took it for a hang. So the first call of either entry point announces the wait on stderr and
# prepares both kernels at once (the backward's compilation would otherwise stall the same iteration unannounced);
# every later call pays one boolean check.
_kernels_ready = False


def _prepare_kernels(dtype: torch.dtype) -> None:
    """Compiles, or loads from Numba's cache, the forward and backward kernels for ``dtype`` by running them on a
    one-sample problem built by the same helpers as a real call (so the argument types, hence the compiled
    specialisations, are those a real call uses), between two lines on stderr. A later call in the other dtype (in
    practice float64: gradcheck, tests) compiles its own specialisations without a notice."""
    global _kernels_ready
    # Set first: if the preparation fails, the real call fails the same way and the notice is not repeated per call.
    _kernels_ready = True
    print("deformable attention: preparing the Numba CPU kernels (compiled on first use, then loaded from the "
          "cache)...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    value = torch.zeros(1, 1, 1, 1, dtype=dtype)
    locations = torch.full((1, 1, 1, 1, 1, 2), 0.5, dtype=dtype)
    weights = torch.ones(1, 1, 1, 1, 1, dtype=dtype)
    shapes, starts, locations_np, weights_np, sizes = _prepare(value, [(1, 1)], locations, weights)
    output = torch.zeros(1, 1, 1, dtype=dtype)
    numba.set_num_threads(1)
    _forward_kernel(_rows(value, 1), shapes, starts, locations_np, weights_np, _rows(output, 1), *sizes)
    _backward_kernel(
        _rows(output, 1), _rows(value, 1), shapes, starts, locations_np, weights_np, _rows(torch.zeros_like(value), 1),
        _flat(torch.zeros_like(locations)), _flat(torch.zeros_like(weights)), 1, 1, *sizes,
    )
    print(f"deformable attention: Numba CPU kernels ready in {time.perf_counter() - start:.1f} s", file=sys.stderr,
          flush=True)


def msda_forward(
    value: Tensor, spatial_shapes: list[tuple[int, int]], sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """MSDA forward on CPU.

    Args:
        value: (batch, sum(H_l * W_l), num_heads, head_dim), float32 or float64.
        spatial_shapes: (H_l, W_l) per level, Python ints.
        sampling_locations: (batch, num_queries, num_heads, num_levels, num_points, 2), dtype of ``value``.
        attention_weights: (batch, num_queries, num_heads, num_levels, num_points), dtype of ``value``.

    Returns:
        (batch, num_queries, num_heads * head_dim), contiguous.
    """
    shapes, starts, locations_np, weights_np, sizes = _prepare(
        value, spatial_shapes, sampling_locations, attention_weights
    )
    if not _kernels_ready:
        _prepare_kernels(value.dtype)
    batch, _, num_queries, num_heads, head_dim, _, _ = sizes
    output = torch.zeros(batch, num_queries, num_heads * head_dim, dtype=value.dtype)
    _set_threads(sizes)
    value_rows, output_rows = _rows(value, head_dim), _rows(output, head_dim)
    # Samples with an infinite weight go to _add_infinite_weight_samples; the forward kernel gets them off the map with
    # weight 0 (they add nothing). The test takes 0.2 ms on the encoder's 2.3M weights, 0.3% of the kernel; the rest
    # is compiled at the first call that needs it, not in _prepare_kernels: the model's weights (a softmax) are finite.
    infinite = np.isinf(weights_np)
    if infinite.any():
        kernel_locations = locations_np.reshape(-1, 2).copy()
        kernel_locations[infinite] = -1.0
        kernel_weights = np.where(infinite, weights_np.dtype.type(0.0), weights_np)
        _forward_kernel(value_rows, shapes, starts, kernel_locations.reshape(-1), kernel_weights, output_rows, *sizes)
        _add_infinite_weight_samples(value_rows, shapes, starts, locations_np, weights_np, output_rows, *sizes)
    else:
        _forward_kernel(value_rows, shapes, starts, locations_np, weights_np, output_rows, *sizes)
    return output


def msda_backward(
    grad_output: Tensor,
    value: Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """MSDA backward on CPU.

    Args:
        grad_output: (batch, num_queries, num_heads * head_dim), dtype of ``value``.
        value, spatial_shapes, sampling_locations, attention_weights: as in ``msda_forward``.

    Returns:
        (grad_value, grad_sampling_locations, grad_attention_weights), contiguous, shaped like the inputs.
    """
    shapes, starts, locations_np, weights_np, sizes = _prepare(
        value, spatial_shapes, sampling_locations, attention_weights
    )
    batch, num_values, num_queries, num_heads, head_dim, num_levels, num_points = sizes
    if tuple(grad_output.shape) != (batch, num_queries, num_heads * head_dim) or grad_output.dtype != value.dtype:
        raise ValueError(
            f"grad_output {tuple(grad_output.shape)} {grad_output.dtype} must be "
            f"{(batch, num_queries, num_heads * head_dim)} {value.dtype}"
        )
    if not _kernels_ready:
        _prepare_kernels(value.dtype)
    grad_locations = torch.zeros(sampling_locations.shape, dtype=value.dtype)
    grad_weights = torch.zeros(attention_weights.shape, dtype=value.dtype)
    # A task (batch element, head) reads and scatters one head's rows. In the (pixel, head) layout of the inputs they
    # are every M-th row, a fixed stride (1 KiB for 8 heads of 32 float32) that maps them onto an eighth of the cache
    # sets; a head-major copy makes them one compact block, at the price of two transposes (four passes over
    # value-sized memory) and two value-sized buffers. That pays off when samples outnumber value rows (the encoder:
    # 16 samples per row), not for a decoder's few hundred queries.
    samples = batch * num_queries * num_heads * num_levels * num_points
    head_major = samples >= _HEAD_MAJOR_SAMPLES_PER_ROW * batch * num_values * num_heads
    _set_threads(sizes)
    if head_major:
        value_rows = _rows(value.detach().transpose(1, 2), head_dim)
        grad_value = torch.zeros(batch, num_heads, num_values, head_dim, dtype=value.dtype)
        strides = (num_values, 1)
    else:
        value_rows = _rows(value, head_dim)
        grad_value = torch.zeros(value.shape, dtype=value.dtype)
        strides = (1, num_heads)
    _backward_kernel(
        _rows(grad_output, head_dim), value_rows, shapes, starts, locations_np, weights_np,
        _rows(grad_value, head_dim), _flat(grad_locations), _flat(grad_weights), *strides, *sizes,
    )
    if head_major:
        del value_rows  # before the transpose below allocates the result: one value-sized buffer less at the peak
        grad_value = grad_value.transpose(1, 2).contiguous()
    return grad_value, grad_locations, grad_weights
