"""``ddetr predict``: detections for image files, folders and globs, as COCO results and annotated pictures.

Writes ``OUT/detections.json`` (COCO results: ``image_id``, ``file_name``, ``category_id``, ``bbox`` [x, y, w, h]
in pixels, ``score``), one ``OUT/<name>_detections.png`` per image, and with ``--show-sampling-points`` one
``OUT/<name>_sampling_points.png``. An input that fails (it cannot be read, the eval resize cannot take it, the model
fails on it) is reported on one line with its name and the cause and skipped; the others are processed, a batch
that fails being rerun image by image, so that one image loses no other; the exit code is then 1.

Image ids are 1..N in input order, or, given a ground-truth COCO JSON (``coco_json``), the ids of that file's
images with the same file names, so that ``detections.json`` can be scored against it. Images are read upright
(EXIF orientation applied), and pictures of small images are drawn enlarged.
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

from deformable_detr.data.images import UnreadableImageError, load_rgb_image
from deformable_detr.data.transforms import ImageSizeError
from deformable_detr.inference.detector import Detections, Detector, PreparedImage, check_score_threshold
from deformable_detr.inference.drawing import draw_detections
from deformable_detr.inference.sampling_points import draw_sampling_points

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# What a model run raises for one bad input (torch's errors are RuntimeErrors; Detector.run_batch turns running out
# of memory into MemoryError). Anything else is a bug and propagates.
MODEL_ERRORS = (RuntimeError, ValueError, MemoryError)


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


class GroundTruthError(ValueError):
    """A ground-truth COCO JSON given to match image ids is missing or has no usable ``images`` list."""


def read_ground_truth_images(coco_json: str | Path) -> list[tuple[str, int]]:
    """(file_name, id) of every entry of a COCO JSON's ``images`` list. Read as plain JSON: predicting needs only
    these two fields, not pycocotools. Raises :class:`GroundTruthError` naming the file and what was expected."""
    path = Path(coco_json)
    if not path.is_file():
        raise GroundTruthError(f"{path}: ground-truth file not found (expected a COCO-format JSON with 'images')")
    try:
        dataset = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise GroundTruthError(f"{path}: not valid JSON ({error})") from error
    images = dataset.get("images") if isinstance(dataset, dict) else None
    if not isinstance(images, list):
        raise GroundTruthError(f"{path}: expected a COCO-format JSON object with an 'images' list")
    entries = []
    for n, image in enumerate(images):
        if (not isinstance(image, dict) or not isinstance(image.get("file_name"), str)
                or not isinstance(image.get("id"), int) or isinstance(image.get("id"), bool)):
            raise GroundTruthError(f"{path}: images[{n}] needs an int 'id' and a str 'file_name', got {image!r:.80}")
        entries.append((image["file_name"], image["id"]))
    return entries


def _file_name_parts(file_name: str) -> tuple[str, ...]:
    """A COCO file_name's path components: '/' or '\\' separated, without '.' components."""
    return tuple(part for part in file_name.replace("\\", "/").split("/") if part not in ("", "."))


