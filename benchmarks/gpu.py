"""One command for a GPU: the reference checks, the attention op, the whole model in inference and training, and the
environment, reported as one table (stdout) and one JSON file.

Parts (``--parts``, all by default; each case is caught on its own, so a backend that cannot run or a case that runs
out of memory is a row with its error and the rest goes on):

* ``verify``: ``ddetr verify`` in process (``deformable_detr.verify.run``) of every reference file in
  ``--reference-dir`` with each backend (``eval_transform.npz`` does not use the op: once); pass/fail counts and the
  worst check of each group (the name's first component: ``out``, ``dbg``, ``loss``, ``match``, ``grad``,
  ``gradnorm``, ``post``, ``msda``; ``in``, ``prep``, ``resized``, ``out`` for the eval transform), worst meaning the
  largest error / tolerance. DETR files are skipped, as ``ddetr verify`` skips them in a folder.
* ``msda``: the op (``benchmarks/msda.py``'s inputs and timing) at the encoder shape (batch 1 and 2) and the decoder
  shape (300 queries, batch 1 and 2), per backend and precision: the median time of the forward and of
  forward+backward, the reference's time over the backend's (x ref), CUDA peak memory above the inputs, and on CUDA
  the forward's share of its memory-bandwidth floor (``msda.bandwidth_floor_seconds``). ``bfloat16`` and ``float16``
  are autocast as in the model: under ``torch.autocast`` the value comes in the half dtype (the value projection's
  output), the locations and weights in float32 (float32 reference points plus offsets; softmax), and the op runs in
  float32 (the ``deformable_detr.ops`` autocast policy). Their error is max |half - float32| / max |float32| of the
  output and of the three gradients (worst), against float32 on the same backend.
* ``inference``: the multi-scale and two-stage models (random weights, eval mode, ``torch.inference_mode``, model
  and ``PostProcess``) at batch 1 and 4, float32 and bfloat16 autocast: median images/s and CUDA peak memory.
* ``training``: full training steps (``benchmarks/train_step.py``'s ``time_cell``: forward, matching, losses,
  backward, clipping, AdamW) of the multi-scale model at batch 2, float32 and bfloat16 autocast: images/s and CUDA
  peak memory.

The environment (device, driver from ``nvidia-smi``, torch / triton / numba / CUDA versions) and the seconds each
part took go into the table's header and footer and the JSON. Progress lines go to stderr. Exit code 0 when every
case ran and every check passed, 1 otherwise, 2 for bad arguments (``--device cuda`` without a GPU).

Sizes: 800 x 1066 images (attention levels 100x134, 50x67, 25x34, 13x17) on CUDA, about 3 minutes on an H100-class
GPU (8 at most); ``--quick`` shrinks images to 128 x 160 and the repeats, so that the same code runs on the CPU in CI.

    python benchmarks/gpu.py --json gpu.json                              # CUDA, the backends triton and reference
    python benchmarks/gpu.py --device cpu --quick --json gpu.json         # CPU: backends cpu and reference
    python benchmarks/gpu.py --parts msda training --backends triton reference --json gpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks: msda, train_step
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import msda  # noqa: E402
import train_step  # noqa: E402

from deformable_detr.model.build import build_model  # noqa: E402
from deformable_detr.ops import available_backends  # noqa: E402
from deformable_detr.verify.comparison import ReferenceFileError  # noqa: E402
from deformable_detr.verify.run import (  # noqa: E402
    UnsupportedReferenceError,
    load_reference,
    reference_kind,
    verify_reference,
)

PARTS = ("verify", "msda", "inference", "training")
PRECISIONS = ("float32", "bfloat16", "float16")
HALF_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
REFERENCE_DIR = Path(__file__).resolve().parents[1] / "tests" / "reference"
INFERENCE_VARIANTS = {"multi-scale": "deformable_detr", "two-stage": "two_stage"}
TRAINING_VARIANT = "deformable_detr"
ERROR_CHARS = 300  # of an error message kept in the JSON (the table shows less)


@dataclass(frozen=True)
class Sizes:
    """What one run measures: the full sizes on CUDA, small ones with ``--quick``."""

    height: int
    width: int
    msda_batches: tuple[int, ...]
    msda_repeats: int
    inference_batches: tuple[int, ...]
    inference_warmup: int
    inference_repeats: int
    training_batch: int
    training_warmup: int
    training_iterations: int


FULL = Sizes(800, 1066, (1, 2), 5, (1, 4), 2, 10, 2, 3, 10)
QUICK = Sizes(128, 160, (1, 2), 2, (1, 4), 1, 1, 2, 1, 1)
QUICK_VERIFY = ("msda_core", "eval_transform", "deformable_detr")  # the op, the data, one model variant


def log(message: str) -> None:
    print(f"[gpu.py] {message}", file=sys.stderr, flush=True)


def level_shapes(height: int, width: int, num_levels: int = 4) -> list[tuple[int, int]]:
    """(H_l, W_l) of the feature maps of an image (ResNet-50 strides 8, 16, 32 and the extra stride-64 level)."""
    shapes = [(math.ceil(height / 8), math.ceil(width / 8))]
    while len(shapes) < num_levels:
        h, w = shapes[-1]
        shapes.append((math.ceil(h / 2), math.ceil(w / 2)))
    return shapes


def describe_error(error: BaseException) -> str:
    """One line: the exception's type and the first line of its message."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:ERROR_CHARS]


