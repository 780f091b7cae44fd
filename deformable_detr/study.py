"""``ddetr study convergence``: the paper's central claim on a CPU. Trains several detectors (by default DETR and
single- and multi-scale Deformable DETR) on one synthetic dataset, at one small width and depth, with one backbone
and batch, each with its own recipe (learning rate, classification loss, matcher costs), evaluates them every epoch
and compares how fast their COCO AP (and AP on small objects) grows, per epoch and per minute of training.

Layout of the study folder::

    study.json          the settings (a rerun resumes the study and must agree with them)
    estimate.json       the time estimate printed before training
    data/               the synthetic dataset, shared by every detector
    <variant>/          a ``ddetr train`` output folder per detector: log.txt (official keys, plus epoch_time and
                        eval_time), checkpoint.pth, eval/
    summary.json        per detector and evaluated epoch: AP, AP50, AP_S, AP_M, training minutes; epochs and minutes
                        each detector needed to reach each other's final AP
    summary.md          the same as tables
    convergence.png     AP and AP_S against epochs and against training minutes, one curve per detector
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from deformable_detr.checkpoint import read_checkpoint
from deformable_detr.config import (
    STUDY_RUN_FIELDS,
    TRAIN_PRESETS,
    VARIANTS,
    ConfigError,
    DataConfig,
    ModelConfig,
    StudyConfig,
    TrainConfig,
    from_dict,
    model_config,
    to_dict,
)
from deformable_detr.data import make_synthetic_dataset
from deformable_detr.data.collate import collate_fn
from deformable_detr.data.synthetic import SyntheticDataset
from deformable_detr.model.build import build_from_config
from deformable_detr.training.engine import train_one_epoch
from deformable_detr.training.optimizer import build_optimizer
from deformable_detr.training.plot import read_log
from deformable_detr.training.train import build_dataset, evaluate_checkpoint, train

# Each detector's own recipe where the two papers' differ: Deformable DETR's main.py (lr 2e-4) and DETR's (lr 1e-4,
# TRAIN_PRESETS["detr"]); weight decay 1e-4 and clipping at 0.1 in both. The backbone starts from random weights
# here, so it learns at the transformer's rate (the official 0.1x assumes ImageNet weights), as in ``ddetr demo``.
# No lr drop: the curves show convergence at a constant rate, and a study extended with more epochs stays one run.
_NO_LR_DROP = 1_000_000


def recipe(variant: str) -> dict[str, Any]:
    """The TrainConfig fields of ``variant``'s recipe in a study (see the comment above)."""
    preset = TRAIN_PRESETS.get(variant, {})
    lr = float(preset.get("lr", TrainConfig.lr))
    return {"lr": lr, "lr_backbone": lr, "weight_decay": float(preset.get("weight_decay", TrainConfig.weight_decay)),
            "clip_max_norm": float(preset.get("clip_max_norm", TrainConfig.clip_max_norm)), "lr_drop": _NO_LR_DROP}


def study_model(study: StudyConfig, variant: str) -> ModelConfig:
    """``variant``'s preset (its architecture, levels, loss and matcher costs) at the study's shared size. Dropout
    off for every detector: on these short schedules it slowed learning (``ddetr demo``'s finding)."""
    return model_config(variant, backbone=study.backbone, hidden_dim=study.hidden_dim, nheads=study.nheads,
                        enc_layers=study.enc_layers, dec_layers=study.dec_layers,
                        dim_feedforward=study.dim_feedforward, num_queries=study.num_queries, dropout=0.0)


