"""Multi-scale deformable attention: time and peak memory of every backend available here, with ratios to the
reference backend measured in the same run.

Shapes (Deformable DETR at 800 x 1066, ResNet-50 strides 8 to 64): levels [(100, 134), (50, 67), (25, 34), (13, 17)]
(17,821 value tokens), 8 heads, head dim 32, 4 levels, 4 points; ``encoder``: one query per value token, ``decoder``:
300 queries. Sampling locations look like a trained model's rather than uniform noise (which would make every
backend a random-access memory benchmark): each query has a reference point (its own pixel centre in the encoder, a
random point in the decoder) and head m's point k sits k + 1 pixels along the head's direction (the official
initialisation) plus N(0, 1) pixels of noise, on every level.

Columns: median wall time over ``--repeats`` runs of the forward (under ``torch.no_grad``) and of forward+backward
(the three gradients), the reference's time divided by the backend's (speed-up), and the peak memory above what the
inputs already take. CPU peak memory is measured in a fresh subprocess per case: after a warm-up call, the kernel's
peak resident set size (``/proc/self/clear_refs`` reset, then ``VmHWM``) minus the resident size before the call,
with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed so that freed tensors leave the resident set. CUDA peak memory is
``torch.cuda.max_memory_allocated`` above the allocation before the call. On CUDA the forward is also compared with
its memory-bandwidth floor: value, locations and weights read once, the output written once, at the bandwidth the
device reports (2 * memory clock * bus width).

    python benchmarks/msda.py                                   # everything: slow with the reference on CPU
    python benchmarks/msda.py --shapes encoder --batch 1 --repeats 3
    python benchmarks/msda.py --shapes decoder --no-memory --json
    python benchmarks/msda.py --device cuda --backends triton   # on a GPU: Triton against the reference
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from deformable_detr.device import deterministic_algorithms  # noqa: E402
from deformable_detr.ops import available_backends, ms_deform_attn  # noqa: E402

SPATIAL_SHAPES = [(100, 134), (50, 67), (25, 34), (13, 17)]
NUM_HEADS = 8
HEAD_DIM = 32
NUM_POINTS = 4
DECODER_QUERIES = 300
SHAPES = ("encoder", "decoder")
MODES = ("forward", "forward_backward")
DETERMINISTIC_SUFFIX = "-deterministic"


def make_inputs(shape: str, batch: int, device: torch.device, dtype: torch.dtype, seed: int = 0,
                spatial_shapes: list[tuple[int, int]] = SPATIAL_SHAPES) -> dict:
    """value (batch, S, 8, 32), sampling_locations (batch, Lq, 8, 4, 4, 2), attention_weights (batch, Lq, 8, 4, 4)
    and grad_output (batch, Lq, 256), drawn on CPU from ``seed`` and moved to ``device``. S = sum(H_l * W_l) over
    ``spatial_shapes`` (smaller maps than the official ones make a quick run; pass the same shapes to ``run_once``)."""
    generator = torch.Generator().manual_seed(seed)
    num_levels = len(spatial_shapes)
    num_values = sum(h * w for h, w in spatial_shapes)
    if shape == "encoder":
        centres = []
        for height, width in spatial_shapes:
            ys, xs = torch.meshgrid(
                (torch.arange(height) + 0.5) / height, (torch.arange(width) + 0.5) / width, indexing="ij"
            )
            centres.append(torch.stack([xs.flatten(), ys.flatten()], -1))
        # (batch, S, 2): every value token is a query at its own pixel centre
        reference = torch.cat(centres).expand(batch, -1, -1)
    elif shape == "decoder":
        reference = 0.05 + 0.9 * torch.rand(batch, DECODER_QUERIES, 2, generator=generator)
    else:
        raise ValueError(f"unknown shape {shape!r}; valid: {SHAPES}")
    num_queries = reference.shape[1]
    angles = torch.arange(NUM_HEADS) * (2 * math.pi / NUM_HEADS)
    directions = torch.stack([angles.cos(), angles.sin()], -1)
    directions = directions / directions.abs().max(-1, keepdim=True)[0]
    # (heads, points, 2) pixels: point k at k + 1 pixels along the head's direction
    star = directions[:, None, :] * torch.arange(1, NUM_POINTS + 1)[None, :, None]
    offsets = star[None, None, :, None] + torch.randn(
        batch, num_queries, NUM_HEADS, num_levels, NUM_POINTS, 2, generator=generator
    )
    normaliser = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=torch.float32)
    locations = reference[:, :, None, None, None, :] + offsets / normaliser[None, None, None, :, None, :]
    logits = torch.randn(batch, num_queries, NUM_HEADS, num_levels * NUM_POINTS, generator=generator)
    weights = logits.softmax(-1).view(batch, num_queries, NUM_HEADS, num_levels, NUM_POINTS)
    value = torch.randn(batch, num_values, NUM_HEADS, HEAD_DIM, generator=generator)
    grad_output = torch.randn(batch, num_queries, NUM_HEADS * HEAD_DIM, generator=generator)
    tensors = {
        "value": value, "sampling_locations": locations, "attention_weights": weights, "grad_output": grad_output
    }
    return {name: tensor.to(device=device, dtype=dtype).contiguous() for name, tensor in tensors.items()}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_once(inputs: dict, backend: str, mode: str, spatial_shapes: list[tuple[int, int]] = SPATIAL_SHAPES
             ) -> tuple:
    """One forward (no autograd) or forward+backward; returns what it computed (kept alive by the caller).
    ``triton-deterministic``: triton under torch.use_deterministic_algorithms (the fixed-order backward)."""
    if backend.endswith(DETERMINISTIC_SUFFIX):
        with deterministic_algorithms():
            return run_once(inputs, backend.removesuffix(DETERMINISTIC_SUFFIX), mode, spatial_shapes)
    # Every backend derives the level starts from the shapes (level_start_index is only checked), and building the
    # tensor here would put a host-to-device copy into every timed CUDA call.
    level_start_index = None
    if mode == "forward":
        with torch.no_grad():
            output = ms_deform_attn(
                inputs["value"], spatial_shapes, level_start_index, inputs["sampling_locations"],
                inputs["attention_weights"], backend=backend,
            )
        return (output,)
    names = ("value", "sampling_locations", "attention_weights")
    leaves = [inputs[name].detach().requires_grad_(True) for name in names]
    output = ms_deform_attn(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2], backend=backend)
    grads = torch.autograd.grad(output, leaves, inputs["grad_output"])
    return (output, *grads)


def time_backends(inputs: dict, backends: list[str], mode: str, repeats: int,
                  spatial_shapes: list[tuple[int, int]] = SPATIAL_SHAPES) -> dict[str, float]:
    """Median seconds per backend; the backends take turns in every repeat so that they share the machine's load."""
    device = inputs["value"].device
    for backend in backends:  # warm-up: JIT compilation or cache load, allocator, lazy imports
        run_once(inputs, backend, mode, spatial_shapes)
    times: dict[str, list[float]] = {backend: [] for backend in backends}
    for _ in range(repeats):
        for backend in backends:
            _synchronize(device)
            start = time.perf_counter()
            run_once(inputs, backend, mode, spatial_shapes)
            _synchronize(device)
            times[backend].append(time.perf_counter() - start)
    return {backend: statistics.median(samples) for backend, samples in times.items()}