def free_memory(device: torch.device) -> None:
    """Frees what the last case left (a failed case's tensors die with its frames), so the next peak starts low."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def precision_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=HALF_DTYPES[precision])


def run_case(record: dict, device: torch.device, body: Callable[[], dict]) -> dict:
    """``record`` updated with what ``body`` measured, or with ``error`` when it raised (out of memory included)."""
    try:
        record.update(body())
        record["error"] = None
    except Exception as error:  # one failed case is reported, the rest still runs
        record["error"] = describe_error(error)
    free_memory(device)
    return record


# ------------------------------------------------------------------------------------------------------ verify


def check_group(name: str) -> str:
    """``out.pred_logits`` -> ``out``; the eval transform's ``c0.prep.boxes`` -> ``prep`` (c0, c1 are cases)."""
    parts = name.split(".")
    if len(parts) > 1 and parts[0][:1] == "c" and parts[0][1:].isdigit():
        return parts[1]
    return parts[0]


def summarise_checks(checks: list) -> dict:
    """Pass/fail counts, the failed checks' names and per group the worst check (largest error / tolerance)."""
    groups: dict[str, dict] = {}
    for check in checks:
        ratio = check.error / check.tolerance if check.tolerance > 0 else (0.0 if check.error == 0 else math.inf)
        group = groups.setdefault(check_group(check.name), {"checks": 0, "failed": 0, "ratio": -1.0})
        group["checks"] += 1
        group["failed"] += not check.passed
        if ratio > group["ratio"]:
            group.update(ratio=ratio, worst=check.name, error=check.error, tolerance=check.tolerance,
                         measure=check.measure)
    failed = [check.name for check in checks if not check.passed]
    return {"checks": len(checks), "passed": len(checks) - len(failed), "failed": len(failed),
            "failed_names": failed[:20], "groups": groups}


