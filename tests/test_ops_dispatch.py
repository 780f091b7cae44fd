"""MSDA backend dispatch: what ``auto`` picks, why an explicit backend cannot run, input errors naming the argument,
and the triton backend reached through ``ms_deform_attn`` in Triton's interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import deformable_detr.ops as ops
from deformable_detr.ops import BACKENDS, available_backends, ms_deform_attn

REPO_ROOT = Path(__file__).resolve().parents[1]


def _inputs(device="cpu", dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    shapes = [(4, 5), (2, 3), (1, 1)]
    value = torch.randn(2, 27, 2, 8, generator=generator).to(device=device, dtype=dtype)
    locations = torch.rand(2, 5, 2, 3, 2, 2, generator=generator).to(device=device, dtype=dtype)
    weights = torch.rand(2, 5, 2, 3, 2, generator=generator).to(device=device, dtype=dtype)
    return value, shapes, None, locations, weights


def test_backends_are_the_three():
    assert BACKENDS == ("reference", "cpu", "triton")


def test_auto_picks_cpu_for_cpu_tensors_and_triton_for_cuda():
    assert ops._resolve_backend("auto", torch.device("cpu")) == "cpu"
    # No GPU needed to ask: only the device type and whether triton imports matter.
    expected_cuda = "triton" if ops._import_problem("triton") is None else "reference"
    assert ops._resolve_backend("auto", torch.device("cuda")) == expected_cuda
    assert ops._resolve_backend("auto", torch.device("meta")) == "reference"
    assert available_backends("cpu")[:2] == ("reference", "cpu")


def test_auto_runs_the_cpu_backend(monkeypatch):
    from deformable_detr.ops import cpu

    calls = []
    original = cpu.msda_forward

    def spy(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(cpu, "msda_forward", spy)
    output = ms_deform_attn(*_inputs())
    assert len(calls) == 1
    torch.testing.assert_close(output, ms_deform_attn(*_inputs(), backend="reference"))


def test_auto_without_numba_uses_the_reference_and_cpu_says_why(monkeypatch):
    monkeypatch.setitem(ops._IMPORT_PROBLEMS, "numba", "numba cannot be imported (test)")
    assert ops._resolve_backend("auto", torch.device("cpu")) == "reference"
    assert "cpu" not in available_backends("cpu")
    with pytest.raises(RuntimeError, match=r"backend 'cpu' cannot run here: numba cannot be imported \(test\)"):
        ms_deform_attn(*_inputs(), backend="cpu")


def test_triton_on_cpu_without_the_interpreter_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    message = "backend 'triton' cannot run here: it runs on CUDA tensors.*TRITON_INTERPRET=1"
    with pytest.raises(RuntimeError, match=message):
        ms_deform_attn(*_inputs(), backend="triton")
    assert "triton" not in available_backends("cpu")


def test_cpu_backend_refuses_other_devices():
    # The reason for a CUDA tensor, without needing a GPU, and the error for a meta tensor (which reaches dispatch).
    assert "runs on CPU tensors and value is on cuda" in ops._why_unavailable("cpu", torch.device("cuda"))
    with pytest.raises(RuntimeError, match="backend 'cpu' cannot run here: it runs on CPU tensors.*meta"):
        ms_deform_attn(*_inputs(device="meta"), backend="cpu")
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run here: it runs on CUDA tensors.*meta"):
        ms_deform_attn(*_inputs(device="meta"), backend="triton")


def test_unknown_backend_lists_the_valid_ones():
    message = "unknown MSDA backend 'cuda_ext'; valid: 'auto', 'reference', 'cpu', 'triton'"
    with pytest.raises(ValueError, match=message):
        ms_deform_attn(*_inputs(), backend="cuda_ext")


@pytest.mark.parametrize("backend", ["auto", "reference", "cpu"])
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda v, s, i, loc, w: (v.long(), s, i, loc, w), "value must be a floating-point tensor"),
        (lambda v, s, i, loc, w: (v[0], s, i, loc, w), "value must have shape"),
        (lambda v, s, i, loc, w: (v, s, i, loc[0], w), "sampling_locations must have shape"),
        (lambda v, s, i, loc, w: (v, s, i, loc, w[..., None]), "attention_weights must have shape"),
        (lambda v, s, i, loc, w: (v, s, i, loc.to("meta"), w), "sampling_locations is on meta"),
        (lambda v, s, i, loc, w: (v, s, i, loc, w.to("meta")), "attention_weights is on meta"),
        (lambda v, s, i, loc, w: (v, s, i, loc, w.double()), "attention_weights has dtype torch.float64"),
        (lambda v, s, i, loc, w: (v, [(4, 5), (2, 3), (1, 2)], i, loc, w), "spatial_shapes"),
    ],
    ids=["integer", "rank", "locations-rank", "weights-rank", "locations-device", "weights-device", "dtype", "shapes"],
)
def test_bad_inputs_raise_value_error_naming_the_argument(backend, change, message):
    with pytest.raises(ValueError, match=message):
        ms_deform_attn(*change(*_inputs()), backend=backend)


def test_triton_backend_through_the_dispatcher_in_the_interpreter():
    """In a fresh process with TRITON_INTERPRET=1 (it must be set before the kernels are decorated), the triton
    backend runs on CPU tensors through ms_deform_attn, forward and backward, and agrees with the reference."""
    script = textwrap.dedent(
        """
        import torch
        from deformable_detr.ops import available_backends, ms_deform_attn
        assert "triton" in available_backends("cpu"), available_backends("cpu")
        generator = torch.Generator().manual_seed(0)
        shapes = [(4, 5), (2, 3), (1, 1)]
        value = torch.randn(2, 27, 2, 8, generator=generator, dtype=torch.float64)
        locations = -0.2 + 1.4 * torch.rand(2, 5, 2, 3, 2, 2, generator=generator, dtype=torch.float64)
        weights = torch.rand(2, 5, 2, 3, 2, generator=generator, dtype=torch.float64)
        results = {}
        for backend in ("triton", "reference"):
            inputs = [t.clone().requires_grad_(True) for t in (value, locations, weights)]
            output = ms_deform_attn(inputs[0], shapes, None, inputs[1], inputs[2], backend=backend)
            results[backend] = (output, *torch.autograd.grad(output.square().sum(), inputs))
        for got, expected in zip(results["triton"], results["reference"]):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
        print("ok")
        """
    )
    environment = {**os.environ, "TRITON_INTERPRET": "1"}
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0 and completed.stdout.strip() == "ok", completed.stderr[-3000:]
