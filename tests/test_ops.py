"""The multi-scale deformable attention op: every backend against one oracle (as torchvision's test/test_ops.py does).

* Shared cases, one input generator (contiguous tensors or strided, transposed views), one oracle (the reference in
  float64 on the same rounded inputs: output and the three gradients) and one tolerance table per (backend, dtype).
* ``test_matches_oracle``: forward and gradients of every backend through ``ms_deform_attn(..., backend=...)``, over
  backend x dtype x contiguity x case.
* What every backend must do (each test parametrized over the backends): the official msda_core vectors, a
  hand-computed bilinear sample, cell borders and far points as grid_sample, NaN / inf inputs as the reference, no
  queries, autocast, torch.compile, float64 gradcheck (where the backend is cheap enough for it).
* Backend-specific tests, named ``test_<backend>_...``, then dispatch and input validation (``test_dispatch_...``,
  ``test_bad_inputs_...``).

The triton backend runs on CUDA tensors when there is a GPU, else on CPU tensors in Triton's interpreter (conftest
sets TRITON_INTERPRET=1 before the kernels are imported).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numba
import numpy as np
import pytest
import torch
from torch import Tensor

import deformable_detr.ops as ops
from deformable_detr.ops import BACKENDS, available_backends, level_start_index_of, ms_deform_attn
from deformable_detr.ops.reference import ms_deform_attn_reference

DEVICES = {
    "reference": torch.device("cpu"),
    "cpu": torch.device("cpu"),
    "triton": torch.device("cuda" if torch.cuda.is_available() else "cpu"),
}
TRITON_INTERPRETED = DEVICES["triton"].type == "cpu"
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
NAMES = ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")

# max|result - oracle| <= TOLERANCE[backend, dtype] * max|oracle|, for the output and each gradient, the oracle being
# the reference in float64 on the same (rounded) inputs.
# float64 differs from the oracle only by summation order (measured ~1e-15); float32 by float32 arithmetic over a few
# dozen terms (measured up to 7e-7; bound 1e-5).
# cpu and triton compute float16 / bfloat16 inputs in float32 (cpu: the dispatcher casts them; triton: the kernels
# up-cast after loading) and round each result once to the input dtype, which costs at most half a unit in the last
# place at the magnitude of the largest element: 2**-11 = 4.9e-4 (float16), 2**-8 = 3.9e-3 (bfloat16). Bounds: twice
# the half unit (float16 1e-3, cpu bfloat16 8e-3); triton bfloat16 one full unit (2**-7 = 7.8e-3) plus margin, because
# Triton's interpreter truncates float32 -> bfloat16 casts (GPUs round to nearest).
# The reference computes in the input dtype, the sample positions included (see BORDER_MARGIN_PX): a position off by
# up to 0.015 px (float16) / 0.12 px (bfloat16) moves the result by that times the slope between neighbours, on top of
# rounding every intermediate. Measured over CASES up to 5.1e-3 (float16) and 4.4e-2 (bfloat16); bounds twice that.
TOLERANCE = {
    ("reference", torch.float64): 1e-12,  # strided views against the oracle's contiguous copies
    ("reference", torch.float32): 1e-5,
    ("reference", torch.float16): 1e-2,
    ("reference", torch.bfloat16): 1e-1,
    ("cpu", torch.float64): 1e-12,
    ("cpu", torch.float32): 1e-5,
    ("cpu", torch.float16): 1e-3,
    ("cpu", torch.bfloat16): 8e-3,
    ("triton", torch.float64): 1e-12,
    ("triton", torch.float32): 1e-5,
    ("triton", torch.float16): 1e-3,
    ("triton", torch.bfloat16): 1e-2,
}

# The reference in float16 / bfloat16 rounds 2x - 1 and grid_sample's pixel coordinate ((g + 1) W - 1) / 2 to that
# dtype: on maps up to 9 pixels wide the sample moves by up to (W / 2) (2**-8 + 2**-7) + 2**-4 = 0.12 px (bfloat16),
# 0.015 px (float16, 3 bits more). Output, value and weight gradients are continuous in the position; the location
# gradient jumps at cell borders (measured: off by up to 1.1x its scale), so it is compared only for samples farther
# than this from a border in both x and y.
BORDER_MARGIN_PX = {torch.float16: 0.02, torch.bfloat16: 0.15}

# A 1x1 level (every sample of a head reads the same pixel, whose value gradient collects all of them), non-square
# maps, a one-pixel-wide level, 1 to 4 levels.
ONE_BY_ONE = ((1, 1),)
TWO_LEVELS = ((3, 7), (2, 1))
THREE_LEVELS = ((4, 5), (2, 3), (1, 1))
FOUR_LEVELS = ((6, 3), (3, 2), (2, 5), (1, 1))


class Case(NamedTuple):
    head_dim: int
    spatial_shapes: tuple[tuple[int, int], ...]
    num_points: int
    batch: int
    num_queries: int = 7
    num_heads: int = 2

    @property
    def name(self) -> str:
        return f"D{self.head_dim}-L{len(self.spatial_shapes)}-P{self.num_points}-N{self.batch}"


CASES = (
    Case(8, ONE_BY_ONE, 1, 1),
    Case(8, FOUR_LEVELS, 8, 1),
    Case(24, THREE_LEVELS, 3, 3),
    Case(24, TWO_LEVELS, 1, 1),
    Case(32, FOUR_LEVELS, 4, 1),
    Case(32, ((5, 9),), 2, 3),
    Case(64, ((3, 7), (2, 2)), 8, 1),
    Case(64, THREE_LEVELS, 4, 3),
)
SMALL = Case(8, THREE_LEVELS, 2, 2)  # for the tests of properties other than numerics


class Inputs(NamedTuple):
    value: Tensor  # (batch, sum(H_l * W_l), num_heads, head_dim)
    spatial_shapes: list[tuple[int, int]]
    sampling_locations: Tensor  # (batch, num_queries, num_heads, num_levels, num_points, 2)
    attention_weights: Tensor  # (batch, num_queries, num_heads, num_levels, num_points)
    grad_output: Tensor  # (batch, num_queries, num_heads * head_dim)


def make_inputs(
    case: Case, dtype: torch.dtype = torch.float32, contiguous: bool = True, device: torch.device | str = "cpu",
    seed: int = 0,
) -> Inputs:
    """Random inputs for ``case``: value and grad_output normal, weights uniform in [0, 1), locations uniform in
    [-0.2, 1.2] (some samples partly or wholly off the map), drawn in float32 and rounded to ``dtype``. With
    ``contiguous=False`` every float tensor is a strided view: drawn with the first two dims swapped and a doubled last
    dim, then viewed back (transposed, and every other element of the last dim)."""
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape: int, low: float | None = None, high: float = 1.0) -> Tensor:
        drawn = shape if contiguous else (shape[1], shape[0], *shape[2:-1], 2 * shape[-1])
        if low is None:
            sample = torch.randn(drawn, generator=generator)
        else:
            sample = low + (high - low) * torch.rand(drawn, generator=generator)
        sample = sample.to(dtype=dtype, device=device)
        if contiguous:
            return sample
        view = sample.transpose(0, 1)[..., ::2]
        assert not view.is_contiguous()
        return view

    shapes = [tuple(hw) for hw in case.spatial_shapes]
    per_sample = (case.batch, case.num_queries, case.num_heads, len(shapes), case.num_points)
    value = draw(case.batch, sum(h * w for h, w in shapes), case.num_heads, case.head_dim)
    locations = draw(*per_sample, 2, low=-0.2, high=1.2)
    weights = draw(*per_sample, low=0.0)
    grad_output = draw(case.batch, case.num_queries, case.num_heads * case.head_dim)
    return Inputs(value, shapes, locations, weights, grad_output)


def oracle(inputs: Inputs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The reference in float64 on CPU, on contiguous copies of the same (rounded) inputs: the output and its
    gradients with respect to value, sampling_locations and attention_weights for ``inputs.grad_output``."""
    differentiable = [
        t.detach().cpu().double().contiguous().requires_grad_(True)
        for t in (inputs.value, inputs.sampling_locations, inputs.attention_weights)
    ]
    output = ms_deform_attn_reference(differentiable[0], inputs.spatial_shapes, differentiable[1], differentiable[2])
    grads = torch.autograd.grad(output, differentiable, inputs.grad_output.detach().cpu().double())
    return (output.detach(), *grads)


