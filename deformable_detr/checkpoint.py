"""Checkpoints in the official layout: ``{"model": state_dict, "optimizer", "lr_scheduler", "epoch", "args"}``.

Official Deformable DETR checkpoints load strictly into the matching variant. Writing is atomic (a temporary file
renamed over the target), so a crash while saving never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import argparse
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

CLASS_HEAD_MARKER = "class_embed."


class CheckpointError(ValueError):
    """The file is not a readable Deformable DETR checkpoint, or does not fit the model."""


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", trusted: bool = False
                    ) -> dict[str, Any]:
    """Reads a checkpoint file (ours or official) as a dict with at least ``model``.

    Loading uses ``weights_only=True`` (no arbitrary code from the file) with ``argparse.Namespace`` allowed, which
    the official checkpoints store as ``args``. ``trusted=True`` lifts the restriction for files you trust that
    hold other Python objects.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        if trusted:
            checkpoint = torch.load(path, map_location=map_location, weights_only=False)
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"checkpoint {path}: holds Python objects that safe loading refuses ({error}); if you trust the file, "
            "load it with trusted=True"
        ) from error
    except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile, OSError) as error:
        # torch.load reports a file that is not a torch archive in several ways, KeyError among them.
        raise CheckpointError(f"checkpoint {path}: unreadable or truncated file, or not a torch checkpoint "
                              f"({type(error).__name__}: {error})") from error
    if isinstance(checkpoint, dict) and "model" not in checkpoint and checkpoint and all(
        isinstance(v, torch.Tensor) for v in checkpoint.values()
    ):
        # A bare state_dict: accept it as the model weights.
        checkpoint = {"model": checkpoint}
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        found = sorted(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(
            f"checkpoint {path}: not a Deformable DETR checkpoint: expected a dict with a 'model' state_dict "
            f"(and optionally 'optimizer', 'lr_scheduler', 'epoch', 'args'), found {found}"
        )
    return checkpoint


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
