"""``ddetr demo``: the main job on the embedded default. Generates the synthetic shapes dataset, trains a small
Deformable DETR from scratch on it (CPU, about 15 minutes on 2 cores), evaluates it with COCO AP and draws its
predictions on validation images."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from PIL import Image

from deformable_detr.data import build_coco_dataset, category_info, make_synthetic_dataset
from deformable_detr.inference.detector import Detector
from deformable_detr.inference.drawing import draw_detections
from deformable_detr.training.evaluation import format_stats
from deformable_detr.training.plot import plot_logs
from deformable_detr.training.train import add_train_arguments, run

# The small configuration: every value is an official flag of ddetr train.
DEMO_TRAIN_FLAGS = [
    "--backbone", "resnet18", "--pretrained_backbone", "none",
    "--hidden_dim", "128", "--nheads", "8", "--enc_layers", "2", "--dec_layers", "3", "--dim_feedforward", "256",
    "--num_queries", "30", "--with_box_refine",
    # From scratch, the backbone learns at the transformer's rate (the official 0.1x assumes ImageNet weights).
    "--lr", "2e-4", "--lr_backbone", "2e-4", "--batch_size", "8",
    "--train_scales", "112", "120", "128", "136", "144", "--crop_sizes", "128", "96", "128",
    "--val_size", "128", "--max_size", "192",
]


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--output_dir", default="demo_output", help="dataset, checkpoints, log.txt and pictures")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr_drop", type=int, default=8)
    parser.add_argument("--num_train", type=int, default=1000, help="synthetic training images")
    parser.add_argument("--num_val", type=int, default=200, help="synthetic validation images")
    parser.add_argument("--image_size", type=int, default=128, help="synthetic image side")
    parser.add_argument("--shape_only", action="store_true",
                        help="colours independent of the class (harder: the class must be read from the shape alone; "
                        "needs far more than the demo's 15 minutes from scratch)")
    parser.add_argument("--num_workers", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--num_pictures", type=int, default=8, help="validation images drawn with predictions")
    parser.add_argument("--no_progress", action="store_true")
    return parser


def draw_predictions(checkpoint_dir: Path, val_images: Path, val_json: Path, out_dir: Path, num_pictures: int,
                     device: str) -> list[Path]:
    """Runs the trained model on the first validation images and writes each as a picture: the ground truth on
    the left, the detections scoring at least 0.3 on the right."""
    detector = Detector.from_checkpoint(checkpoint_dir / "checkpoint.pth", device=device, score_threshold=0.3)
    dataset = build_coco_dataset("val", images=val_images, annotations=val_json, transforms=None, progress=False)
    names = category_info(dataset)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index in range(min(num_pictures, len(dataset))):
        image, target = dataset[index]
        found = detector.predict(image)
        predicted = draw_detections(image, found.boxes.tolist(), found.scores.tolist(), found.labels.tolist(), names)
        # The untransformed target holds xyxy pixel boxes.
        truth = draw_detections(image, target["boxes"].tolist(), [1.0] * len(target["labels"]),
                                target["labels"].tolist(), names)
        # Upscaled: the synthetic images are small.
        scale = max(1, 384 // max(image.size))
        pair = Image.new("RGB", (2 * image.width * scale + 8, image.height * scale), (255, 255, 255))
        pair.paste(truth.resize((image.width * scale, image.height * scale), Image.NEAREST), (0, 0))
        pair.paste(predicted.resize((image.width * scale, image.height * scale), Image.NEAREST),
                   (image.width * scale + 8, 0))
        path = out_dir / f"prediction_{index:02d}.png"
        pair.save(path)
        written.append(path)
    return written


def run_demo(args: argparse.Namespace) -> dict:
    output_dir = Path(args.output_dir)
    started = time.time()
    data = make_synthetic_dataset(output_dir / "data", num_train=args.num_train, num_val=args.num_val,
                                  image_size=args.image_size, seed=0, colour_by_class=not args.shape_only)
    print(f"synthetic dataset in {data.root}: {args.num_train} training and {args.num_val} validation images")
    flags = DEMO_TRAIN_FLAGS + [
        "--train_images", str(data.train_images), "--train_json", str(data.train_json),
        "--val_images", str(data.val_images), "--val_json", str(data.val_json),
        "--epochs", str(args.epochs), "--lr_drop", str(args.lr_drop), "--eval_every", str(args.epochs),
        "--output_dir", str(output_dir), "--device", args.device, "--num_workers", str(args.num_workers),
        "--seed", str(args.seed),
    ] + (["--no_progress"] if args.no_progress else [])
    train_args = add_train_arguments(argparse.ArgumentParser()).parse_args(flags)
    log = run(train_args)
    stats = log["test_coco_eval_bbox"]
    pictures = draw_predictions(output_dir, data.val_images, data.val_json, output_dir / "predictions",
                                args.num_pictures, args.device)
    curves = plot_logs([output_dir])
    minutes = (time.time() - started) / 60
    print(f"\ndemo finished in {minutes:.1f} min: COCO bbox on {args.num_val} synthetic validation images\n"
          f"{format_stats(stats)}\npredictions drawn in {pictures[0].parent}/, curves in {curves}, "
          f"log in {output_dir / 'log.txt'}")
    (output_dir / "demo_result.json").write_text(json.dumps({"coco_eval_bbox": stats, "minutes": minutes}))
    return log