def verify_part(device: torch.device, backends: list[str], reference_dir: Path, quick: bool) -> dict:
    records, skipped = [], []
    for path in sorted(reference_dir.glob("*.npz")):
        try:
            reference = load_reference(path)
            kind = reference_kind(reference, str(path))
        except UnsupportedReferenceError:  # DETR files: skipped, as ddetr verify skips them in a folder
            skipped.append({"file": path.name, "reason": "a DETR file, a model this version does not implement"})
            continue
        except ReferenceFileError as error:
            records.append({"file": path.name, "backend": "-", "error": describe_error(error), "seconds": 0.0})
            continue
        if quick and path.stem not in QUICK_VERIFY:
            skipped.append({"file": path.name, "reason": "left out by --quick"})
            continue
        # The eval transform does not run the attention op: once, whatever the backends.
        for backend in ["-"] if kind == "eval_transform" else backends:
            record = {"file": path.name, "backend": backend}
            started = time.perf_counter()

            def body(reference=reference, backend=backend, path=path) -> dict:
                checks, _ = verify_reference(reference, str(device), "auto" if backend == "-" else backend,
                                             source=str(path))
                return summarise_checks(checks)

            run_case(record, device, body)
            record["seconds"] = time.perf_counter() - started
            records.append(record)
            outcome = record["error"] or f"{record['passed']}/{record['checks']} checks passed"
            log(f"verify {path.name} backend {backend}: {outcome} ({record['seconds']:.1f} s)")
    return {"records": records, "skipped": skipped,
            "passed": bool(records) and all(not r["error"] and r["failed"] == 0 for r in records)}


# -------------------------------------------------------------------------------------------------------- msda


def msda_inputs(shape: str, batch: int, device: torch.device, precision: str, spatial_shapes) -> dict:
    """``msda.make_inputs`` in float32; for a half precision the value in that dtype, as the model gives it."""
    inputs = msda.make_inputs(shape, batch, device, torch.float32, spatial_shapes=spatial_shapes)
    if precision != "float32":
        inputs["value"] = inputs["value"].to(HALF_DTYPES[precision])
    return inputs


