"""The Numba CPU MSDA backend against the float64 reference: forward and the three gradients over a grid of shapes,
float64 gradcheck, the official msda_core vectors, cell-border conventions, dtypes, threads and torch.compile."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch

from deformable_detr.ops import level_start_index_of, ms_deform_attn
from deformable_detr.ops.reference import ms_deform_attn_reference

# max|cpu - oracle| <= TOLERANCE * max(1, max|oracle|) per tensor, the oracle being the reference in float64 on the
# same (rounded) inputs. float64 differs from the oracle only by summation order (measured ~1e-15); float32 by float32
# arithmetic over a few dozen terms (measured up to 3e-7 relative).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}

ONE_BY_ONE = ((1, 1),)
TWO_LEVELS = ((3, 7), (1, 1))
THREE_LEVELS = ((4, 5), (2, 3), (1, 1))
FOUR_LEVELS = ((6, 3), (3, 2), (2, 5), (1, 1))

CASES = [
    # head_dim, spatial_shapes, num_points, batch, contiguous
    (8, ONE_BY_ONE, 1, 1, True),
    (8, FOUR_LEVELS, 8, 3, False),
    (24, THREE_LEVELS, 3, 3, False),
    (24, TWO_LEVELS, 1, 1, True),
    (32, FOUR_LEVELS, 4, 1, False),
    (32, ((5, 9),), 2, 3, True),
    (64, TWO_LEVELS, 8, 1, False),
    (64, THREE_LEVELS, 4, 3, True),
]


def _inputs(dtype, head_dim, shapes, points, batch, contiguous, queries=7, heads=3, seed=0):
    """Random inputs, locations in [-0.2, 1.2] (some samples partly or wholly off the map); with
    ``contiguous=False`` every float tensor is a strided view."""
    generator = torch.Generator().manual_seed(seed)
    num_values = sum(h * w for h, w in shapes)
    levels = len(shapes)

    def draw(*shape, uniform=False):
        if contiguous:
            sample = torch.rand(shape, generator=generator) if uniform else torch.randn(shape, generator=generator)
            return sample.to(dtype)
        # Draw with the first two dims swapped and a doubled last dim, then view back: transposed and strided.
        swapped = (shape[1], shape[0], *shape[2:-1], 2 * shape[-1])
        sample = torch.rand(swapped, generator=generator) if uniform else torch.randn(swapped, generator=generator)
        view = sample.to(dtype).transpose(0, 1)[..., ::2]
        assert not view.is_contiguous()
        return view

    value = draw(batch, num_values, heads, head_dim)
    locations = -0.2 + 1.4 * draw(batch, queries, heads, levels, points, 2, uniform=True)
    weights = draw(batch, queries, heads, levels, points, uniform=True)
    return value, [tuple(hw) for hw in shapes], locations, weights


def _assert_close(actual, expected, tolerance, name):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = (actual.double() - expected.double()).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    assert error <= tolerance * scale, f"{name}: max error {error:.3g} > {tolerance:.1g} * {scale:.3g}"


def _oracle(value, shapes, locations, weights, grad_output):
    """Reference output and gradients in float64 on the same inputs."""
    inputs = [t.detach().double().requires_grad_(True) for t in (value, locations, weights)]
    output = ms_deform_attn_reference(inputs[0], shapes, inputs[1], inputs[2])
    grads = torch.autograd.grad(output, inputs, grad_output.double())
    return (output, *grads)


def _cpu(value, shapes, locations, weights, grad_output):
    inputs = [t.detach().requires_grad_(True) for t in (value, locations, weights)]
    output = ms_deform_attn(inputs[0], shapes, None, inputs[1], inputs[2], backend="cpu")
    grads = torch.autograd.grad(output, inputs, grad_output)
    return (output, *grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(("head_dim", "shapes", "points", "batch", "contiguous"), CASES)
def test_forward_and_gradients_match_reference(dtype, head_dim, shapes, points, batch, contiguous):
    value, shapes, locations, weights = _inputs(dtype, head_dim, shapes, points, batch, contiguous)
    generator = torch.Generator().manual_seed(1)
    grad_output = torch.randn(batch, locations.shape[1], value.shape[2] * head_dim, generator=generator).to(dtype)
    # Some samples must be partly off the map (a neighbour left of column 0), and wholly off where a map is wide
    # enough for [-0.2, 1.2] to reach past pixel -1, or the zero padding would go untested.
    widths = torch.tensor([w for _, w in shapes], dtype=dtype)[:, None]
    pixel_x = locations[..., 0] * widths - 0.5
    assert ((pixel_x > -1) & (pixel_x < 0)).any()
    if max(w for _, w in shapes) >= 5:
        assert (pixel_x < -1).any()

    results = _cpu(value, shapes, locations, weights, grad_output)
    expected = _oracle(value, shapes, locations, weights, grad_output)
    names = ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")
    for name, actual, oracle in zip(names, results, expected):
        assert actual.dtype == dtype, name
        _assert_close(actual, oracle, TOLERANCE[dtype], name)


def test_gradcheck_float64():
    value, shapes, locations, weights = _inputs(torch.float64, 5, THREE_LEVELS, 2, 2, contiguous=True, queries=4)
    # The bilinear derivative jumps at pixel-cell borders; with this seed no sample lies within eps of one.
    inputs = tuple(t.requires_grad_(True) for t in (value, locations, weights))

    def op(v, loc, w):
        return ms_deform_attn(v, shapes, None, loc, w, backend="cpu")

    assert torch.autograd.gradcheck(op, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_official_msda_core_vectors(reference_path):
    """The official float64 vectors (msda_core.npz): output and all gradients to 1e-10 of each array's scale."""
    data = np.load(reference_path / "msda_core.npz")

    def get(name):
        return torch.from_numpy(data[f"msda.{name}"])

    shapes = [tuple(int(s) for s in hw) for hw in data["msda.spatial_shapes"]]
    assert torch.equal(get("level_start_index"), level_start_index_of(shapes))
    inputs = [get(name).requires_grad_(True) for name in ("value", "sampling_locations", "attention_weights")]
    output = ms_deform_attn(inputs[0], shapes, get("level_start_index"), inputs[1], inputs[2], backend="cpu")
    grads = torch.autograd.grad(output, inputs, get("grad_output"))
    names = ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")
    for name, actual in zip(names, (output, *grads)):
        expected = get(name)
        assert actual.dtype == torch.float64
        error = (actual - expected).abs().max().item()
        assert error <= 1e-10 * expected.abs().max().item(), f"{name}: {error:.3g}"


