"""`ddetr study convergence`: a two-epoch miniature study through the command line (tiny models), its outputs checked
against the training logs it wrote, resuming, recovery of an epoch lost during its evaluation, and bad input."""

from __future__ import annotations

import json
import subprocess

import pytest
from helpers.tiny import user_environment
from PIL import Image

from deformable_detr.config import ConfigError, StudyConfig
from deformable_detr.study import format_summary, summarize

# Tiny detectors on tiny images: the whole miniature study in well under a minute per detector.
TINY_STUDY = ["--hidden_dim", "32", "--nheads", "4", "--enc_layers", "1", "--dec_layers", "2", "--dim_feedforward",
              "64", "--num_queries", "10", "--num_train", "8", "--num_val", "4", "--image_size", "64",
              "--batch_size", "4", "--max_objects", "3", "--no_progress"]
OFFICIAL_KEYS = ("train_loss", "train_loss_ce", "train_loss_bbox", "train_loss_giou", "train_lr", "test_loss",
                 "test_coco_eval_bbox", "epoch", "n_parameters")


def _study(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ddetr", "study", "convergence", *TINY_STUDY, *args], capture_output=True, text=True,
                          timeout=900, env=user_environment())


def _log(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.txt").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def miniature(tmp_path_factory):
    """The default three detectors, two epochs each, through `ddetr study convergence`."""
    out = tmp_path_factory.mktemp("study")
    result = _study("--output_dir", str(out), "--epochs", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_miniature_study_writes_logs_summary_table_and_figure(miniature):
    """Every detector's log.txt has the official keys for both epochs; summary.json's curves are exactly the logs'
    COCO numbers (AP, AP50, AP_S, AP_M = stats 0, 1, 3, 4) with the summed training minutes; the epochs to reach
    another's final AP are recomputed here from the logs; the figure is a PNG; the estimate was printed first."""
    out, result = miniature
    assert result.stdout.index("time estimate") < result.stdout.index("== deformable_detr")
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["curves"]) == ["deformable_detr", "single_scale", "detr"]
    finals = {}
    for variant, points in summary["curves"].items():
        log = _log(out / variant)
        assert [entry["epoch"] for entry in log] == [0, 1]
        for entry in log:
            assert all(key in entry for key in OFFICIAL_KEYS), sorted(set(OFFICIAL_KEYS) - set(entry))
            assert entry["epoch_time"] > 0 and entry["eval_time"] > 0
        assert [p["epoch"] for p in points] == [1, 2]
        minutes = 0.0
        for point, entry in zip(points, log):
            stats = entry["test_coco_eval_bbox"]
            minutes += entry["epoch_time"] / 60
            assert (point["AP"], point["AP50"], point["AP_S"], point["AP_M"]) == (stats[0], stats[1], stats[3],
                                                                                  stats[4])
            assert point["minutes"] == pytest.approx(minutes, rel=1e-12)
        finals[variant] = log[-1]["test_coco_eval_bbox"][0]
    for variant, targets in summary["reach"].items():
        assert set(targets) == set(finals) - {variant}
        aps = [entry["test_coco_eval_bbox"][0] for entry in _log(out / variant)]
        for other, reach in targets.items():
            expected = next((epoch for epoch, ap in enumerate(aps, start=1) if ap >= finals[other]), None)
            assert (reach["target_AP"], reach["epoch"]) == (finals[other], expected)
    table = (out / "summary.md").read_text()
    assert table.count("| detr |") >= 2 and "| deformable_detr | detr |" in table
    with Image.open(out / "convergence.png") as figure:
        assert figure.format == "PNG" and figure.width > 800
    assert json.loads((out / "estimate.json").read_text())["minutes"] > 0
    # The data has the study's knobs (the generator records those not at its own defaults).
    info = json.loads((out / "data" / "train.json").read_text())["info"]
    study = json.loads((out / "study.json").read_text())
    assert (info["clutter"], info["min_visible"], info["image_size"]) == (study["clutter"], study["min_visible"], 64)
    assert info.get("small_fraction", 0.0) == study["small_fraction"]


def test_resumed_study_equals_an_uninterrupted_one(tmp_path):
    """One epoch, then a rerun asked for two: the data is not rewritten, the first epoch's line is kept, and the two
    lines equal those of a study that ran both epochs at once (training resumes exactly)."""
    stepwise, straight = tmp_path / "stepwise", tmp_path / "straight"
    assert _study("--output_dir", str(stepwise), "--epochs", "1", "--variants", "single_scale").returncode == 0
    first = _log(stepwise / "single_scale")
    written = (stepwise / "data" / "train.json").stat().st_mtime_ns
    resumed = _study("--output_dir", str(stepwise), "--epochs", "2", "--variants", "single_scale")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "writing the synthetic dataset" not in resumed.stdout
    assert (stepwise / "data" / "train.json").stat().st_mtime_ns == written
    assert _study("--output_dir", str(straight), "--epochs", "2", "--variants", "single_scale").returncode == 0
    both, once = _log(stepwise / "single_scale"), _log(straight / "single_scale")
    assert both[0] == first[0]
    for a, b in zip(both, once):
        assert a["test_coco_eval_bbox"] == b["test_coco_eval_bbox"]
        assert a["train_loss"] == b["train_loss"]
    # A finished study reruns to its summary without training.
    again = _study("--output_dir", str(stepwise), "--epochs", "2", "--variants", "single_scale")
    assert again.returncode == 0 and "time estimate" not in again.stdout and "== single_scale" not in again.stdout


def test_epoch_lost_during_evaluation_is_evaluated_from_its_checkpoint(tmp_path):
    """An interruption after an epoch's checkpoint but before its log line (during the evaluation): the rerun
    evaluates that checkpoint and logs it, with the AP the lost line had, and its training time marked unknown."""
    out = tmp_path / "study"
    assert _study("--output_dir", str(out), "--epochs", "2", "--variants", "detr").returncode == 0
    log_file = out / "detr" / "log.txt"
    lines = log_file.read_text().splitlines()
    lost = json.loads(lines[-1])
    log_file.write_text(lines[0] + "\n")
    rerun = _study("--output_dir", str(out), "--epochs", "2", "--variants", "detr")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    recovered = _log(out / "detr")[-1]
    assert recovered["epoch"] == 1 and recovered["recovered"] is True and recovered["epoch_time"] is None
    assert recovered["test_coco_eval_bbox"] == lost["test_coco_eval_bbox"]
    summary = json.loads((out / "summary.json").read_text())
    assert "training time unknown" in summary["notes"][0]


def test_bad_input_is_one_line_naming_it(tmp_path):
    """An unknown detector lists the valid ones; a folder of another study names the field that differs; a
    non-empty folder that is no study is refused."""
    result = _study("--output_dir", str(tmp_path / "a"), "--variants", "detr", "yolo")
    assert result.returncode != 0 and "unknown variant(s) 'yolo'" in result.stderr
    assert "deformable_detr" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(ConfigError, match="unknown variant"):
        StudyConfig(variants=("detr", "retinanet"))

    out = tmp_path / "b"
    estimated = _study("--output_dir", str(out), "--variants", "detr", "--estimate_only")
    assert estimated.returncode == 0 and "time estimate" in estimated.stdout and not (out / "detr").exists()
    result = _study("--output_dir", str(out), "--image_size", "96")
    assert result.returncode != 0
    assert "holds another study: its image_size is 64, not 96" in result.stderr and "Traceback" not in result.stderr

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    result = _study("--output_dir", str(tmp_path / "c"))
    assert result.returncode != 0 and "holds no study.json" in result.stderr


def test_summary_reach_and_table_from_hand_made_logs(tmp_path):
    """Epochs and minutes to reach another detector's final AP, on logs written here: A's AP 0.1, 0.3, 0.5 (60 s
    epochs), B's 0.2, 0.25 (30 s epochs, the second evaluated only): A reaches B's 0.25 at epoch 2 (2 min), B never
    reaches A's 0.5."""
    study = StudyConfig(output_dir=str(tmp_path), variants=("single_scale", "detr"), epochs=3)

    def stats(ap: float) -> list[float]:
        return [ap, ap + 0.2, ap, ap / 2, ap, ap] + [0.0] * 6

    for variant, entries in (("single_scale", [(0, 60, 0.1), (1, 60, 0.3), (2, 60, 0.5)]),
                             ("detr", [(0, 30, None), (1, 30, 0.2), (2, 30, 0.25)])):
        (tmp_path / variant).mkdir()
        with (tmp_path / variant / "log.txt").open("w") as log:
            for epoch, seconds, ap in entries:
                entry = {"epoch": epoch, "epoch_time": seconds, "train_loss": 1.0}
                if ap is not None:
                    entry["test_coco_eval_bbox"] = stats(ap)
                log.write(json.dumps(entry) + "\n")
    summary = summarize(study)
    assert [p["epoch"] for p in summary["curves"]["detr"]] == [2, 3]
    assert summary["curves"]["detr"][0]["minutes"] == pytest.approx(1.0)
    assert summary["curves"]["single_scale"][1]["AP_S"] == pytest.approx(0.15)
    assert summary["reach"]["single_scale"]["detr"] == {"target_AP": 0.25, "target_epoch": 3, "epoch": 2,
                                                        "minutes": pytest.approx(2.0)}
    # B never reaches A's 0.5; A had B's final 0.25 after 2 epochs, so B (3 epochs) is more than 1.5x slower.
    assert summary["reach"]["detr"]["single_scale"] == {"target_AP": 0.5, "target_epoch": 3, "epoch": None,
                                                        "minutes": None, "other_reached_final_AP_at_epoch": 2,
                                                        "epochs_ratio_above": 1.5}
    table = format_summary(summary)
    assert "| single_scale | detr | (0.250, 3) | 2 | 2.0 |" in table
    assert ("| detr | single_scale | (0.500, 3) | not reached (the other had its final AP after 2: > 1.5x slower) "
            "| - |") in table
