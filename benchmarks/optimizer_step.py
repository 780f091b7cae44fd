"""Optimizer step: milliseconds per AdamW (or SGD) update over a model's trainable parameters, for torch's three
implementations measured side by side in one process: the per-tensor Python loop (``forloop``, torch's CPU
default), the multi-tensor one (``foreach``) and the single fused kernel (``fused``, what ``build_optimizer``
uses where it can). Each implementation's update after the same steps is compared with the for-loop one (max
relative difference of the parameters).

    python benchmarks/optimizer_step.py                      # the demo model on the CPU
    python benchmarks/optimizer_step.py --variant deformable_detr --steps 10
"""

from __future__ import annotations

import argparse
import copy
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
from deformable_detr.training.optimizer import parameter_groups  # noqa: E402

IMPLEMENTATIONS = {"forloop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def time_implementation(model: torch.nn.Module, name: str, sgd: bool, steps: int, device: torch.device
                        ) -> tuple[float, list[torch.Tensor]]:
    """Median seconds of one step over ``steps`` steps after 3 warm-up steps, and the parameters afterwards."""
    model = copy.deepcopy(model)
    groups = parameter_groups(model, 2e-4, 2e-5)
    generator = torch.Generator().manual_seed(0)
    for group in groups:
        for p in group["params"]:
            p.grad = torch.randn(p.shape, generator=generator).to(device)
    kwargs = IMPLEMENTATIONS[name]
    optimizer = (torch.optim.SGD(groups, lr=2e-4, momentum=0.9, weight_decay=1e-4, **kwargs) if sgd
                 else torch.optim.AdamW(groups, lr=2e-4, weight_decay=1e-4, **kwargs))
    times = []
    for step in range(3 + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times), [p.detach().clone() for p in model.parameters()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="demo", choices=["demo", *VARIANTS],
                        help="demo: the model of `ddetr demo` (ResNet-18, width 128); else an official variant")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sgd", action="store_true", help="SGD with momentum instead of AdamW")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    config = DEMO_MODEL if args.variant == "demo" else model_config(args.variant)
    torch.manual_seed(0)
    model = build_from_config(dataclasses.replace(config, num_classes=91))[0].to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    records, baseline = [], None
    for name in IMPLEMENTATIONS:
        seconds, params = time_implementation(model, name, args.sgd, args.steps, device)
        if baseline is None:
            baseline = params
        diff = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(params, baseline))
        records.append({"implementation": name, "step_ms": 1e3 * seconds, "max_rel_diff_vs_forloop": diff})
    summary = {"variant": args.variant, "device": str(device), "optimizer": "SGD" if args.sgd else "AdamW",
               "tensors": len(trainable), "parameters": sum(p.numel() for p in trainable),
               "threads": torch.get_num_threads(), "torch": torch.__version__, "records": records}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{summary['optimizer']} step, {args.variant} model ({summary['tensors']} tensors, "
          f"{summary['parameters'] / 1e6:.1f} M parameters), {device}, {summary['threads']} threads, "
          f"median of {args.steps}")
    for record in records:
        print(f"  {record['implementation']:8s} {record['step_ms']:7.1f} ms   "
              f"{records[0]['step_ms'] / record['step_ms']:4.1f}x   max rel. diff vs forloop "
              f"{record['max_rel_diff_vs_forloop']:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
