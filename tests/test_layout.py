"""The layers, as imports show them: the package imports light, inference never imports training, configs and the
command line import no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "deformable_detr"


def _modules_loaded_by(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_importing_the_package_or_its_configs_loads_no_torch():
    for statement in ("import deformable_detr", "from deformable_detr.config import TrainConfig",
                      "from deformable_detr import cli"):
        loaded = _modules_loaded_by(statement)
        assert "torch" not in loaded and "numpy" not in loaded, statement


def test_the_detector_loads_neither_matplotlib_nor_pycocotools_nor_training():
    loaded = _modules_loaded_by("from deformable_detr import Detector")
    assert "torch" in loaded  # the check below is about a real import
    heavy = sorted(m for m in loaded if m.split(".")[0] in ("matplotlib", "pycocotools")
                   or m.startswith("deformable_detr.training"))
    assert not heavy, heavy


@pytest.mark.parametrize("module", sorted(p.stem for p in (PACKAGE / "inference").glob("*.py")
                                          if p.stem != "__init__"))
def test_no_inference_module_imports_the_training_side(module):
    loaded = _modules_loaded_by(f"import deformable_detr.inference.{module}")
    assert not [m for m in loaded if m.startswith("deformable_detr.training")], module
