"""``ddetr verify`` as a user runs it: a separate process, exit codes, the saved arrays."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np


def _ddetr(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deformable_detr", *args], capture_output=True, text=True,
                          timeout=600)


def test_verify_passes_and_saves_under_the_reference_names(reference_path, tmp_path):
    out = tmp_path / "computed.npz"
    result = _ddetr("verify", str(reference_path / "msda_core.npz"), "--save", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS  msda.grad_sampling_locations" in result.stdout
    assert "all checks passed" in result.stdout
    saved = np.load(out)
    reference = np.load(reference_path / "msda_core.npz")
    assert set(saved.files) == {"msda.output", "msda.grad_value", "msda.grad_sampling_locations",
                                "msda.grad_attention_weights"}
    np.testing.assert_allclose(saved["msda.output"], reference["msda.output"], rtol=1e-12, atol=1e-14)


def test_verify_fails_on_a_wrong_reference(reference_path, tmp_path):
    reference = dict(np.load(reference_path / "msda_core.npz"))
    reference["msda.output"] = reference["msda.output"] * 1.001
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, **reference)
    result = _ddetr("verify", str(wrong), "--failures-only")
    assert result.returncode == 1
    assert "FAIL  msda.output" in result.stdout and "SOME CHECKS FAILED" in result.stdout


def test_verify_rejects_a_file_that_is_not_a_reference(tmp_path):
    other = tmp_path / "other.npz"
    np.savez(other, weights=np.zeros(3))
    result = _ddetr("verify", str(other))
    assert result.returncode == 2
    assert "not a reference file" in result.stderr and "meta.variant" in result.stderr
    not_npz = tmp_path / "notes.npz"
    not_npz.write_text("hello")
    result = _ddetr("verify", str(not_npz))
    assert result.returncode == 2 and "not a numpy .npz archive" in result.stderr


def test_verify_with_a_backend_that_cannot_run_says_why(reference_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "deformable_detr", "verify", str(reference_path / "msda_core.npz"),
                             "--backend", "triton", "--device", "cpu"], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 2
    assert "backend 'triton' cannot run here: it runs on CUDA tensors" in result.stderr