def match_image_ids(files: list[Path], ground_truth: list[tuple[str, int]], source: str
                    ) -> tuple[dict[Path, int], list[str]]:
    """The ground-truth image id of each input file, and a message per input that has none.

    A ground-truth ``file_name`` matches a file whose path ends with it: the base name for a file_name without
    folders (``000001.png``), the last folders and the base name otherwise (``val/000001.png`` matches
    ``.../val/000001.png``, not ``.../train/000001.png``). An input matched by no entry, or by several, is reported
    with its candidates; so are inputs sharing one entry (the same base name in two folders, for a file_name
    without folders).
    """
    by_base_name: dict[str, list[tuple[tuple[str, ...], int, str]]] = {}
    for file_name, image_id in ground_truth:
        parts = _file_name_parts(file_name)
        if parts:
            by_base_name.setdefault(parts[-1], []).append((parts, image_id, file_name))
    found: dict[Path, tuple[int, str]] = {}
    problems: list[str] = []
    for path in files:
        parts = path.parts
        candidates = [(image_id, file_name) for gt_parts, image_id, file_name in by_base_name.get(path.name, [])
                      if parts[-len(gt_parts):] == gt_parts]
        if not candidates:
            problems.append(f"{path}: no image of {source} has this file_name (expected an 'images' entry whose "
                            f"file_name is '{path.name}' or ends the path, e.g. '{path.parent.name}/{path.name}')")
        elif len(candidates) > 1:
            listed = ", ".join(f"{name!r} (id {image_id})" for image_id, name in candidates)
            problems.append(f"{path}: ambiguous, several images of {source} match: {listed}")
        else:
            found[path] = candidates[0]
    claimed: dict[int, list[Path]] = {}
    for path, (image_id, _) in found.items():
        claimed.setdefault(image_id, []).append(path)
    for image_id, paths in claimed.items():
        if len(paths) > 1:
            for path in paths:
                others = ", ".join(str(p) for p in paths if p != path)
                problems.append(f"{path}: ambiguous, image id {image_id} of {source} (file_name "
                                f"{found[path][1]!r}) matches other inputs too: {others}")
                del found[path]
    return {path: image_id for path, (image_id, _) in found.items()}, problems


def run_predict(checkpoint: str | Path, inputs: list[str], out: str | Path, *, score_threshold: float = 0.5,
                device: str = "auto", batch_size: int = 1, amp: str | None = None, variant: str | None = None,
                sampling_points_query: int | None = None, show_sampling_points: bool = False,
                coco_json: str | Path | None = None, progress: bool = True, compile: bool = False) -> PredictSummary:
    """Runs the checkpoint on every input (see the module docstring and :func:`predict_files`); ``compile``:
    ``torch.compile`` of the model (see :class:`Detector`)."""
    if amp is not None and amp not in AMP_DTYPES:
        raise ValueError(f"--amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
    check_score_threshold(score_threshold, "--score_threshold")  # before the checkpoint is read
    detector = Detector.from_checkpoint(checkpoint, device=device, dtype=AMP_DTYPES.get(amp, torch.float32),
                                        score_threshold=score_threshold, variant=variant, compile=compile)
    return predict_files(detector, inputs, out, batch_size=batch_size, sampling_points_query=sampling_points_query,
                         show_sampling_points=show_sampling_points, coco_json=coco_json, progress=progress)


def predict_files(detector: Detector, inputs: list[str], out: str | Path, *, batch_size: int = 1,
                  sampling_points_query: int | None = None, show_sampling_points: bool = False,
                  coco_json: str | Path | None = None, progress: bool = True) -> PredictSummary:
    """Runs ``detector`` (with its score threshold) on every input and writes the outputs of the module docstring.

    ``coco_json``: a ground-truth COCO JSON; each input then gets the id of the ground-truth image with its file
    name (see :func:`match_image_ids`), so that ``detections.json`` can be scored against that file with pycocotools
    directly (``COCO(coco_json).loadRes(detections.json)``); an input without exactly one match is reported and
    skipped, as a failed input. Without it, image ids are 1..N in input order. ``show_sampling_points`` draws the
    last decoder layer's sampling points of ``sampling_points_query``, or of the top detection's query when None.
    """
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    if sampling_points_query is not None and not show_sampling_points:
        raise ValueError("--sampling_points_query chooses the query that --show_sampling_points draws; add that flag")
    if show_sampling_points and detector.config.architecture != "deformable_detr":
        raise ValueError(f"--show_sampling_points draws deformable attention's sampling points; the model is "
                         f"{detector.config.architecture}, whose attention samples no points")
    if sampling_points_query is not None and not 0 <= sampling_points_query < detector.config.num_queries:
        raise ValueError(f"--sampling_points_query {sampling_points_query}: the model has queries 0.."
                         f"{detector.config.num_queries - 1}")
    ground_truth = read_ground_truth_images(coco_json) if coco_json is not None else None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files, problems = expand_inputs(inputs)
    image_ids: dict[Path, int] | None = None
    if ground_truth is not None:
        image_ids, unmatched = match_image_ids(files, ground_truth, str(coco_json))
        problems += unmatched
        files = [path for path in files if path in image_ids]
    summary = PredictSummary()
    for problem in problems:
        print(f"ddetr predict: {problem}", file=sys.stderr)
        summary.failed.append(problem)
    stems = _output_stems(files)
    results: list[dict] = []
    # A bar only where it can redraw itself: written to a file, its redraws would pile up on one line.
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=not (progress and sys.stderr.isatty()),
               file=sys.stderr)

    def skip(message: str) -> None:
        tqdm.write(f"ddetr predict: skipped {message}", file=sys.stderr)
        summary.failed.append(message)
        bar.update(1)

    for start in range(0, len(files), batch_size):
        batch = []
        for path, stem in zip(files[start:start + batch_size], stems[start:start + batch_size]):
            try:
                image = load_rgb_image(path)  # upright: EXIF orientation applied, boxes in the pixels a viewer shows
                prepared = detector.prepare(image, name=str(path))
            except (UnreadableImageError, ImageSizeError) as error:  # their messages start with the file's name
                skip(str(error))
                continue
            except ValueError as error:
                skip(f"{path}: {_one_line(error)}")
                continue
            batch.append((path, stem, image, prepared))
        for (path, stem, image, _), detections in zip(batch, _run_batch(detector, batch, show_sampling_points)):
            if isinstance(detections, BaseException):
                skip(f"{path}: the model failed on this image ({_one_line(detections)})")
                continue
            summary.images += 1
            summary.detections += len(detections)
            image_id = image_ids[path] if image_ids is not None else summary.images
            results += detections.to_coco(image_id, file_name=str(path))
            # Enlarged when small (a 64 x 64 image is drawn at 512 x 512), so that captions do not cover it.
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


