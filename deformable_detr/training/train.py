"""Training and evaluation as plain functions: ``train(model_cfg, train_cfg, data_cfg)`` is the official ``main()``
(the same loop, schedule, checkpoints and log), ``evaluate_checkpoint(path, ...)`` its ``--eval`` branch.

Both read their settings from the typed configs only. Everything that can be checked before work starts (the
settings, the data files, a checkpoint to resume or fine-tune from and whether it fits the model) is checked first,
so a failed start writes nothing and leaves what is already in the output folder untouched.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import datetime
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from deformable_detr.checkpoint import (
    CheckpointError,
    checkpoint_size_estimate,
    load_model_state,
    make_checkpoint,
    model_weights,
    read_checkpoint,
    remove_interrupted_saves,
    save_checkpoint,
    stored_configs,
)
from deformable_detr.checkpoint_config import config_from_checkpoint
from deformable_detr.compile import compile_model
from deformable_detr.config import (
    DATA_SOURCE_FIELDS,
    TRAIN_PRESETS,
    VARIANTS,
    ConfigError,
    DataConfig,
    ModelConfig,
    RunConfigs,
    TrainConfig,
    check_architecture,
    merge_data,
    merge_model,
)
from deformable_detr.data import CocoDetection, build_coco_dataset, collate_fn, make_coco_transforms
from deformable_detr.device import deterministic_algorithms, resolve_device
from deformable_detr.model.build import build_from_config
from deformable_detr.training.distributed import DistributedInfo, init_distributed, peer_failures_reported
from deformable_detr.training.ema import ModelEMA
from deformable_detr.training.engine import DivergenceGuard, NonFiniteLossError, evaluate, train_one_epoch
from deformable_detr.training.evaluation import format_per_class, format_stats, require_evaluator
from deformable_detr.training.optimizer import build_optimizer

COCO_NUM_CLASSES = 91  # the official COCO label space: category ids 1..90 with gaps, used as labels


def load_pretrained_backbone(model: torch.nn.Module, source: str) -> None:
    """ImageNet weights for the ResNet: torchvision's (downloaded once, cached), a local state_dict file, or none."""
    if source == "none":
        return
    body = model.backbone[0].body
    if source == "torchvision":
        import torchvision

        name = model.backbone[0].name
        weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as error:  # network errors come in many types
            raise OSError(f"could not download the ImageNet {name} weights ({error}); pass "
                          "--pretrained_backbone FILE (a torchvision ResNet state_dict) or 'none'") from error
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"--pretrained_backbone {source}: no such file (expected a torchvision ResNet "
                                    "state_dict, 'torchvision' or 'none')")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state.get("state_dict", state)) if isinstance(state, dict) else state
    state = {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    own = body.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"--pretrained_backbone {source}: not a {model.backbone[0].name} state_dict "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    body.load_state_dict(state, strict=True)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class _Run:
    """What both entry points set up: the process group, the device and the output folder."""

    info: DistributedInfo
    device: torch.device
    output_dir: Path | None

    def print(self, *args: Any) -> None:
        if self.info.is_main:
            print(*args, flush=True)


def _check_writable(output_dir: Path) -> None:
    """Creates ``output_dir`` and a probe file in it (then removes it): an unwritable folder is reported before any
    work, not when the first checkpoint is saved an epoch later."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".ddetr_write_probe_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise OSError(f"--output_dir {output_dir}: cannot write there ({error.strerror or error}); give a folder "
                      "you can write to") from error


def _check_free_space(output_dir: Path, needed: int) -> None:
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise OSError(f"--output_dir {output_dir}: {free / 2**20:.0f} MiB free on its disk, and a checkpoint of this "
                      f"model takes about {needed / 2**20:.0f} MiB; free some space or choose another folder")


def _start_run(train_cfg: TrainConfig) -> _Run:
    device = resolve_device(train_cfg.device)
    info = init_distributed(train_cfg.dist_url, device.type, timeout=train_cfg.dist_timeout)
    if device.type == "cuda" and info.enabled:
        device = torch.device(f"cuda:{info.local_rank}")
    output_dir = Path(train_cfg.output_dir) if train_cfg.output_dir else None
    if output_dir and info.is_main:
        _check_writable(output_dir)
    return _Run(info, device, output_dir)


def build_dataset(split: str, data_cfg: DataConfig, info: DistributedInfo | None = None) -> CocoDetection:
    """The ``split`` ('train' or 'val') of ``data_cfg``'s data with its transforms, as training and evaluation read
    it (``info``: this process's place in a distributed run, for ``cache_mode``)."""
    info = info or DistributedInfo()
    if split == "train":
        transforms = make_coco_transforms("train", scales=data_cfg.train_scales, max_size=data_cfg.max_size,
                                          crop_resize_sizes=data_cfg.crop_resize_sizes, crop_size=data_cfg.crop_size)
    else:
        transforms = make_coco_transforms("val", val_size=data_cfg.val_size, max_size=data_cfg.max_size)
    source = (dict(coco_path=data_cfg.coco_path) if data_cfg.coco_path else
              dict(images=getattr(data_cfg, f"{split}_images"), annotations=getattr(data_cfg, f"{split}_json")))
    return build_coco_dataset(split, **source, transforms=transforms, cache_mode=data_cfg.cache_mode,
                              local_rank=info.local_rank, local_size=info.local_size, strict=data_cfg.strict)


def _check_data_given(data_cfg: DataConfig, training: bool) -> None:
    if training and not data_cfg.has_train_data():
        raise ConfigError("training needs data: --coco_path DIR (the official layout), or --train_images/--train_json "
                          "and --val_images/--val_json (any COCO-format folder and JSON)")
    if not data_cfg.has_val_data():
        raise ConfigError("give the validation data: --coco_path DIR (the official layout), or --val_images and "
                          "--val_json (any COCO-format folder and JSON)")


def resolve_num_classes(model_cfg: ModelConfig, data_cfg: DataConfig, datasets: list[CocoDetection]) -> int:
    """``num_classes`` of the model: as configured (it must fit every category id, the labels), else 91 for COCO
    in the official layout, else the largest category id + 1."""
    largest = max(max(d.category_ids, default=0) for d in datasets)
    if model_cfg.num_classes is None:
        return COCO_NUM_CLASSES if data_cfg.coco_path else largest + 1
    if largest >= model_cfg.num_classes:
        raise ConfigError(f"num_classes {model_cfg.num_classes} does not fit the data: category id {largest} needs "
                          f"at least {largest + 1} class logits (labels are the category ids)")
    return model_cfg.num_classes


def _checkpoint_model(path: str, flag: str, hints: dict[str, Any]
                      ) -> tuple[dict[str, Any], ModelConfig, RunConfigs | None]:
    """The checkpoint behind ``--resume``/``--finetune``, the model it holds, and its stored configs. ``hints``:
    the model settings given, for what the weights of a checkpoint without settings cannot tell (DC5)."""
    checkpoint = read_checkpoint(path)
    model = config_from_checkpoint(checkpoint, f"--{flag} {path}", hints=hints)
    return checkpoint, model, stored_configs(checkpoint, path)


def _val_loader(val_set: CocoDetection, batch_size: int, data_cfg: DataConfig, run: _Run) -> DataLoader:
    sampler = DistributedSampler(val_set, shuffle=False) if run.info.enabled else SequentialSampler(val_set)
    return DataLoader(val_set, batch_size, sampler=sampler, drop_last=False, collate_fn=collate_fn,
                      num_workers=data_cfg.num_workers, pin_memory=run.device.type == "cuda")


def _stats_entry(prefix: str, stats: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}_{k}": v for k, v in stats.items()}


def _resume_optimizer(optimizer: torch.optim.Optimizer, lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
                      checkpoint: dict[str, Any], train_cfg: TrainConfig) -> None:
    """Loads the optimizer and the lr schedule of a resumed run, then, as the official main.py does, the settings'
    learning rates and lr drop win over the stored ones (its ``override_resumed_lr_drop``, which it forces on): the
    lr is the settings' lr times 0.1 per drop already passed."""
    settings_lrs = [(group["lr"], group["initial_lr"]) for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except ValueError as error:
        raise CheckpointError(f"--resume {train_cfg.resume}: its optimizer state does not fit this model's "
                              f"parameter groups ({error})") from error
    for group, (lr, initial_lr) in zip(optimizer.param_groups, settings_lrs):
        group["lr"], group["initial_lr"] = lr, initial_lr
    lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    lr_scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    epoch = lr_scheduler.last_epoch
    if train_cfg.lr_drop_epochs:
        drops = bisect.bisect_right(sorted(train_cfg.lr_drop_epochs), epoch)
        lr_scheduler.milestones = collections.Counter(train_cfg.lr_drop_epochs)
    else:
        drops = epoch // train_cfg.lr_drop
        lr_scheduler.step_size = train_cfg.lr_drop
    # The closed form, as the official lr_scheduler.step(last_epoch) computes it.
    for group, base_lr in zip(optimizer.param_groups, lr_scheduler.base_lrs):
        group["lr"] = base_lr * lr_scheduler.gamma**drops
    lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _check_finite_weights(model: torch.nn.Module, epoch: int) -> None:
    """Refuses to save a model with nan/inf weights or buffers (one device synchronisation per epoch)."""
    tensors = {name: t for name, t in model.state_dict().items() if t.is_floating_point()}
    finite = torch.stack([torch.isfinite(t).all() for t in tensors.values()]).cpu()
    if not finite.all():
        bad = [name for name, ok in zip(tensors, finite.tolist()) if not ok]
        raise NonFiniteLossError(f"after epoch {epoch} the weights hold nan/inf ({len(bad)} tensor(s), e.g. "
                                 f"{', '.join(bad[:3])}): not saved, the checkpoints written so far are intact")


def _start_ema(model: torch.nn.Module, train_cfg: TrainConfig, resumed: dict[str, Any] | None, run: _Run
               ) -> ModelEMA | None:
    """The weights' moving average of ``--ema`` (None without): resumed from the checkpoint's ``ema`` entry, or
    started from the model's weights (a new run, a fine-tuning, or a resumed checkpoint without one: said so)."""
    if not train_cfg.ema:
        return None
    ema = ModelEMA(model, train_cfg.ema_decay, train_cfg.ema_tau)
    if resumed is not None and "ema" in resumed:
        ema.load_state_dict(resumed["ema"], f"--resume {train_cfg.resume}")
    elif resumed is not None:
        run.print(f"--ema: {train_cfg.resume} holds no EMA weights (trained without --ema): the average starts from "
                  "its model weights, with the warm-up of a new average")
    return ema


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, data_cfg: DataConfig) -> dict[str, Any]:
    """Trains as the official ``main()`` and returns the last log entry (the official keys).

    ``train_cfg.resume``: continue that checkpoint's run (its weights, optimizer, lr schedule and epoch); the model
    must fit its weights (an architecture setting that differs is an error naming both values).
    ``train_cfg.finetune``: start from that checkpoint's weights; with ``drop_class_heads`` another
    ``num_classes`` is allowed and the class heads start afresh. ``model_cfg.num_classes`` None: from the data.
    Each epoch writes ``checkpoint.pth`` (and ``checkpointNNNN.pth`` every 5 epochs and before the lr drop) and a
    line of ``log.txt`` to ``train_cfg.output_dir``.
    """
    _check_data_given(data_cfg, training=True)
    require_evaluator(train_cfg.evaluator)
    # Stored as absolute paths, so that the checkpoint's run can be resumed and evaluated from any folder.
    data_cfg = dataclasses.replace(data_cfg, **{name: str(Path(getattr(data_cfg, name)).resolve())
                                                for name in DATA_SOURCE_FIELDS if getattr(data_cfg, name)})
    if train_cfg.output_dir:
        train_cfg = dataclasses.replace(train_cfg, output_dir=str(Path(train_cfg.output_dir).resolve()))
    resumed = finetuned = None
    if train_cfg.resume:
        resumed = _checkpoint_model(train_cfg.resume, "resume", dataclasses.asdict(model_cfg))
        check_architecture(model_cfg, resumed[1], f"--resume {train_cfg.resume}")
        done = resumed[0].get("epoch")
        if isinstance(done, int) and done + 1 >= train_cfg.epochs:
            print(f"nothing to do: --resume {train_cfg.resume} has finished {done + 1} epoch(s) and --epochs is "
                  f"{train_cfg.epochs}; give --epochs above {done + 1} to train further", flush=True)
            return {}
    if train_cfg.finetune:
        finetuned = _checkpoint_model(train_cfg.finetune, "finetune", dataclasses.asdict(model_cfg))
        check_architecture(model_cfg, finetuned[1], f"--finetune {train_cfg.finetune}",
                           allow_num_classes=train_cfg.drop_class_heads)

    run = _start_run(train_cfg)
    if run.output_dir and run.info.is_main:  # not in evaluation, which may share the folder of a live run
        for leftover in remove_interrupted_saves(run.output_dir):
            run.print(f"removed {leftover.name}: the temporary file of a checkpoint save that was interrupted")
    if train_cfg.deterministic:
        run.print("deterministic algorithms on: the attention backward sums in a fixed order (torch warns about any "
                  "op without a deterministic kernel)")
    with peer_failures_reported(run.info, train_cfg.dist_timeout), deterministic_algorithms(train_cfg.deterministic):
        return _train_run(run, model_cfg, train_cfg, data_cfg, resumed, finetuned)


def _train_run(run: _Run, model_cfg: ModelConfig, train_cfg: TrainConfig, data_cfg: DataConfig,
               resumed: tuple | None, finetuned: tuple | None) -> dict[str, Any]:
    _seed_everything(train_cfg.seed + run.info.rank)
    train_set, val_set = build_dataset("train", data_cfg, run.info), build_dataset("val", data_cfg, run.info)
    for name, dataset in (("training", train_set), ("validation", val_set)):
        if len(dataset) == 0:
            raise ConfigError(f"the {name} set ({dataset.annotation_file}) lists no images: nothing to "
                              f"{'train on' if name == 'training' else 'evaluate'}")
    # The images each process sees per epoch (DistributedSampler pads to equal shares); fewer than one batch would
    # take no step at all with the official drop_last: train on the partial batch instead, and say so.
    share = math.ceil(len(train_set) / run.info.world_size)
    partial_batch = share < train_cfg.batch_size
    if partial_batch:
        run.print(f"note: {len(train_set)} training image(s), fewer than one batch of {train_cfg.batch_size} per "
                  f"process: each epoch takes one step on a partial batch of {share}")
    model_cfg = dataclasses.replace(
        model_cfg, num_classes=resolve_num_classes(model_cfg, data_cfg, [train_set, val_set]),
        # The official code freezes the whole backbone when its learning rate is 0.
        train_backbone=model_cfg.train_backbone and train_cfg.lr_backbone > 0)
    configs = RunConfigs(model_cfg, train_cfg, data_cfg)
    model, criterion, postprocessors = build_from_config(model_cfg)
    if resumed is not None:
        load_model_state(model, resumed[0]["model"])
    elif finetuned is not None:
        load_model_state(model, finetuned[0]["model"], drop_class_heads=train_cfg.drop_class_heads)
    else:
        load_pretrained_backbone(model, train_cfg.pretrained_backbone)
    model.to(run.device)
    criterion.to(run.device)  # DETR's criterion holds its class weights as a buffer
    model_without_ddp = model
    if run.info.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    if train_cfg.compile:  # checkpoints keep saving model_without_ddp, whose names the compiled wrapper prefixes
        model = compile_model(model, run.print)
    n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    run.print(f"model: {model_cfg}\nnumber of trainable parameters: {n_parameters:,}")

    optimizer = build_optimizer(model_without_ddp, train_cfg.lr, train_cfg.lr_backbone,
                                train_cfg.lr_linear_proj_mult, train_cfg.weight_decay, train_cfg.sgd)
    if train_cfg.lr_drop_epochs:
        lr_scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(train_cfg.lr_drop_epochs))
    else:
        lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, train_cfg.lr_drop)
    scaler = torch.amp.GradScaler(run.device.type) if train_cfg.amp == "fp16" else None
    start_epoch = train_cfg.start_epoch
    if resumed is not None and all(k in resumed[0] for k in ("optimizer", "lr_scheduler", "epoch")):
        checkpoint = resumed[0]
        _resume_optimizer(optimizer, lr_scheduler, checkpoint, train_cfg)
        start_epoch = checkpoint["epoch"] + 1
        if scaler is not None and "scaler" in checkpoint:
            scaler.load_state_dict(checkpoint["scaler"])
    ema = _start_ema(model_without_ddp, train_cfg, resumed[0] if resumed is not None else None, run)
    # With --ema, evaluation during training is of the average (as detrex's), and the log says so.
    evaluated = ema.module if ema is not None else model
    if run.output_dir and run.info.is_main:
        _check_free_space(run.output_dir, checkpoint_size_estimate(model_without_ddp, optimizer, ema=ema is not None))

    val_loader = _val_loader(val_set, train_cfg.batch_size, data_cfg, run)
    writer = None
    if train_cfg.tensorboard and run.output_dir and run.info.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run.output_dir / "tb"))
    run.print(f"training {len(train_set)} images, evaluating {len(val_set)}; epochs {start_epoch}.."
              f"{train_cfg.epochs - 1}; {run.info.world_size} process{'es' if run.info.world_size > 1 else ''} on "
              f"{run.device.type}")
    started = time.time()
    log_stats: dict[str, Any] = {}
    divergence = DivergenceGuard(train_cfg.divergence_factor)
    background_only = len(train_set.images_with_all_boxes_dropped)
    for epoch in range(start_epoch, train_cfg.epochs):
        # Every epoch starts from RNG states that depend only on (seed, epoch, rank), so that resuming from a
        # checkpoint replays exactly what an uninterrupted run does.
        _seed_everything(train_cfg.seed + 1000 * epoch + run.info.rank)
        generator = torch.Generator().manual_seed(train_cfg.seed + epoch)
        if run.info.enabled:
            train_sampler = DistributedSampler(train_set, shuffle=True, seed=train_cfg.seed)
            train_sampler.set_epoch(epoch)
        else:
            train_sampler = RandomSampler(train_set, generator=generator)
        train_loader = DataLoader(train_set, train_cfg.batch_size, sampler=train_sampler, drop_last=not partial_batch,
                                  collate_fn=collate_fn, num_workers=data_cfg.num_workers,
                                  pin_memory=run.device.type == "cuda", generator=generator)
        epoch_started = time.time()
        train_stats = train_one_epoch(model, criterion, train_loader, optimizer, run.device, epoch,
                                      train_cfg.clip_max_norm, train_cfg.amp, scaler, progress=train_cfg.progress,
                                      print_freq=train_cfg.print_freq, divergence=divergence, ema=ema)
        lr_scheduler.step()
        # Seconds of this epoch's training pass (checkpointing and evaluation not counted): the time axis of
        # convergence curves (ddetr study), summed over a resumed run's log.
        epoch_time = time.time() - epoch_started
        if train_set.num_skipped:
            run.print(f"epoch {epoch}: {train_set.num_skipped} unreadable or degenerate image(s) skipped so far (see "
                      "the warnings above)")
        if background_only:
            run.print(f"epoch {epoch}: {background_only} image(s) whose boxes are all dropped trained as background "
                      "only (see the warning at the start)")
        if run.output_dir and run.info.is_main:
            _check_finite_weights(model_without_ddp, epoch)
            checkpoint = make_checkpoint(
                model_without_ddp.state_dict(), configs, train_set.categories, optimizer=optimizer.state_dict(),
                lr_scheduler=lr_scheduler.state_dict(), epoch=epoch,
                scaler=scaler.state_dict() if scaler is not None else None,
                ema=ema.state_dict() if ema is not None else None)
            save_checkpoint(run.output_dir / "checkpoint.pth", checkpoint)
            # Extra numbered checkpoints before the lr drop and every 5 epochs, as the official main.py.
            if (epoch + 1) % train_cfg.lr_drop == 0 or (epoch + 1) % 5 == 0:
                save_checkpoint(run.output_dir / f"checkpoint{epoch:04}.pth", checkpoint)
        log_stats = {**_stats_entry("train", train_stats), "epoch": epoch, "n_parameters": n_parameters,
                     "epoch_time": epoch_time}
        if (epoch + 1) % train_cfg.eval_every == 0 or epoch == train_cfg.epochs - 1:
            eval_started = time.time()
            test_stats, coco_evaluator = evaluate(
                evaluated, criterion, postprocessors, val_loader, val_set.coco, run.device, train_cfg.amp,
                progress=train_cfg.progress, print_freq=train_cfg.print_freq, evaluator=train_cfg.evaluator)
            if run.output_dir and run.info.is_main:
                # As the official main.py: the accumulated COCOeval arrays to eval/latest.pth, and every 50 epochs
                # to eval/NNN.pth; latest.json: the per-class AP (as ddetr eval's eval.json).
                (run.output_dir / "eval").mkdir(exist_ok=True)
                coco_evaluator.save(run.output_dir / "eval" / "latest.json",
                                    [run.output_dir / "eval" / name
                                     for name in ["latest.pth"] + ([f"{epoch:03}.pth"] if epoch % 50 == 0 else [])],
                                    {"epoch": epoch, **_stats_entry("test", test_stats)})
            log_stats = {**_stats_entry("train", train_stats), **_stats_entry("test", test_stats), "epoch": epoch,
                         "n_parameters": n_parameters, **({"test_weights": "ema"} if ema is not None else {}),
                         "epoch_time": epoch_time, "eval_time": time.time() - eval_started}
            run.print(f"epoch {epoch}: COCO bbox{' of the EMA weights' if ema is not None else ''}\n"
                      f"{format_stats(test_stats['coco_eval_bbox'])}")
        if run.output_dir and run.info.is_main:
            with (run.output_dir / "log.txt").open("a") as log:
                log.write(json.dumps(log_stats) + "\n")
            if writer is not None:
                for key, value in log_stats.items():
                    if isinstance(value, (int, float)) and math.isfinite(value):
                        writer.add_scalar(key, value, epoch)
                if "test_coco_eval_bbox" in log_stats:
                    writer.add_scalar("test_AP", log_stats["test_coco_eval_bbox"][0], epoch)
                    writer.add_scalar("test_AP50", log_stats["test_coco_eval_bbox"][1], epoch)
    run.print(f"training time {datetime.timedelta(seconds=int(time.time() - started))}")
    if writer is not None:
        writer.close()
    return log_stats


