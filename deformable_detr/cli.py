"""``ddetr``: the command-line tool. Each subcommand maps to one plain function."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _verify(args: argparse.Namespace) -> int:
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
    except ReferenceFileError as error:
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
