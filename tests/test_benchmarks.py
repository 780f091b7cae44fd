"""benchmarks/gpu.py, the one command for a GPU, run the way CI can: on the CPU with ``--quick`` in a subprocess (its
JSON and table), the error for ``--device cuda`` without a GPU, and a backend that cannot run reported per case while
the rest goes on."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers.tiny import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import gpu  # noqa: E402
import msda  # noqa: E402

from deformable_detr.verify.comparison import Check  # noqa: E402

SCRIPT = REPO_ROOT / "benchmarks" / "gpu.py"


def run_gpu_script(*flags: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, cwd=REPO_ROOT,
                          env=env or dict(os.environ), timeout=timeout)


def without_triton_interpreter() -> dict[str, str]:
    """The environment without TRITON_INTERPRET (conftest sets it for this process when there is no GPU)."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_benchmark") / "gpu.json"
    completed = run_gpu_script("--device", "cpu", "--quick", "--json", str(out))
    return completed, out


def test_level_shapes_of_the_official_scale_are_the_attention_benchmark_shapes():
    assert gpu.level_shapes(800, 1066) == msda.SPATIAL_SHAPES
    assert gpu.level_shapes(128, 160) == [(16, 20), (8, 10), (4, 5), (2, 3)]


def test_check_summary_groups_by_name_and_keeps_the_worst_error_over_tolerance():
    checks = [Check("out.pred_logits", 1e-6, 2e-5, True, "rel-max"), Check("out.pred_boxes", 1e-5, 2e-5, True, "rel"),
              Check("loss.total", 2e-5, 1e-5, False, "rel"), Check("c0.prep.labels", 0.0, 0.0, True, "exact"),
              Check("c1.prep.size", 1.0, 0.0, False, "exact")]
    summary = gpu.summarise_checks(checks)
    assert (summary["checks"], summary["passed"], summary["failed"]) == (5, 3, 2)
    assert summary["failed_names"] == ["loss.total", "c1.prep.size"]
    groups = summary["groups"]
    assert set(groups) == {"out", "loss", "prep"}
    assert groups["out"]["worst"] == "out.pred_boxes" and groups["out"]["ratio"] == pytest.approx(0.5)
    assert groups["loss"]["failed"] == 1 and groups["loss"]["ratio"] == pytest.approx(2.0)
    assert groups["prep"]["worst"] == "c1.prep.size" and math.isinf(groups["prep"]["ratio"])


@pytest.mark.slow
def test_quick_cpu_run_writes_every_part_and_verify_passes(quick_run):
    completed, out = quick_run
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result) >= {"environment", "parts", "seconds", "errors", "verify_passed"}
    env = result["environment"]
    assert env["device"] == "cpu" and env["quick"] is True and env["backends"] == ["reference", "cpu"]
    assert env["torch"] == torch.__version__ and "triton" in env and "nvidia_smi" in env
    assert list(result["parts"]) == list(gpu.PARTS)
    assert all(part["seconds"] > 0 for part in result["parts"].values())
    assert result["errors"] == 0 and result["verify_passed"] is True

    verify = result["parts"]["verify"]
    verified = {(r["file"], r["backend"]) for r in verify["records"]}
    assert verified == {("msda_core.npz", "reference"), ("msda_core.npz", "cpu"), ("eval_transform.npz", "-"),
                        ("deformable_detr.npz", "reference"), ("deformable_detr.npz", "cpu")}
    for record in verify["records"]:
        assert record["error"] is None and record["failed"] == 0 and record["passed"] == record["checks"] > 0
        assert sum(group["checks"] for group in record["groups"].values()) == record["checks"]
    model = next(r for r in verify["records"] if r["file"] == "deformable_detr.npz")
    assert set(model["groups"]) == {"out", "dbg", "loss", "match", "grad", "gradnorm", "post"}
    assert all(0 <= group["ratio"] <= 1 for group in model["groups"].values())
    assert {"detr.npz", "two_stage.npz"} <= {s["file"] for s in verify["skipped"]}

    attention = result["parts"]["msda"]["records"]
    cases = {(r["shape"], r["batch"], r["backend"], r["precision"]) for r in attention}
    assert cases == {(shape, batch, backend, precision) for shape in ("encoder", "decoder") for batch in (1, 2)
                     for backend in ("reference", "cpu") for precision in gpu.PRECISIONS}
    for record in attention:
        assert record["error"] is None and record["forward_s"] > 0 and record["forward_backward_s"] > 0
        if record["backend"] == "cpu":
            assert record["forward_speedup"] > 0
        if record["precision"] == "float32":
            assert "output_rel_error_vs_float32" not in record
        else:  # the value rounded to 8 (bfloat16) or 11 (float16) significant bits, the op in float32
            assert 0 < record["output_rel_error_vs_float32"] < 2e-2 and 0 < record["grad_rel_error_vs_float32"] < 2e-2

    inference = result["parts"]["inference"]["records"]
    assert {(r["variant"], r["backend"], r["precision"], r["batch"]) for r in inference} == {
        (variant, backend, precision, batch) for variant in ("multi-scale", "two-stage")
        for backend in ("reference", "cpu") for precision in ("float32", "bfloat16") for batch in (1, 4)}
    training = result["parts"]["training"]["records"]
    assert {(r["backend"], r["precision"], r["batch"]) for r in training} == {
        (backend, precision, 2) for backend in ("reference", "cpu") for precision in ("float32", "bfloat16")}
    for record in inference + training:
        assert record["error"] is None and record["images_per_s"] > 0 and record["size"] == [128, 160]


