"""The pure-PyTorch MSDA op: float64 gradcheck, a hand-computed bilinear sample, and input validation."""

from __future__ import annotations

import pytest
import torch

from deformable_detr.ops import level_start_index_of, ms_deform_attn


def _inputs(batch=2, queries=5, heads=2, head_dim=3, shapes=((4, 5), (2, 3), (1, 1)), points=2, dtype=torch.float64,
            seed=0):
    generator = torch.Generator().manual_seed(seed)
    num_values = sum(h * w for h, w in shapes)
    value = torch.randn(batch, num_values, heads, head_dim, generator=generator, dtype=dtype)
    locations = -0.2 + 1.4 * torch.rand(batch, queries, heads, len(shapes), points, 2, generator=generator,
                                         dtype=dtype)
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=generator, dtype=dtype)
    return value, list(shapes), level_start_index_of(list(shapes)), locations, weights


def test_gradcheck_float64():
    value, shapes, starts, locations, weights = _inputs()
    # The bilinear derivative jumps at pixel-cell borders; with seed 0 no sample lies within eps of one.
    for inputs in (value, locations, weights):
        inputs.requires_grad_(True)

    def op(v, loc, w):
        return ms_deform_attn(v, shapes, starts, loc, w, backend="reference")

    assert torch.autograd.gradcheck(op, (value, locations, weights), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_bilinear_sample_by_hand():
    """One level 2x3, one head, one point: the output is the bilinear blend of the 4 neighbours (align_corners
    False: pixel (i, j) is centred at ((j + 0.5) / W, (i + 0.5) / H)), zeros outside."""
    value = torch.arange(6, dtype=torch.float64).view(1, 6, 1, 1)  # rows [0 1 2], [3 4 5]
    x = 0.75 * 3 - 0.5  # pixel coordinates (1.75, 0.0): row 0 exactly
    locations = torch.tensor([0.75, 0.25], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
    weights = torch.ones(1, 1, 1, 1, 1, dtype=torch.float64)
    out = ms_deform_attn(value, [(2, 3)], None, locations, weights)
    expected = (1 - (x - 1)) * 1 + (x - 1) * 2  # row 0 exactly (y = 0), between columns 1 and 2
    assert out.item() == pytest.approx(expected)
    # x = 0 is half a pixel left of column 0's centre: half of pixel (1, 0) plus half of a zero from outside.
    locations = torch.tensor([0.0, 0.75], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
    out = ms_deform_attn(value, [(2, 3)], None, locations, weights)
    assert out.item() == pytest.approx(0.5 * 3)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda v, s, i, loc, w: (v[0], s, i, loc, w), "value must have shape"),
        (lambda v, s, i, loc, w: (v.long(), s, i, loc, w), "floating-point"),
        (lambda v, s, i, loc, w: (v[:, :-1], s, i, loc, w), "spatial_shapes"),
        (lambda v, s, i, loc, w: (v, s, i, loc[..., :1], w), "sampling_locations must have shape"),
        (lambda v, s, i, loc, w: (v, s, i, loc[:, :, :, :2], w), "levels"),
        (lambda v, s, i, loc, w: (v, s, i, loc, w[..., :1]), "attention_weights must have shape"),
        (lambda v, s, i, loc, w: (v, s, i, loc.float(), w), "dtype"),
        (lambda v, s, i, loc, w: (v, s, i[:2], loc, w), "level_start_index"),
    ],
)
def test_bad_inputs_name_the_argument(change, message):
    with pytest.raises(ValueError, match=message):
        ms_deform_attn(*change(*_inputs()))


def test_unknown_backend_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown MSDA backend 'cuda_ext'.*'reference'"):
        ms_deform_attn(*_inputs(), backend="cuda_ext")
