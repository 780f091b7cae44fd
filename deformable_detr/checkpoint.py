"""Checkpoints: the official layout, plus the run's settings as plain data.

A checkpoint written by ``ddetr train`` is a dict that official tools read as theirs::

    {"model": state_dict, "optimizer": ..., "lr_scheduler": ..., "epoch": int,            # the official layout
     "format": "deformable-detr", "format_version": 2,
     "config": {"model": {...}, "train": {...}, "data": {...}},                            # configs, plain data
     "categories": {label: name}}                                                         # for class names

It holds nothing but tensors and plain data, so ``torch.load(path, weights_only=True)`` reads it with nothing
allowed beyond that. Official checkpoints (their ``args`` is an ``argparse.Namespace``) and those of deformable-detr
0.1 (format 1: our training flags as a Namespace, which may also hold the CLI's handler function, by reference) are
read too, with the Namespace allowed and the handler reference resolved to a stub, never to code. Writing is atomic
(a temporary file renamed over the target), so a crash while saving never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import argparse
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deformable_detr.config import (
    CONFIG_CLASSES,
    VARIANTS,
    ConfigError,
    DataConfig,
    ModelConfig,
    RunConfigs,
    TrainConfig,
    from_dict,
    settings_from_namespace,
    to_dict,
)

CLASS_HEAD_MARKER = "class_embed."
FORMAT_NAME = "deformable-detr"
FORMAT_VERSION = 2


class CheckpointError(ValueError):
    """The file is not a readable Deformable DETR checkpoint, or does not fit the model."""


def _legacy_cli_handler(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``deformable_detr.cli._train``, which format-1 checkpoints reference in their ``args``."""
    raise RuntimeError("a stub for a function referenced by an old checkpoint; it does nothing")


# What weights-only loading may build besides tensors and plain data: the official checkpoints' Namespace, and the
# handler reference of format 1 (resolved to the stub above, whatever the module holds today).
_SAFE_GLOBALS = [argparse.Namespace, (_legacy_cli_handler, "deformable_detr.cli._train")]


