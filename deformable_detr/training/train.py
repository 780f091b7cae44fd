"""``ddetr train`` / ``ddetr eval``: the official ``main.py`` with its flag names, plus custom datasets, AMP,
variant presets, atomic checkpoints and a progress bar."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from deformable_detr.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from deformable_detr.config import VARIANTS, model_config
from deformable_detr.data import build_coco_dataset, collate_fn, make_coco_transforms
from deformable_detr.model.build import build_from_config
from deformable_detr.training.distributed import DistributedInfo, init_distributed
from deformable_detr.training.engine import evaluate, train_one_epoch
from deformable_detr.training.evaluation import format_stats
from deformable_detr.training.optimizer import build_optimizer

# Official flags we accept for compatibility with the official configs/*.sh, and the only value we support.
_FIXED_OFFICIAL_FLAGS = {"position_embedding": "sine", "dataset_file": "coco", "masks": False,
                         "frozen_weights": None, "lr_backbone_names": ["backbone.0"],
                         "lr_linear_proj_names": ["reference_points", "sampling_offsets"]}


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The official ``get_args_parser`` flags (same names and defaults), then ours."""
    official = parser.add_argument_group("official flags (fundamentalvision/Deformable-DETR main.py)")
    official.add_argument("--lr", default=2e-4, type=float)
    official.add_argument("--lr_backbone_names", default=["backbone.0"], type=str, nargs="+")
    official.add_argument("--lr_backbone", default=2e-5, type=float, help="0 freezes the whole backbone")
    official.add_argument("--lr_linear_proj_names", default=["reference_points", "sampling_offsets"], type=str,
                          nargs="+")
    official.add_argument("--lr_linear_proj_mult", default=0.1, type=float)
    official.add_argument("--batch_size", default=2, type=int, help="per process")
    official.add_argument("--weight_decay", default=1e-4, type=float)
    official.add_argument("--epochs", default=50, type=int)
    official.add_argument("--lr_drop", default=40, type=int)
    official.add_argument("--lr_drop_epochs", default=None, type=int, nargs="+")
    official.add_argument("--clip_max_norm", default=0.1, type=float)
    official.add_argument("--sgd", action="store_true")
    official.add_argument("--with_box_refine", action="store_true")
    official.add_argument("--two_stage", action="store_true")
    official.add_argument("--frozen_weights", type=str, default=None)
    official.add_argument("--backbone", default="resnet50", type=str)
    official.add_argument("--dilation", action="store_true")
    official.add_argument("--position_embedding", default="sine", type=str)
    official.add_argument("--position_embedding_scale", default=2 * np.pi, type=float)
    official.add_argument("--num_feature_levels", default=4, type=int)
    official.add_argument("--enc_layers", default=6, type=int)
    official.add_argument("--dec_layers", default=6, type=int)
    official.add_argument("--dim_feedforward", default=1024, type=int)
    official.add_argument("--hidden_dim", default=256, type=int)
    official.add_argument("--dropout", default=0.1, type=float)
    official.add_argument("--nheads", default=8, type=int)
    official.add_argument("--num_queries", default=300, type=int)
    official.add_argument("--dec_n_points", default=4, type=int)
    official.add_argument("--enc_n_points", default=4, type=int)
    official.add_argument("--masks", action="store_true")
    official.add_argument("--no_aux_loss", dest="aux_loss", action="store_false")
    official.add_argument("--set_cost_class", default=2, type=float)
    official.add_argument("--set_cost_bbox", default=5, type=float)
    official.add_argument("--set_cost_giou", default=2, type=float)
    official.add_argument("--mask_loss_coef", default=1, type=float)
    official.add_argument("--dice_loss_coef", default=1, type=float)
    official.add_argument("--cls_loss_coef", default=2, type=float)
    official.add_argument("--bbox_loss_coef", default=5, type=float)
    official.add_argument("--giou_loss_coef", default=2, type=float)
    official.add_argument("--focal_alpha", default=0.25, type=float)
    official.add_argument("--dataset_file", default="coco")
    official.add_argument("--coco_path", default=None, type=str,
                          help="official layout: train2017/, val2017/, annotations/instances_{train,val}2017.json")
    official.add_argument("--coco_panoptic_path", type=str)
    official.add_argument("--remove_difficult", action="store_true")
    official.add_argument("--output_dir", default="", help="where to save checkpoints and log.txt; empty: nowhere")
    official.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    official.add_argument("--seed", default=42, type=int)
    official.add_argument("--resume", default="", help="checkpoint to resume from (model, optimizer, lr, epoch)")
    official.add_argument("--start_epoch", default=0, type=int, metavar="N")
    official.add_argument("--eval", action="store_true", help="only evaluate (the weights of --resume)")
    official.add_argument("--num_workers", default=2, type=int)
    official.add_argument("--cache_mode", action="store_true", help="load the images into memory (sharded by rank)")
    official.add_argument("--world_size", default=1, type=int, help="set by torchrun / SLURM; kept for scripts")
    official.add_argument("--dist_url", default="env://")

    ours = parser.add_argument_group("deformable-detr additions")
    ours.add_argument("--variant", choices=list(VARIANTS), default=None,
                      help="preset of an official variant (sets --num_feature_levels/--dilation/--with_box_refine/"
                      "--two_stage)")
    ours.add_argument("--train_images", type=str, help="custom COCO-format data: training image folder")
    ours.add_argument("--train_json", type=str, help="custom COCO-format data: training annotations")
    ours.add_argument("--val_images", type=str, help="custom COCO-format data: validation image folder")
    ours.add_argument("--val_json", type=str, help="custom COCO-format data: validation annotations")
    ours.add_argument("--num_classes", type=int, default=None,
                      help="number of class logits; default: 91 for --coco_path, else max category id + 1")
    ours.add_argument("--pretrained_backbone", default="torchvision",
                      help="'torchvision' (ImageNet weights, downloaded once), a local ResNet state_dict file, "
                      "or 'none' (train from scratch)")
    ours.add_argument("--finetune", default="", help="initialise from a checkpoint's model weights (not its "
                      "optimizer/epoch); combine with --drop_class_heads for another label set")
    ours.add_argument("--drop_class_heads", action="store_true",
                      help="with --finetune: leave the class heads at their initialisation (other num_classes)")
    ours.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="mixed precision")
    ours.add_argument("--msda_backend", default="auto", help="multi-scale deformable attention backend")
    ours.add_argument("--train_scales", type=int, nargs="+", default=None,
                      help="training short-side sizes (default: the official 480..800 step 32)")
    ours.add_argument("--val_size", type=int, default=800, help="evaluation short side (official 800)")
    ours.add_argument("--max_size", type=int, default=1333, help="longest side after resizing (official 1333)")
    ours.add_argument("--crop_sizes", type=int, nargs=3, default=None, metavar=("R1", "CROP_MIN", "CROP_MAX"),
                      help="training crop branch: resize short side to R1 +-, then crop to [CROP_MIN, CROP_MAX] "
                      "(default: the official 400/500/600 and 384..600)")
    ours.add_argument("--strict", action="store_true", help="stop on an unreadable image instead of skipping it")
    ours.add_argument("--eval_every", type=int, default=1, help="evaluate every N epochs (and after the last)")
    ours.add_argument("--tensorboard", action="store_true", help="also write TensorBoard logs to output_dir/tb")
    ours.add_argument("--no_progress", action="store_true", help="no progress bars")
    return parser


