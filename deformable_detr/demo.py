"""``ddetr demo``: the main job on the embedded default. Generates the synthetic shapes dataset, trains a small
Deformable DETR from scratch on it (CPU, about 9 minutes on 2 cores), evaluates it with COCO AP and draws its
predictions on validation images."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from PIL import Image

from deformable_detr.config import DataConfig, DemoConfig, TrainConfig, model_config
from deformable_detr.data import build_coco_dataset, category_info, make_synthetic_dataset
from deformable_detr.inference.detector import Detector
from deformable_detr.inference.drawing import draw_detections
from deformable_detr.training.evaluation import format_stats
from deformable_detr.training.plot import plot_logs
from deformable_detr.training.train import train

# The small configuration: a ResNet-18 (random weights: nothing can be downloaded here), a narrow, shallow
# transformer with box refinement, and the sizes of the synthetic images. No dropout: on this short schedule it
# slowed learning (9 epochs without it: AP50 0.708, 10 with it: 0.691) and cost 6% of a step (its random masks).
DEMO_MODEL = model_config("box_refine", backbone="resnet18", hidden_dim=128, nheads=8, enc_layers=2, dec_layers=3,
                          dim_feedforward=256, num_queries=30, dropout=0.0)
# From scratch, the backbone learns at the transformer's rate (the official 0.1x assumes ImageNet weights).
DEMO_TRAIN = TrainConfig(lr=2e-4, lr_backbone=2e-4, batch_size=8, pretrained_backbone="none")
DEMO_DATA = DataConfig(train_scales=(112, 120, 128, 136, 144), crop_resize_sizes=(128,), crop_size=(96, 128),
                       val_size=128, max_size=192)


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
        # Both halves drawn enlarged to about 384 px (the synthetic images are small), so that the captions leave
        # the shapes visible.
        predicted = draw_detections(image, found.boxes.tolist(), found.scores.tolist(), found.labels.tolist(), names,
                                    min_side=384)
        # The untransformed target holds xyxy pixel boxes.
        truth = draw_detections(image, target["boxes"].tolist(), [1.0] * len(target["labels"]),
                                target["labels"].tolist(), names, min_side=384)
        pair = Image.new("RGB", (2 * truth.width + 8, truth.height), (255, 255, 255))
        pair.paste(truth, (0, 0))
        pair.paste(predicted, (truth.width + 8, 0))
        path = out_dir / f"prediction_{index:02d}.png"
        pair.save(path)
        written.append(path)
    return written


def run_demo(demo: DemoConfig) -> dict:
    """Writes the synthetic dataset, trains :data:`DEMO_MODEL` on it, evaluates it after the last epoch and draws
    its detections and the training curves; returns the last log entry."""
    output_dir = Path(demo.output_dir)
    started = time.time()
    data = make_synthetic_dataset(output_dir / "data", num_train=demo.num_train, num_val=demo.num_val,
                                  image_size=demo.image_size, seed=0, colour_by_class=not demo.shape_only)
    print(f"synthetic dataset in {data.root}: {demo.num_train} training and {demo.num_val} validation images")
    train_cfg = dataclasses.replace(DEMO_TRAIN, epochs=demo.epochs, lr_drop=demo.lr_drop, eval_every=demo.epochs,
                                    output_dir=str(output_dir), device=demo.device, seed=demo.seed,
                                    progress=demo.progress)
    data_cfg = dataclasses.replace(DEMO_DATA, train_images=str(data.train_images), train_json=str(data.train_json),
                                   val_images=str(data.val_images), val_json=str(data.val_json),
                                   num_workers=demo.num_workers)
    log = train(DEMO_MODEL, train_cfg, data_cfg)
    stats = log["test_coco_eval_bbox"]
    pictures = draw_predictions(output_dir, data.val_images, data.val_json, output_dir / "predictions",
                                demo.num_pictures, demo.device)
    curves = plot_logs([output_dir])
    minutes = (time.time() - started) / 60
    where = f"predictions drawn in {pictures[0].parent}/, " if pictures else ""
    print(f"\ndemo finished in {minutes:.1f} min: COCO bbox on {demo.num_val} synthetic validation images\n"
          f"{format_stats(stats)}\n{where}curves in {curves}, log in {output_dir / 'log.txt'}")
    (output_dir / "demo_result.json").write_text(json.dumps({"coco_eval_bbox": stats, "minutes": minutes}))
    return log