def evaluate_checkpoint(path: str | Path, data_cfg: DataConfig | None = None, train_cfg: TrainConfig | None = None,
                        model_overrides: dict[str, Any] | None = None, *, variant: str | None = None,
                        raw_weights: bool = False) -> dict[str, Any]:
    """COCO bbox evaluation of the model in checkpoint ``path`` (ours or official): the official ``--eval``.

    The model is rebuilt from the checkpoint. ``data_cfg``: the validation data and sizes (default: those the
    checkpoint was trained with). ``train_cfg``: the run settings used here (device, batch_size, amp, output_dir,
    progress, print_freq, dist_url, evaluator). ``model_overrides``: settings of the model that its weights do not
    depend on (e.g. ``msda_backend``, ``num_detections``); an architecture setting that differs is an error naming
    both values. ``variant``: for an official checkpoint without settings, what its weights cannot tell (DC5).
    The checkpoint's EMA weights (``ddetr train --ema``) are evaluated when it has them (then the entries get
    ``test_weights: "ema"``), its trained weights with ``raw_weights`` or when it has none.
    Returns the official ``test_*`` entries (``test_coco_eval_bbox``: the 12 COCO numbers) and the evaluation's
    report (``bbox``: the 12 numbers by name, ``per_class``: AP and AP50 per category, ``num_images``,
    ``num_detections``, ``evaluator``), and writes them to ``OUTPUT_DIR/eval.json``, with COCOeval's accumulated
    arrays (the official ``eval.pth``) to ``OUTPUT_DIR/eval.pth``.
    """
    train_cfg = train_cfg or TrainConfig()
    checkpoint = read_checkpoint(path)
    stored = config_from_checkpoint(checkpoint, str(path), variant=variant, hints=model_overrides)
    # The attention kernels are a choice of where the model runs, not part of it: auto, unless given.
    model_cfg = dataclasses.replace(stored, **{"msda_backend": "auto", **(model_overrides or {})})
    check_architecture(model_cfg, stored, f"checkpoint {path}")
    if data_cfg is None:
        runs = stored_configs(checkpoint, str(path))
        data_cfg = runs.data if runs is not None else DataConfig()
    _check_data_given(data_cfg, training=False)
    require_evaluator(train_cfg.evaluator)

    run = _start_run(train_cfg)
    with peer_failures_reported(run.info, train_cfg.dist_timeout):
        return _evaluate_run(run, path, checkpoint, model_cfg, data_cfg, train_cfg, raw_weights)