def test_cell_borders_and_far_points_follow_grid_sample():
    """Samples exactly on pixel centres / cell borders (pixel coordinates -1, -0.5, 0, 1, W - 1, W, ...) and far off
    the map: output and gradients equal autograd through grid_sample, whose convention at a border is the cell to its
    right/below (floor) and whose neighbours off the map contribute 0. Dyadic sizes keep every coordinate exact."""
    shapes = [(4, 8), (2, 2)]
    pixel = torch.tensor([-1.5, -1.0, -0.75, -0.5, 0.0, 0.5, 1.0, 2.25, 3.0, 3.5, 7.0, 7.5, 8.0, 1e30, -1e30])
    xs, ys = torch.meshgrid(pixel, pixel, indexing="ij")
    points = torch.stack([xs.flatten(), ys.flatten()], -1).double()  # (225, 2) pixel coordinates on level 0
    # Pixel coordinate c on a level of size n is the normalised (c + 0.5) / n; level 1 gets the same fractions.
    locations = ((points + 0.5) / torch.tensor([8.0, 4.0], dtype=torch.float64)).view(1, -1, 1, 1, 1, 2)
    locations = locations.expand(1, -1, 2, 2, 1, 2).contiguous()
    generator = torch.Generator().manual_seed(2)
    value = torch.randn(1, 36, 2, 8, generator=generator, dtype=torch.float64)
    weights = torch.rand(1, locations.shape[1], 2, 2, 1, generator=generator, dtype=torch.float64)
    grad_output = torch.randn(1, locations.shape[1], 16, generator=generator, dtype=torch.float64)
    results = _cpu(value, shapes, locations, weights, grad_output)
    expected = _oracle(value, shapes, locations, weights, grad_output)
    for name, actual, oracle in zip(("output", "grad_value", "grad_locations", "grad_weights"), results, expected):
        _assert_close(actual, oracle, 1e-13, name)
    # The far points (|coordinate| = 1e30) read nothing and get zero gradients.
    far = (points.abs() > 1e29).any(-1)
    assert results[0][0, far].abs().max() == 0 and results[2][0, far].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_dtypes_go_through_float32(dtype):
    value, shapes, locations, weights = _inputs(torch.float32, 8, THREE_LEVELS, 2, 2, contiguous=True)
    value, locations, weights = (t.to(dtype).requires_grad_(True) for t in (value, locations, weights))
    output = ms_deform_attn(value, shapes, None, locations, weights, backend="cpu")
    assert output.dtype == dtype
    output.float().square().sum().backward()
    assert value.grad.dtype == locations.grad.dtype == weights.grad.dtype == dtype
    # The op is the float32 one on the same (rounded) inputs, then rounded once.
    expected = ms_deform_attn(value.float(), shapes, None, locations.float(), weights.float(), backend="cpu")
    assert torch.equal(output, expected.to(dtype))


