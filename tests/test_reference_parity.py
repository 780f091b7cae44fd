"""Every public reference file of the official implementation passes through ``ddetr verify``'s machinery."""

from __future__ import annotations

import numpy as np
import pytest

from deformable_detr.config import VARIANTS
from deformable_detr.verify.run import load_reference, verify_reference


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


def test_gradient_tolerance_follows_what_feeds_a_sampling_location():
    """Every parameter of an encoder/decoder layer but the last (and pos_trans) feeds a later sampling location, so
    its grad gets the upstream bounds; the last layer's attention weights and the heads get the heads' bound."""
    from deformable_detr.verify.run import GRAD_HEAD_REL_MAX, GRAD_UPSTREAM_REL_MAX, _gradient_checks

    layers = {"encoder": 6, "decoder": 6}
    grad = np.ones(4)

    def bounds(name: str) -> list[float]:
        return [check.tolerance for check in _gradient_checks(f"grad.{name}", grad, grad, layers)]

    assert GRAD_UPSTREAM_REL_MAX in bounds("transformer.decoder.layers.0.cross_attn.attention_weights.weight")
    assert GRAD_UPSTREAM_REL_MAX in bounds("transformer.encoder.layers.4.self_attn.value_proj.weight")
    assert GRAD_UPSTREAM_REL_MAX in bounds("transformer.pos_trans.bias")
    assert bounds("transformer.decoder.layers.5.cross_attn.attention_weights.weight") == [GRAD_HEAD_REL_MAX]
    assert bounds("transformer.decoder.layers.5.cross_attn.value_proj.weight") == [GRAD_HEAD_REL_MAX]
    assert bounds("class_embed.0.weight") == [GRAD_HEAD_REL_MAX]


def test_verify_turns_tensorfloat32_off_while_it_runs(reference_path, monkeypatch):
    """On a GPU, cuDNN's default TF32 moves the backbone by ~2e-4 (seen on an H200), ten times the tolerances: verify
    runs with it off and puts the user's settings back afterwards."""
    import torch

    from deformable_detr.verify import run

    seen = []
    real = run.run_msda_case

    def spy(*args, **kwargs):
        seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
                     torch.get_float32_matmul_precision()))
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "run_msda_case", spy)
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.get_float32_matmul_precision())
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
        checks, _ = verify_reference(load_reference(reference_path / "msda_core.npz"), backend="reference")
        assert seen == [(False, False, "highest")]
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
                torch.get_float32_matmul_precision()) == (True, True, "high")
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])
