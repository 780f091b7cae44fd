"""``ddetr``: the command-line tool. Each subcommand maps to one plain function."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _verify(args: argparse.Namespace) -> int:
    from deformable_detr.ops import BackendUnavailableError
    from deformable_detr.verify import ReferenceFileError, verify_files

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
    from deformable_detr.train import run

    run(args)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from deformable_detr.train import run

    args.eval = True
    run(args)
    return 0


def _plot(args: argparse.Namespace) -> int:
    from deformable_detr.plot import plot_logs

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

    from deformable_detr.train import add_train_arguments

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
