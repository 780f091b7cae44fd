"""``ddetr plot``: loss and AP curves from log.txt, readable for one epoch, many epochs and small APs."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from deformable_detr.training.plot import MIN_AP_TOP, build_figure, plot_logs


def _write_log(directory: Path, epochs: int, ap: list[float] | None = None, evaluate_every: int = 1) -> Path:
    """A log.txt as ddetr train writes it: train entries every epoch, test entries every ``evaluate_every``."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for epoch in range(epochs):
        entry = {"epoch": epoch, "train_loss": 10.0 - epoch, "train_loss_ce_unscaled": 1.0 - 0.1 * epoch,
                 "train_loss_bbox_unscaled": 0.5 - 0.05 * epoch, "train_loss_giou_unscaled": 0.8 - 0.05 * epoch,
                 "n_parameters": 1000}
        if (epoch + 1) % evaluate_every == 0 or epoch == epochs - 1:
            value = ap[epoch] if ap is not None else 0.01 * (epoch + 1)
            entry.update(test_loss=11.0 - epoch, test_coco_eval_bbox=[value, 2 * value] + [-1.0] * 10)
        lines.append(json.dumps(entry))
    (directory / "log.txt").write_text("\n".join(lines) + "\n")
    return directory


def _visible_ticks(axis) -> list[float]:
    low, high = sorted(axis.get_xlim())
    return [tick for tick in axis.get_xticks() if low - 1e-9 <= tick <= high + 1e-9]


def _check_axes(figure, num_points: int, num_runs: int) -> None:
    figure.canvas.draw()
    loss_axis, terms_axis, ap_axis = figure.axes
    for axis in figure.axes:
        ticks = _visible_ticks(axis)
        assert ticks and all(float(tick).is_integer() for tick in ticks), ticks
        assert axis.get_lines()
        for line in axis.get_lines():
            # A marker on every line: a single epoch is a single point, invisible as a bare line.
            assert line.get_marker() not in (None, "", "None", " ") and line.get_markersize() > 0
    assert len(loss_axis.get_lines()[0].get_xdata()) == num_points
    assert len(terms_axis.get_lines()) == 3 * num_runs and len(ap_axis.get_lines()) == 2 * num_runs


def test_single_epoch(tmp_path: Path) -> None:
    run = _write_log(tmp_path / "run", 1, ap=[0.02])
    figure = build_figure([run])
    try:
        _check_axes(figure, 1, 1)
        ap_axis = figure.axes[2]
        assert [list(line.get_ydata()) for line in ap_axis.get_lines()] == [[0.02], [0.04]]
        bottom, top = ap_axis.get_ylim()
        assert bottom == 0 and 0.04 < top <= 0.05  # scaled to the largest AP50, not to 1
    finally:
        plt.close(figure)
    out = plot_logs([run])
    assert out == run / "curves.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_several_epochs_and_runs(tmp_path: Path) -> None:
    first = _write_log(tmp_path / "first", 7, evaluate_every=2)  # AP 0.02 .. 0.07, AP50 up to 0.14
    second = _write_log(tmp_path / "second", 3, ap=[0.1, 0.2, 0.3])
    figure = build_figure([first, second])
    try:
        _check_axes(figure, 7, 2)
        ticks = _visible_ticks(figure.axes[0])
        assert len(ticks) >= 3  # several integer epochs labelled, not a single tick
        bottom, top = figure.axes[2].get_ylim()
        assert bottom == 0 and 0.6 < top <= 0.7  # the largest AP50 of all runs is 0.6
        assert [line.get_label() for line in figure.axes[2].get_lines()] == [
            "first AP", "first AP50", "second AP", "second AP50"]
    finally:
        plt.close(figure)
    out = plot_logs([first, second], tmp_path / "both.png")
    assert out == tmp_path / "both.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_zero_ap_and_missing_log(tmp_path: Path) -> None:
    run = _write_log(tmp_path / "run", 2, ap=[0.0, 0.0])
    figure = build_figure([run])
    try:
        assert figure.axes[2].get_ylim() == pytest.approx((0, MIN_AP_TOP))
    finally:
        plt.close(figure)
    with pytest.raises(FileNotFoundError, match="log.txt"):
        plot_logs([tmp_path / "nowhere"])
