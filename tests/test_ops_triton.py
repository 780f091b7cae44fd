"""Triton MSDA kernels (forward and the three gradients) against the float64 reference, and against msda_core.npz.

Without a GPU the kernels run in Triton's interpreter on CPU tensors; TRITON_INTERPRET must be set before the kernels
are decorated by ``triton.jit``, i.e. before ``deformable_detr.ops.triton_kernels`` is first imported.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest

from deformable_detr.ops import level_start_index_of, triton_kernels
from deformable_detr.ops.reference import ms_deform_attn_reference
from deformable_detr.ops.triton_kernels import msda_backward, msda_forward

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# max|kernel - oracle| <= TOLERANCE * max|oracle| per tensor, the oracle being float64 on the same (rounded) inputs.
# The kernels compute in float32 and round each result once to the input dtype, which costs at most half a unit in
# the last place at the magnitude of the largest element: 2**-11 = 4.9e-4 (float16), 2**-8 = 3.9e-3 (bfloat16), and
# 2**-24 (float32), where float32 arithmetic over a few dozen terms dominates instead (measured up to 3e-7).
# Bounds: float32 1e-5; float16 2x its half unit; bfloat16 one full unit (2**-7 = 7.8e-3) plus margin, because
# Triton's interpreter truncates float32 -> bfloat16 casts (GPUs round to nearest); float64 computes in float64.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}

# A 1x1 level (every query reads the same pixel: concurrent atomic adds), non-square maps, 1 to 4 levels.
ONE_BY_ONE = ((1, 1),)
THREE_LEVELS = ((4, 5), (2, 3), (1, 1))
FOUR_LEVELS = ((6, 3), (3, 2), (2, 1), (1, 1))
TWO_LEVELS = ((3, 7), (2, 2))

CASES = [
    # dtype, head_dim, spatial_shapes, num_points, batch, contiguous
    (torch.float32, 8, ONE_BY_ONE, 1, 1, True),
    (torch.float32, 24, THREE_LEVELS, 3, 3, False),
    (torch.float32, 32, FOUR_LEVELS, 8, 1, False),
    (torch.float32, 64, ((3, 7),), 4, 3, True),
    (torch.float16, 24, THREE_LEVELS, 4, 3, False),
    (torch.float16, 64, ((5, 4), (1, 1)), 2, 1, True),
    (torch.bfloat16, 32, THREE_LEVELS, 4, 3, False),
    (torch.bfloat16, 8, TWO_LEVELS, 8, 1, True),
    (torch.float64, 24, THREE_LEVELS, 3, 3, False),
]


def _inputs(dtype, head_dim, shapes, points, batch, contiguous, queries=11, heads=2, seed=0):
    """Random inputs in ``dtype`` on DEVICE; with ``contiguous=False`` every float tensor is a transposed view."""
    generator = torch.Generator().manual_seed(seed)
    num_values = sum(h * w for h, w in shapes)
    levels = len(shapes)

    def draw(*shape, low=None):
        x = torch.rand(*shape, generator=generator) if low is not None else torch.randn(*shape, generator=generator)
        return (x if low is None else low + 1.4 * x).to(dtype=dtype, device=DEVICE)

    if contiguous:
        value = draw(batch, num_values, heads, head_dim)
        # Locations in [-0.2, 1.2]: some samples have neighbours, or all of them, outside the map.
        locations = draw(batch, queries, heads, levels, points, 2, low=-0.2)
        weights = draw(batch, queries, heads, levels, points, low=0.0)
        grad_output = draw(batch, queries, heads * head_dim)
    else:
        value = draw(batch, heads, num_values, head_dim).transpose(1, 2)
        locations = draw(batch, heads, queries, levels, points, 2, low=-0.2).transpose(1, 2)
        weights = draw(batch, queries, heads, points, levels, low=0.0).transpose(3, 4)
        grad_output = draw(batch, heads * head_dim, queries).transpose(1, 2)
        assert not any(t.is_contiguous() for t in (value, locations, weights, grad_output))
    spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=DEVICE)
    return value, spatial_shapes, level_start_index_of(list(shapes), DEVICE), locations, weights, grad_output


def _oracle(value, shapes, locations, weights, grad_output):
    """Reference output and gradients in float64 on the same inputs, computed on CPU."""
    value, locations, weights = (t.detach().cpu().double().requires_grad_(True) for t in (value, locations, weights))
    output = ms_deform_attn_reference(value, [tuple(hw) for hw in shapes], locations, weights)
    output.backward(grad_output.detach().cpu().double())
    return output.detach(), value.grad, locations.grad, weights.grad


def _assert_close(name, actual, expected, tolerance):
    error = (actual.detach().cpu().double() - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert scale > 0, f"{name}: the oracle is all zeros, the comparison would prove nothing"
    assert error <= tolerance * scale, f"{name}: max|a-b| = {error:.3g} > {tolerance:g} * max|ref| ({scale:.3g})"


def _check_against_oracle(dtype, head_dim, shapes, points, batch, contiguous):
    value, spatial_shapes, starts, locations, weights, grad_output = _inputs(
        dtype, head_dim, shapes, points, batch, contiguous
    )
    output = msda_forward(value, spatial_shapes, starts, locations, weights)
    grads = msda_backward(grad_output, value, spatial_shapes, starts, locations, weights)
    expected = _oracle(value, shapes, locations, weights, grad_output)

    names = ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")
    inputs = (grad_output, value, locations, weights)
    for name, actual, like, reference in zip(names, (output, *grads), inputs, expected):
        assert actual.shape == like.shape and actual.dtype == dtype and actual.device == value.device, name
        _assert_close(name, actual, reference, TOLERANCE[dtype])


@pytest.mark.parametrize(
    ("dtype", "head_dim", "shapes", "points", "batch", "contiguous"),
    CASES,
    ids=[f"{str(c[0])[6:]}-D{c[1]}-L{len(c[2])}-P{c[3]}-N{c[4]}-{'contig' if c[5] else 'strided'}" for c in CASES],
)
def test_forward_and_gradients_match_reference(dtype, head_dim, shapes, points, batch, contiguous):
    _check_against_oracle(dtype, head_dim, shapes, points, batch, contiguous)


def test_several_query_blocks_with_a_partial_last_one(monkeypatch):
    """11 queries in blocks of 4 on CPU (3 programs per head, the last one 3/4 masked); a GPU picks blocks of 8."""
    monkeypatch.setattr(triton_kernels, "_INTERPRETER_MAX_BLOCK_Q", 4)
    _check_against_oracle(torch.float32, 24, THREE_LEVELS, 2, 2, False)


def test_samples_far_outside_read_zero_and_get_no_gradient():
    """Points wholly outside every map (including wild values that would overflow an int conversion unclamped)."""
    value, spatial_shapes, starts, locations, weights, grad_output = _inputs(
        torch.float32, 8, THREE_LEVELS, 2, 1, True, queries=5
    )
    far = torch.tensor([-5.0, 7.0, 1e9, -1e9, -1.0 / 3.0 - 1e-3], device=DEVICE)  # last: x * 3 - 0.5 < -1 on W=3
    locations = far[torch.arange(locations.numel(), device=DEVICE) % far.numel()].view_as(locations)
    # Keep a sample inside one map so that some gradient is non-zero and the zeros below are not vacuous.
    locations[0, 0, 0, 0, 0] = torch.tensor([0.33, 0.61])  # not on a pixel centre: 4 neighbours
    output = msda_forward(value, spatial_shapes, starts, locations, weights)
    grads = msda_backward(grad_output, value, spatial_shapes, starts, locations, weights)
    grad_value, grad_locations, grad_weights = grads

    inside = torch.zeros_like(weights, dtype=torch.bool)
    inside[0, 0, 0, 0, 0] = True
    assert torch.all(output[:, 1:] == 0) and torch.all(output[0, 0, :8] != 0) and torch.all(output[0, 0, 8:] == 0)
    assert torch.all(grad_weights[~inside] == 0) and torch.all(grad_locations[~inside] == 0)
    assert grad_weights[inside].abs().item() > 0 and grad_locations[inside].abs().min().item() > 0
    assert torch.count_nonzero(grad_value) == 4 * 8  # the four neighbours of the inside sample, head 0 only
    expected = _oracle(value, THREE_LEVELS, locations, weights, grad_output)
    for name, actual, reference in zip(("output", "grad_value", "grad_loc", "grad_attn"),
                                       (output, grad_value, grad_locations, grad_weights), expected):
        _assert_close(name, actual, reference, TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_official_msda_core_vectors(reference_path, dtype):
    """msda_core.npz (float64 from the official ms_deform_attn_core_pytorch; inputs exactly representable in float32).

    float64 must agree to 1e-10 (the README's bound for msda_core); float32 to 1e-5 of each array's scale, the float32
    bound above (measured: a few 1e-7).
    """
    data = np.load(reference_path / "msda_core.npz")

    def tensor(key, dtype=dtype):
        return torch.from_numpy(data[f"msda.{key}"]).to(dtype=dtype, device=DEVICE)

    value, locations, weights, grad_output = (
        tensor(k) for k in ("value", "sampling_locations", "attention_weights", "grad_output")
    )
    spatial_shapes = tensor("spatial_shapes", torch.long)
    starts = tensor("level_start_index", torch.long)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5

    output = msda_forward(value, spatial_shapes, starts, locations, weights)
    grads = msda_backward(grad_output, value, spatial_shapes, starts, locations, weights)
    names = ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")
    for name, actual in zip(names, (output, *grads)):
        _assert_close(name, actual, torch.from_numpy(data[f"msda.{name}"]), tolerance)


def test_no_queries_gives_empty_results():
    value, spatial_shapes, starts, locations, weights, grad_output = _inputs(
        torch.float32, 8, TWO_LEVELS, 2, 2, True, queries=0
    )
    assert msda_forward(value, spatial_shapes, starts, locations, weights).shape == (2, 0, 16)
    grads = msda_backward(grad_output, value, spatial_shapes, starts, locations, weights)
    grad_value, grad_locations, grad_weights = grads
    assert torch.all(grad_value == 0) and grad_value.shape == value.shape
    assert grad_locations.shape == locations.shape and grad_weights.shape == weights.shape
