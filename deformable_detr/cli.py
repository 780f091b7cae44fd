"""``ddetr``: the command-line tool, a thin layer over plain functions.

Each subcommand is a parser and a handler that turns the flags given into typed configs and calls one function.
The flags of the configs are derived from their fields (name, type, default, and the field's docstring as the help
text), so no default is written twice; nothing here imports torch, so ``ddetr --help`` answers at once.

One spelling rule for every subcommand: flags are the official underscore names (``--batch_size``), and the
hyphenated form of any flag works too (``--batch-size``). The checkpoint is the first positional argument of
``eval``, ``predict`` and ``export``. User errors (missing paths, malformed JSON, unreadable checkpoints, settings
out of range) print one line and exit with 2; a traceback means a bug (``--debug`` shows one for every error).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from deformable_detr.config import (
    AMP_MODES,
    ARCHITECTURES,
    CHECKPOINT_PARTS,
    CONFIG_CLASSES,
    EVALUATORS,
    MSDA_BACKENDS,
    OFFICIAL_FIXED_FLAGS,
    OFFICIAL_IGNORED_FLAGS,
    RESNETS,
    VARIANTS,
    DemoConfig,
    StudyConfig,
    check_official_flag,
    field_docs,
    field_types,
)

EXIT_USER_ERROR = 2
# Choices of config fields, shown in the help and checked by argparse.
_CHOICES = {"backbone": RESNETS, "msda_backend": MSDA_BACKENDS, "amp": AMP_MODES, "evaluator": EVALUATORS,
            "checkpoint_activations": CHECKPOINT_PARTS, "architecture": ARCHITECTURES}
# Config fields without a flag: the official code derives train_backbone from --lr_backbone 0, and so do we.
_NO_FLAG = ("train_backbone",)
# The settings ``ddetr eval`` takes (the model itself comes from the checkpoint).
_EVAL_FIELDS = {
    "data": ("coco_path", "val_images", "val_json", "val_size", "max_size", "num_workers", "cache_mode", "strict"),
    "train": ("device", "batch_size", "amp", "compile", "output_dir", "progress", "print_freq", "dist_url",
              "evaluator"),
    "model": ("msda_backend", "num_detections"),
}


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each flag's default (where it has one) after its help text."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=min(120, max(80, _terminal_width())))

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = getattr(action, "shown_default", action.default)
        if (default not in (None, False, argparse.SUPPRESS, "", ()) and not isinstance(action, argparse._HelpAction)
                and "%(default)" not in text and action.option_strings):
            shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            text += f" (default: {shown})"
        return text.replace("%", "%%").replace("%%(default)s", "%(default)s")


def _terminal_width() -> int:
    try:
        return os.get_terminal_size().columns
    except OSError:
        return 100


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose subcommands share the formatter, and whose unknown flags get a suggestion."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def suggest(self, unknown: str) -> str:
        options = [option for option in self._option_string_actions if option.startswith("--")]
        close = difflib.get_close_matches(unknown.split("=")[0], options, n=1, cutoff=0.6)
        return f" (did you mean {close[0]}?)" if close else ""


# ----------------------------------------------------------------------------------------- flags from configs


def _flag_kwargs(cls: type, name: str) -> tuple[list[str], dict[str, Any]]:
    """The option strings and ``add_argument`` keywords of config field ``name``; the default is kept out of the
    namespace (SUPPRESS), so that the handler sees exactly the flags that were given."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    annotation = field_types(cls)[name]
    # X | None -> X
    base = (next(a for a in typing.get_args(annotation) if a is not type(None))
            if isinstance(annotation, types.UnionType) else annotation)
    kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": field_docs(cls).get(name, "")}
    if base is bool:
        if field.default is True:
            return [f"--no_{name}"], {**kwargs, "action": "store_false"}
        return [f"--{name}"], {**kwargs, "action": "store_true"}
    kwargs["shown_default"] = field.default
    if typing.get_origin(base) is tuple:
        item_types = typing.get_args(base)
        kwargs.update(type=item_types[0], nargs="+" if item_types[-1] is Ellipsis else len(item_types))
    else:
        kwargs["type"] = base
    if name in _CHOICES:
        kwargs["choices"] = _CHOICES[name]
        if kwargs.get("nargs") is not None:  # argparse would repeat the list of choices for every item
            kwargs["metavar"] = "PART"
    else:
        kwargs["metavar"] = name.upper() if kwargs.get("nargs") is None else name.split("_")[-1].upper()
    return [f"--{name}"], kwargs


