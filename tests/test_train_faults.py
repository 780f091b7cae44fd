"""Faults of a training run met through ``ddetr train`` (in process, ``cli.main``): divergence stops before a step
is applied and never replaces a checkpoint; what can be checked before work (an unwritable folder, a full disk, an
empty training set, nothing left to do) is reported at once; a resumed run takes the learning rate of its flags as
the official main.py does; a tiny training set still trains; leftovers of an interrupted save are removed."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from helpers.tiny import TINY_MODEL_FLAGS, TINY_RUN_FLAGS, data_flags

from deformable_detr.cli import main
from deformable_detr.data import make_synthetic_dataset
from deformable_detr.training import engine


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), num_train=8, num_val=2, image_size=64, seed=0)


@pytest.fixture(scope="module")
def trained(synthetic, tmp_path_factory):
    """A run of one good epoch: its folder (checkpoint.pth, log.txt)."""
    out = tmp_path_factory.mktemp("trained")
    assert _train(synthetic, out, "--epochs", "1", "--eval_every", "100") == 0
    return out


def _train(data, out: Path, *flags: str) -> int:
    return main(["train", *TINY_MODEL_FLAGS, *TINY_RUN_FLAGS, *data_flags(data), "--no_progress", "--print_freq", "0",
                 "--output_dir", str(out), *flags])


def _copy_run(trained: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.txt").read_text().splitlines()]


def _last_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_nan_predictions_stop_the_step_and_keep_the_checkpoint(trained, tmp_path, capsys):
    """--lr 1e6 turns the predicted boxes into nan at the next step: named as such (not as badly formed boxes)."""
    run = _copy_run(trained, tmp_path)
    before = (run / "checkpoint.pth").read_bytes()
    assert _train(_data_of(run), run, "--resume", str(run / "checkpoint.pth"), "--epochs", "3",
                  "--lr", "1e6") == 2
    message = _last_line(capsys)
    assert message.startswith("ddetr train: non-finite predictions: pred_logits"), message
    assert "at epoch 1, iteration 1: the model diverged" in message and "x1 < x0" not in message
    assert (run / "checkpoint.pth").read_bytes() == before and len(_log(run)) == 1


def test_a_finite_explosion_stops_before_it_is_saved(trained, tmp_path, capsys):
    """--lr 100 makes the loss grow a thousandfold while every number stays finite (measured: epoch losses of 1e6
    with this model); the step is refused before it is applied and the last good checkpoint stays."""
    run = _copy_run(trained, tmp_path)
    before = (run / "checkpoint.pth").read_bytes()
    assert _train(_data_of(run), run, "--resume", str(run / "checkpoint.pth"), "--epochs", "3", "--lr", "100") == 2
    message = _last_line(capsys)
    assert "times this run's starting loss" in message and "--divergence_factor" in message, message
    assert (run / "checkpoint.pth").read_bytes() == before and len(_log(run)) == 1


def test_non_finite_gradients_and_weights_are_never_applied_or_saved(trained, tmp_path, capsys, monkeypatch):
    run = _copy_run(trained, tmp_path)
    before = (run / "checkpoint.pth").read_bytes()
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *args, **kwargs: torch.tensor(float("inf")))
    assert _train(_data_of(run), run, "--resume", str(run / "checkpoint.pth"), "--epochs", "2") == 2
    assert "the gradient norm is inf" in _last_line(capsys)
    monkeypatch.undo()

    # An epoch that ends with a nan weight (whatever put it there) is not saved.
    real_epoch = engine.train_one_epoch

    def poisoned_epoch(model, *args, **kwargs):
        stats = real_epoch(model, *args, **kwargs)
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = float("nan")
        return stats

    monkeypatch.setattr("deformable_detr.training.train.train_one_epoch", poisoned_epoch)
    assert _train(_data_of(run), run, "--resume", str(run / "checkpoint.pth"), "--epochs", "2") == 2
    message = _last_line(capsys)
    assert "after epoch 1 the weights hold nan/inf (1 tensor(s), e.g. transformer.level_embed)" in message, message
    assert (run / "checkpoint.pth").read_bytes() == before and len(_log(run)) == 1


def test_resume_takes_the_learning_rate_of_the_flags_as_the_official_main(trained, tmp_path):
    """The official main.py restores the flags' lr after loading the optimizer and lets --lr_drop override the
    stored schedule: lr = flag lr * 0.1 ** (epochs done // lr_drop)."""
    run = _copy_run(trained, tmp_path)
    assert _train(_data_of(run), run, "--resume", str(run / "checkpoint.pth"), "--epochs", "3", "--lr", "1e-3",
                  "--lr_drop", "2", "--eval_every", "100") == 0
    lrs = [entry["train_lr"] for entry in _log(run)]
    assert lrs[0] == pytest.approx(2e-4)  # the first run's own lr
    assert lrs[1:] == [pytest.approx(1e-3), pytest.approx(1e-4)]  # epoch 1: 1e-3; epoch 2: after the drop at 2


def test_resume_with_nothing_left_to_do_says_so_and_exits_0(trained, tmp_path, capsys):
    run = _copy_run(trained, tmp_path)
    before = (run / "checkpoint.pth").read_bytes()
    assert _train(_data_of(run), run, "--resume", str(run / "checkpoint.pth"), "--epochs", "1") == 0
    out = capsys.readouterr().out
    assert "nothing to do" in out and "has finished 1 epoch(s) and --epochs is 1" in out
    assert (run / "checkpoint.pth").read_bytes() == before and len(_log(run)) == 1


def test_an_unwritable_output_folder_is_reported_before_any_work(synthetic, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert _train(synthetic, blocker / "run", "--epochs", "1") == 2
    message = _last_line(capsys)
    assert message.startswith(f"ddetr train: --output_dir {blocker / 'run'}: cannot write there"), message
    assert "give a folder you can write to" in message


def test_too_little_disk_space_is_reported_before_any_work(synthetic, tmp_path, capsys, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10 * 2**20))
    assert _train(synthetic, tmp_path / "run", "--epochs", "1") == 2
    message = _last_line(capsys)
    assert "10 MiB free on its disk, and a checkpoint of this model takes about" in message, message
    assert not (tmp_path / "run" / "log.txt").exists()


def test_fewer_images_than_a_batch_train_on_the_partial_batch(tmp_path, capsys):
    data = make_synthetic_dataset(tmp_path / "data", num_train=3, num_val=1, image_size=64, seed=1)
    assert _train(data, tmp_path / "run", "--epochs", "1", "--batch_size", "4", "--eval_every", "100") == 0
    assert "each epoch takes one step on a partial batch of 3" in capsys.readouterr().out
    assert "train_loss" in _log(tmp_path / "run")[0]


def test_an_empty_training_set_is_a_clear_error(tmp_path, capsys):
    data = make_synthetic_dataset(tmp_path / "data", num_train=2, num_val=1, image_size=64, seed=1)
    annotations = json.loads(Path(data.train_json).read_text())
    Path(data.train_json).write_text(json.dumps({**annotations, "images": [], "annotations": []}))
    assert _train(data, tmp_path / "run", "--epochs", "1") == 2
    message = _last_line(capsys)
    assert message == f"ddetr train: the training set ({data.train_json}) lists no images: nothing to train on"


def test_leftovers_of_an_interrupted_save_are_removed_at_the_next_start(trained, tmp_path, capsys):
    run = _copy_run(trained, tmp_path)
    leftover = run / ".checkpoint.pth.k3j2l1q0.tmp"
    leftover.write_bytes(b"\0" * 1024)
    an_hour_ago = time.time() - 3600  # a save in progress keeps touching its file: recent ones are spared
    os.utime(leftover, (an_hour_ago, an_hour_ago))
    assert _train(_data_of(run), run, "--resume", str(run / "checkpoint.pth"), "--epochs", "2",
                  "--eval_every", "100") == 0
    assert not leftover.exists()
    assert f"removed {leftover.name}" in capsys.readouterr().out


def _data_of(run: Path):
    """The data of a trained run: resuming needs no data flags, but the helper passes them; read them back."""
    from types import SimpleNamespace

    data = torch.load(run / "checkpoint.pth", weights_only=True)["config"]["data"]
    return SimpleNamespace(train_images=data["train_images"], train_json=data["train_json"],
                           val_images=data["val_images"], val_json=data["val_json"])