@pytest.mark.slow
def test_quick_cpu_run_prints_one_table_and_progress_per_part(quick_run):
    completed, _ = quick_run
    lines = completed.stdout.splitlines()
    assert lines[0].startswith("cpu (") and "--quick" in lines[0]
    assert [cell.strip() for cell in lines[1].split("|")[1:-1]] == ["part", "case", "backend", "precision", "status",
                                                                     "result"]
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| part ")]
    assert {row.split("|")[1].strip() for row in rows} == set(gpu.PARTS)
    assert not [row for row in rows if "ERROR" in row or "FAIL" in row]
    assert lines[-1].startswith("time: verify ") and "0 case(s) with an error" in lines[-1]
    assert "epoch 0 done" not in completed.stdout  # the training loop's own line is progress, on stderr
    for part in gpu.PARTS:
        assert f"[gpu.py] {part}: done in" in completed.stderr


# Both need a machine without a GPU (there the triton backend cannot run on CPU tensors without the interpreter):
# defined only there, rather than skipped elsewhere.
if not torch.cuda.is_available():

    def test_device_cuda_without_a_gpu_is_one_line_and_exit_2(tmp_path):
        out = tmp_path / "gpu.json"
        completed = run_gpu_script("--device", "cuda", "--json", str(out), timeout=120)
        assert completed.returncode == 2
        assert completed.stdout == ""
        assert completed.stderr.strip().splitlines() == [completed.stderr.strip()]
        assert "--device cuda" in completed.stderr and "no CUDA device" in completed.stderr
        assert not out.exists()


    def test_a_backend_that_cannot_run_is_reported_per_case_and_the_rest_runs(tmp_path):
        references = tmp_path / "reference"
        references.mkdir()
        shutil.copy(REPO_ROOT / "tests" / "reference" / "msda_core.npz", references)
        out = tmp_path / "gpu.json"
        # Without TRITON_INTERPRET the triton backend cannot run on CPU tensors.
        completed = run_gpu_script("--device", "cpu", "--quick", "--parts", "verify", "msda", "--backends", "triton",
                                   "reference", "--reference-dir", str(references), "--json", str(out),
                                   env=without_triton_interpreter(), timeout=300)
        assert completed.returncode == 1, completed.stderr[-3000:]
        result = json.loads(out.read_text())
        records = result["parts"]["verify"]["records"] + result["parts"]["msda"]["records"]
        failed = [r for r in records if r["error"]]
        assert failed and all(r["backend"] == "triton" for r in failed)
        assert all("TRITON_INTERPRET" in r["error"] and r["error"].startswith("BackendUnavailableError")
                   for r in failed)
        assert result["errors"] == len(failed) == 1 + 4 * len(gpu.PRECISIONS)  # msda_core; 2 shapes x 2 batches
        reference = [r for r in records if r["backend"] == "reference"]
        assert len(reference) == len(failed) and not any(r["error"] for r in reference)
        assert result["verify_passed"] is False
        assert all(r["forward_s"] > 0 for r in reference if "forward_s" in r)
        error_rows = [line for line in completed.stdout.splitlines() if "| ERROR " in line]
        assert len(error_rows) == len(failed) and all("| triton " in row for row in error_rows)
