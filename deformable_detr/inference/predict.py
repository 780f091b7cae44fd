"""``ddetr predict``: detections for image files, folders and globs, as COCO results and annotated pictures.

Writes ``OUT/detections.json`` (COCO results: ``image_id``, ``file_name``, ``category_id``, ``bbox`` [x, y, w, h]
in pixels, ``score``), one ``OUT/<name>_detections.png`` per image, and with ``--show-sampling-points`` one
``OUT/<name>_sampling_points.png``. An input that cannot be read is reported by name and skipped; the exit code is
then 1, after every other input has been processed.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from deformable_detr.checkpoint import CheckpointError
from deformable_detr.data.coco import UnreadableImageError, load_rgb_image
from deformable_detr.inference.detector import Detector
from deformable_detr.inference.drawing import draw_detections
from deformable_detr.inference.sampling_points import draw_sampling_points

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class PredictSummary:
    images: int = 0
    detections: int = 0
    failed: list[str] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Files as given, folders as their image files (by suffix, sorted, not recursive), anything else as a glob
    pattern (``**`` recursive). Returns the files, without repeats, and a message per input that named nothing."""
    files: list[Path] = []
    problems: list[str] = []
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                problems.append(f"{entry}: folder without image files ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif path.is_file():
            files.append(path)
        elif glob.has_magic(entry):
            found = sorted(Path(p) for p in glob.glob(entry, recursive=True) if Path(p).is_file())
            if not found:
                problems.append(f"{entry}: no file matches this pattern")
            files += found
        else:
            problems.append(f"{entry}: no such file or folder")
    unique = list(dict.fromkeys(p.resolve() for p in files))
    return unique, problems


def _output_stems(files: list[Path]) -> list[str]:
    """A distinct output name per file: its stem, with _2, _3, ... for repeated stems (same name, other folders)."""
    seen: dict[str, int] = {}
    stems = []
    for path in files:
        count = seen.get(path.stem, 0) + 1
        seen[path.stem] = count
        stems.append(path.stem if count == 1 else f"{path.stem}_{count}")
    return stems


def run_predict(checkpoint: str, inputs: list[str], out: str | Path, *, score_threshold: float = 0.5,
                device: str = "cpu", batch_size: int = 1, amp: str | None = None, variant: str | None = None,
                sampling_points_query: int | None = None, show_sampling_points: bool = False,
                progress: bool = True) -> PredictSummary:
    """Runs the checkpoint on every input (see the module docstring). ``show_sampling_points`` draws the last
    decoder layer's sampling points of ``sampling_points_query``, or of the top detection's query when None."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if amp is not None and amp not in AMP_DTYPES:
        raise ValueError(f"--amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
    detector = Detector.from_checkpoint(checkpoint, device=device, dtype=AMP_DTYPES.get(amp, torch.float32),
                                        score_threshold=score_threshold, variant=variant)
    if sampling_points_query is not None and not 0 <= sampling_points_query < detector.config.num_queries:
        raise ValueError(f"--show-sampling-points {sampling_points_query}: the model has queries 0.."
                         f"{detector.config.num_queries - 1}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files, problems = expand_inputs(inputs)
    summary = PredictSummary()
    for problem in problems:
        print(f"ddetr predict: {problem}", file=sys.stderr)
        summary.failed.append(problem)
    stems = _output_stems(files)
    results: list[dict] = []
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=not progress, file=sys.stderr)
    for start in range(0, len(files), batch_size):
        batch = []
        for path, stem in zip(files[start:start + batch_size], stems[start:start + batch_size]):
            try:
                image = load_rgb_image(path)
            except UnreadableImageError as error:
                tqdm.write(f"ddetr predict: skipped {error}", file=sys.stderr)
                summary.failed.append(str(error))
                bar.update(1)
                continue
            batch.append((path, stem, image))
        if not batch:
            continue
        prepared = [detector.prepare(image) for _, _, image in batch]
        found = detector.run_batch(prepared, sampling_points=show_sampling_points)
        for (path, stem, image), detections in zip(batch, found):
            summary.images += 1
            summary.detections += len(detections)
            results += detections.to_coco(summary.images, file_name=str(path))
            picture = draw_detections(image, detections.boxes.tolist(), detections.scores.tolist(),
                                      detections.labels.tolist(), detector.class_names)
            target = out / f"{stem}_detections.png"
            picture.save(target)
            summary.written.append(target)
            if show_sampling_points and detections.sampling_points is not None:
                query = sampling_points_query
                if query is None:
                    # The top detection's query; with no detection above the threshold, the best-scoring query.
                    query = (int(detections.query_indices[0]) if len(detections)
                             else int(detections.sampling_points.scores.argmax()))
                drawing = draw_sampling_points(image, detections.sampling_points, query, detector.class_names)
                target = out / f"{stem}_sampling_points.png"
                drawing.save(target)
                summary.written.append(target)
            bar.update(1)
    bar.close()
    json_path = out / "detections.json"
    json_path.write_text(json.dumps(results))
    summary.written.append(json_path)
    return summary


def main(args: argparse.Namespace) -> int:
    """The ``ddetr predict`` handler: exit code 0 when every input was processed, 1 when one failed, 2 for a bad
    checkpoint or option."""
    try:
        summary = run_predict(args.checkpoint, args.inputs, args.out, score_threshold=args.score_threshold,
                              device=args.device, batch_size=args.batch_size, amp=args.amp, variant=args.variant,
                              sampling_points_query=args.show_sampling_points if args.show_sampling_points != -1
                              else None, show_sampling_points=args.show_sampling_points is not None,
                              progress=not args.no_progress)
    except (CheckpointError, ValueError) as error:
        print(f"ddetr predict: {error}", file=sys.stderr)
        return 2
    print(f"{summary.images} image(s), {summary.detections} detection(s) with score >= {args.score_threshold} "
          f"written to {Path(args.out) / 'detections.json'}; pictures in {args.out}/")
    if summary.failed:
        print(f"ddetr predict: {len(summary.failed)} input(s) failed:\n  " + "\n  ".join(summary.failed),
              file=sys.stderr)
        return 1
    return 0
