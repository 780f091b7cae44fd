"""A tiny model and a synthetic dataset for tests that go through the `ddetr` command line as a user would."""

from __future__ import annotations

import os
import sys
from pathlib import Path

TINY_MODEL_FLAGS = ["--backbone", "resnet18", "--hidden_dim", "32", "--nheads", "4", "--enc_layers", "1",
                    "--dec_layers", "2", "--dim_feedforward", "64", "--num_queries", "10"]
TINY_RUN_FLAGS = ["--pretrained_backbone", "none", "--lr_backbone", "2e-4", "--device", "cpu", "--num_workers", "0",
                  "--batch_size", "2", "--train_scales", "64", "--crop_resize_sizes", "64", "--crop_size", "48", "64",
                  "--val_size", "64", "--max_size", "80"]
REPO_ROOT = Path(__file__).resolve().parents[2]


def data_flags(data) -> list[str]:
    """The flags naming a SyntheticDataset's images and annotations."""
    return ["--train_images", str(data.train_images), "--train_json", str(data.train_json),
            "--val_images", str(data.val_images), "--val_json", str(data.val_json)]


def user_environment(**extra: str) -> dict[str, str]:
    """The environment of a user whose virtual environment is active: its bin folder (ddetr, torchrun) first on the
    PATH; one thread per process, as two processes share this machine's cores."""
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID")}
    return {**env, "PATH": bin_dir + os.pathsep + env.get("PATH", ""), "OMP_NUM_THREADS": "1", **extra}