def _evaluate_run(run: _Run, path: str | Path, checkpoint: dict[str, Any], model_cfg: ModelConfig,
                  data_cfg: DataConfig, train_cfg: TrainConfig, raw_weights: bool = False) -> dict[str, Any]:
    val_set = build_dataset("val", data_cfg, run.info)
    largest = max(val_set.category_ids, default=0)
    if largest >= model_cfg.num_classes:
        raise ConfigError(f"the data has category id {largest}, but the model in {path} has {model_cfg.num_classes} "
                          "classes: evaluate on data with its categories, or fine-tune it on these with --finetune "
                          f"{path} --drop_class_heads")
    model, criterion, postprocessors = build_from_config(model_cfg)
    weights, which = model_weights(checkpoint, ema=not raw_weights)
    load_model_state(model, weights)
    if which == "ema":
        run.print(f"evaluating the EMA weights of {path} ({checkpoint['ema'].get('updates')} updates; --raw_weights: "
                  "the trained weights)")
    model.to(run.device)
    criterion.to(run.device)  # DETR's criterion holds its class weights as a buffer
    if run.info.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    if train_cfg.compile:
        model = compile_model(model, run.print)
    val_loader = _val_loader(val_set, train_cfg.batch_size, data_cfg, run)
    stats, evaluator = evaluate(model, criterion, postprocessors, val_loader, val_set.coco, run.device, train_cfg.amp,
                                progress=train_cfg.progress, print_freq=train_cfg.print_freq,
                                evaluator=train_cfg.evaluator)
    entry = {**_stats_entry("test", stats), **({"test_weights": "ema"} if which == "ema" else {})}
    run.print(f"{evaluator.summary}\nper-class AP (IoU .50:.95 and .50, area all, maxDets 100):\n"
              f"{format_per_class(evaluator.per_class)}")
    if run.output_dir and run.info.is_main:
        evaluator.save(run.output_dir / "eval.json", [run.output_dir / "eval.pth"], entry)
    return {**entry, **evaluator.report()}


