"""Activation checkpointing: the memory it saves and the time it costs in a training step, on the CPU.

One training step (forward in training mode, the criterion, the backward of the weighted loss; no optimizer step)
of a model with random weights on random images, at the official scale by default: R50 multi-scale
(``deformable_detr``), batch 2, 800 x 1066, dropout 0.1, the attention kernels of ``auto``. One row per setting of
``--checkpoint_activations`` (none, each part alone, encoder + decoder, all three), each in its own subprocess, so
that its memory is its own:

* peak RSS: the subprocess's peak resident memory (``getrusage(RUSAGE_SELF).ru_maxrss``) over its whole life: the
  model, the inputs, and the steps' activations, gradients and allocator slack;
* above model: the peak minus the resident memory just before the first step (model built, inputs made), i.e. what
  the step itself adds (activations kept for the backward, gradients, temporaries);
* step: the median wall time of the timed steps (after ``--warmup`` untimed steps, default 1; the first step also
  loads the attention kernels, about a second, and touches every page for the first time).

    python benchmarks/activation_memory.py                      # the official scale (minutes on 2 cores)
    python benchmarks/activation_memory.py --warmup 0 --settings none encoder decoder backbone all   # ~10 min
    python benchmarks/activation_memory.py --size 400 533 --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from deformable_detr.config import VARIANTS, model_config  # noqa: E402
from deformable_detr.model.build import build_from_config  # noqa: E402

SETTINGS = {"none": (), "encoder": ("encoder",), "decoder": ("decoder",), "backbone": ("backbone",),
            "encoder+decoder": ("encoder", "decoder"), "all": ("backbone", "encoder", "decoder")}


def _resident_mib() -> float:
    """The current resident set size of this process (Linux /proc), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise OSError("no VmRSS in /proc/self/status (Linux only)")


def run_worker(args: argparse.Namespace) -> dict:
    """One row: build, ``args.warmup`` untimed steps, ``args.steps`` timed steps; returns the measurements."""
    torch.manual_seed(0)
    config = model_config(args.variant, num_classes=91, checkpoint_activations=SETTINGS[args.setting])
    model, criterion, _ = build_from_config(config)
    model.train()
    height, width = args.size
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, height, width, generator=generator)
    mask = torch.zeros(args.batch, height, width, dtype=torch.bool)
    targets = [{"labels": torch.randint(1, 91, (5,), generator=generator),
                "boxes": torch.rand(5, 4, generator=generator) * 0.5 + 0.25} for _ in range(args.batch)]

    def step() -> float:
        model.zero_grad(set_to_none=True)
        started = time.perf_counter()
        criterion.total_loss(criterion(model(images, mask), targets)).backward()
        return time.perf_counter() - started

    before_mib = _resident_mib()
    for _ in range(args.warmup):
        step()
    times = [step() for _ in range(args.steps)]
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"setting": args.setting, "peak_rss_mib": peak_mib, "before_step_mib": before_mib,
            "above_model_mib": peak_mib - before_mib, "step_s": statistics.median(times),
            "step_runs_s": [round(t, 2) for t in times]}


def table(rows: list[dict]) -> str:
    base = next(row for row in rows if row["setting"] == "none")
    lines = ["| --checkpoint_activations | peak RSS MiB | above model MiB | vs none | step s | vs none |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        if "failed" in row:
            lines.append(f"| {row['setting']} | failed: {row['failed']} | | | | |")
            continue
        lines.append(f"| {row['setting']} | {row['peak_rss_mib']:.0f} | {row['above_model_mib']:.0f} | "
                     f"{row['above_model_mib'] / base['above_model_mib']:.2f}x | {row['step_s']:.1f} | "
                     f"{row['step_s'] / base['step_s']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="deformable_detr", choices=list(VARIANTS))
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1066], metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per row before the timed ones")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                        help="rows to measure (none is always measured: the ratios are to it)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.setting = args.worker
        print(json.dumps(run_worker(args)))
        return 0

    def log(message: str) -> None:
        print(message, file=sys.stderr if args.json else sys.stdout, flush=True)

    height, width = args.size
    environment = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                   "cpu": platform.processor() or platform.machine(), "python": platform.python_version()}
    log(f"training step of {args.variant} at batch {args.batch}, {height}x{width}, {args.warmup} warm-up and "
        f"{args.steps} timed step(s) per row, each row in its own process; {environment}")
    rows = []
    for setting in ["none", *(s for s in args.settings if s != "none")]:
        command = [sys.executable, __file__, "--worker", setting, "--variant", args.variant, "--size", str(height),
                   str(width), "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
        if result.returncode != 0:
            rows.append({"setting": setting, "failed": result.stderr.strip().splitlines()[-1][:200]})
            log(f"  {setting}: failed:\n{result.stderr[-2000:]}")
            continue
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        log(f"  {setting}: peak RSS {rows[-1]['peak_rss_mib']:.0f} MiB, step {rows[-1]['step_s']:.1f} s")
    if rows[0].get("failed"):
        log("the row without checkpointing failed: no ratios")
        return 1
    if args.json:
        print(json.dumps({"environment": environment, "variant": args.variant, "size": [height, width],
                          "batch": args.batch, "warmup": args.warmup, "steps": args.steps, "rows": rows},
                         indent=1))
    else:
        print(f"\n{args.variant}, batch {args.batch}, {height}x{width}, CPU threads {environment['threads']}\n")
        print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