def study_data(study: StudyConfig, data: SyntheticDataset) -> DataConfig:
    """The official augmentation (flip, multi-scale resize, random crop) scaled to the synthetic image size."""
    size = study.image_size
    return DataConfig(train_images=str(data.train_images), train_json=str(data.train_json),
                      val_images=str(data.val_images), val_json=str(data.val_json),
                      train_scales=tuple(sorted({max(32, round(size * (1 + k / 16) / 8) * 8) for k in range(-2, 3)})),
                      crop_resize_sizes=(size,), crop_size=(max(16, size * 3 // 4), size), val_size=size,
                      max_size=size * 3 // 2, num_workers=study.num_workers)


def study_train(study: StudyConfig, variant: str, epochs: int | None = None, resume: str = "") -> TrainConfig:
    return TrainConfig(**recipe(variant), batch_size=study.batch_size, epochs=epochs or study.epochs,
                       eval_every=study.eval_every, output_dir=str(Path(study.output_dir) / variant),
                       device=study.device, seed=study.seed, pretrained_backbone="none", resume=resume,
                       progress=study.progress)


# ----------------------------------------------------------------------------------------------- the study folder


def open_study(study: StudyConfig) -> Path:
    """Creates the study folder with its study.json, or checks that the one there is of the same study: a field
    that differs (other than how it runs, the epochs and the detectors) is an error naming it."""
    root = Path(study.output_dir)
    saved = root / "study.json"
    if saved.is_file():
        try:
            stored = from_dict(StudyConfig, json.loads(saved.read_text()), str(saved))
        except json.JSONDecodeError as error:
            raise ConfigError(f"{saved}: not a JSON study config ({error})") from error
        free = set(STUDY_RUN_FIELDS) | {"epochs", "variants"}
        for field in dataclasses.fields(StudyConfig):
            if field.name not in free and getattr(stored, field.name) != getattr(study, field.name):
                raise ConfigError(
                    f"{root} holds another study: its {field.name} is {getattr(stored, field.name)!r}, not "
                    f"{getattr(study, field.name)!r}; give the same settings to resume it, or another --output_dir")
    elif root.is_dir() and any(root.iterdir()):
        raise ConfigError(f"{root} is not empty and holds no study.json: give an empty or new --output_dir")
    root.mkdir(parents=True, exist_ok=True)
    record = {k: v for k, v in to_dict(study).items() if k not in STUDY_RUN_FIELDS}
    temporary = saved.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(temporary, saved)
    return root


def ensure_data(study: StudyConfig) -> SyntheticDataset:
    """The study's synthetic dataset in OUTPUT_DIR/data, written unless both JSON files are there (they are written
    after their images; the generator is deterministic, so an interrupted write is simply redone)."""
    root = Path(study.output_dir) / "data"
    data = SyntheticDataset(root, root / "train", root / "train.json", root / "val", root / "val.json")
    if data.train_json.is_file() and data.val_json.is_file():
        return data
    started = time.time()
    print(f"writing the synthetic dataset to {root} ({study.num_train} training, {study.num_val} validation images "
          f"of up to {study.image_size} px)", flush=True)
    written = make_synthetic_dataset(
        root, num_train=study.num_train, num_val=study.num_val, image_size=study.image_size, seed=study.data_seed,
        max_objects=study.max_objects, colour_by_class=study.colour_by_class, small_fraction=study.small_fraction,
        clutter=study.clutter, min_visible=study.min_visible)
    print(f"  done in {time.time() - started:.0f} s", flush=True)
    return written


def epochs_done(variant_dir: Path) -> list[dict[str, Any]]:
    """The log entries of a detector's training folder (none yet: empty)."""
    log = variant_dir / "log.txt"
    if not log.is_file() or not log.read_text().strip():
        return []
    return read_log(log)


# ------------------------------------------------------------------------------------------------- the estimate


def _time_variant(study: StudyConfig, variant: str, data_cfg: DataConfig, steps: int = 3, warmup: int = 2
                  ) -> dict[str, float]:
    """Seconds of one training step (the real ``train_one_epoch``, after ``warmup`` steps: the first steps of a
    process ran up to 1.6x slower here) and of one evaluation batch's forward pass, on the study's data."""
    torch.manual_seed(study.seed)
    device = torch.device(study.device)
    train_set, val_set = build_dataset("train", data_cfg), build_dataset("val", data_cfg)
    num_classes = max(train_set.category_ids) + 1
    model, criterion, _ = build_from_config(dataclasses.replace(study_model(study, variant), num_classes=num_classes))
    model.to(device)
    criterion.to(device)
    settings = recipe(variant)
    optimizer = build_optimizer(model, settings["lr"], settings["lr_backbone"], weight_decay=settings["weight_decay"])
    generator = torch.Generator().manual_seed(study.seed)
    loader = DataLoader(train_set, study.batch_size, shuffle=True, collate_fn=collate_fn, generator=generator)
    batches = []
    started = time.perf_counter()
    for batch in loader:
        batches.append(batch)
        if len(batches) == warmup + steps:
            break
    # Reading and augmenting a batch: part of every step when the data is loaded in the training process (the
    # estimate without it fell 20-30% short per epoch on 2 cores).
    loading = (time.perf_counter() - started) / len(batches) if study.num_workers == 0 else 0.0
    warmup = min(warmup, len(batches) - 1)  # a tiny training set: fewer warm-up steps, at least one timed
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        train_one_epoch(model, criterion, batches[:warmup], optimizer, device, 0, settings["clip_max_norm"],
                        progress=False)
        started = time.perf_counter()
        train_one_epoch(model, criterion, batches[warmup:], optimizer, device, 0, settings["clip_max_norm"],
                        progress=False)
        step = (time.perf_counter() - started) / max(1, len(batches) - warmup) + loading
    images, mask, _ = next(iter(DataLoader(val_set, study.batch_size, collate_fn=collate_fn)))
    model.eval()
    with torch.no_grad():
        model(images.to(device), mask.to(device))
        started = time.perf_counter()
        model(images.to(device), mask.to(device))
        forward = time.perf_counter() - started
    return {"step_seconds": step, "eval_batch_seconds": forward}


def estimate(study: StudyConfig, data: SyntheticDataset) -> dict[str, Any]:
    """Times a few steps of each detector that has epochs left and extrapolates: minutes per epoch (training plus
    the evaluations, every eval_every epochs) and for the epochs left; also written to OUTPUT_DIR/estimate.json."""
    data_cfg = study_data(study, data)
    rows = {}
    for variant in study.variants:
        left = study.epochs - len(epochs_done(Path(study.output_dir) / variant))
        if left <= 0:
            continue
        timing = _time_variant(study, variant, data_cfg)
        steps = max(1, study.num_train // study.batch_size)
        train_minutes = steps * timing["step_seconds"] / 60
        # A COCOeval of a few hundred images takes about a second; the batches' post-processing is in the noise.
        eval_minutes = (math.ceil(study.num_val / study.batch_size) * timing["eval_batch_seconds"] + 1.0) / 60
        evaluations = len([e for e in range(study.epochs - left, study.epochs)
                           if (e + 1) % study.eval_every == 0 or e == study.epochs - 1])
        rows[variant] = {**timing, "epochs_left": left, "train_minutes_per_epoch": train_minutes,
                         "eval_minutes": eval_minutes, "minutes": left * train_minutes + evaluations * eval_minutes}
    result = {"variants": rows, "minutes": sum(r["minutes"] for r in rows.values()),
              "torch_threads": torch.get_num_threads(), "device": study.device}
    (Path(study.output_dir) / "estimate.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def format_estimate(result: dict[str, Any]) -> str:
    lines = ["time estimate (a few timed steps per detector, extrapolated):"]
    for variant, row in result["variants"].items():
        lines.append(f"  {variant:<18} {row['step_seconds']:6.2f} s/step, {row['train_minutes_per_epoch']:5.1f} min "
                     f"per epoch + {row['eval_minutes']:4.1f} min per evaluation; {row['epochs_left']} epoch(s) "
                     f"left: {row['minutes']:5.1f} min")
    lines.append(f"  total: about {result['minutes']:.0f} min")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- the training


def train_variant(study: StudyConfig, variant: str, data: SyntheticDataset) -> None:
    """Trains one detector to ``study.epochs``, resuming its checkpoint if it has one. A run interrupted between
    its checkpoint and its log line (during the evaluation) gets that epoch evaluated from the checkpoint first."""
    folder = Path(study.output_dir) / variant
    checkpoint = folder / "checkpoint.pth"
    done = epochs_done(folder)
    if done and done[-1]["epoch"] + 1 >= study.epochs:
        return
    data_cfg = study_data(study, data)
    resume = ""
    if checkpoint.is_file():
        resume = str(checkpoint)
        saved_epoch = read_checkpoint(checkpoint).get("epoch")
        logged = done[-1]["epoch"] if done else -1
        if isinstance(saved_epoch, int) and saved_epoch > logged:
            _log_interrupted_epoch(study, variant, checkpoint, saved_epoch, data_cfg)
    print(f"\n== {variant}: epochs {len(epochs_done(folder))}..{study.epochs - 1} in {folder}", flush=True)
    train(study_model(study, variant), study_train(study, variant, resume=resume), data_cfg)


def _log_interrupted_epoch(study: StudyConfig, variant: str, checkpoint: Path, epoch: int, data_cfg: DataConfig
                           ) -> None:
    """The line of log.txt that an interruption during ``epoch``'s evaluation lost: its checkpoint evaluated now.
    Its training losses and time are gone (``epoch_time`` null: the summary counts the median epoch for it)."""
    print(f"{variant}: epoch {epoch} was saved but not logged (interrupted during its evaluation): evaluating its "
          "checkpoint", flush=True)
    folder = checkpoint.parent
    run = dataclasses.replace(study_train(study, variant), output_dir=str(folder / "recovered"), resume="")
    result = evaluate_checkpoint(checkpoint, data_cfg, run)
    entry = {k: v for k, v in result.items() if k.startswith("test_")}
    entry.update({"epoch": epoch, "epoch_time": None, "recovered": True})
    with (folder / "log.txt").open("a") as log:
        log.write(json.dumps(entry) + "\n")


# -------------------------------------------------------------------------------------------------- the summary

# Indices of COCOeval's 12 numbers
_AP, _AP50, _AP_SMALL, _AP_MEDIUM = 0, 1, 3, 4


def summarize(study: StudyConfig) -> dict[str, Any]:
    """The curves of every detector from its log.txt and the epochs (and minutes) each needed to reach each
    other's final AP; written to summary.json and summary.md."""
    root = Path(study.output_dir)
    curves: dict[str, list[dict[str, Any]]] = {}
    notes = []
    for variant in study.variants:
        entries = [e for e in epochs_done(root / variant) if e["epoch"] < study.epochs]
        times = [e["epoch_time"] for e in entries if isinstance(e.get("epoch_time"), (int, float))]
        typical = statistics.median(times) if times else 0.0
        minutes, points = 0.0, []
        for entry in entries:
            seconds = entry.get("epoch_time")
            if not isinstance(seconds, (int, float)):
                notes.append(f"{variant} epoch {entry['epoch']}: training time unknown (recovered after an "
                             f"interruption), counted as the median epoch ({typical:.0f} s)")
                seconds = typical
            minutes += seconds / 60
            stats = entry.get("test_coco_eval_bbox")
            if stats:
                points.append({"epoch": entry["epoch"] + 1, "minutes": minutes, "AP": stats[_AP],
                               "AP50": stats[_AP50], "AP_S": stats[_AP_SMALL], "AP_M": stats[_AP_MEDIUM]})
        curves[variant] = points
    reach: dict[str, dict[str, Any]] = {}
    for variant, points in curves.items():
        reach[variant] = {}
        for other, other_points in curves.items():
            if other == variant or not other_points or not points:
                continue
            target = other_points[-1]["AP"]
            first = next((p for p in points if p["AP"] >= target), None)
            entry = {"target_AP": target, "target_epoch": other_points[-1]["epoch"],
                     "epoch": first["epoch"] if first else None, "minutes": first["minutes"] if first else None}
            if first is None:
                # Not reached: then the other needed only k epochs for this one's final AP, and this one is slower
                # by more than (its epochs) / k: the lower bound the study can state.
                final = points[-1]
                matched = next(p for p in other_points if p["AP"] >= final["AP"])
                entry["other_reached_final_AP_at_epoch"] = matched["epoch"]
                entry["epochs_ratio_above"] = final["epoch"] / matched["epoch"]
            reach[variant][other] = entry
    summary = {"study": {k: v for k, v in to_dict(study).items() if k not in STUDY_RUN_FIELDS}, "curves": curves,
               "reach": reach, "notes": notes}
    estimate_file = root / "estimate.json"
    if estimate_file.is_file():
        summary["estimate_minutes"] = json.loads(estimate_file.read_text())["minutes"]
    (root / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (root / "summary.md").write_text(format_summary(summary) + "\n")
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """Markdown: AP, AP50, AP_S and AP_M of every detector at every evaluated epoch (with its training minutes), then
    the epochs and minutes each detector needed to reach each other's final AP."""
    lines = ["| detector | epoch | minutes | AP | AP50 | AP_S | AP_M |", "|---|---|---|---|---|---|---|"]
    for variant, points in summary["curves"].items():
        for p in points:
            lines.append(f"| {variant} | {p['epoch']} | {p['minutes']:.1f} | {p['AP']:.3f} | {p['AP50']:.3f} | "
                         f"{p['AP_S']:.3f} | {p['AP_M']:.3f} |")
    lines += ["", "| detector | reaches the final AP of | (AP, after epochs) | after epochs | after minutes |",
              "|---|---|---|---|---|"]
    for variant, targets in summary["reach"].items():
        for other, r in targets.items():
            epoch = r["epoch"] if r["epoch"] is not None else (
                f"not reached (the other had its final AP after {r['other_reached_final_AP_at_epoch']}: "
                f"> {r['epochs_ratio_above']:.1f}x slower)")
            minutes = f"{r['minutes']:.1f}" if r["minutes"] is not None else "-"
            lines.append(f"| {variant} | {other} | ({r['target_AP']:.3f}, {r['target_epoch']}) | {epoch} | "
                         f"{minutes} |")
    lines += [f"\n- {note}" for note in summary["notes"]]
    return "\n".join(lines)


def plot_convergence(summary: dict[str, Any], path: Path) -> Path:
    """convergence.png: AP and AP_S against epochs (top) and against training minutes (bottom), one curve per
    detector."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    top = 0.01
    for variant, points in summary["curves"].items():
        if not points:
            continue
        for row, x_key in enumerate(("epoch", "minutes")):
            for column, metric in enumerate(("AP", "AP_S")):
                values = [p[metric] if p[metric] >= 0 else float("nan") for p in points]
                axes[row][column].plot([p[x_key] for p in points], values, "o-", markersize=4, label=variant)
                top = max([top] + [v for v in values if v == v])
    study = summary["study"]
    for row, x_label in enumerate(("epoch", "training minutes")):
        for column, metric in enumerate(("AP", "AP on small objects (AP_S)")):
            ax = axes[row][column]
            ax.set_xlabel(x_label)
            ax.set_ylabel(metric)
            ax.set_ylim(0, min(1.05, top * 1.15))
            ax.grid(alpha=0.3)
            ax.legend()
            if row == 0:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle(f"convergence on synthetic shapes: {study['num_train']} training images of up to "
                    f"{study['image_size']} px, {study['backbone']}, width {study['hidden_dim']}, "
                    f"{study['enc_layers']}+{study['dec_layers']} layers, batch {study['batch_size']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# --------------------------------------------------------------------------------------------------- entry point


def run_study(study: StudyConfig) -> dict[str, Any]:
    """The whole study: folder, data, estimate, each detector's training (resumed where it stopped), the summary,
    its tables and the figure. Returns the summary."""
    started = time.time()
    root = open_study(study)
    data = ensure_data(study)
    pending = [v for v in study.variants if len(epochs_done(root / v)) < study.epochs]
    if pending:
        print(format_estimate(estimate(study, data)), flush=True)
    if study.estimate_only:
        return {}
    for variant in study.variants:
        train_variant(study, variant, data)
    summary = summarize(study)
    figure = plot_convergence(summary, root / "convergence.png")
    print(f"\nstudy finished in {(time.time() - started) / 60:.1f} min (this run)\n{format_summary(summary)}\n\n"
          f"summary in {root / 'summary.json'} and {root / 'summary.md'}, figure in {figure}", flush=True)
    return summary


__all__ = ["VARIANTS", "estimate", "format_summary", "open_study", "plot_convergence", "recipe", "run_study",
           "summarize"]