# ----------------------------------------------------------------------------- settings given on a command line


def run_configs_from_settings(settings: dict[str, dict[str, Any]], variant: str | None = None) -> RunConfigs:
    """The configs of a training run from the settings given explicitly (``{"model": {...}, "train": {...},
    "data": {...}}``, e.g. the flags typed after ``ddetr train``) and the variant preset, under them.

    Without a checkpoint: the defaults, the preset, then the settings. With ``resume``: the checkpoint's configs
    (the model read off its weights for an official one), then the settings; one that contradicts the weights is an
    error naming both values. With ``finetune``: the checkpoint's model (with ``drop_class_heads``, its
    ``num_classes`` comes from the new data unless given), and the recipe and data of the settings alone.
    """
    model_settings = {**(VARIANTS[variant] if variant else {}), **settings["model"]}
    # The variant's recipe where it differs from the defaults (DETR's), under the settings given.
    train_settings = {**(TRAIN_PRESETS.get(variant, {}) if variant else {}), **settings["train"]}
    data_settings = dict(settings["data"])
    source = train_settings.get("resume") or train_settings.get("finetune")
    if not source:
        return RunConfigs(ModelConfig(**model_settings), TrainConfig(**train_settings), DataConfig(**data_settings))
    flag = "resume" if train_settings.get("resume") else "finetune"
    checkpoint, stored_model, stored = _checkpoint_model(source, flag, model_settings)
    if flag == "finetune":
        drop = train_settings.get("drop_class_heads", False)
        if drop:
            model_settings = {"num_classes": None, **model_settings}
        model = merge_model(stored_model, model_settings, f"--finetune {source}", allow_num_classes=drop)
        return RunConfigs(model, TrainConfig(**train_settings), DataConfig(**data_settings))
    model = merge_model(stored_model, model_settings, f"--resume {source}")
    if stored is None:  # an official checkpoint: the recipe and the data are the flags'
        return RunConfigs(model, TrainConfig(**train_settings), DataConfig(**data_settings))
    # The stored run continues: its recipe, without the start it had (a fine-tuned run resumes from its own weights).
    train_cfg = dataclasses.replace(stored.train, finetune="", drop_class_heads=False, start_epoch=0,
                                    **settings["train"])
    return RunConfigs(model, train_cfg, merge_data(stored.data, data_settings))


def eval_configs_from_settings(path: str | Path, settings: dict[str, dict[str, Any]]
                               ) -> tuple[DataConfig, TrainConfig]:
    """The data and run settings of ``ddetr eval CHECKPOINT``: the checkpoint's data, with the data settings given
    explicitly over it, and the run settings given."""
    stored = stored_configs(read_checkpoint(path), str(path))
    data_cfg = merge_data(stored.data if stored is not None else DataConfig(), settings["data"])
    return data_cfg, TrainConfig(**settings["train"])