def _check_official_flags(args: argparse.Namespace) -> None:
    for flag, supported in _FIXED_OFFICIAL_FLAGS.items():
        if getattr(args, flag) != supported:
            raise ValueError(f"--{flag} {getattr(args, flag)!r} is not supported (only {supported!r}): "
                             + {"position_embedding": "the official models use the sine embedding",
                                "dataset_file": "give COCO-format data with --coco_path or --train_json/...",
                                "masks": "Deformable DETR has no segmentation head",
                                "frozen_weights": "it only serves segmentation training",
                                "lr_backbone_names": "parameter groups are collected from module references",
                                "lr_linear_proj_names": "parameter groups are collected from module references",
                                }[flag])


def model_config_from_args(args: argparse.Namespace, num_classes: int):
    """The ModelConfig the flags describe (``--variant`` first, then the official flags that differ from it)."""
    preset = VARIANTS[args.variant] if args.variant else {}
    options = dict(
        backbone=args.backbone, dilation=args.dilation or bool(preset.get("dilation")),
        train_backbone=args.lr_backbone > 0, position_embedding_scale=args.position_embedding_scale,
        num_feature_levels=preset.get("num_feature_levels", args.num_feature_levels),
        enc_layers=args.enc_layers, dec_layers=args.dec_layers, dim_feedforward=args.dim_feedforward,
        hidden_dim=args.hidden_dim, dropout=args.dropout, nheads=args.nheads, num_queries=args.num_queries,
        dec_n_points=args.dec_n_points, enc_n_points=args.enc_n_points,
        with_box_refine=args.with_box_refine or bool(preset.get("with_box_refine")),
        two_stage=args.two_stage or bool(preset.get("two_stage")), aux_loss=args.aux_loss,
        set_cost_class=args.set_cost_class, set_cost_bbox=args.set_cost_bbox, set_cost_giou=args.set_cost_giou,
        cls_loss_coef=args.cls_loss_coef, bbox_loss_coef=args.bbox_loss_coef, giou_loss_coef=args.giou_loss_coef,
        focal_alpha=args.focal_alpha, msda_backend=args.msda_backend,
    )
    return model_config("deformable_detr", num_classes=num_classes, **options)


