"""Training speed: seconds per iteration and peak memory of the real training step (``engine.train_one_epoch``:
forward, matching, losses, backward, clipping, AdamW) for an official variant, per attention backend and precision,
measured side by side in one process.

The batch is random images of ``--size`` (default 800 x 1066, the official scale) with random boxes (``--boxes``
per image, default 7, about COCO's mean); random weights (speed does not depend on the values). Each cell runs
``--iterations`` steps after ``--warmup`` steps; the median step time is reported, with peak CUDA memory.

    python benchmarks/train_step.py --device cuda                        # triton and reference, fp32 / bf16
    python benchmarks/train_step.py --device cpu --size 320 427 --iterations 3 --backends cpu reference
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from deformable_detr.config import VARIANTS, model_config  # noqa: E402
from deformable_detr.model.build import build_from_config  # noqa: E402
from deformable_detr.training.engine import train_one_epoch  # noqa: E402
from deformable_detr.training.optimizer import build_optimizer  # noqa: E402


def make_batch(batch: int, height: int, width: int, boxes: int, num_classes: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, height, width, generator=generator)
    mask = torch.zeros(batch, height, width, dtype=torch.bool)
    targets = []
    for _ in range(batch):
        centres = torch.rand(boxes, 2, generator=generator) * 0.8 + 0.1
        sizes = torch.rand(boxes, 2, generator=generator) * 0.3 + 0.02
        targets.append({"boxes": torch.cat([centres, sizes], dim=1),
                        "labels": torch.randint(1, num_classes, (boxes,), generator=generator)})
    return images, mask, targets


class TimedBatches:
    """Yields the same batch ``count`` times and records the time between consecutive yields (one training step
    each), synchronising the device so that each interval covers the step's kernels."""

    def __init__(self, batch, count: int, device: torch.device):
        self.batch, self.count, self.device, self.times = batch, count, device, []

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        start = None
        for _ in range(self.count):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            now = time.perf_counter()
            if start is not None:
                self.times.append(now - start)
            start = now
            yield self.batch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter() - start)


def time_cell(args: argparse.Namespace, variant: str, device: torch.device, backend: str, amp: str | None) -> dict:
    torch.manual_seed(0)
    config = model_config(variant, num_classes=91, msda_backend=backend)
    model, criterion, _ = build_from_config(config)
    model.to(device)
    criterion.to(device)
    optimizer = build_optimizer(model)
    batch = make_batch(args.batch, *args.size, args.boxes, 91)
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    batches = TimedBatches(batch, args.warmup + args.iterations, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_one_epoch(model, criterion, batches, optimizer, device, epoch=0, amp=amp, scaler=scaler, progress=False,
                    print_freq=0)
    timed = batches.times[args.warmup:]
    record = {"variant": variant, "device": str(device), "backend": backend, "amp": amp or "fp32",
              "batch": args.batch, "size": list(args.size), "step_s": statistics.median(timed),
              "images_per_s": args.batch / statistics.median(timed)}
    if device.type == "cuda":
        record["peak_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", nargs="+", default=["deformable_detr"], choices=list(VARIANTS),
                        help="one or more variants, timed side by side (e.g. detr deformable_detr: the cost side of "
                        "the convergence trade; DETR has no deformable attention, so its backend is moot)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", nargs="+", default=None, help="default: triton and reference on CUDA, cpu and "
                        "reference on the CPU")
    parser.add_argument("--amp", nargs="+", default=None, choices=["fp32", "bf16", "fp16"],
                        help="default: fp32 and bf16")
    parser.add_argument("--batch", type=int, default=2, help="images per step (the official per-GPU batch: 2)")
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1066], metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--boxes", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    backends = args.backends or (["triton", "reference"] if device.type == "cuda" else ["cpu", "reference"])
    precisions = args.amp or ["fp32", "bf16"]
    records = []
    for variant in args.variant:
        for backend in backends:
            for amp in precisions:
                record = time_cell(args, variant, device, backend, None if amp == "fp32" else amp)
                records.append(record)
                if not args.json:
                    memory = f", peak {record['peak_GiB']:.2f} GiB" if "peak_GiB" in record else ""
                    print(f"{variant} {device} {backend:9s} {record['amp']}: {1e3 * record['step_s']:.1f} ms/step, "
                          f"{record['images_per_s']:.1f} images/s{memory}", flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    if args.json:
        print(json.dumps({"device_name": name, "torch": torch.__version__, "records": records}, indent=2))
    else:
        print(f"{name}, torch {torch.__version__}, batch {args.batch} of {args.size[0]}x{args.size[1]}, "
              f"median of {args.iterations} steps after {args.warmup} warm-up steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
