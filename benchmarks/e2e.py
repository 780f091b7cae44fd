"""End-to-end inference speed: batch-1 latency and batch-B throughput of the whole detector (model and
post-processing, on already decoded and resized images), for several inference paths measured in one process.

Rows (each with random weights; speed does not depend on the values):

* ``baseline``: our model as built for training, with the ``reference`` (pure PyTorch, ``grid_sample``) deformable
  attention, under ``torch.no_grad``, plus ``PostProcess``;
* ``cpu_msda``: the baseline with the Numba CPU attention kernels instead (to separate the kernels' share);
* ``default``: what ``Detector`` runs: the Numba CPU attention kernels (``auto``), frozen batch norms folded into
  the convolutions (``deformable_detr.inference.rewrites``), ``torch.inference_mode``, padding, post-processing and
  the score threshold;
* ``compile``: ``default`` with ``torch.compile`` on the model (``Detector(..., compile=True)``; compile time
  reported apart, not in the median);
* ``huggingface``: ``transformers.DeformableDetrForObjectDetection`` built from a config (no download: random
  weights, a ResNet-50 from ``ResNetConfig``), its pure-PyTorch attention, plus the same top-k; skipped with a note
  when ``transformers`` is not importable.

The ``default`` row is also checked against the baseline (same weights, max relative difference of logits and
boxes) and, with ``--reference DIR``, against the official outputs of the reference file of the variant (the
``ddetr verify`` output tolerance, 2e-5 relative).

glibc allocator: large tensors are served by fresh ``mmap`` calls whose pages fault in (and are zeroed) on every
forward. The ``default`` row's batch-1 latency is measured again in subprocesses with the allocator environment
cleared and with each setting of ``--malloc`` (default: no mmap and no trimming, so freed memory is reused).

    python benchmarks/e2e.py --repeats 2
    python benchmarks/e2e.py --variant two_stage --rows baseline default --json
    python benchmarks/e2e.py --variant demo --size 128 160 --batch 8 --rows default compile --malloc   # ddetr demo's
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from deformable_detr.config import VARIANTS  # noqa: E402
from deformable_detr.inference.detector import Detector, PreparedImage  # noqa: E402
from deformable_detr.inference.export_onnx import with_reference_attention  # noqa: E402
from deformable_detr.model.build import build_from_config, build_model  # noqa: E402
from deformable_detr.model.postprocess import PostProcess  # noqa: E402

ROWS = ("baseline", "cpu_msda", "default", "compile", "huggingface")
MALLOC_KEYS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_",
               "MALLOC_ARENA_MAX")
DEFAULT_MALLOC = ["MALLOC_MMAP_MAX_=0,MALLOC_TRIM_THRESHOLD_=68719476736",
                  "MALLOC_MMAP_THRESHOLD_=33554432,MALLOC_TRIM_THRESHOLD_=68719476736"]
REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference"
OUTPUT_REL_TOL = 2e-5


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall times in seconds of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def images_of(batch: int, height: int, width: int) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(batch))


def ours(variant: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model, _, _ = build_from_config(_config(variant))
    return model.eval()


def baseline_call(model: torch.nn.Module, postprocess, batch: int, height: int, width: int) -> Callable[[], object]:
    images = images_of(batch, height, width)
    mask = torch.zeros(batch, height, width, dtype=torch.bool)
    sizes = torch.tensor([[height, width]] * batch)

    def call():
        with torch.no_grad():
            return postprocess(model(images, mask), sizes)
    return call


def detector_call(detector: Detector, batch: int, height: int, width: int) -> Callable[[], object]:
    prepared = [PreparedImage(image, (height, width)) for image in images_of(batch, height, width)]
    return lambda: detector.run_batch(prepared)


def huggingface_model(variant: str):
    """transformers' Deformable DETR of ``variant`` with random weights, or a string saying why not."""
    try:
        from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig
    except ImportError as error:
        return f"transformers is not importable ({error}); pip install transformers to add this row"
    if variant not in VARIANTS:
        return f"no transformers counterpart of {variant} is built here"
    preset = VARIANTS[variant]
    if preset.get("dilation"):
        return "transformers supports DC5 (dilation) only with a timm backbone; not built"
    levels = preset.get("num_feature_levels", 4)
    backbone = ResNetConfig(out_features=["stage2", "stage3", "stage4"] if levels > 1 else ["stage4"])
    config = DeformableDetrConfig(backbone_config=backbone, num_labels=91, num_feature_levels=levels,
                                  with_box_refine=bool(preset.get("with_box_refine")),
                                  two_stage=bool(preset.get("two_stage")), disable_custom_kernels=True)
    torch.manual_seed(0)
    return DeformableDetrForObjectDetection(config).eval()