def test_autocast_runs_in_float32():
    """Under CPU autocast (bfloat16) a bfloat16 value and float32 locations/weights (what MSDeformAttn produces) run
    in float32 and give a float32 output, exactly the float32 op on the up-cast value."""
    value, shapes, locations, weights = _inputs(torch.float32, 8, THREE_LEVELS, 2, 2, contiguous=True)
    value_bf16 = value.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = ms_deform_attn(value_bf16, shapes, None, locations, weights, backend="cpu")
        reference = ms_deform_attn(value_bf16, shapes, None, locations, weights, backend="reference")
    assert output.dtype == reference.dtype == torch.float32
    expected = ms_deform_attn(value_bf16.float(), shapes, None, locations, weights, backend="cpu")
    assert torch.equal(output, expected)
    _assert_close(output, reference, 1e-5, "autocast cpu vs reference")


def test_result_does_not_depend_on_thread_count():
    """grad_value is accumulated without atomics (one task per (batch, head)): bitwise equal on 1 and 2 threads."""
    # 3 * 200 queries * 3 heads * 4 levels * 4 points = 28800 samples: enough work for the kernels to use 2 threads.
    value, shapes, locations, weights = _inputs(torch.float32, 32, FOUR_LEVELS, 4, 3, contiguous=True, queries=200)
    grad_output = torch.randn(3, 200, 3 * 32, generator=torch.Generator().manual_seed(3))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _cpu(value, shapes, locations, weights, grad_output)
        assert numba.get_num_threads() == 1
        torch.set_num_threads(2)
        double = _cpu(value, shapes, locations, weights, grad_output)
        assert numba.get_num_threads() == min(2, numba.config.NUMBA_NUM_THREADS)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(single, double):
        assert torch.equal(a, b)


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) kernels, autograd registration and AOT dispatch of both custom ops."""
    value, shapes, locations, weights = _inputs(torch.float64, 8, THREE_LEVELS, 2, 2, contiguous=True)
    flat_shapes = [s for hw in shapes for s in hw]
    grad_output = torch.randn(2, locations.shape[1], 3 * 8, dtype=torch.float64)
    forward = torch.ops.deformable_detr.ms_deform_attn_cpu.default
    backward = torch.ops.deformable_detr.ms_deform_attn_cpu_backward.default
    differentiable = tuple(t.requires_grad_(True) for t in (value, locations, weights))
    torch.library.opcheck(forward, (differentiable[0], flat_shapes, differentiable[1], differentiable[2]))
    torch.library.opcheck(backward, (grad_output, value.detach(), flat_shapes, locations.detach(), weights.detach()))


def _compiled_matches_eager(compile_backend, msda_backend="cpu"):
    value, shapes, locations, weights = _inputs(torch.float32, 8, THREE_LEVELS, 2, 2, contiguous=True)

    def step(v, loc, w):
        # Ops around the MSDA call, so that a graph break would split the graph.
        output = ms_deform_attn(v * 2.0, shapes, None, loc.clamp(-1, 2), w.softmax(-1), backend=msda_backend)
        return (output + 1).square()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    eager_inputs = [t.clone().requires_grad_(True) for t in (value, locations, weights)]
    compiled_inputs = [t.clone().requires_grad_(True) for t in (value, locations, weights)]
    eager = step(*eager_inputs)
    result = compiled(*compiled_inputs)  # fullgraph=True raises on any graph break
    torch.testing.assert_close(result, eager)
    eager.sum().backward()
    result.sum().backward()
    for a, b in zip(compiled_inputs, eager_inputs):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("msda_backend", ["cpu", "auto"])
def test_torch_compile_fullgraph_traces_the_op(msda_backend):
    """Dynamo traces the dispatch (auto's choice included) and the custom op without a graph break, AOTAutograd
    the registered backward."""
    _compiled_matches_eager("aot_eager", msda_backend)


@pytest.mark.slow
def test_torch_compile_fullgraph_inductor():
    """Inductor generates (and compiles with the C++ toolchain) the code around the custom op."""
    _compiled_matches_eager("inductor")


def test_backward_layouts_agree(monkeypatch):
    """The backward scatters into a head-major copy when samples outnumber value rows, else in place: same sums in
    the same order, so bitwise equal results."""
    from deformable_detr.ops import cpu

    value, shapes, locations, weights = _inputs(torch.float64, 24, THREE_LEVELS, 3, 2, contiguous=True)
    grad_output = torch.randn(2, locations.shape[1], 3 * 24, dtype=torch.float64)
    results = []
    for samples_per_row in (0, 10**9):  # always head-major, never
        monkeypatch.setattr(cpu, "_HEAD_MAJOR_SAMPLES_PER_ROW", samples_per_row)
        results.append(cpu.msda_backward(grad_output, value, shapes, locations, weights))
    for head_major, in_place in zip(*results):
        assert torch.equal(head_major, in_place)
