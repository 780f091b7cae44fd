"""``ddetr``: the command-line tool. Each subcommand maps to one plain function."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _verify(args: argparse.Namespace) -> int:
    from deformable_detr.ops import BackendUnavailableError
    from deformable_detr.verify.run import ReferenceFileError, verify_files

    paths: list[str] = []
    for path in args.references:
        # A folder stands for every reference file in it.
        paths += sorted(str(p) for p in Path(path).glob("*.npz")) if Path(path).is_dir() else [path]
    if not paths:
        print(f"ddetr verify: no .npz file in {args.references}", file=sys.stderr)
        return 2
    try:
        passed = verify_files(paths, device=args.device, backend=args.backend, save=args.save,
                              only_failures=args.failures_only)
    except (ReferenceFileError, BackendUnavailableError) as error:
        print(f"ddetr verify: {error}", file=sys.stderr)
        return 2
    print("verify: all checks passed" if passed else "verify: SOME CHECKS FAILED")
    return 0 if passed else 1


def _train(args: argparse.Namespace) -> int:
    from deformable_detr.training.train import run

    run(args)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from deformable_detr.training.train import run

    args.eval = True
    run(args)
    return 0


def _plot(args: argparse.Namespace) -> int:
    from deformable_detr.training.plot import plot_logs

    print(f"wrote {plot_logs(args.output_dirs, args.out)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from deformable_detr.demo import run_demo

    run_demo(args)
    return 0


def _make_synthetic(args: argparse.Namespace) -> int:
    from deformable_detr.data import make_synthetic_dataset

    data = make_synthetic_dataset(args.out, num_train=args.num_train, num_val=args.num_val,
                                  image_size=args.image_size, seed=args.seed, colour_by_class=args.colour_by_class)
    print(f"wrote {args.num_train} training and {args.num_val} validation images with COCO JSONs to {data.root}:\n"
          f"  ddetr train --train_images {data.train_images} --train_json {data.train_json} "
          f"--val_images {data.val_images} --val_json {data.val_json} ...")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from deformable_detr.inference.predict import main as predict_main

    return predict_main(args)


def _export_onnx(args: argparse.Namespace) -> int:
    from deformable_detr.checkpoint import CheckpointError
    from deformable_detr.inference.export_onnx import export_checkpoint

    try:
        check = export_checkpoint(args.checkpoint, args.out, args.size[0], args.size[1], variant=args.variant,
                                  opset=args.opset, exporter=args.exporter, tolerance=args.tolerance)
    except (CheckpointError, ValueError) as error:
        print(f"ddetr export onnx: {error}", file=sys.stderr)
        return 2
    if not check.passed(args.tolerance):
        print(f"ddetr export onnx: onnxruntime and PyTorch disagree (max relative error "
              f"{check.max_relative_error:.2e} > {args.tolerance:g}, or different labels)", file=sys.stderr)
        return 1
    print(f"export onnx: check passed, wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddetr", description="Deformable DETR: verify, train, evaluate, predict.")
    commands = parser.add_subparsers(dest="command", required=True)

    verify = commands.add_parser(
        "verify", help="rerun the official procedure behind reference files and compare every array",
        description="Runs the procedure that produced each reference file (ddetr-init-v1 weights, eval mode, "
        "forward, criterion, backward, post-processing; or the MSDA core case) and compares every array with the "
        "reference README's tolerances. Exit code 0: all passed, 1: a check failed, 2: bad input.",
    )
    verify.add_argument("references", nargs="+", help="reference .npz files, or folders of them")
    verify.add_argument("--save", help="write every computed array, under the reference's key names, to this .npz")
    verify.add_argument("--device", default="cpu", help="torch device to run on (default: cpu)")
    verify.add_argument("--backend", default="auto", help="MSDA backend: auto or one of deformable_detr.ops.BACKENDS")
    verify.add_argument("--failures-only", action="store_true", help="print only the failed checks")
    verify.set_defaults(handler=_verify)

    from deformable_detr.training.train import add_train_arguments

    train = commands.add_parser(
        "train", help="train on COCO or COCO-format data (official main.py flags)",
        description="The official main.py: the same flags and defaults, so the official configs/*.sh work with "
        "'python -u main.py' replaced by 'ddetr train'. Multi-GPU: torchrun --nproc_per_node=N -m deformable_detr "
        "train ...",
    )
    add_train_arguments(train).set_defaults(handler=_train)
    evaluation = commands.add_parser("eval", help="COCO bbox AP of a checkpoint (= train --eval --resume CKPT)")
    add_train_arguments(evaluation).set_defaults(handler=_eval)

    plot = commands.add_parser("plot", help="loss and AP curves of training runs to a PNG")
    plot.add_argument("output_dirs", nargs="+", help="training output folders (each with a log.txt)")
    plot.add_argument("--out", help="PNG path (default: OUTPUT_DIR/curves.png of the first run)")
    plot.set_defaults(handler=_plot)

    from deformable_detr.demo import add_demo_arguments

    demo = commands.add_parser("demo", help="generate the synthetic dataset, train a small model on the CPU, "
                               "evaluate, draw predictions (about 15 minutes on 2 cores)")
    add_demo_arguments(demo).set_defaults(handler=_demo)

    synthetic = commands.add_parser("make-synthetic", help="write the synthetic shapes dataset (images + COCO JSON)")
    synthetic.add_argument("--out", required=True, help="output folder")
    synthetic.add_argument("--num_train", type=int, default=1000)
    synthetic.add_argument("--num_val", type=int, default=200)
    synthetic.add_argument("--image_size", type=int, default=160)
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument("--colour_by_class", action="store_true", help="tie each class to one hue (easier)")
    synthetic.set_defaults(handler=_make_synthetic)

    from deformable_detr.config import VARIANTS

    predict = commands.add_parser(
        "predict", help="detect objects in images: COCO-results JSON and annotated pictures",
        description="Runs a checkpoint (ours or official) on image files, folders and glob patterns; writes "
        "OUT/detections.json (COCO results format) and OUT/<name>_detections.png per image. Unreadable inputs are "
        "reported and skipped; exit code 1 if any failed, 2 for a bad checkpoint or option.",
    )
    predict.add_argument("checkpoint", help="checkpoint of ddetr train or of the official code")
    predict.add_argument("inputs", nargs="+", help="image files, folders (their image files) or glob patterns")
    predict.add_argument("--out", required=True, help="output folder")
    predict.add_argument("--score-threshold", type=float, default=0.5, help="keep detections scoring at least this")
    predict.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    predict.add_argument("--batch-size", type=int, default=1, help="images per forward pass (padded together)")
    predict.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="mixed precision")
    predict.add_argument("--variant", choices=list(VARIANTS), default=None,
                         help="official variant, for checkpoints without args (single_scale_dc5 cannot be told "
                         "from the weights)")
    predict.add_argument("--show-sampling-points", type=int, nargs="?", const=-1, default=None, metavar="QUERY",
                         help="also draw the last decoder layer's sampling points of query QUERY (default: the top "
                         "detection's) coloured by attention weight, to OUT/<name>_sampling_points.png")
    predict.add_argument("--no-progress", action="store_true", help="no progress bar")
    predict.set_defaults(handler=_predict)

    export = commands.add_parser("export", help="export a checkpoint for deployment (onnx)")
    formats = export.add_subparsers(dest="format", required=True)
    onnx = formats.add_parser(
        "onnx", help="the detector with post-processing as ONNX, checked with onnxruntime",
        description="Exports the detector and its post-processing (inputs: images (B,3,H,W) normalised and padded, "
        "mask (B,H,W) True on padding, original_sizes (B,2); outputs: scores, labels, boxes in original pixels) "
        "with a dynamic batch and a fixed H x W, then runs the file with onnxruntime and PyTorch on sample "
        "batches and prints the largest relative error. Exit code 1 if it exceeds --tolerance, 2 for bad input.",
    )
    onnx.add_argument("checkpoint", help="checkpoint of ddetr train or of the official code")
    onnx.add_argument("out", help="the .onnx file to write")
    onnx.add_argument("--size", type=int, nargs=2, default=[800, 1333], metavar=("HEIGHT", "WIDTH"),
                      help="input size of the graph (default 800 1333: any eval-resized landscape image fits; pad "
                      "smaller ones and mark the padding in the mask)")
    onnx.add_argument("--variant", choices=list(VARIANTS), default=None, help="as for predict")
    onnx.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 16, for GridSample)")
    onnx.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo",
                      help="torch.export-based (default) or the legacy TorchScript tracer (faster, deprecated)")
    onnx.add_argument("--tolerance", type=float, default=1e-4, help="largest relative error accepted")
    onnx.set_defaults(handler=_export_onnx)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