def load_pretrained_backbone(model, source: str) -> None:
    """ImageNet weights for the ResNet: torchvision's (downloaded once, cached) or a local state_dict file."""
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
            raise RuntimeError(f"could not download the ImageNet {name} weights ({error}); pass "
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


def _datasets(args: argparse.Namespace, info: DistributedInfo):
    train_kwargs: dict = {}
    if args.train_scales:
        train_kwargs["scales"] = args.train_scales
    if args.crop_sizes:
        train_kwargs["crop_resize_sizes"] = [args.crop_sizes[0]]
        train_kwargs["crop_size"] = (args.crop_sizes[1], args.crop_sizes[2])
    train_kwargs["max_size"] = args.max_size
    common = dict(cache_mode=args.cache_mode, local_rank=info.local_rank, local_size=info.local_size,
                  strict=args.strict)
    if args.coco_path:
        def source(image_set):
            return dict(coco_path=args.coco_path)
    else:
        if not (args.val_json and args.val_images):
            raise ValueError("give the data: --coco_path DIR (official layout), or --train_images/--train_json "
                             "and --val_images/--val_json (any COCO-format folder and JSON)")

        def source(image_set):
            return dict(images=getattr(args, f"{image_set}_images"), annotations=getattr(args, f"{image_set}_json"))
    val_set = build_coco_dataset("val", **source("val"), transforms=make_coco_transforms(
        "val", val_size=args.val_size, max_size=args.max_size), **common)
    train_set = None
    if not args.eval:
        if not args.coco_path and not (args.train_json and args.train_images):
            raise ValueError("training needs --train_images and --train_json (or --coco_path)")
        train_set = build_coco_dataset("train", **source("train"),
                                       transforms=make_coco_transforms("train", **train_kwargs), **common)
    return train_set, val_set


def _num_classes(args: argparse.Namespace, datasets) -> int:
    """Official COCO: 91 logits (category ids are used as labels). Custom data: max category id + 1."""
    largest = max(max(d.category_ids, default=0) for d in datasets if d is not None)
    if args.num_classes is None:
        return 91 if args.coco_path else largest + 1
    if largest >= args.num_classes:
        raise ValueError(f"--num_classes {args.num_classes} does not fit the data: category id {largest} needs "
                         f"at least {largest + 1} class logits (labels are the category ids)")
    return args.num_classes


def run(args: argparse.Namespace) -> dict:
    """Trains (or with --eval, evaluates) as the official main(); returns the last log entry."""
    _check_official_flags(args)
    info = init_distributed(args.dist_url, args.device)
    device = torch.device(args.device if not args.device.startswith("cuda") or not info.enabled
                          else f"cuda:{info.local_rank}")
    _seed_everything(args.seed + info.rank)
    output_dir = Path(args.output_dir) if args.output_dir else None
    if output_dir and info.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    if args.eval and not args.resume:
        raise ValueError("--eval evaluates the weights of --resume CHECKPOINT; none given")

    train_set, val_set = _datasets(args, info)
    num_classes = _num_classes(args, [train_set, val_set])
    config = model_config_from_args(args, num_classes)
    model, criterion, postprocessors = build_from_config(config)
    if not args.resume:
        load_pretrained_backbone(model, args.pretrained_backbone)
    if args.finetune:
        load_checkpoint(model, args.finetune, drop_class_heads=args.drop_class_heads)
    model.to(device)
    model_without_ddp = model
    if info.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    if info.is_main:
        print(f"model: {config}\nnumber of trainable parameters: {n_parameters:,}")

    optimizer = build_optimizer(model_without_ddp, args.lr, args.lr_backbone, args.lr_linear_proj_mult,
                                args.weight_decay, args.sgd)
    if args.lr_drop_epochs:
        lr_scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.lr_drop_epochs)
    else:
        lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None

    if args.resume:
        checkpoint = load_checkpoint(model_without_ddp, args.resume)
        if not args.eval and all(k in checkpoint for k in ("optimizer", "lr_scheduler", "epoch")):
            try:
                optimizer.load_state_dict(checkpoint["optimizer"])
            except ValueError as error:
                raise CheckpointError(f"--resume {args.resume}: its optimizer state does not fit this model's "
                                      f"parameter groups ({error})") from error
            lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
            args.start_epoch = checkpoint["epoch"] + 1
            if scaler is not None and "scaler" in checkpoint:
                scaler.load_state_dict(checkpoint["scaler"])

    val_sampler = DistributedSampler(val_set, shuffle=False) if info.enabled else SequentialSampler(val_set)
    val_loader = DataLoader(val_set, args.batch_size, sampler=val_sampler, drop_last=False, collate_fn=collate_fn,
                            num_workers=args.num_workers, pin_memory=device.type == "cuda")
    progress = not args.no_progress
    if args.eval:
        stats, evaluator = evaluate(model, criterion, postprocessors, val_loader, val_set.coco, device, args.amp,
                                    progress)
        if info.is_main:
            print(evaluator.summary)
            if output_dir:
                (output_dir / "eval.json").write_text(json.dumps({f"test_{k}": v for k, v in stats.items()}))
        return {f"test_{k}": v for k, v in stats.items()}

    writer = None
    if args.tensorboard and output_dir and info.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(output_dir / "tb"))
    print_fn = print if info.is_main else (lambda *a, **k: None)
    print_fn(f"training {len(train_set)} images, evaluating {len(val_set)}; "
             f"epochs {args.start_epoch}..{args.epochs - 1}")
    start_time = time.time()
    log_stats: dict = {}
    for epoch in range(args.start_epoch, args.epochs):
        # Every epoch starts from RNG states that depend only on (seed, epoch, rank), so that resuming from a
        # checkpoint replays exactly what an uninterrupted run does.
        _seed_everything(args.seed + 1000 * epoch + info.rank)
        generator = torch.Generator().manual_seed(args.seed + epoch)
        if info.enabled:
            train_sampler = DistributedSampler(train_set, shuffle=True, seed=args.seed)
            train_sampler.set_epoch(epoch)
        else:
            train_sampler = RandomSampler(train_set, generator=generator)
        train_loader = DataLoader(train_set, args.batch_size, sampler=train_sampler, drop_last=True,
                                  collate_fn=collate_fn, num_workers=args.num_workers,
                                  pin_memory=device.type == "cuda", generator=generator)
        train_stats = train_one_epoch(model, criterion, train_loader, optimizer, device, epoch, args.clip_max_norm,
                                      args.amp, scaler, progress)
        lr_scheduler.step()
        skipped = getattr(train_set, "num_skipped", 0)
        if skipped:
            print_fn(f"epoch {epoch}: {skipped} unreadable image(s) skipped so far (see the warnings above)")
        if output_dir and info.is_main:
            checkpoint = {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                          "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch, "args": args,
                          "categories": train_set.categories}  # {label: name}, read by ddetr predict
            if scaler is not None:
                checkpoint["scaler"] = scaler.state_dict()
            save_checkpoint(output_dir / "checkpoint.pth", checkpoint)
            # Extra numbered checkpoints before the lr drop and every 5 epochs, as the official main.py.
            if (epoch + 1) % args.lr_drop == 0 or (epoch + 1) % 5 == 0:
                save_checkpoint(output_dir / f"checkpoint{epoch:04}.pth", checkpoint)
        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch,
                     "n_parameters": n_parameters}
        if (epoch + 1) % args.eval_every == 0 or epoch == args.epochs - 1:
            test_stats, evaluator = evaluate(model, criterion, postprocessors, val_loader, val_set.coco, device,
                                             args.amp, progress)
            log_stats = {**{f"train_{k}": v for k, v in train_stats.items()},
                         **{f"test_{k}": v for k, v in test_stats.items()}, "epoch": epoch,
                         "n_parameters": n_parameters}
            print_fn(f"epoch {epoch}: COCO bbox\n{format_stats(test_stats['coco_eval_bbox'])}")
        if output_dir and info.is_main:
            with (output_dir / "log.txt").open("a") as log:
                log.write(json.dumps(log_stats) + "\n")
            if writer is not None:
                for key, value in log_stats.items():
                    if isinstance(value, (int, float)) and math.isfinite(value):
                        writer.add_scalar(key, value, epoch)
                if "test_coco_eval_bbox" in log_stats:
                    writer.add_scalar("test_AP", log_stats["test_coco_eval_bbox"][0], epoch)
                    writer.add_scalar("test_AP50", log_stats["test_coco_eval_bbox"][1], epoch)
    total = datetime.timedelta(seconds=int(time.time() - start_time))
    print_fn(f"training time {total}")
    if writer is not None:
        writer.close()
    return log_stats
