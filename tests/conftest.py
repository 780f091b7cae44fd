from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton decides between compiled and interpreted kernels when a kernel module is first imported: without a GPU,
# run them in the interpreter (how CI tests the Triton backend), before any test module imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


def reference_dir() -> Path:
    """The official reference vectors: $DDETR_REFERENCE_DIR, else the repository's copy in tests/reference."""
    path = Path(os.environ.get("DDETR_REFERENCE_DIR", REPO_ROOT / "tests" / "reference"))
    if not (path / "README.md").is_file():
        raise FileNotFoundError(
            f"reference vectors not found at {path}; set DDETR_REFERENCE_DIR to the folder holding the .npz files"
        )
    return path


@pytest.fixture(scope="session")
def reference_path() -> Path:
    return reference_dir()