def huggingface_call(model, batch: int, height: int, width: int) -> Callable[[], object]:
    pixel_values = images_of(batch, height, width)
    pixel_mask = torch.ones(batch, height, width, dtype=torch.long)

    def call():
        with torch.inference_mode():
            outputs = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
            probabilities = outputs.logits.sigmoid().flatten(1)
            return torch.topk(probabilities, 100, dim=1)
    return call


def compare_with_reference(detector: Detector, variant: str, reference_dir: Path) -> str:
    """The default path's outputs on the reference file's images, against the official ones."""
    import numpy as np

    from deformable_detr.verify.reference_init import apply_ddetr_init_v1

    path = reference_dir / f"{variant}.npz"
    if not path.is_file():
        return f"no reference file {path}"
    reference = np.load(path)
    model, _, _ = build_model(variant, num_classes=91)
    apply_ddetr_init_v1(model)
    checked = Detector(model, detector.config, optimize=True)
    with torch.inference_mode():
        outputs = checked.model(torch.from_numpy(reference["in.images"]), torch.from_numpy(reference["in.mask"]))
    errors = {}
    for key, value in (("pred_logits", outputs.pred_logits), ("pred_boxes", outputs.pred_boxes)):
        expected = torch.from_numpy(reference[f"out.{key}"]).double()
        errors[key] = float((value.double() - expected).abs().max() / expected.abs().max())
    worst = max(errors.values())
    verdict = "within" if worst <= OUTPUT_REL_TOL else "OUTSIDE"
    return (f"default path vs {path.name} (official outputs): max relative error logits {errors['pred_logits']:.1e}, "
            f"boxes {errors['pred_boxes']:.1e}, {verdict} the ddetr verify tolerance {OUTPUT_REL_TOL:g}")


def relative_difference(expected: list[dict], got: list) -> float:
    """Largest relative difference of the scores and boxes of ``got`` (Detections) from ``expected``
    (PostProcess dicts), image by image."""
    worst = 0.0
    for reference, detections in zip(expected, got):
        for key in ("scores", "boxes"):
            target = reference[key].double()
            difference = (getattr(detections, key).double() - target).abs().max() / target.abs().max()
            worst = max(worst, float(difference))
    return worst


def measure(name: str, call_of: Callable[[int], Callable[[], object]], batch: int, repeats: int,
            log: Callable[[str], None]) -> dict:
    """Median batch-1 latency and batch-``batch`` throughput of one row."""
    row: dict = {"row": name}
    single = timed(call_of(1), repeats)
    row["latency_ms"] = 1000 * statistics.median(single)
    row["latency_runs_ms"] = [round(1000 * t, 1) for t in single]
    log(f"  {name}: batch 1 median {row['latency_ms']:.0f} ms over {len(single)} runs")
    if batch > 1:
        many = timed(call_of(batch), repeats)
        row["images_per_s"] = batch / statistics.median(many)
        row["batch_runs_ms"] = [round(1000 * t, 1) for t in many]
        log(f"  {name}: batch {batch} median {1000 * statistics.median(many):.0f} ms = "
            f"{row['images_per_s']:.2f} images/s")
    return row


def run_worker(args: argparse.Namespace) -> None:
    """One ``default`` row, batch 1 only, printed as one JSON line (the allocator subprocesses)."""
    height, width = args.size
    detector = Detector(ours(args.variant), _config(args.variant))
    row = measure("default", lambda b: detector_call(detector, b, height, width), 1, args.repeats, lambda _: None)
    print(json.dumps(row))


def _config(variant: str):
    from deformable_detr.config import model_config

    if variant == "demo":  # the small model that ddetr demo trains (the synthetic data's ids 1..5: 6 logits)
        from deformable_detr.demo import DEMO_MODEL

        return dataclasses.replace(DEMO_MODEL, num_classes=6)
    return model_config(variant, num_classes=91)


def allocator_rows(args: argparse.Namespace, log: Callable[[str], None]) -> list[dict]:
    """The default row's batch-1 latency in subprocesses, without any MALLOC_* variable and with each setting."""
    rows = []
    clean = {k: v for k, v in os.environ.items() if k not in MALLOC_KEYS}
    for setting in [""] + list(args.malloc):
        env = dict(clean)
        for pair in filter(None, setting.split(",")):
            key, _, value = pair.partition("=")
            env[key] = value
        command = [sys.executable, __file__, "--worker", "--variant", args.variant, "--size", *map(str, args.size),
                   "--repeats", str(args.repeats)]
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            log(f"  allocator subprocess ({setting or 'glibc defaults'}) failed:\n{result.stderr[-2000:]}")
            continue
        row = json.loads(result.stdout.strip().splitlines()[-1])
        row["row"] = f"default, subprocess, {setting or 'glibc defaults'}"
        log(f"  {row['row']}: batch 1 median {row['latency_ms']:.0f} ms")
        rows.append(row)
    return rows