def _add_config_flags(group: argparse._ArgumentGroup, cls: type, names: Sequence[str] | None = None) -> None:
    for field in dataclasses.fields(cls):
        if (names is None and field.name not in _NO_FLAG) or (names is not None and field.name in names):
            options, kwargs = _flag_kwargs(cls, field.name)
            shown_default = kwargs.pop("shown_default", None)
            action = group.add_argument(*options, **kwargs)
            action.shown_default = shown_default  # for the help text only: the parsed default stays SUPPRESS


def _settings(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The config fields given on the command line, per config ({"model": ..., "train": ..., "data": ...})."""
    given = vars(args)
    settings = {}
    for kind, cls in CONFIG_CLASSES.items():
        settings[kind] = {f.name: tuple(given[f.name]) if isinstance(given[f.name], list) else given[f.name]
                          for f in dataclasses.fields(cls) if f.name in given}
    return settings


# ----------------------------------------------------------------------------------------------------- handlers


def _verify(args: argparse.Namespace) -> int:
    from deformable_detr.verify.run import verify_files

    paths: list[str] = []
    folders: set[str] = set()
    for path in args.references:
        if Path(path).is_dir():
            found = sorted(str(p) for p in Path(path).glob("*.npz"))
            if not found:
                raise FileNotFoundError(f"{path}: no .npz reference file in this folder")
            paths += found
            folders |= set(found)
        else:
            paths.append(path)
    passed = verify_files(paths, device=args.device, backend=args.backend, save=args.save,
                          only_failures=args.failures_only, skip_unsupported=folders)
    print("verify: all checks passed" if passed else "verify: SOME CHECKS FAILED")
    return 0 if passed else 1


def _train(args: argparse.Namespace) -> int:
    settings = _settings(args)
    for name in OFFICIAL_FIXED_FLAGS:
        if name in vars(args):
            check_official_flag(name, getattr(args, name))
    if args.eval:
        # The official main.py --eval: evaluate the weights of --resume.
        checkpoint = settings["train"].pop("resume", "")
        if not checkpoint:
            raise ValueError("--eval evaluates the weights of --resume CHECKPOINT; none given")
        return _run_eval(checkpoint, settings, args.variant)
    from deformable_detr.training.train import run_configs_from_settings, train

    configs = run_configs_from_settings(settings, args.variant)
    train(configs.model, configs.train, configs.data)
    return 0


def _eval(args: argparse.Namespace) -> int:
    checkpoint = args.checkpoint or args.resume
    if not checkpoint:
        raise ValueError("give the checkpoint to evaluate: ddetr eval CHECKPOINT")
    return _run_eval(checkpoint, _settings(args), args.variant, raw_weights=args.raw_weights)


def _run_eval(checkpoint: str, settings: dict[str, dict[str, Any]], variant: str | None,
              raw_weights: bool = False) -> int:
    from deformable_detr.training.train import eval_configs_from_settings, evaluate_checkpoint

    data_cfg, train_cfg = eval_configs_from_settings(checkpoint, settings)
    evaluate_checkpoint(checkpoint, data_cfg, train_cfg, settings["model"], variant=variant, raw_weights=raw_weights)
    return 0


def _plot(args: argparse.Namespace) -> int:
    from deformable_detr.training.plot import plot_logs

    print(f"wrote {plot_logs(args.output_dirs, args.out)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from deformable_detr.demo import run_demo

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig) if f.name in vars(args)}
    run_demo(DemoConfig(**given))
    return 0


def _study_convergence(args: argparse.Namespace) -> int:
    from deformable_detr.study import run_study

    given = {f.name: tuple(getattr(args, f.name)) if isinstance(getattr(args, f.name), list) else getattr(args, f.name)
             for f in dataclasses.fields(StudyConfig) if f.name in vars(args)}
    run_study(StudyConfig(**given))
    return 0


def _make_synthetic(args: argparse.Namespace) -> int:
    from deformable_detr.data import make_synthetic_dataset

    data = make_synthetic_dataset(args.out, num_train=args.num_train, num_val=args.num_val,
                                  image_size=args.image_size, seed=args.seed, colour_by_class=args.colour_by_class,
                                  max_objects=args.max_objects, min_objects=args.min_objects,
                                  small_fraction=args.small_fraction, clutter=args.clutter,
                                  min_visible=args.min_visible)
    print(f"wrote {args.num_train} training and {args.num_val} validation images with COCO JSONs to {data.root}:\n"
          f"  ddetr train --train_images {data.train_images} --train_json {data.train_json} "
          f"--val_images {data.val_images} --val_json {data.val_json} ...")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from deformable_detr.inference.predict import predict_command

    return predict_command(args)


def _export_onnx(args: argparse.Namespace) -> int:
    from deformable_detr.inference.export_onnx import export_checkpoint

    check = export_checkpoint(args.checkpoint, args.out, args.size[0], args.size[1], variant=args.variant,
                              opset=args.opset, exporter=args.exporter, dynamic=args.dynamic,
                              tolerance=args.tolerance)
    if not check.passed(args.tolerance):
        print(f"ddetr export onnx: onnxruntime and PyTorch disagree (max relative error "
              f"{check.max_relative_error:.2e} > {args.tolerance:g}, or different labels)", file=sys.stderr)
        return 1
    print(f"export onnx: check passed, wrote {args.out}")
    return 0


def _export_hf(args: argparse.Namespace) -> int:
    from deformable_detr.inference.hf_format import export_hf

    out = export_hf(args.checkpoint, args.out, backbone_form=args.backbone_form, variant=args.variant)
    print(f"export hf: wrote {out} (transformers.DeformableDetrForObjectDetection.from_pretrained loads it)")
    return 0


# ------------------------------------------------------------------------------------------------------ parsers


def _version() -> str:
    from deformable_detr import __version__

    return __version__


def build_parser() -> _Parser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of any error")
    parser = _Parser(prog="ddetr", parents=[common],
                     description="Deformable DETR: train, evaluate, predict, export, verify against the official "
                     "numbers. Flags are the official underscore names; the hyphenated forms work too.")
    parser.add_argument("--version", action="version", version=f"deformable-detr {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def command(name: str, handler: Callable[[argparse.Namespace], int], help: str, description: str = "") -> _Parser:
        sub = commands.add_parser(name, help=help, description=description or help, parents=[common])
        sub.set_defaults(handler=handler)
        return sub

    demo = command("demo", _demo, "the main job: synthetic data, a small model trained on the CPU, AP, pictures",
                   "Generates the synthetic shapes dataset, trains a small Deformable DETR from scratch on it, "
                   "evaluates it with COCO AP and draws its detections.")
    _add_config_flags(demo.add_argument_group("demo"), DemoConfig)

    train = command("train", _train, "train on COCO or COCO-format data (the official main.py flags)",
                    "The official main.py: the same flags and defaults, so the official configs/*.sh work with "
                    "'python -u main.py' replaced by 'ddetr train'. With --resume the model, the recipe and the data "
                    "come from the checkpoint, and flags given override them (a model setting that contradicts its "
                    "weights is an error). Several processes: torchrun --nproc_per_node=N -m deformable_detr train ...")
    train.add_argument("--variant", choices=list(VARIANTS), default=None,
                       help="preset of an official variant (num_feature_levels, dilation, with_box_refine, "
                       "two_stage; detr, detr_dc5: DETR (Carion et al. 2020) and its recipe: lr 1e-4, lr_backbone "
                       "1e-5, 300 epochs, lr_drop 200); flags given explicitly win over it")
    train.add_argument("--eval", action="store_true",
                       help="only evaluate the weights of --resume CHECKPOINT (the official --eval; = ddetr eval)")
    _add_config_flags(train.add_argument_group("model"), CONFIG_CLASSES["model"])
    _add_config_flags(train.add_argument_group("training"), CONFIG_CLASSES["train"])
    _add_config_flags(train.add_argument_group("data"), CONFIG_CLASSES["data"])
    official = train.add_argument_group("official flags with one supported value, accepted for the official scripts")
    for name, (supported, reason) in OFFICIAL_FIXED_FLAGS.items():
        if isinstance(supported, bool):
            official.add_argument(f"--{name}", action="store_true", default=argparse.SUPPRESS,
                                  help=f"not supported: {reason}")
        else:
            official.add_argument(f"--{name}", nargs="+" if isinstance(supported, list) else None,
                                  default=argparse.SUPPRESS,
                                  help=f"only {supported!r}: {reason}" if supported else f"not supported: {reason}")
    for name, reason in OFFICIAL_IGNORED_FLAGS.items():
        official.add_argument(f"--{name}", default=argparse.SUPPRESS, help=f"no effect: {reason}")

    evaluation = command("eval", _eval, "COCO bbox AP of a checkpoint (ours or official)",
                         "Evaluates CHECKPOINT on the validation data: the model is rebuilt from the checkpoint, the "
                         "data and sizes are those it was trained with unless given here. Prints the 12 COCO numbers "
                         "and the per-class AP table, and writes OUTPUT_DIR/eval.json and eval.pth.")
    evaluation.add_argument("checkpoint", nargs="?", help="checkpoint of ddetr train or of the official code, or a "
                            "Hugging Face folder (config.json + model.safetensors)")
    evaluation.add_argument("--resume", default=None, help=argparse.SUPPRESS)  # the official spelling, kept working
    evaluation.add_argument("--variant", choices=list(VARIANTS), default=None,
                            help="official variant, for checkpoints without settings (single_scale_dc5 cannot be "
                            "told from the weights)")
    evaluation.add_argument("--raw_weights", action="store_true",
                            help="evaluate the checkpoint's trained weights, not its EMA weights (which a checkpoint "
                            "of ddetr train --ema holds, and which are evaluated by default)")
    titles = {"data": "data", "train": "run (OUTPUT_DIR receives eval.json and eval.pth)",
              "model": "model settings its weights do not depend on"}
    for kind, names in _EVAL_FIELDS.items():
        _add_config_flags(evaluation.add_argument_group(titles[kind]), CONFIG_CLASSES[kind], names)

    predict = command("predict", _predict, "detect objects in images: COCO-results JSON and annotated pictures",
                      "Runs CHECKPOINT (ours or official) on image files, folders and glob patterns; writes "
                      "OUT/detections.json (COCO results) and OUT/<name>_detections.png per image. Inputs that fail "
                      "(unreadable, too small or elongated, or that the model fails on) are reported by name and "
                      "skipped, the others processed; exit code 1 if any failed, 2 for a bad checkpoint or option.")
    predict.add_argument("checkpoint", help="checkpoint of ddetr train or of the official code, or a Hugging Face "
                         "folder (config.json + model.safetensors)")
    predict.add_argument("inputs", nargs="+", help="image files, folders (their image files) or glob patterns")
    predict.add_argument("--out", required=True, help="output folder")
    predict.add_argument("--score_threshold", type=float, default=0.5, help="keep detections scoring at least this")
    predict.add_argument("--device", default="auto", help="torch device; auto: cuda when available, else cpu")
    predict.add_argument("--batch_size", type=int, default=1, help="images per forward pass (padded together)")
    predict.add_argument("--amp", choices=AMP_MODES, default=None, help="mixed precision")
    predict.add_argument("--compile", action="store_true",
                         help="torch.compile the model (the first call compiles, and its time is printed)")
    predict.add_argument("--variant", choices=list(VARIANTS), default=None,
                         help="official variant, for checkpoints without settings (single_scale_dc5 cannot be told "
                         "from the weights)")
    predict.add_argument("--coco_json", default=None,
                         help="a ground-truth COCO JSON: detections.json gets its image ids (matched by file name), "
                         "so pycocotools can score it")
    predict.add_argument("--show_sampling_points", action="store_true",
                         help="also draw the last decoder layer's sampling points of the top detection's query, "
                         "coloured by attention weight, to OUT/<name>_sampling_points.png")
    predict.add_argument("--sampling_points_query", type=int, default=None, metavar="QUERY",
                         help="with --show_sampling_points: draw this query instead of the top detection's")
    predict.add_argument("--no_progress", action="store_true", help="no progress bar")

    export = command("export", lambda args: 0, "export a checkpoint for deployment (onnx) or Hugging Face (hf)")
    formats = export.add_subparsers(dest="format", required=True, metavar="FORMAT", parser_class=_Parser)
    onnx = formats.add_parser(
        "onnx", help="the detector with post-processing as ONNX, checked with onnxruntime", parents=[common],
        description="Exports the detector and its post-processing (inputs: images (B,3,H,W) normalised and padded, "
        "mask (B,H,W) True on padding, original_sizes (B,2); outputs: scores, labels, boxes in original pixels) "
        "with a dynamic batch and a fixed H x W (--dynamic: any H x W above a minimum), then runs the file with "
        "onnxruntime and PyTorch on sample "
        "batches and prints the largest relative error. Exit code 1 if it exceeds --tolerance, 2 for bad input.")
    onnx.set_defaults(handler=_export_onnx)
    onnx.add_argument("checkpoint", help="checkpoint of ddetr train or of the official code")
    onnx.add_argument("out", help="the .onnx file to write")
    onnx.add_argument("--size", type=int, nargs=2, default=[800, 1333], metavar=("HEIGHT", "WIDTH"),
                      help="input size of the graph (any eval-resized landscape image fits 800 x 1333; pad smaller "
                      "ones and mark the padding in the mask)")
    onnx.add_argument("--variant", choices=list(VARIANTS), default=None, help="as for predict")
    onnx.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 16, for GridSample)")
    onnx.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo",
                      help="torch.export-based, or the legacy TorchScript tracer (faster, deprecated)")
    onnx.add_argument("--tolerance", type=float, default=1e-4, help="largest relative error accepted")
    onnx.add_argument("--dynamic", action="store_true",
                      help="the graph takes any H x W from a minimum up (65 x 65 multi-scale, printed and stored in "
                      "the metadata), --size is the example traced; checked at --size and at a second size; needs "
                      "--exporter dynamo")
    hf = formats.add_parser(
        "hf", help="a Hugging Face transformers folder (config.json + model.safetensors)", parents=[common],
        description="Writes the model as a folder that transformers' DeformableDetrForObjectDetection.from_pretrained"
        "(DIR) loads: config.json (architecture, id2label from the class names), model.safetensors (transformers' "
        "parameter names) and preprocessor_config.json (the eval resize). ddetr predict/eval read such folders too.")
    hf.set_defaults(handler=_export_hf)
    hf.add_argument("checkpoint", help="checkpoint of ddetr train or of the official code, or a Hugging Face folder")
    hf.add_argument("out", help="the folder to write")
    hf.add_argument("--backbone_form", choices=["timm", "transformers"], default="timm",
                    help="the ResNet as timm's (like the SenseTime Hub models; transformers then needs timm, and DC5 "
                    "needs this form) or as transformers' own ResNet (no timm needed)")
    hf.add_argument("--variant", choices=list(VARIANTS), default=None, help="as for predict")

    verify = command("verify", _verify, "rerun the official procedure behind reference files and compare every array",
                     "Runs the procedure that produced each reference file (ddetr-init-v1 weights, eval mode, "
                     "forward, criterion, backward, post-processing; or the MSDA core case; or the eval transform) "
                     "and compares every array with the reference README's tolerances. The repository's copy of the "
                     "official vectors is tests/reference. Exit code 0: all passed, 1: a check failed, 2: bad input.")
    verify.add_argument("references", nargs="+", help="reference .npz files, or folders of them (tests/reference)")
    verify.add_argument("--save", help="write every computed array, under the reference's key names, to this .npz")
    verify.add_argument("--device", default="cpu", help="torch device to run on")
    verify.add_argument("--backend", default="auto", choices=MSDA_BACKENDS, help="deformable attention backend")
    verify.add_argument("--failures_only", action="store_true", help="print only the failed checks")

    synthetic = command("make-synthetic", _make_synthetic, "write the synthetic shapes dataset (images + COCO JSON)")
    synthetic.add_argument("--out", required=True, help="output folder")
    synthetic.add_argument("--num_train", type=int, default=1000, help="training images")
    synthetic.add_argument("--num_val", type=int, default=200, help="validation images")
    synthetic.add_argument("--image_size", type=int, default=160, help="image side")
    synthetic.add_argument("--seed", type=int, default=0, help="random seed (the same seed writes the same files)")
    synthetic.add_argument("--colour_by_class", action="store_true", help="tie each class to one hue (easier)")
    synthetic.add_argument("--max_objects", type=int, default=4, help="at most this many objects per image")
    synthetic.add_argument("--min_objects", type=int, default=1,
                           help="at least this many objects in an image that has any (1..max_objects)")
    synthetic.add_argument("--small_fraction", type=float, default=0.0,
                           help="probability in [0, 1] that an object is COCO-small (extent 8..24 px, area < 32x32)")
    synthetic.add_argument("--clutter", type=int, default=0,
                           help="up to this many unannotated distractor marks per image (rings, segments, arcs in "
                                "the objects' colours)")
    synthetic.add_argument("--min_visible", type=float, default=0.6,
                           help="occlusion, in (0, 1]: every object keeps at least this share of its pixels visible "
                                "(lower: more occlusion)")

    study = command("study", lambda args: 0, "compare detectors' convergence on synthetic data (the paper's claim)")
    studies = study.add_subparsers(dest="study", required=True, metavar="STUDY", parser_class=_Parser)
    convergence = studies.add_parser(
        "convergence", parents=[common], help="train DETR and Deformable DETR alike; AP per epoch and per minute",
        description="Trains the chosen detectors on one synthetic dataset at one small size, each with its own "
        "recipe, evaluates them every epoch and writes their AP curves, the epochs each needs to reach the others' "
        "final AP, and a figure. Prints a time estimate first; a rerun resumes the study.")
    convergence.set_defaults(handler=_study_convergence)
    _add_config_flags(convergence.add_argument_group("study"), StudyConfig)

    plot = command("plot", _plot, "loss and AP curves of training runs to a PNG")
    plot.add_argument("output_dirs", nargs="+", help="training output folders (each with a log.txt)")
    plot.add_argument("--out", help="PNG path (default: OUTPUT_DIR/curves.png of the first run)")
    return parser


def normalise_flags(argv: Sequence[str]) -> list[str]:
    """``--some-flag[=v]`` -> ``--some_flag[=v]``: the hyphenated form of every flag works, in every subcommand.
    Arguments after a bare ``--`` are left alone."""
    normalised: list[str] = []
    for position, token in enumerate(argv):
        if token == "--":
            return normalised + list(argv[position:])
        if token.startswith("--") and len(token) > 2:
            name, equals, value = token.partition("=")
            token = "--" + name[2:].replace("-", "_") + equals + value
        normalised.append(token)
    return normalised


def _subparser(parser: _Parser, args: argparse.Namespace) -> _Parser:
    """The parser of the subcommand that was chosen (for its flags' names)."""
    chosen = parser
    for dest in ("command", "format"):
        name = getattr(args, dest, None)
        actions = [a for a in chosen._actions if isinstance(a, argparse._SubParsersAction)]
        if name is None or not actions or name not in actions[0].choices:
            break
        chosen = actions[0].choices[name]
    return chosen


def _is_user_error(error: BaseException) -> bool:
    """Errors that bad input causes (and that name it), as opposed to bugs; a missing optional package is one."""
    if isinstance(error, (ValueError, OSError, FloatingPointError, MemoryError, ImportError)):
        return True
    if "torch" in sys.modules:
        from deformable_detr.ops import BackendUnavailableError

        return isinstance(error, BackendUnavailableError)
    return False


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = normalise_flags(sys.argv[1:] if argv is None else argv)
    args, unknown = parser.parse_known_args(argv)
    chosen = _subparser(parser, args)
    if unknown:
        flag = next((u for u in unknown if u.startswith("-")), unknown[0])
        chosen.error(f"unrecognized argument{'s' if len(unknown) > 1 else ''}: {' '.join(unknown)}"
                     + (chosen.suggest(flag) if flag.startswith("--") else ""))
    name = f"ddetr {args.command}" + (f" {args.format}" if getattr(args, "format", None) else "")
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug or not _is_user_error(error):
            raise
        print(f"{name}: {str(error) or type(error).__name__}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