def _one_line(error: BaseException) -> str:
    """``Type: message`` on one line (torch's messages can span several)."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _run_batch(detector: Detector, batch: list[tuple[Path, str, object, PreparedImage]], sampling_points: bool
               ) -> list[Detections | BaseException]:
    """The detections of each image of ``batch``, or the error the model raised on it. A batch that fails is run
    again image by image, so that one image that the model cannot run loses no other."""
    if not batch:
        return []
    try:
        return list(detector.run_batch([prepared for *_, prepared in batch], sampling_points=sampling_points))
    except MODEL_ERRORS as error:
        if len(batch) == 1:
            return [error]
        tqdm.write(f"ddetr predict: a batch of {len(batch)} images failed ({_one_line(error)}); running them one "
                   "by one", file=sys.stderr)
    return [_run_batch(detector, [item], sampling_points)[0] for item in batch]


def predict_command(args: argparse.Namespace) -> int:
    """The ``ddetr predict`` handler: exit code 0 when every input was processed, 1 when one failed (bad checkpoints
    and options raise, which the command line reports with exit code 2)."""
    summary = run_predict(args.checkpoint, args.inputs, args.out, score_threshold=args.score_threshold,
                          device=args.device, batch_size=args.batch_size, amp=args.amp, variant=args.variant,
                          sampling_points_query=args.sampling_points_query,
                          show_sampling_points=args.show_sampling_points, coco_json=args.coco_json,
                          progress=not args.no_progress, compile=args.compile)
    print(f"{summary.images} image(s), {summary.detections} detection(s) with score >= {args.score_threshold} "
          f"written to {Path(args.out) / 'detections.json'}; pictures in {args.out}/")
    if summary.failed:
        print(f"ddetr predict: {len(summary.failed)} input(s) failed, {summary.images} image(s) processed:\n  "
              + "\n  ".join(summary.failed), file=sys.stderr)
        return 1
    return 0
