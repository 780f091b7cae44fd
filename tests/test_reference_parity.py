"""Every public reference file of the official implementation passes through ``ddetr verify``'s machinery."""

from __future__ import annotations

import pytest

from deformable_detr.config import VARIANTS
from deformable_detr.verify import load_reference, verify_reference


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_matches_official(reference_path, variant):
    reference = load_reference(reference_path / f"{variant}.npz")
    checks, computed = verify_reference(reference)
    failed = [check.line() for check in checks if not check.passed]
    assert not failed, "\n".join(failed)
    # Every reference array is either an input or was computed and compared: nothing is silently ignored.
    inputs = {k for k in reference if k.startswith(("meta.", "in.", "tgt."))}
    assert set(reference) - inputs <= set(computed)
    compared = {check.name.split(" ")[0] for check in checks}
    for key in set(reference) - inputs - {"grad.names", "gradnorm.names", "gradnorm.values", "post.target_sizes"}:
        if not key.startswith("post."):
            assert key in compared, f"{key} was not compared"


def test_msda_core_matches_official(reference_path):
    checks, _ = verify_reference(load_reference(reference_path / "msda_core.npz"), backend="reference")
    assert len(checks) == 4
    assert all(check.passed for check in checks), [check.line() for check in checks]


def test_a_perturbed_reference_fails(reference_path):
    """The comparison can fail: a reference output moved by 1e-3 of its scale is caught."""
    reference = load_reference(reference_path / "msda_core.npz")
    reference["msda.grad_sampling_locations"] = reference["msda.grad_sampling_locations"].copy()
    reference["msda.grad_sampling_locations"].flat[7] += 1e-3 * abs(reference["msda.grad_sampling_locations"]).max()
    checks, _ = verify_reference(reference, backend="reference")
    failed = [check.name for check in checks if not check.passed]
    assert failed == ["msda.grad_sampling_locations"]