def _check_file_format(path: Path) -> None:
    """Refuses a file that is no ``torch.save`` output (a zip archive, or a pickle before PyTorch 1.6) before
    unpickling it, which would misread text as pickle opcodes and report something unrelated."""
    with path.open("rb") as file:
        head = file.read(4)
    if head != b"PK\x03\x04" and head[:1] != b"\x80":
        raise CheckpointError(f"checkpoint {path}: unreadable, not a PyTorch checkpoint file (it starts with "
                              f"{head!r}; torch.save writes a zip archive, or a pickle before PyTorch 1.6)")


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", trusted: bool = False
                    ) -> dict[str, Any]:
    """Reads a checkpoint file (ours, of any format, or official) as a dict with at least ``model``.

    Loading uses ``weights_only=True`` (no code from the file) with the official ``argparse.Namespace`` allowed.
    ``trusted=True`` lifts the restriction for files you trust that hold other Python objects.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    _check_file_format(path)
    try:
        if trusted:
            checkpoint = torch.load(path, map_location=map_location, weights_only=False)
        else:
            with torch.serialization.safe_globals(_SAFE_GLOBALS):
                checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"checkpoint {path}: holds Python objects that safe loading refuses ({error}); if you trust the file, "
            "load it with trusted=True"
        ) from error
    except Exception as error:  # torch.load reports bytes that are no checkpoint in many ways (KeyError, EOFError...)
        raise CheckpointError(f"checkpoint {path}: unreadable or truncated file, or not a torch checkpoint "
                              f"({type(error).__name__}: {error})") from error
    if isinstance(checkpoint, dict) and "model" not in checkpoint and checkpoint and all(
        isinstance(v, torch.Tensor) for v in checkpoint.values()
    ):
        # A bare state_dict: accept it as the model weights.
        checkpoint = {"model": checkpoint}
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        found = sorted(map(str, checkpoint))[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(
            f"checkpoint {path}: not a Deformable DETR checkpoint: expected a dict with a 'model' state_dict "
            f"(and optionally 'optimizer', 'lr_scheduler', 'epoch', 'config'), found {found}"
        )
    version = checkpoint.get("format_version")
    if checkpoint.get("format") == FORMAT_NAME and version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: format version {version!r}, this version of deformable-detr reads "
                              f"{FORMAT_VERSION} (upgrade deformable-detr to read it)")
    return checkpoint


def make_checkpoint(model_state: dict[str, torch.Tensor], configs: RunConfigs, categories: dict[int, str], *,
                    optimizer: dict | None = None, lr_scheduler: dict | None = None, epoch: int | None = None,
                    scaler: dict | None = None) -> dict[str, Any]:
    """The dict ``ddetr train`` saves (see the module docstring); the configs become plain data."""
    checkpoint: dict[str, Any] = {"model": model_state}
    for key, value in (("optimizer", optimizer), ("lr_scheduler", lr_scheduler), ("epoch", epoch),
                       ("scaler", scaler)):
        if value is not None:
            checkpoint[key] = value
    checkpoint.update({
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "config": {"model": to_dict(configs.model), "train": to_dict(configs.train), "data": to_dict(configs.data)},
        "categories": {int(label): str(name) for label, name in categories.items()},
    })
    return checkpoint


def _is_format_1_args(args: Any) -> bool:
    """The training flags that deformable-detr 0.1 stored (they have our additions), not the official ones."""
    return isinstance(args, argparse.Namespace) and hasattr(args, "val_size") and hasattr(args, "msda_backend")


def _configs_from_format_1(args: argparse.Namespace, state_dict: dict[str, torch.Tensor]) -> RunConfigs:
    """deformable-detr 0.1 built its model from these flags with the variant preset winning over
    ``--num_feature_levels`` and or-ing the boolean variant flags; rebuilt here exactly so."""
    values = dict(vars(args))
    variant = values.pop("variant", None)
    values.pop("num_classes", None)  # the weights tell: their class heads
    crop_sizes = values.pop("crop_sizes", None)
    progress = not values.pop("no_progress", False)
    train_scales = values.pop("train_scales", None)
    settings = settings_from_namespace(values)
    model = settings["model"]
    preset = VARIANTS[variant] if variant else {}
    model["num_feature_levels"] = preset.get("num_feature_levels", model.get("num_feature_levels", 4))
    for name in ("dilation", "with_box_refine", "two_stage"):
        model[name] = bool(model.get(name)) or bool(preset.get(name))
    model["num_classes"] = int(state_dict["class_embed.0.weight"].shape[0])
    data = settings["data"]
    if crop_sizes:
        data["crop_resize_sizes"], data["crop_size"] = (crop_sizes[0],), (crop_sizes[1], crop_sizes[2])
    if train_scales:
        data["train_scales"] = tuple(train_scales)
    train = settings["train"]
    train["progress"] = progress
    train["lr_drop_epochs"] = tuple(train["lr_drop_epochs"]) if train.get("lr_drop_epochs") else None
    return RunConfigs(ModelConfig(**model), TrainConfig(**train), DataConfig(**data))


def stored_configs(checkpoint: dict[str, Any], source: str) -> RunConfigs | None:
    """The run's configs kept in a checkpoint of ``ddetr train`` (format 2, or format 1 converted); None for the
    official checkpoints and bare state_dicts, whose model is read off the weights instead."""
    try:
        if checkpoint.get("format") == FORMAT_NAME:
            stored = checkpoint.get("config")
            if not isinstance(stored, dict) or set(stored) != set(CONFIG_CLASSES):
                raise ConfigError(f"'config' must hold {sorted(CONFIG_CLASSES)}, found "
                                  f"{sorted(stored) if isinstance(stored, dict) else type(stored).__name__}")
            return RunConfigs(*(from_dict(cls, stored[kind], f"config.{kind}") for kind, cls in
                                CONFIG_CLASSES.items()))
        if _is_format_1_args(checkpoint.get("args")):
            return _configs_from_format_1(checkpoint["args"], checkpoint["model"])
    except (ConfigError, KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint {source}: its stored settings cannot be read ({error})") from error
    return None


def load_model_state(model: nn.Module, state_dict: dict[str, torch.Tensor], drop_class_heads: bool = False) -> None:
    """Loads ``state_dict`` into ``model`` strictly.

    ``drop_class_heads=True`` (fine-tuning on another label set) leaves every ``class_embed`` at the model's own
    initialisation and loads everything else strictly. Without it, a class head of another size is an error that
    names the key and both shapes.
    """
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    own = model.state_dict()
    if drop_class_heads:
        state_dict = {k: v for k, v in state_dict.items() if CLASS_HEAD_MARKER not in k}
    missing = [k for k in own if k not in state_dict and not (drop_class_heads and CLASS_HEAD_MARKER in k)]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not fit the model: {len(missing)} missing key(s) {missing[:5]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:5]} (is it another variant? box refinement and "
            "two-stage add keys, single-scale has fewer input projections)"
        )
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            hint = (" (another num_classes: pass drop_class_heads=True to fine-tune with new class heads)"
                    if CLASS_HEAD_MARKER in key else "")
            raise CheckpointError(
                f"checkpoint key {key!r} has shape {tuple(tensor.shape)}, the model expects {tuple(own[key].shape)}"
                f"{hint}"
            )
    model.load_state_dict(state_dict, strict=not drop_class_heads)


def load_checkpoint(model: nn.Module, path: str | Path, drop_class_heads: bool = False,
                    map_location: str | torch.device = "cpu", trusted: bool = False) -> dict[str, Any]:
    """Reads ``path`` and loads its weights into ``model`` (see :func:`load_model_state`); returns the whole
    checkpoint dict, so that training can resume its optimizer, lr schedule and epoch."""
    checkpoint = read_checkpoint(path, map_location=map_location, trusted=trusted)
    try:
        load_model_state(model, checkpoint["model"], drop_class_heads=drop_class_heads)
    except CheckpointError as error:
        raise CheckpointError(f"checkpoint {path}: {error}") from error
    return checkpoint


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> None:
    """Writes ``checkpoint`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