def relative_error(computed: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.detach().double()
    computed = computed.detach()
    return float((computed.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def msda_part(device: torch.device, backends: list[str], sizes: Sizes) -> dict:
    spatial_shapes = level_shapes(sizes.height, sizes.width)
    records = []
    for shape in msda.SHAPES:
        for batch in sizes.msda_batches:
            float32_results: dict[str, tuple] = {}
            reference_times: dict[str, float] = {}
            for precision in PRECISIONS:
                for backend in backends:
                    record = {"shape": shape, "batch": batch, "backend": backend, "precision": precision,
                              "spatial_shapes": spatial_shapes}

                    def body(shape=shape, batch=batch, backend=backend, precision=precision) -> dict:
                        inputs = msda_inputs(shape, batch, device, precision, spatial_shapes)
                        measured = {"queries": inputs["sampling_locations"].shape[1]}
                        with precision_context(device, precision):
                            results = msda.run_once(inputs, backend, "forward_backward", spatial_shapes)
                            for mode in msda.MODES:
                                measured[f"{mode}_s"] = msda.time_backends(
                                    inputs, [backend], mode, sizes.msda_repeats, spatial_shapes)[backend]
                                if device.type == "cuda":
                                    measured[f"{mode}_peak_bytes"] = msda.cuda_peak_memory(
                                        inputs, backend, mode, spatial_shapes)
                        if precision == "float32":
                            float32_results[backend] = tuple(t.detach() for t in results)
                        elif backend in float32_results:
                            errors = [relative_error(a, b) for a, b in zip(results, float32_results[backend])]
                            measured["output_rel_error_vs_float32"] = errors[0]
                            measured["grad_rel_error_vs_float32"] = max(errors[1:])
                        if device.type == "cuda":
                            floor_bytes, floor_seconds = msda.bandwidth_floor_seconds(inputs)
                            measured.update(forward_floor_bytes=floor_bytes, forward_floor_s=floor_seconds,
                                            forward_fraction_of_floor=floor_seconds / measured["forward_s"],
                                            forward_achieved_GBps=floor_bytes / measured["forward_s"] / 1e9)
                        return measured

                    run_case(record, device, body)
                    if not record["error"]:
                        key = f"{precision}/{{}}"
                        if backend == "reference":
                            for mode in msda.MODES:
                                reference_times[key.format(mode)] = record[f"{mode}_s"]
                        for mode in msda.MODES:
                            if key.format(mode) in reference_times:
                                record[f"{mode}_speedup"] = reference_times[key.format(mode)] / record[f"{mode}_s"]
                    records.append(record)
                    log(f"msda {shape} batch {batch} {backend} {precision}: "
                        + (record["error"] or f"fwd {1e3 * record['forward_s']:.2f} ms, "
                           f"fwd+bwd {1e3 * record['forward_backward_s']:.2f} ms"))
            float32_results.clear()
    return {"records": records}


# --------------------------------------------------------------------------------------------------- inference


def inference_part(device: torch.device, backends: list[str], sizes: Sizes) -> dict:
    records = []
    for label, variant in INFERENCE_VARIANTS.items():
        for backend in backends:
            built: dict = {}
            for precision in ("float32", "bfloat16"):
                for batch in sizes.inference_batches:
                    record = {"variant": label, "backend": backend, "precision": precision, "batch": batch,
                              "size": [sizes.height, sizes.width]}

                    def body(variant=variant, backend=backend, precision=precision, batch=batch) -> dict:
                        if "model" not in built:  # one model per (variant, backend), built at its first case
                            torch.manual_seed(0)
                            model, _, postprocessors = build_model(variant, num_classes=91, msda_backend=backend)
                            built.update(model=model.to(device).eval(), postprocess=postprocessors["bbox"])
                        return time_inference(built["model"], built["postprocess"], device, precision, batch, sizes)

                    run_case(record, device, body)
                    records.append(record)
                    log(f"inference {label} {backend} {precision} batch {batch}: "
                        + (record["error"] or f"{record['images_per_s']:.2f} images/s"))
            built.clear()
            free_memory(device)
    return {"records": records}


def time_inference(model: torch.nn.Module, postprocess: torch.nn.Module, device: torch.device, precision: str,
                   batch: int, sizes: Sizes) -> dict:
    """Median images/s of model + post-processing over ``sizes.inference_repeats`` calls after the warm-up."""
    generator = torch.Generator().manual_seed(batch)
    images = torch.randn(batch, 3, sizes.height, sizes.width, generator=generator).to(device)
    mask = torch.zeros(batch, sizes.height, sizes.width, dtype=torch.bool, device=device)
    target_sizes = torch.tensor([[sizes.height, sizes.width]] * batch, device=device)

    def call() -> object:
        with torch.inference_mode(), precision_context(device, precision):
            return postprocess(model(images, mask), target_sizes)

    for _ in range(sizes.inference_warmup):
        call()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(sizes.inference_repeats):
        started = time.perf_counter()
        call()
        synchronize(device)
        times.append(time.perf_counter() - started)
    measured = {"batch_s": statistics.median(times), "images_per_s": batch / statistics.median(times)}
    if device.type == "cuda":
        measured["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    return measured


# ---------------------------------------------------------------------------------------------------- training


def training_part(device: torch.device, backends: list[str], sizes: Sizes) -> dict:
    records = []
    settings = argparse.Namespace(batch=sizes.training_batch,
                                  size=[sizes.height, sizes.width], boxes=7, warmup=sizes.training_warmup,
                                  iterations=sizes.training_iterations)
    for backend in backends:
        for precision, amp in (("float32", None), ("bfloat16", "bf16")):
            record = {"variant": "multi-scale", "backend": backend, "precision": precision,
                      "batch": sizes.training_batch, "size": [sizes.height, sizes.width]}

            def body(backend=backend, amp=amp) -> dict:
                cell = train_step.time_cell(settings, TRAINING_VARIANT, device, backend, amp)
                measured = {"step_s": cell["step_s"], "images_per_s": cell["images_per_s"]}
                if "peak_GiB" in cell:
                    measured["peak_bytes"] = int(cell["peak_GiB"] * 2**30)
                return measured

            with contextlib.redirect_stdout(sys.stderr):  # the training loop's epoch line is progress
                run_case(record, device, body)
            records.append(record)
            log(f"training {backend} {precision} batch {sizes.training_batch}: "
                + (record["error"] or f"{record['images_per_s']:.2f} images/s"))
    return {"records": records}


# ------------------------------------------------------------------------------------------------- environment


def nvidia_smi() -> str | None:
    """'name, driver, memory' of each GPU from nvidia-smi, or None where it is missing or fails."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        completed = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (completed.stdout.strip() or None) if completed.returncode == 0 else None


def module_version(name: str) -> str | None:
    try:
        return getattr(__import__(name), "__version__", "?")
    except ImportError:
        return None


def environment(device: torch.device, quick: bool, backends: list[str]) -> dict:
    result = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "nvidia_smi": nvidia_smi(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": module_version("triton"),
        "numba": module_version("numba"),
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "quick": quick,
        "backends": backends,
        "available_backends": list(available_backends(device)),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        result.update(capability=list(torch.cuda.get_device_capability(device)),
                      memory_GiB=properties.total_memory / 2**30)
    return result


# ------------------------------------------------------------------------------------------------------ report


def strict_json(value: object) -> object:
    """``value`` with infinite and NaN floats as the strings "inf", "-inf", "nan" (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(item) for item in value]
    return value


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.2f}"


def _mib(value: int | None) -> str:
    return "" if value is None else f"{value / 2**20:.0f} MiB"


def table_rows(result: dict) -> Iterator[list[str]]:
    """[part, case, backend, precision, status, measurements] per record."""
    parts = result["parts"]
    for r in parts.get("verify", {}).get("records", []):
        if r["error"]:
            yield ["verify", r["file"], r["backend"], "float32", "ERROR", r["error"]]
            continue
        worst = ", ".join(f"{name} {100 * float(g['ratio']):.0f}%" if math.isfinite(float(g["ratio"]))
                          else f"{name} inf" for name, g in r["groups"].items())  # "inf" once read back from JSON
        failed = f"; failed: {', '.join(r['failed_names'])}" if r["failed"] else ""
        yield ["verify", r["file"], r["backend"], "float32", f"{'pass' if not r['failed'] else 'FAIL'} "
               f"{r['passed']}/{r['checks']}", f"worst error/tolerance: {worst}{failed}"]
    for r in parts.get("msda", {}).get("records", []):
        case = f"{r['shape']} b{r['batch']}"
        if r["error"]:
            yield ["msda", case, r["backend"], r["precision"], "ERROR", r["error"]]
            continue
        text = []
        for mode, label in (("forward", "fwd"), ("forward_backward", "fwd+bwd")):
            shown = f"{mode}_speedup" in r and r["backend"] != "reference"
            speedup = f" ({r[f'{mode}_speedup']:.1f}x)" if shown else ""
            peak = f", {_mib(r[f'{mode}_peak_bytes'])}" if f"{mode}_peak_bytes" in r else ""
            text.append(f"{label} {_ms(r[f'{mode}_s'])} ms{speedup}{peak}")
        if "output_rel_error_vs_float32" in r:
            text.append(f"vs float32 {r['output_rel_error_vs_float32']:.1e}, grads "
                        f"{r['grad_rel_error_vs_float32']:.1e}")
        if "forward_fraction_of_floor" in r:
            text.append(f"fwd {r['forward_achieved_GBps']:.0f} GB/s = {100 * r['forward_fraction_of_floor']:.0f}% "
                        "of floor")
        yield ["msda", case, r["backend"], r["precision"], "ok", "; ".join(text)]
    for part in ("inference", "training"):
        for r in parts.get(part, {}).get("records", []):
            case = f"{r['variant']} b{r['batch']} {r['size'][0]}x{r['size'][1]}"
            if r["error"]:
                yield [part, case, r["backend"], r["precision"], "ERROR", r["error"]]
                continue
            seconds = r.get("batch_s", r.get("step_s"))
            unit = "batch" if part == "inference" else "step"
            text = f"{r['images_per_s']:.2f} images/s ({_ms(seconds)} ms per {unit})"
            if "peak_bytes" in r:
                text += f", peak {_mib(r['peak_bytes'])}"
            yield [part, case, r["backend"], r["precision"], "ok", text]


def format_table(result: dict, error_width: int = 120) -> str:
    env = result["environment"]
    header = ["part", "case", "backend", "precision", "status", "result"]
    rows = [row[:5] + [row[5] if row[4] != "ERROR" else row[5][:error_width]] for row in table_rows(result)]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    widths[-1] = len(header[-1])  # the last column is not padded
    driver = f", nvidia-smi: {env['nvidia_smi']}" if env["nvidia_smi"] else ""
    lines = [f"{env['device']} ({env['device_name']}{driver}); torch {env['torch']}, CUDA {env['cuda']}, triton "
             f"{env['triton']}, numba {env['numba']}, {env['cpu_threads']} CPU threads"
             + (", --quick" if env["quick"] else ""),
             "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    skipped = result["parts"].get("verify", {}).get("skipped", [])
    if skipped:
        lines.append("verify skipped: " + "; ".join(f"{s['file']} ({s['reason']})" for s in skipped))
    times = ", ".join(f"{part} {part_result['seconds']:.1f} s" for part, part_result in result["parts"].items())
    lines.append(f"time: {times}; total {result['seconds']:.1f} s. msda: median times, x = reference time / backend "
                 "time at the same precision; half precisions under autocast (value in the half dtype); "
                 f"{result['errors']} case(s) with an error")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace, device: torch.device) -> dict:
    sizes = QUICK if args.quick else FULL
    backends = args.backends or (["reference", "triton"] if device.type == "cuda" else ["reference", "cpu"])
    started = time.perf_counter()
    result: dict = {"environment": environment(device, args.quick, backends), "parts": {}}
    log(f"device {result['environment']['device_name']}, backends {', '.join(backends)}, "
        f"parts {', '.join(args.parts)}")
    for part in PARTS:
        if part not in args.parts:
            continue
        log(f"{part}: start")
        part_started = time.perf_counter()
        if part == "verify":
            part_result = verify_part(device, backends, args.reference_dir, args.quick)
        else:
            part_result = {"msda": msda_part, "inference": inference_part, "training": training_part}[part](
                device, backends, sizes)
        part_result["seconds"] = time.perf_counter() - part_started
        result["parts"][part] = part_result
        log(f"{part}: done in {part_result['seconds']:.1f} s")
    result["seconds"] = time.perf_counter() - started
    result["errors"] = sum(bool(r["error"]) for p in result["parts"].values() for r in p["records"])
    result["verify_passed"] = result["parts"]["verify"]["passed"] if "verify" in result["parts"] else None
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="128 x 160 images, few repeats (for the CPU and CI)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the results to this JSON file")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--backends", nargs="+", choices=["reference", "cpu", "triton"],
                        help="attention backends (default: reference and triton on CUDA, reference and cpu on the "
                        "CPU); one that cannot run gives error rows")
    parser.add_argument("--reference-dir", type=Path, default=REFERENCE_DIR, help="the reference files to verify")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu.py: --device cuda: no CUDA device here (torch.cuda.is_available() is False); use --device cpu",
              file=sys.stderr)
        return 2
    if "verify" in args.parts and not any(args.reference_dir.glob("*.npz")):
        print(f"gpu.py: --reference-dir {args.reference_dir}: no .npz reference files there", file=sys.stderr)
        return 2
    result = run(args, torch.device(args.device))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(strict_json(result), indent=2, default=str, allow_nan=False) + "\n")
    print(format_table(result))
    return 0 if result["errors"] == 0 and result["verify_passed"] is not False else 1


if __name__ == "__main__":
    raise SystemExit(main())