def run(backend: str, inputs: Inputs, level_start_index: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``ms_deform_attn(..., backend=backend)`` on ``inputs`` (views as they are): output and the three gradients."""
    differentiable = [
        t.detach().requires_grad_(True) for t in (inputs.value, inputs.sampling_locations, inputs.attention_weights)
    ]
    output = ms_deform_attn(
        differentiable[0], inputs.spatial_shapes, level_start_index, differentiable[1], differentiable[2],
        backend=backend,
    )
    grads = torch.autograd.grad(output, differentiable, inputs.grad_output)
    return (output.detach(), *grads)


def assert_close(name: str, actual: Tensor, expected: Tensor, tolerance: float, where: Tensor | None = None) -> None:
    """max|actual - expected| <= tolerance * max|expected| (over the elements ``where`` selects, if given)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().item()
    assert scale > 0, f"{name}: the expected values are all zeros, the comparison would prove nothing"
    difference = (actual.detach().cpu().double() - expected.double()).abs()
    if where is not None:
        assert where.any(), f"{name}: no element selected, the comparison would prove nothing"
        difference = difference[where]
    error = difference.max().item()
    assert error <= tolerance * scale, f"{name}: max|a-b| = {error:.3g} > {tolerance:g} * max|expected| ({scale:.3g})"



def assert_same_nonfinite(name: str, actual: Tensor, expected: Tensor, tolerance: float, classes: bool = True) -> None:
    """NaN, +inf and -inf in the places ``expected`` has them (``classes=False``: non-finite ones, of any kind), and
    the finite entries as in ``assert_close``."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual = actual.detach().cpu().double()
    expected = expected.double()
    kinds = (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)) if classes else ()
    for kind, test in (*kinds, ("non-finite", lambda t: ~torch.isfinite(t))):
        differ = test(actual) != test(expected)
        assert not differ.any(), f"{name}: {kind} entries differ from the reference's at {int(differ.sum())} places"
    finite = torch.isfinite(expected)
    assert_close(name, actual.where(finite, 0.0), expected.where(finite, 0.0), tolerance, where=finite)

def pixel_distance_to_cell_border(sampling_locations: Tensor, spatial_shapes: list[tuple[int, int]]) -> Tensor:
    """(..., num_levels, num_points, 2): how far each sample's pixel coordinates (x W - 0.5, y H - 0.5) are from the
    nearest integer, where the bilinear cell (and so the location derivative) changes."""
    sizes = torch.tensor([(w, h) for h, w in spatial_shapes], dtype=torch.float64)[:, None, :]  # (L, 1, 2) as (W, H)
    pixel = sampling_locations.detach().cpu().double() * sizes - 0.5
    return (pixel - pixel.round()).abs()


def assert_some_samples_leave_the_map(inputs: Inputs) -> None:
    """Some samples must be partly off the map (a neighbour left of column 0), and wholly off where a map is wide
    enough for [-0.2, 1.2] to reach past pixel -1, or the zero padding would go untested."""
    widths = torch.tensor([w for _, w in inputs.spatial_shapes], dtype=torch.float64)[:, None]  # (L, 1)
    pixel_x = inputs.sampling_locations[..., 0].detach().cpu().double() * widths - 0.5
    assert ((pixel_x > -1) & (pixel_x < 0)).any()
    if max(w for _, w in inputs.spatial_shapes) >= 5:
        assert (pixel_x < -1).any()


def _comparison_params() -> list:
    """backend x dtype x contiguity x case. In Triton's interpreter a call costs 0.05 to 1 s (Python per program
    and per operation), so there each (dtype, contiguity) runs one case, in turn: every case runs once."""
    params = []
    for backend in BACKENDS:
        combinations = [
            (dtype, contiguous) for dtype in DTYPES for contiguous in (True, False)
            # The reference on contiguous float64 inputs is the oracle itself.
            if not (backend == "reference" and dtype == torch.float64 and contiguous)
        ]
        for index, (dtype, contiguous) in enumerate(combinations):
            cases = (CASES[index % len(CASES)],) if backend == "triton" and TRITON_INTERPRETED else CASES
            layout = "contiguous" if contiguous else "strided"
            for case in cases:
                identifier = f"{backend}-{str(dtype).removeprefix('torch.')}-{layout}-{case.name}"
                params.append(pytest.param(backend, dtype, contiguous, case, id=identifier))
    return params


# --- every backend against the oracle ---


@pytest.mark.parametrize(("backend", "dtype", "contiguous", "case"), _comparison_params())
def test_matches_oracle(backend, dtype, contiguous, case):
    inputs = make_inputs(case, dtype, contiguous, DEVICES[backend])
    assert_some_samples_leave_the_map(inputs)
    results = run(backend, inputs)
    expected = oracle(inputs)
    like = (inputs.grad_output, inputs.value, inputs.sampling_locations, inputs.attention_weights)
    for name, actual, input_like, reference in zip(NAMES, results, like, expected):
        assert actual.shape == input_like.shape and actual.dtype == dtype and actual.device == input_like.device, name
        where = None
        if backend == "reference" and name == "grad_sampling_locations" and dtype in BORDER_MARGIN_PX:
            distance = pixel_distance_to_cell_border(inputs.sampling_locations, inputs.spatial_shapes)
            where = (distance > BORDER_MARGIN_PX[dtype]).all(-1, keepdim=True).expand_as(reference)
        assert_close(name, actual, reference, TOLERANCE[backend, dtype], where)


# --- what every backend must do ---


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_official_msda_core_vectors(reference_path, backend, dtype):
    """msda_core.npz (float64 from the official ms_deform_attn_core_pytorch; inputs exactly representable in float32).

    float64 must agree to 1e-10 of each array's scale (the README's bound for msda_core); float32 to the float32
    tolerance (measured: a few 1e-7).
    """
    data = np.load(reference_path / "msda_core.npz")
    device = DEVICES[backend]

    def tensor(key: str, dtype: torch.dtype = dtype) -> Tensor:
        return torch.from_numpy(data[f"msda.{key}"]).to(dtype=dtype, device=device)

    shapes = [(int(h), int(w)) for h, w in data["msda.spatial_shapes"]]
    level_start_index = tensor("level_start_index", torch.long)
    assert torch.equal(level_start_index.cpu(), level_start_index_of(shapes))
    inputs = Inputs(
        tensor("value"), shapes, tensor("sampling_locations"), tensor("attention_weights"), tensor("grad_output")
    )
    results = run(backend, inputs, level_start_index)
    tolerance = 1e-10 if dtype == torch.float64 else TOLERANCE[backend, torch.float32]
    for name, actual in zip(NAMES, results):
        assert actual.dtype == dtype, name
        assert_close(name, actual, torch.from_numpy(data[f"msda.{name}"]), tolerance)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bilinear_sample_by_hand(backend):
    """One level 2x3, one head, one point: the output is the bilinear blend of the 4 neighbours (align_corners
    False: pixel (i, j) is centred at ((j + 0.5) / W, (i + 0.5) / H)), zeros outside."""
    device = DEVICES[backend]
    value = torch.arange(6, dtype=torch.float64, device=device).view(1, 6, 1, 1)  # rows [0 1 2], [3 4 5]
    weights = torch.ones(1, 1, 1, 1, 1, dtype=torch.float64, device=device)

    def sample(x: float, y: float) -> float:
        locations = torch.tensor([x, y], dtype=torch.float64, device=device).view(1, 1, 1, 1, 1, 2)
        return ms_deform_attn(value, [(2, 3)], None, locations, weights, backend=backend).item()

    column = 0.75 * 3 - 0.5  # pixel coordinates (1.75, 0.0): row 0 exactly, between columns 1 and 2
    assert sample(0.75, 0.25) == pytest.approx((1 - (column - 1)) * 1 + (column - 1) * 2)
    # x = 0 is half a pixel left of column 0's centre: half of pixel (1, 0) plus half of a zero from outside.
    assert sample(0.0, 0.75) == pytest.approx(0.5 * 3)


@pytest.mark.parametrize("backend", ["cpu", "triton"])  # the reference is grid_sample, the oracle
def test_cell_borders_and_far_points_follow_grid_sample(backend):
    """Samples exactly on pixel centres / cell borders (pixel coordinates -1, -0.5, 0, 1, W - 1, W, ...) and far off
    the map: output and gradients equal autograd through grid_sample, whose convention at a border is the cell to its
    right/below (floor) and whose neighbours off the map contribute 0. Dyadic sizes keep every coordinate exact."""
    device = DEVICES[backend]
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
    inputs = Inputs(value.to(device), shapes, locations.to(device), weights.to(device), grad_output.to(device))
    results = run(backend, inputs)
    for name, actual, expected in zip(NAMES, results, oracle(inputs)):
        assert_close(name, actual, expected, 1e-13)
    # The far points (|coordinate| = 1e30) read nothing and get zero gradients.
    far = (points.abs() > 1e29).any(-1)
    assert results[0][0, far].abs().max() == 0 and results[2][0, far].abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_samples_far_outside_read_zero_and_get_no_gradient(backend):
    """Points wholly outside every map (including wild values that would overflow an int conversion unclamped)."""
    inputs = make_inputs(Case(8, THREE_LEVELS, 2, 1, num_queries=5), device=DEVICES[backend])
    locations = inputs.sampling_locations
    far = torch.tensor([-5.0, 7.0, 1e9, -1e9, -1.0 / 3.0 - 1e-3], device=locations.device)  # last: x 3 - 0.5 < -1
    locations = far[torch.arange(locations.numel(), device=locations.device) % far.numel()].view_as(locations)
    # Keep a sample inside one map so that some gradient is non-zero and the zeros below are not vacuous.
    locations[0, 0, 0, 0, 0] = torch.tensor([0.33, 0.61])  # not on a pixel centre: 4 neighbours
    inputs = inputs._replace(sampling_locations=locations)
    output, grad_value, grad_locations, grad_weights = run(backend, inputs)

    inside = torch.zeros_like(inputs.attention_weights, dtype=torch.bool)
    inside[0, 0, 0, 0, 0] = True
    assert torch.all(output[:, 1:] == 0) and torch.all(output[0, 0, :8] != 0) and torch.all(output[0, 0, 8:] == 0)
    assert torch.all(grad_weights[~inside] == 0) and torch.all(grad_locations[~inside] == 0)
    assert grad_weights[inside].abs().item() > 0 and grad_locations[inside].abs().min().item() > 0
    assert torch.count_nonzero(grad_value) == 4 * 8  # the four neighbours of the inside sample, head 0 only
    for name, actual, expected in zip(NAMES, (output, grad_value, grad_locations, grad_weights), oracle(inputs)):
        assert_close(name, actual, expected, TOLERANCE[backend, torch.float32])


NONFINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
# Dyadic map sizes: the pixel coordinates of the pixel centres used below are exact in float32 (a bilinear weight of
# exactly 0 times an infinity is NaN, so the tests must not depend on rounding).
DYADIC = Case(8, ((4, 8), (2, 2), (1, 1)), 2, 2, num_queries=5)
POINT = (1, 3, 1, 0, 1)  # (batch, query, head, level, point) of the sample the tests below make non-finite


@pytest.mark.parametrize("coordinate", ["x", "y"])
@pytest.mark.parametrize("bad", NONFINITE.values(), ids=NONFINITE.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_sampling_location_gives_nan_like_the_reference(backend, bad, coordinate):
    """One point of one query at x (or y) = NaN, +inf or -inf, what the reference (grid_sample's CPU kernel) gives:
    the point's bilinear weights are NaN (x - floor(x) is NaN for +-inf too) and multiply the zeros it reads off the
    map, so the query's output for that head is NaN in every channel, and so is the point's weight gradient. Its
    location gradient is NaN in the other coordinate and 0 in this one (d/dx is a difference of the zeros read, times
    y's bilinear weights; d/dy is one times x's). value gets no gradient from it. All else is finite, as the oracle."""
    inputs = make_inputs(DYADIC, device=DEVICES[backend])
    axis = "xy".index(coordinate)
    inputs.sampling_locations[(*POINT, axis)] = bad
    results = run(backend, inputs)

    batch, query, head = POINT[:3]
    expected_nan = [torch.zeros(result.shape, dtype=torch.bool) for result in results]
    expected_nan[0][batch, query, head * DYADIC.head_dim:(head + 1) * DYADIC.head_dim] = True
    expected_nan[2][(*POINT, 1 - axis)] = True
    expected_nan[3][POINT] = True
    for name, actual, expected, nan in zip(NAMES, results, oracle(inputs), expected_nan):
        assert torch.equal(expected.isnan(), nan), f"{name}: the reference itself changed"
        assert_same_nonfinite(name, actual, expected, TOLERANCE[backend, torch.float32])
    assert results[2][(*POINT, axis)].item() == 0


@pytest.mark.parametrize("where", ["pixel-centre", "off-the-map"])
@pytest.mark.parametrize("bad", NONFINITE.values(), ids=NONFINITE.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_attention_weight_propagates_like_the_reference(backend, bad, where):
    """The reference multiplies the bilinear sample by the weight A. On a pixel centre (the sample is that pixel) an
    infinite A gives +-inf in every channel, a NaN A NaN; off the map the sample is 0, so 0 * A is NaN either way
    (no backend may skip that sample). The output matches the oracle's NaN, +inf and -inf exactly, except triton's
    for an infinite A on the map (it folds A into the corner weights: NaN, see its kernel); the gradients match its
    non-finite entries, and its NaN ones too for a NaN A (for an infinite A the location gradient of the point, A
    times a sum, may be NaN where the reference's is +-inf or the reverse: it multiplies before summing)."""
    inputs = make_inputs(DYADIC, device=DEVICES[backend])
    location = (2.5 / 8, 1.5 / 4) if where == "pixel-centre" else (-0.5, 0.5)  # level 0 is 4 x 8
    inputs.sampling_locations[POINT] = torch.tensor(location)
    inputs.attention_weights[POINT] = bad
    results = run(backend, inputs)
    expected = oracle(inputs)

    batch, query, head = POINT[:3]
    row = expected[0][batch, query, head * DYADIC.head_dim:(head + 1) * DYADIC.head_dim]
    assert (row.isinf() if where == "pixel-centre" and not math.isnan(bad) else row.isnan()).all()
    classes = not (backend == "triton" and math.isinf(bad) and where == "pixel-centre")
    assert_same_nonfinite("output", results[0], expected[0], TOLERANCE[backend, torch.float32], classes)
    for name, actual, reference in zip(NAMES[1:], results[1:], expected[1:]):
        classes = math.isnan(bad) or name != "grad_sampling_locations"
        assert_same_nonfinite(name, actual, reference, TOLERANCE[backend, torch.float32], classes)


@pytest.mark.parametrize("bad", NONFINITE.values(), ids=NONFINITE.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_value_propagates_like_the_reference(backend, bad):
    """A NaN / +-inf value channel reaches every sample that reads its pixel as one of its (up to four) neighbours,
    even with bilinear weight 0 (0 * inf is NaN): output, weight and location gradients follow the oracle's NaN,
    +inf and -inf exactly; the value gradient does not involve value and stays finite."""
    inputs = make_inputs(DYADIC, device=DEVICES[backend])
    inputs.value[1, 2 * 8 + 3, 1, 5] = bad  # level 0, pixel (row 2, column 3), head 1, channel 5
    # On the centre of the pixel left of it, which is read with bilinear weight 0.
    inputs.sampling_locations[POINT] = torch.tensor([2.5 / 8, 2.5 / 4])
    results = run(backend, inputs)
    expected = oracle(inputs)
    assert expected[0].isnan().any() and expected[3].isnan().any()
    for name, actual, reference in zip(NAMES, results, expected):
        assert_same_nonfinite(name, actual, reference, TOLERANCE[backend, torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_nonfinite_inputs_match_the_reference(backend):
    """NaN, +inf and -inf scattered over value and locations, NaN over weights (infinite ones: see above), a third of
    the samples on pixel centres (some bilinear weights exactly 0), some weights 0: output and gradients have the
    oracle's NaN, +inf and -inf entries, and its finite ones."""
    inputs = make_inputs(DYADIC._replace(num_queries=24), seed=3)
    generator = torch.Generator().manual_seed(4)
    sizes = torch.tensor([(w, h) for h, w in DYADIC.spatial_shapes], dtype=torch.float32)[:, None, :]  # (L, 1, 2)
    centres = ((inputs.sampling_locations * sizes - 0.5).round() + 0.5) / sizes
    on_centre = torch.rand(inputs.attention_weights.shape, generator=generator)[..., None] < 1 / 3
    inputs.sampling_locations.copy_(torch.where(on_centre, centres, inputs.sampling_locations))
    inputs.attention_weights[torch.rand(inputs.attention_weights.shape, generator=generator) < 0.05] = 0
    every_kind = torch.tensor(list(NONFINITE.values()))
    for tensor, specials in (
        (inputs.value, every_kind), (inputs.sampling_locations, every_kind), (inputs.attention_weights, every_kind[:1])
    ):
        chosen = torch.rand(tensor.shape, generator=generator) < 0.02
        tensor[chosen] = specials[torch.randint(0, len(specials), (int(chosen.sum()),), generator=generator)]
    inputs = Inputs(*(t.to(DEVICES[backend]) if isinstance(t, Tensor) else t for t in inputs))
    results = run(backend, inputs)
    expected = oracle(inputs)
    for kind in (torch.isnan, torch.isposinf, torch.isneginf):
        assert kind(expected[0]).any() and kind(expected[3]).any()
    for name, actual, reference in zip(NAMES, results, expected):
        assert_same_nonfinite(name, actual, reference, TOLERANCE[backend, torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_queries_gives_empty_results(backend):
    inputs = make_inputs(Case(8, TWO_LEVELS, 2, 2, num_queries=0), device=DEVICES[backend])
    output, grad_value, grad_locations, grad_weights = run(backend, inputs)
    assert output.shape == (2, 0, 16)
    assert torch.all(grad_value == 0) and grad_value.shape == inputs.value.shape
    assert grad_locations.shape == inputs.sampling_locations.shape
    assert grad_weights.shape == inputs.attention_weights.shape


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_reads_value_in_half_and_keeps_locations_and_weights_in_float32(backend, half):
    """Under autocast a float32 value (or one already in the autocast dtype, as value_proj gives it) is read in the
    autocast dtype, the float32 locations and weights stay float32, accumulation is float32 and the output is in the
    autocast dtype: the float32 op on the rounded value, rounded once. Gradients come back in each input's dtype."""
    device = DEVICES[backend]
    inputs = make_inputs(SMALL, device=device)
    value = inputs.value.clone().requires_grad_(True)
    locations = inputs.sampling_locations.clone().requires_grad_(True)
    weights = inputs.attention_weights.clone().requires_grad_(True)
    with torch.autocast(device.type, dtype=half):
        output = ms_deform_attn(value, inputs.spatial_shapes, None, locations, weights, backend=backend)
        again = ms_deform_attn(value.detach().to(half), inputs.spatial_shapes, None, locations.detach(),
                               weights.detach(), backend=backend)
    assert output.dtype == again.dtype == half
    assert torch.equal(output, again)  # a value already in the autocast dtype gives the same
    rounded_value = inputs.value.to(half).double()
    expected = oracle(inputs._replace(value=rounded_value.to(inputs.value.dtype)))[0]
    assert_close("autocast output", output, expected, TOLERANCE[backend, half])
    # Against float32 throughout: the value's rounding (half a unit in the last place) plus the output's (half a unit;
    # a whole one in Triton's interpreter, which truncates): 2**-9 + 2**-8 = 5.9e-3 (bfloat16), 2**-12 + 2**-11 =
    # 7.3e-4 (float16); the weights sum to less than 1. Measured: 4.2e-3 and 3.9e-4.
    bound = {torch.bfloat16: 6e-3, torch.float16: 8e-4}[half]
    assert_close("autocast output vs float32", output, oracle(inputs)[0], bound)
    output.float().backward(inputs.grad_output.float())
    assert value.grad.dtype == locations.grad.dtype == weights.grad.dtype == torch.float32
    assert torch.isfinite(locations.grad).all() and locations.grad.abs().sum() > 0


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_half_value_is_read_as_it_is_with_float32_locations(backend, half):
    """Without autocast: a half value with float32 locations and weights (the mixed signature) runs as is; half
    locations and weights are up-cast to float32 first (rounded to half they would be half a pixel off)."""
    device = DEVICES[backend]
    inputs = make_inputs(SMALL, device=device)
    args = (inputs.spatial_shapes, None)
    value = inputs.value.to(half)
    mixed = ms_deform_attn(value, *args, inputs.sampling_locations, inputs.attention_weights, backend=backend)
    assert mixed.dtype == half
    expected = oracle(inputs._replace(value=value.to(inputs.value.dtype)))[0]
    assert_close("mixed output", mixed, expected, TOLERANCE[backend, half])
    all_half = ms_deform_attn(value, *args, inputs.sampling_locations.to(half), inputs.attention_weights.to(half),
                              backend=backend)
    from_float = ms_deform_attn(value, *args, inputs.sampling_locations.to(half).float(),
                                inputs.attention_weights.to(half).float(), backend=backend)
    assert torch.equal(all_half, from_float)


def test_locations_of_another_dtype_than_a_full_precision_value_are_refused():
    inputs = make_inputs(SMALL, torch.float64)
    with pytest.raises(ValueError, match="sampling_locations has dtype torch.float32, value has torch.float64; they "
                                         "must agree"):
        ms_deform_attn(inputs.value, inputs.spatial_shapes, None, inputs.sampling_locations.float(),
                       inputs.attention_weights, backend="reference")


@pytest.mark.parametrize("backend", ["reference", "cpu"])  # Triton's interpreter would take minutes
def test_gradcheck_float64(backend):
    inputs = make_inputs(Case(3, THREE_LEVELS, 2, 2, num_queries=4), torch.float64)
    # The bilinear derivative jumps at pixel-cell borders: no sample may lie within the finite-difference step of one
    # (eps 1e-6 in normalised coordinates is at most 5e-6 px on these maps).
    assert pixel_distance_to_cell_border(inputs.sampling_locations, inputs.spatial_shapes).min() > 1e-4
    differentiable = tuple(
        t.requires_grad_(True) for t in (inputs.value, inputs.sampling_locations, inputs.attention_weights)
    )

    def op(v, loc, w):
        return ms_deform_attn(v, inputs.spatial_shapes, None, loc, w, backend=backend)

    assert torch.autograd.gradcheck(op, differentiable, eps=1e-6, atol=1e-5, rtol=1e-4)


def _compiled_matches_eager(compile_backend: str, msda_backend: str) -> None:
    device = DEVICES.get(msda_backend, torch.device("cpu"))
    inputs = make_inputs(SMALL, device=device)

    def step(v, loc, w):
        # Ops around the MSDA call, so that a graph break would split the graph.
        output = ms_deform_attn(v * 2.0, inputs.spatial_shapes, None, loc.clamp(-1, 2), w.softmax(-1),
                                backend=msda_backend)
        return (output + 1).square()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    originals = (inputs.value, inputs.sampling_locations, inputs.attention_weights)
    eager_inputs = [t.clone().requires_grad_(True) for t in originals]
    compiled_inputs = [t.clone().requires_grad_(True) for t in originals]
    eager = step(*eager_inputs)
    result = compiled(*compiled_inputs)  # fullgraph=True raises on any graph break
    torch.testing.assert_close(result, eager)
    eager.sum().backward()
    result.sum().backward()
    for a, b in zip(compiled_inputs, eager_inputs):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("msda_backend", [*BACKENDS, "auto"])
def test_torch_compile_fullgraph_traces_the_op(msda_backend):
    """Dynamo traces the dispatch (auto's choice included) and the op (a custom op for cpu and triton) without a
    graph break, AOTAutograd the registered backward."""
    _compiled_matches_eager("aot_eager", msda_backend)


# --- cpu (Numba) ---


@pytest.mark.slow
def test_cpu_torch_compile_fullgraph_inductor():
    """Inductor generates (and compiles with the C++ toolchain) the code around the custom op."""
    _compiled_matches_eager("inductor", "cpu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cpu_half_dtypes_go_through_float32(dtype):
    inputs = make_inputs(SMALL)
    value, locations, weights = (
        t.to(dtype).requires_grad_(True) for t in (inputs.value, inputs.sampling_locations, inputs.attention_weights)
    )
    output = ms_deform_attn(value, inputs.spatial_shapes, None, locations, weights, backend="cpu")
    assert output.dtype == dtype
    output.float().square().sum().backward()
    assert value.grad.dtype == locations.grad.dtype == weights.grad.dtype == dtype
    # The op is the float32 one on the same (rounded) inputs, then rounded once.
    expected = ms_deform_attn(
        value.float(), inputs.spatial_shapes, None, locations.float(), weights.float(), backend="cpu"
    )
    assert torch.equal(output, expected.to(dtype))


def test_cpu_result_does_not_depend_on_thread_count():
    """grad_value is accumulated without atomics (one task per (batch, head)): bitwise equal on 1 and 2 threads."""
    # 3 * 200 queries * 2 heads * 4 levels * 4 points = 19200 samples: enough work for the kernels to use 2 threads.
    inputs = make_inputs(Case(32, FOUR_LEVELS, 4, 3, num_queries=200))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run("cpu", inputs)
        assert numba.get_num_threads() == 1
        torch.set_num_threads(2)
        double = run("cpu", inputs)
        assert numba.get_num_threads() == min(2, numba.config.NUMBA_NUM_THREADS)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(single, double):
        assert torch.equal(a, b)


def test_cpu_custom_ops_pass_opcheck():
    """Schema, fake (meta) kernels, autograd registration and AOT dispatch of both custom ops."""
    inputs = make_inputs(SMALL, torch.float64)
    flat_shapes = [size for hw in inputs.spatial_shapes for size in hw]
    value, locations, weights = inputs.value, inputs.sampling_locations, inputs.attention_weights
    forward = torch.ops.deformable_detr.ms_deform_attn_cpu.default
    backward = torch.ops.deformable_detr.ms_deform_attn_cpu_backward.default
    differentiable = tuple(t.clone().requires_grad_(True) for t in (value, locations, weights))
    torch.library.opcheck(forward, (differentiable[0], flat_shapes, differentiable[1], differentiable[2]))
    torch.library.opcheck(backward, (inputs.grad_output, value, flat_shapes, locations, weights))


def test_cpu_backward_layouts_agree(monkeypatch):
    """The backward scatters into a head-major copy when samples outnumber value rows, else in place: same sums in
    the same order, so bitwise equal results."""
    from deformable_detr.ops import cpu

    inputs = make_inputs(Case(24, THREE_LEVELS, 3, 2), torch.float64)
    results = []
    for samples_per_row in (0, 10**9):  # always head-major, never
        monkeypatch.setattr(cpu, "_HEAD_MAJOR_SAMPLES_PER_ROW", samples_per_row)
        results.append(cpu.msda_backward(
            inputs.grad_output, inputs.value, inputs.spatial_shapes, inputs.sampling_locations,
            inputs.attention_weights,
        ))
    for head_major, in_place in zip(*results):
        assert torch.equal(head_major, in_place)


# --- triton ---


def test_triton_several_query_blocks_with_a_partial_last_one(monkeypatch):
    """11 queries in blocks of 4 in the interpreter (3 programs per head, the last one 3/4 masked); a GPU picks blocks
    of 8."""
    from deformable_detr.ops import triton_kernels

    monkeypatch.setattr(triton_kernels, "_INTERPRETER_MAX_BLOCK_Q", 4)
    inputs = make_inputs(Case(24, THREE_LEVELS, 2, 2, num_queries=11), contiguous=False, device=DEVICES["triton"])
    for name, actual, expected in zip(NAMES, run("triton", inputs), oracle(inputs)):
        assert_close(name, actual, expected, TOLERANCE["triton", torch.float32])



@pytest.fixture
def deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) for one test, restored afterwards."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.mark.parametrize(("case", "dtype", "block_q"), [
    (CASES[1], torch.float64, 64), (CASES[2], torch.float32, 64),
    (Case(24, THREE_LEVELS, 2, 2, num_queries=11), torch.bfloat16, 4),
], ids=["float64-8points", "float32-3batch", "bfloat16-3blocks"])
def test_triton_deterministic_backward_matches_the_oracle(case, dtype, block_q, deterministic_algorithms, monkeypatch):
    """Under torch.use_deterministic_algorithms(True) grad_value is summed from per-neighbour records in a fixed order
    instead of with atomic adds: the same oracle and tolerances; the location and weight gradients are the same
    bits as without it (in the last case several query blocks, as on a GPU)."""
    from deformable_detr.ops import triton_kernels

    calls = []
    original = triton_kernels._gather_grad_value
    monkeypatch.setattr(triton_kernels, "_gather_grad_value", lambda *args: calls.append(1) or original(*args))
    monkeypatch.setattr(triton_kernels, "_INTERPRETER_MAX_BLOCK_Q", block_q)
    inputs = make_inputs(case, dtype, contiguous=False, device=DEVICES["triton"])
    results = run("triton", inputs)
    assert calls, "the deterministic gather did not run"
    for name, actual, expected in zip(NAMES, results, oracle(inputs)):
        assert_close(name, actual, expected, TOLERANCE["triton", dtype])
    torch.use_deterministic_algorithms(False)
    atomic = run("triton", inputs)
    assert len(calls) == 1
    assert torch.equal(results[2], atomic[2]) and torch.equal(results[3], atomic[3])


def test_triton_deterministic_backward_adds_in_query_point_order(deterministic_algorithms):
    """The order of the additions is the documented one: the records of a grad_value row by (query, level, point,
    neighbour). Three queries sample the centre of a 1x1 map (one neighbour, bilinear weight 1) with two points of
    attention weights 1 and 1/4; grad_output is (1, 2**24, 1). Every product is exact, but the float32 sums are not:
    in (query, point) order they give 20971524, in (point, query) order 20971520, the exact sum is 20971522.5."""
    device = DEVICES["triton"]
    value = torch.zeros(1, 1, 1, 1, device=device, requires_grad=True)
    locations = torch.full((1, 3, 1, 1, 2, 2), 0.5, device=device)
    weights = torch.tensor([1.0, 0.25], device=device).expand(1, 3, 1, 1, 2).contiguous()
    grad_output = torch.tensor([1.0, 2.0**24, 1.0], device=device).view(1, 3, 1)
    output = ms_deform_attn(value, [(1, 1)], None, locations, weights, backend="triton")
    (grad_value,) = torch.autograd.grad(output, value, grad_output)
    query_point_order = np.float32(0)
    for g in (1.0, 2.0**24, 1.0):
        for w in (1.0, 0.25):
            query_point_order = np.float32(query_point_order + np.float32(w * g))
    assert query_point_order == 20971524.0 and 1.0 * 1.25 + 2.0**24 * 1.25 + 1.25 == 20971522.5
    assert grad_value.item() == query_point_order


# --- dispatch and input validation ---


def _call_args(device: torch.device | str = "cpu") -> tuple:
    """Valid positional arguments of ms_deform_attn (float32, level_start_index None)."""
    inputs = make_inputs(SMALL, device=device)
    return inputs.value, inputs.spatial_shapes, None, inputs.sampling_locations, inputs.attention_weights


def test_dispatch_backends_are_the_three():
    assert BACKENDS == ("reference", "cpu", "triton")


def test_dispatch_auto_picks_cpu_for_cpu_tensors_and_triton_for_cuda():
    assert ops._resolve_backend("auto", torch.device("cpu")) == "cpu"
    # No GPU needed to ask: only the device type and whether triton imports matter.
    expected_cuda = "triton" if ops._import_problem("triton") is None else "reference"
    assert ops._resolve_backend("auto", torch.device("cuda")) == expected_cuda
    assert ops._resolve_backend("auto", torch.device("meta")) == "reference"
    assert available_backends("cpu")[:2] == ("reference", "cpu")


def test_dispatch_triton_runs_the_triton_kernels(monkeypatch):
    """backend="triton" reaches the Triton kernels, forward and backward: on CUDA tensors, or without a GPU on CPU
    tensors in Triton's interpreter (what every triton test here relies on; conftest sets TRITON_INTERPRET=1)."""
    from deformable_detr.ops import triton_kernels

    calls = []
    for name in ("msda_forward", "msda_backward"):
        original = getattr(triton_kernels, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(triton_kernels, name, spy)
    assert "triton" in available_backends(DEVICES["triton"])
    inputs = make_inputs(Case(8, ONE_BY_ONE, 1, 1), device=DEVICES["triton"])
    for name, actual, expected in zip(NAMES, run("triton", inputs), oracle(inputs)):
        assert_close(name, actual, expected, TOLERANCE["triton", torch.float32])
    assert calls == ["msda_forward", "msda_backward"]


def test_dispatch_auto_runs_the_cpu_backend(monkeypatch):
    from deformable_detr.ops import cpu

    calls = []
    original = cpu.msda_forward

    def spy(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(cpu, "msda_forward", spy)
    output = ms_deform_attn(*_call_args())
    assert len(calls) == 1
    torch.testing.assert_close(output, ms_deform_attn(*_call_args(), backend="reference"))


def test_dispatch_auto_without_numba_uses_the_reference_and_cpu_says_why(monkeypatch):
    monkeypatch.setitem(ops._IMPORT_PROBLEMS, "numba", "numba cannot be imported (test)")
    assert ops._resolve_backend("auto", torch.device("cpu")) == "reference"
    assert "cpu" not in available_backends("cpu")
    with pytest.raises(RuntimeError, match=r"backend 'cpu' cannot run here: numba cannot be imported \(test\)"):
        ms_deform_attn(*_call_args(), backend="cpu")


def test_dispatch_triton_on_cpu_without_the_interpreter_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    message = "backend 'triton' cannot run here: it runs on CUDA tensors.*TRITON_INTERPRET=1"
    with pytest.raises(RuntimeError, match=message):
        ms_deform_attn(*_call_args(), backend="triton")
    assert "triton" not in available_backends("cpu")


def test_dispatch_cpu_backend_refuses_other_devices():
    # The reason for a CUDA tensor, without needing a GPU, and the error for a meta tensor (which reaches dispatch).
    assert "runs on CPU tensors and value is on cuda" in ops._why_unavailable("cpu", torch.device("cuda"))
    with pytest.raises(RuntimeError, match="backend 'cpu' cannot run here: it runs on CPU tensors.*meta"):
        ms_deform_attn(*_call_args("meta"), backend="cpu")
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run here: it runs on CUDA tensors.*meta"):
        ms_deform_attn(*_call_args("meta"), backend="triton")


def test_dispatch_unknown_backend_lists_the_valid_ones():
    message = "unknown MSDA backend 'cuda_ext'; valid: 'auto', 'reference', 'cpu', 'triton'"
    with pytest.raises(ValueError, match=message):
        ms_deform_attn(*_call_args(), backend="cuda_ext")


BAD_INPUTS = {
    # id: (change to (value, spatial_shapes, level_start_index, sampling_locations, attention_weights), message)
    "integer": (lambda v, s, i, loc, w: (v.long(), s, i, loc, w), "value must be a floating-point tensor"),
    "rank": (lambda v, s, i, loc, w: (v[0], s, i, loc, w), "value must have shape"),
    "positions": (lambda v, s, i, loc, w: (v[:, :-1], s, i, loc, w), "positions on dim 1 but spatial_shapes"),
    "shapes": (lambda v, s, i, loc, w: (v, [(4, 5), (2, 3), (1, 2)], i, loc, w), "spatial_shapes"),
    "locations-rank": (lambda v, s, i, loc, w: (v, s, i, loc[0], w), "sampling_locations must have shape"),
    "locations-xy": (lambda v, s, i, loc, w: (v, s, i, loc[..., :1], w), "sampling_locations must have shape"),
    "levels": (lambda v, s, i, loc, w: (v, s, i, loc[:, :, :, :2], w), "2 levels on dim 3"),
    "weights-rank": (lambda v, s, i, loc, w: (v, s, i, loc, w[..., None]), "attention_weights must have shape"),
    "weights-points": (lambda v, s, i, loc, w: (v, s, i, loc, w[..., :1]), "attention_weights must have shape"),
    "locations-dtype": (lambda v, s, i, loc, w: (v, s, i, loc.double(), w), "sampling_locations has dtype"),
    "weights-dtype": (lambda v, s, i, loc, w: (v, s, i, loc, w.double()), "attention_weights has dtype torch.float64"),
    "locations-device": (lambda v, s, i, loc, w: (v, s, i, loc.to("meta"), w), "sampling_locations is on meta"),
    "weights-device": (lambda v, s, i, loc, w: (v, s, i, loc, w.to("meta")), "attention_weights is on meta"),
    "level-start-index": (lambda v, s, i, loc, w: (v, s, i[:2], loc, w), "level_start_index must have shape"),
}


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
@pytest.mark.parametrize(("change", "message"), BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_raise_value_error_naming_the_argument(backend, change, message):
    value, shapes, _, locations, weights = _call_args()
    args = change(value, shapes, level_start_index_of(shapes), locations, weights)
    with pytest.raises(ValueError, match=message):
        ms_deform_attn(*args, backend=backend)