def _read_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_peak_memory_child(spec: dict) -> int:
    """In this (fresh) process: peak resident bytes of one call above the resident size before it."""
    torch.set_num_threads(spec["threads"])
    inputs = make_inputs(spec["shape"], spec["batch"], torch.device("cpu"), getattr(torch, spec["dtype"]))
    run_once(inputs, spec["backend"], spec["mode"])  # warm-up (JIT load, lazy imports), results freed
    before = _read_status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    results = run_once(inputs, spec["backend"], spec["mode"])
    peak = _read_status_kib("VmHWM")
    del results
    return (peak - before) * 1024


def cpu_peak_memory(shape: str, batch: int, dtype: torch.dtype, backend: str, mode: str) -> int:
    spec = {"shape": shape, "batch": batch, "dtype": str(dtype).removeprefix("torch."), "backend": backend,
            "mode": mode, "threads": torch.get_num_threads()}
    # A fixed mmap threshold: tensors above 64 KiB get their own mapping and leave the resident set when freed (by
    # default glibc raises the threshold after a free, keeping later tensors of that size on the heap).
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    completed = subprocess.run(
        [sys.executable, __file__, "--memory-child", json.dumps(spec)], env=environment, capture_output=True,
        text=True, check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"memory measurement of {spec} failed:\n{completed.stderr[-2000:]}")
    return int(completed.stdout.strip().splitlines()[-1])


def cuda_peak_memory(inputs: dict, backend: str, mode: str, spatial_shapes: list[tuple[int, int]] = SPATIAL_SHAPES
                     ) -> int:
    device = inputs["value"].device
    run_once(inputs, backend, mode, spatial_shapes)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    results = run_once(inputs, backend, mode, spatial_shapes)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del results
    return peak - before


def bandwidth_floor_seconds(inputs: dict) -> tuple[int, float]:
    """(bytes, seconds) of the forward's compulsory traffic at the device's nominal DRAM bandwidth."""
    value, locations, weights = inputs["value"], inputs["sampling_locations"], inputs["attention_weights"]
    output_bytes = inputs["grad_output"].numel() * value.element_size()  # the output has grad_output's shape
    total = sum(t.numel() * t.element_size() for t in (value, locations, weights)) + output_bytes
    properties = torch.cuda.get_device_properties(value.device)
    bytes_per_second = 2 * properties.memory_clock_rate * 1000 * properties.memory_bus_width / 8
    return total, total / bytes_per_second