def table(rows: list[dict], batch: int) -> str:
    base = next((r for r in rows if r["row"] == "baseline"), None)
    lines = [f"| path | batch 1 latency ms | vs baseline | batch {batch} images/s | vs baseline |",
             "|---|---|---|---|---|"]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['row']} | skipped: {row['skipped']} | | | |")
            continue
        latency = f"{row['latency_ms']:.0f}"
        speedup = f"{base['latency_ms'] / row['latency_ms']:.2f}x" if base else ""
        throughput = f"{row['images_per_s']:.2f}" if "images_per_s" in row else ""
        ratio = (f"{row['images_per_s'] / base['images_per_s']:.2f}x"
                 if base and "images_per_s" in row and "images_per_s" in base else "")
        lines.append(f"| {row['row']} | {latency} | {speedup} | {throughput} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", nargs="+", default=["deformable_detr"], choices=[*VARIANTS, "demo"])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1066], metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--batch", type=int, default=4, help="batch size of the throughput column")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell (after one warm-up)")
    parser.add_argument("--malloc", nargs="*", default=DEFAULT_MALLOC,
                        help="allocator settings 'KEY=VALUE,KEY=VALUE' compared in subprocesses (none: skip)")
    parser.add_argument("--reference", type=Path, default=REFERENCE_DIR,
                        help="folder of the official reference files, to check the default path's outputs")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    parser.add_argument("--json-out", type=Path, help="also write the JSON object to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.variant = args.variant[0]
        run_worker(args)
        return 0

    def log(message: str) -> None:
        print(message, file=sys.stderr if args.json else sys.stdout, flush=True)

    height, width = args.size
    environment = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor()
                   or platform.machine(), "python": platform.python_version(),
                   "malloc_env": {k: os.environ[k] for k in MALLOC_KEYS if k in os.environ}}
    log(f"end-to-end inference at {height}x{width}, batch 1 and {args.batch}, {args.repeats} timed runs per cell; "
        f"{environment}")
    report: dict = {"environment": environment, "size": [height, width], "batch": args.batch,
                    "repeats": args.repeats, "variants": {}}
    for variant in args.variant:
        log(f"\n{variant}")
        rows: list[dict] = []
        notes: list[str] = []
        model = ours(variant)
        detector = Detector(model, _config(variant))
        postprocess = PostProcess(detector.config.num_detections)
        baseline_model = with_reference_attention(copy.deepcopy(model))
        if "baseline" in args.rows:
            rows.append(measure("baseline", lambda b: baseline_call(baseline_model, postprocess, b, height,
                                                                    width), args.batch, args.repeats, log))
        if "cpu_msda" in args.rows:
            rows.append(measure("cpu_msda", lambda b: baseline_call(model, postprocess, b, height, width),
                                args.batch, args.repeats, log))
        if "default" in args.rows:
            rows.append(measure("default", lambda b: detector_call(detector, b, height, width), args.batch,
                                args.repeats, log))
            # Same weights, same input: how far the optimised path moves the outputs.
            got = detector.run_batch([PreparedImage(images_of(1, height, width)[0], (height, width))], 0.0)
            expected = baseline_call(baseline_model, postprocess, 1, height, width)()
            notes.append(f"default vs baseline, same weights: max relative difference of the top-100 scores and "
                         f"boxes {relative_difference(expected, got):.1e}")
            if args.reference.is_dir():
                notes.append(compare_with_reference(detector, variant, args.reference))
        if "compile" in args.rows:
            compiled = Detector(model, _config(variant), compile=True)
            started = time.perf_counter()
            try:
                detector_call(compiled, 1, height, width)()
                compile_s = time.perf_counter() - started
                rows.append(measure("compile", lambda b: detector_call(compiled, b, height, width), args.batch,
                                    args.repeats, log))
                rows[-1]["first_call_s"] = compile_s
                notes.append(f"torch.compile: first call (compilation) {compile_s:.0f} s")
            except Exception as error:  # compilation can fail in many ways; the row then says why
                rows.append({"row": "compile", "skipped": f"{type(error).__name__}: {str(error)[:200]}"})
        if "huggingface" in args.rows:
            hf = huggingface_model(variant)
            if isinstance(hf, str):
                rows.append({"row": "huggingface", "skipped": hf})
                log(f"  huggingface: skipped: {hf}")
            else:
                rows.append(measure("huggingface", lambda b: huggingface_call(hf, b, height, width), args.batch,
                                    args.repeats, log))
            del hf
        if "default" in args.rows and args.malloc:
            args_for_worker = argparse.Namespace(**{**vars(args), "variant": variant})
            rows += allocator_rows(args_for_worker, log)
        report["variants"][variant] = {"rows": rows, "notes": notes}
        if not args.json:
            print(f"\n{variant}, {height}x{width}, CPU threads {environment['threads']}, medians of {args.repeats}\n")
            print(table(rows, args.batch))
            for note in notes:
                print(f"- {note}")
    if args.json:
        print(json.dumps(report, indent=1))
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
