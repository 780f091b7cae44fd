"""``ddetr train --deterministic``: the run goes through torch's deterministic mode, in which the triton attention
backward sums grad_value from its neighbour records in a fixed order (tests/test_ops.py checks that it does, and its
numbers); the process's settings come back afterwards. Run in process (``cli.main``) on the CPU, where the ``cpu``
attention backend is deterministic anyway (the triton kernels in Triton's interpreter would take minutes here)."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny import TINY_MODEL_FLAGS, TINY_RUN_FLAGS, data_flags

from deformable_detr.cli import main
from deformable_detr.data import make_synthetic_dataset
from deformable_detr.device import deterministic_algorithms
from deformable_detr.training import train as train_module


def _mode() -> tuple[bool, bool]:
    """(deterministic algorithms on, warn only)."""
    return torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), num_train=4, num_val=2, image_size=48, seed=0)


def test_train_deterministic_trains_in_deterministic_mode_and_restores_the_settings(synthetic, tmp_path,
                                                                                   monkeypatch, capsys):
    modes = []
    original_epoch = train_module.train_one_epoch

    def train_one_epoch(*args, **kwargs):
        modes.append(_mode())
        return original_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", train_one_epoch)
    flags = ["train", *TINY_MODEL_FLAGS, *TINY_RUN_FLAGS, *data_flags(synthetic), "--no_progress", "--print_freq", "0",
             "--epochs", "1", "--eval_every", "100", "--deterministic"]
    assert main([*flags, "--output_dir", str(tmp_path / "run")]) == 0
    assert modes == [(True, True)]
    assert "deterministic algorithms on" in capsys.readouterr().out
    assert not torch.are_deterministic_algorithms_enabled()


def test_deterministic_algorithms_restores_what_was_set_before():
    torch.use_deterministic_algorithms(True, warn_only=False)
    try:
        with deterministic_algorithms():
            assert _mode() == (True, True)
        assert _mode() == (True, False)
    finally:
        torch.use_deterministic_algorithms(False)
    with deterministic_algorithms(enabled=False):
        assert not torch.are_deterministic_algorithms_enabled()
