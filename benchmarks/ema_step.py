"""EMA update (``--ema``): milliseconds per update of the weights' moving average after an optimizer step, as
``ModelEMA.update`` does it (one ``torch._foreach_lerp_`` over the trained parameters, one ``torch._foreach_copy_``
of the rest), against a per-tensor Python loop of ``lerp_`` / ``copy_`` doing the same (checked equal).

    python benchmarks/ema_step.py                              # the demo model on the CPU
    python benchmarks/ema_step.py --variant deformable_detr    # the R50 model
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from deformable_detr.config import VARIANTS, model_config  # noqa: E402
from deformable_detr.demo import DEMO_MODEL  # noqa: E402
from deformable_detr.model.build import build_from_config  # noqa: E402
from deformable_detr.training.ema import ModelEMA, ema_decay  # noqa: E402


@torch.no_grad()
def loop_update(ema: ModelEMA, model: torch.nn.Module) -> None:
    """The same update, one tensor at a time."""
    ema.updates += 1
    weight = 1.0 - ema_decay(ema.updates, ema.decay, ema.tau)
    for own, parameter in zip(ema.module.parameters(), model.parameters()):
        if parameter.requires_grad:
            own.lerp_(parameter, weight)
        else:
            own.copy_(parameter)
    for own, buffer in zip(ema.module.buffers(), model.buffers()):
        own.copy_(buffer)


def time_updates(model: torch.nn.Module, updates: dict, steps: int, device: torch.device
                 ) -> dict[str, tuple[list[float], ModelEMA]]:
    """Seconds of each of ``steps`` updates (after 3 warm-up updates) per implementation, and its average afterwards.
    The implementations take turns, update by update, so that a load that comes and goes on a shared machine falls
    on all of them."""
    emas = {name: ModelEMA(model, 0.9998, 2000) for name in updates}
    times: dict[str, list[float]] = {name: [] for name in updates}
    for step in range(3 + steps):
        for name, update in updates.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            update(emas[name], model)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= 3:
                times[name].append(time.perf_counter() - start)
    return {name: (times[name], emas[name]) for name in updates}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="demo", choices=["demo", *VARIANTS],
                        help="demo: the model of `ddetr demo` (ResNet-18, width 128); else an official variant (R50)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    config = DEMO_MODEL if args.variant == "demo" else model_config(args.variant)
    torch.manual_seed(0)
    model = build_from_config(dataclasses.replace(config, num_classes=91))[0].to(device)
    # Weights that differ from the average's start, as after an optimizer step.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p), alpha=1e-3)
    results = time_updates(model, {"foreach": ModelEMA.update, "loop": loop_update}, args.steps, device)
    records = [{"implementation": name, "update_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times)}
               for name, (times, _) in results.items()]
    averages = [ema.module.state_dict() for _, ema in results.values()]
    equal = all(torch.equal(averages[0][k], averages[1][k]) for k in averages[0])
    trained = [p for p in model.parameters() if p.requires_grad]
    summary = {"variant": args.variant, "device": str(device), "trained_tensors": len(trained),
               "trained_parameters": sum(p.numel() for p in trained),
               "state_tensors": len(model.state_dict()), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "foreach_equals_loop": equal, "records": records}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"EMA update, {args.variant} model ({summary['trained_tensors']} trained tensors, "
          f"{summary['trained_parameters'] / 1e6:.1f} M parameters; {summary['state_tensors']} state tensors), "
          f"{device}, {summary['threads']} threads, {args.steps} updates each; foreach == loop: {equal}")
    for record in records:
        print(f"  {record['implementation']:8s} median {record['update_ms']:7.2f} ms   min {record['min_ms']:7.2f} ms")
    return 0 if equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