def benchmark(args: argparse.Namespace) -> dict:
    dtype = getattr(torch, args.dtype)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    if args.device != "all":
        devices = [d for d in devices if d.type == args.device]
        if not devices:
            raise SystemExit(f"--device {args.device}: not available here (CUDA: {torch.cuda.is_available()})")
    records = []
    for device in devices:
        backends = [b for b in available_backends(device) if not args.backends or b in args.backends]
        if "reference" not in backends:
            backends.insert(0, "reference")  # the ratios need it
        if "triton" in backends and device.type == "cuda":
            backends.append("triton" + DETERMINISTIC_SUFFIX)  # the cost of bitwise-reproducible gradients
        for shape in args.shapes:
            for batch in args.batch:
                inputs = make_inputs(shape, batch, device, dtype)
                reference_output = run_once(inputs, "reference", "forward")[0]
                timings = {mode: time_backends(inputs, backends, mode, args.repeats) for mode in MODES}
                for backend in backends:
                    output = run_once(inputs, backend, "forward")[0]
                    record = {
                        "device": str(device),
                        "shape": shape,
                        "batch": batch,
                        "queries": inputs["sampling_locations"].shape[1],
                        "backend": backend,
                        "dtype": args.dtype,
                        "max_abs_diff_vs_reference": (output.double() - reference_output.double()).abs().max().item(),
                    }
                    for mode in MODES:
                        record[f"{mode}_s"] = timings[mode][backend]
                        record[f"{mode}_speedup"] = timings[mode]["reference"] / timings[mode][backend]
                        if args.memory:
                            peak = (
                                cuda_peak_memory(inputs, backend, mode)
                                if device.type == "cuda"
                                else cpu_peak_memory(shape, batch, dtype, backend, mode)
                            )
                            record[f"{mode}_peak_bytes"] = peak
                    if device.type == "cuda" and backend != "reference":
                        floor_bytes, floor_seconds = bandwidth_floor_seconds(inputs)
                        record["forward_floor_bytes"] = floor_bytes
                        record["forward_floor_s"] = floor_seconds
                        record["forward_fraction_of_floor"] = floor_seconds / record["forward_s"]
                    records.append(record)
                del inputs
    return {
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "cpu_threads": torch.get_num_threads(),
            "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "repeats": args.repeats,
        },
        "records": records,
    }


def format_table(result: dict) -> str:
    memory = any("forward_peak_bytes" in record for record in result["records"])
    header = ["device", "shape", "batch", "backend", "fwd ms", "fwd x", "fwd+bwd ms", "fwd+bwd x"]
    if memory:
        header += ["fwd peak MiB", "fwd+bwd peak MiB"]
    header += ["max|diff|"]
    rows = []
    for r in result["records"]:
        row = [r["device"], r["shape"], str(r["batch"]), r["backend"], f"{1e3 * r['forward_s']:.1f}",
               f"{r['forward_speedup']:.1f}", f"{1e3 * r['forward_backward_s']:.1f}",
               f"{r['forward_backward_speedup']:.1f}"]
        if memory:
            row += [f"{r['forward_peak_bytes'] / 2**20:.1f}", f"{r['forward_backward_peak_bytes'] / 2**20:.1f}"]
        row += [f"{r['max_abs_diff_vs_reference']:.1e}"]
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(header, widths)), "-|-".join("-" * w for w in widths)]
    lines += [" | ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    floors = [r for r in result["records"] if "forward_floor_s" in r]
    for r in floors:
        lines.append(
            f"{r['device']} {r['shape']} batch {r['batch']} {r['backend']}: forward bandwidth floor "
            f"{r['forward_floor_bytes'] / 2**20:.1f} MiB -> {1e3 * r['forward_floor_s']:.3f} ms, "
            f"achieved {100 * r['forward_fraction_of_floor']:.0f}% of it"
        )
    env = result["environment"]
    lines.append(
        f"torch {env['torch']}, {env['cpu_threads']} CPU threads, {env['repeats']} repeats (median); x = reference "
        f"time / backend time in this run"
        + (f"; GPU {env['cuda_device']}" if env["cuda_device"] else "")
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backends", nargs="+", help="restrict to these backends (the reference always runs)")
    parser.add_argument("--device", default="all", choices=["all", "cpu", "cuda"], help="which devices to time")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory runs")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        print(cpu_peak_memory_child(json.loads(args.memory_child)))
        return 0
    result = benchmark(args)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
