"""The official README's commands, as written: configs/*.sh through tools/run_dist_launch.sh (two CPU processes),
``<config> --resume <ckpt> --eval``, and tools/run_dist_slurm.sh's srun command line."""

from __future__ import annotations

import json
import socket
import subprocess

import pytest
import torch
from helpers.tiny import REPO_ROOT, TINY_MODEL_FLAGS, TINY_RUN_FLAGS, data_flags, user_environment

from deformable_detr.data import make_synthetic_dataset

CONFIGS = {
    "r50_deformable_detr": [],
    "r50_deformable_detr_single_scale": ["--num_feature_levels", "1"],
    "r50_deformable_detr_single_scale_dc5": ["--num_feature_levels", "1", "--dilation"],
    "r50_deformable_detr_plus_iterative_bbox_refinement": ["--with_box_refine"],
    "r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage": ["--with_box_refine", "--two_stage"],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), num_train=8, num_val=4, image_size=64)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_config_runs_ddetr_train_with_the_official_flags(name, tmp_path):
    # DDETR replaced by echo: the command line the script runs.
    result = subprocess.run([str(REPO_ROOT / "configs" / f"{name}.sh"), "--lr", "1e-4"], capture_output=True,
                            text=True, env=user_environment(DDETR="echo"), cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["train", *CONFIGS[name], "--output_dir", f"exps/{name}", "--lr", "1e-4"]


def test_the_launch_script_trains_and_resumes_in_two_processes(synthetic, tmp_path):
    out = tmp_path / "exps"
    config = str(REPO_ROOT / "configs" / "r50_deformable_detr.sh")
    command = [str(REPO_ROOT / "tools" / "run_dist_launch.sh"), "2", config, *TINY_MODEL_FLAGS, *TINY_RUN_FLAGS,
               *data_flags(synthetic), "--output_dir", str(out), "--epochs", "1", "--eval_every", "100",
               "--no_progress"]
    env = user_environment(GPUS_PER_NODE="2", MASTER_PORT=str(_free_port()))
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 processes on cpu" in result.stdout
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 0

    # Resume in two processes: the settings come from the checkpoint; given are the new epoch count, and the output
    # folder, which the config script sets (to exps/<config name>) as the official one does.
    env["MASTER_PORT"] = str(_free_port())
    resume = [*command[:3], "--resume", str(out / "checkpoint.pth"), "--epochs", "2", "--output_dir", str(out),
              "--no_progress"]
    result = subprocess.run(resume, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "epochs 1..1; 2 processes on cpu" in result.stdout
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [entry["epoch"] for entry in log] == [0, 1] and len(log[-1]["test_coco_eval_bbox"]) == 12
    # The official evaluation form: <config> --resume <checkpoint> --eval.
    evaluation = subprocess.run([config, "--resume", str(out / "checkpoint.pth"), "--eval", "--output_dir",
                                 str(tmp_path / "eval"), "--device", "cpu", "--no_progress"],
                                capture_output=True, text=True, env=user_environment(), cwd=tmp_path, timeout=600)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    stats = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert stats["test_coco_eval_bbox"] == log[-1]["test_coco_eval_bbox"]


def test_the_slurm_script_builds_the_official_srun_line():
    script = str(REPO_ROOT / "tools" / "run_dist_slurm.sh")
    result = subprocess.run([script, "gpu", "ddetr", "16", "configs/r50_deformable_detr.sh", "--coco_path", "my coco"],
                            capture_output=True, text=True, env=user_environment(DRY_RUN="1", SRUN_ARGS="--time=2:00"),
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "srun -p gpu --job-name=ddetr --gres=gpu:8 --ntasks=16 --ntasks-per-node=8 --cpus-per-task=4 "
        "--kill-on-bad-exit=1 --time=2:00 configs/r50_deformable_detr.sh --coco_path my\\ coco")
    result = subprocess.run([script, "gpu", "job", "4", "run.sh"], capture_output=True, text=True,
                            env=user_environment(DRY_RUN="1", CPUS_PER_TASK="6"), timeout=60)
    assert "--gres=gpu:4 --ntasks=4 --ntasks-per-node=4 --cpus-per-task=6" in result.stdout
    result = subprocess.run([script, "gpu"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "usage:" in result.stderr
