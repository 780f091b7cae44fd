"""Checkpoints: the official layout, plus the run's settings as plain data.

A checkpoint written by ``ddetr train`` is a dict that official tools read as theirs::

    {"model": state_dict, "optimizer": ..., "lr_scheduler": ..., "epoch": int,            # the official layout
     "format": "deformable-detr", "format_version": 2,
     "config": {"model": {...}, "train": {...}, "data": {...}},                            # configs, plain data
     "categories": {label: name},                                                         # for class names
     "model_digest": {"algorithm": "sha256", "tensors": {name: hex digest}},               # to detect corruption
     "ema": {"model": state_dict, "updates": int, "decay": float, "tau": float,            # with --ema only
             "model_digest": {...}}}

It holds nothing but tensors and plain data, so ``torch.load(path, weights_only=True)`` reads it with nothing
allowed beyond that. Official checkpoints (their ``args`` is an ``argparse.Namespace``) and those of deformable-detr
0.1 (format 1: our training flags as a Namespace, which may also hold the CLI's handler function, by reference) are
read too, with the Namespace allowed and the handler reference resolved to a stub, never to code.

``model_digest`` (optional, so official checkpoints and older format-2 files without it still load) is a hash of
each weight tensor's dtype, shape and bytes: torch's zip reader does not check the archive's CRCs, so flipped bytes
in a file would otherwise load silently as other weights. Reading verifies it. A file that cannot be read (a text
file, garbage or truncated bytes, an empty file, a directory) is a :class:`CheckpointError` of one line naming the
file and what was expected.

Writing is atomic (a temporary ``.NAME.XXXXXXXX.tmp`` in the same folder, renamed over the target), so a crash while
saving never leaves a truncated checkpoint behind; a process killed mid-save leaves its temporary file, which
:func:`remove_interrupted_saves` removes. Checkpoints get the permissions of any new file (``0o666`` less the umask).
A full disk is a :class:`CheckpointSpaceError` (an ``OSError``) saying so; :func:`checkpoint_size_estimate` tells
how much room a checkpoint of a model and its optimizer takes, for a check before training starts.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import os
import pickle
import re
import secrets
import shutil
import stat
import time
import warnings
import zipfile
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
DIGEST_KEY = "model_digest"
EMA_KEY = "ema"
# sha256 rather than blake2b: on the R50 Deformable DETR state_dict (41M float32 parameters, 164 MB) it takes 97 ms
# against blake2b's 193 ms, on a CPU with the SHA extensions that current x86 and ARM server CPUs have. The record
# names its algorithm, so that another can be chosen later.
DIGEST_ALGORITHM = "sha256"
# Those a digest may name (a later version may hash otherwise): hashlib's own, less the variable-length ones.
_DIGEST_ALGORITHMS = frozenset(hashlib.algorithms_guaranteed - {"shake_128", "shake_256"})


class CheckpointError(ValueError):
    """The file is not a readable Deformable DETR checkpoint, or does not fit the model."""


class CheckpointSpaceError(OSError):
    """A checkpoint could not be written for lack of disk space: ``CheckpointSpaceError(errno, message)`` with
    ``errno`` ENOSPC or EDQUOT; the previous file at the target, if any, is untouched and no partial file is left."""

    def __str__(self) -> str:
        return self.strerror


def _legacy_cli_handler(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``deformable_detr.cli._train``, which format-1 checkpoints reference in their ``args``."""
    raise RuntimeError("a stub for a function referenced by an old checkpoint; it does nothing")


# What weights-only loading may build besides tensors and plain data: the official checkpoints' Namespace, and the
# handler reference of format 1 (resolved to the stub above, whatever the module holds today).
_SAFE_GLOBALS = [argparse.Namespace, (_legacy_cli_handler, "deformable_detr.cli._train")]
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_MAGIC = b"\x80"  # the PROTO opcode that starts a pickle of protocol 2 or later (torch.save before 1.6)
_EXPECTED = "expected a checkpoint written by torch.save"


def _check_file(path: Path) -> None:
    """Refuses what is no file written by ``torch.save`` (a zip archive, or a pickle before PyTorch 1.6) before
    unpickling it, which would misread text as pickle opcodes and report something unrelated."""
    if path.is_dir():
        inside = path / "checkpoint.pth"
        hint = f" (did you mean {inside}?)" if inside.is_file() else ""
        raise CheckpointError(f"checkpoint {path}: a directory, not a file; {_EXPECTED}{hint}")
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: not a regular file; {_EXPECTED}")
    try:
        with path.open("rb") as file:
            head = file.read(4)
    except OSError as error:
        raise CheckpointError(f"checkpoint {path}: cannot be read ({error.strerror or error})") from error
    if not head:
        raise CheckpointError(f"checkpoint {path}: unreadable, an empty file (0 bytes); {_EXPECTED} (an interrupted "
                              "copy or download?)")
    if head != _ZIP_MAGIC and head[:1] != _PICKLE_MAGIC:
        raise CheckpointError(f"checkpoint {path}: unreadable, not a PyTorch checkpoint file (it starts with "
                              f"{head!r}; torch.save writes a zip archive, or a pickle before PyTorch 1.6)")
    if head == _ZIP_MAGIC:
        # torch reports a damaged archive as an OSError or a miniz error; zipfile says what is wrong, cheaply (it
        # reads the central directory at the end, which a truncated file lacks).
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, EOFError, ValueError) as error:
            reason = "no central directory at its end" if str(error) == "File is not a zip file" else str(error)
            raise CheckpointError(f"checkpoint {path}: unreadable or truncated file, a damaged zip archive ({reason}: "
                                  f"an interrupted copy or download?); {_EXPECTED}") from error
        if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
            raise CheckpointError(f"checkpoint {path}: unreadable, a zip archive that torch.save did not write (no "
                                  f"data.pkl among {names[:5]}); {_EXPECTED}")


# What torch's weights-only unpickler says when the pickle is well formed but builds a Python object it does not
# allow (then trusted=True reads the file). Anything else it raises means the bytes are no valid pickle.
_REFUSED = re.compile(r"(?:Unsupported global: |unsupported )GLOBAL (\S+)|allowlisted|unrecognized function|"
                      r"must be imported to load")


def _first_line(error: BaseException) -> str:
    """The gist of an error of torch.load in one line, without the advice torch appends."""
    text = str(error)
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if detail:
        text = detail.group(1)
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    line = line.split(". This is an internal miniz error")[0]
    kind = type(error).__name__
    if kind == "error":  # struct.error and the like say little without their module
        kind = f"{type(error).__module__}.error"
    if isinstance(error, EOFError):
        return f"{kind}: the data ends early"
    return f"{kind}: {line[:200]}" if line else kind


def _load_error(path: Path, error: Exception, trusted: bool) -> CheckpointError:
    """The one-line CheckpointError for a file that ``torch.load`` could not read."""
    text = str(error)
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", text, re.DOTALL)  # torch wraps it in advice of its own
    refused = None if trusted or not isinstance(error, pickle.UnpicklingError) else _REFUSED.search(
        detail.group(1) if detail else text)
    if refused:
        what = f"GLOBAL {refused.group(1)}" if refused.group(1) else _first_line(error)
        return CheckpointError(f"checkpoint {path}: holds Python objects that safe loading refuses ({what}); if you "
                               "trust the file, load it with trusted=True")
    return CheckpointError(f"checkpoint {path}: unreadable or truncated file, corrupted or not a checkpoint "
                           f"({_first_line(error)}); {_EXPECTED}")


def weights_digest(state_dict: dict[str, torch.Tensor], algorithm: str = DIGEST_ALGORITHM) -> dict[str, Any]:
    """The ``model_digest`` record of ``state_dict``: ``{"algorithm": ..., "tensors": {name: hex digest}}``, each
    digest over the tensor's dtype, shape and bytes in logical (row-major) order, so the storage layout does not
    matter. Tensors on an accelerator are copied to the CPU to be hashed."""
    tensors = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu").contiguous()
        digest = hashlib.new(algorithm, f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # (numel * element size,) bytes
        tensors[name] = digest.hexdigest()
    return {"algorithm": algorithm, "tensors": tensors}


def _verify_digest(path: Path, checkpoint: dict[str, Any]) -> None:
    """Raises :class:`CheckpointError` when the weights differ from the digest saved with them."""
    stored = checkpoint[DIGEST_KEY]
    if not (isinstance(stored, dict) and isinstance(stored.get("tensors"), dict)
            and stored.get("algorithm") in _DIGEST_ALGORITHMS):
        raise CheckpointError(f"checkpoint {path}: its {DIGEST_KEY!r} is unreadable (expected {{'algorithm': one of "
                              f"{sorted(_DIGEST_ALGORITHMS)}, 'tensors': {{name: hex digest}}}}, found "
                              f"{str(stored)[:100]}); the file is damaged or not ours")
    model = checkpoint["model"]
    actual = weights_digest(model, stored["algorithm"])["tensors"]
    differing = [name for name in model if name in stored["tensors"] and stored["tensors"][name] != actual[name]]
    missing = [name for name in stored["tensors"] if name not in model]
    unexpected = [name for name in model if name not in stored["tensors"]]
    if differing:
        others = f" and {len(differing) - 1} other tensor(s) differ" if len(differing) > 1 else " differs"
        raise CheckpointError(f"checkpoint {path}: the weights are corrupted: tensor {differing[0]!r}{others} "
                              "from the digest saved with them (flipped bytes on the disk or in a copy); use another "
                              "copy of the file, or an earlier checkpoint")
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path}: the weights do not match the digest saved with them: "
                              f"{len(missing)} tensor(s) missing {missing[:5]}, {len(unexpected)} unexpected "
                              f"{unexpected[:5]} (the file was altered after saving)")


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", trusted: bool = False
                    ) -> dict[str, Any]:
    """Reads a checkpoint file (ours, of any format, or official) as a dict with at least ``model``.

    Loading uses ``weights_only=True`` (no code from the file) with the official ``argparse.Namespace`` allowed.
    ``trusted=True`` lifts the restriction for files you trust that hold other Python objects. The weights are
    checked against the checkpoint's ``model_digest`` where it has one. Every file that cannot be read (none, a
    directory, empty, text, garbage, truncated, corrupted weights) is a :class:`CheckpointError` of one line.

    A Hugging Face ``DeformableDetrForObjectDetection`` folder (or its ``config.json`` or ``.safetensors`` file) is
    read as the same dict, with the official names and the model's settings (see
    :mod:`deformable_detr.inference.hf_format`).
    """
    # Imported here: the Hugging Face mapping builds on this module.
    from deformable_detr.inference import hf_format

    path = Path(path)
    if hf_format.hf_folder_of(path) is not None:
        return hf_format.read_hf_checkpoint(path)
    _check_file(path)
    try:
        with warnings.catch_warnings():
            # Garbage after a leading 0x80 reads as a pickle protocol of that number, which torch warns about at
            # length before it fails; the error says what is wrong.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            if trusted:
                checkpoint = torch.load(path, map_location=map_location, weights_only=False)
            else:
                with torch.serialization.safe_globals(_SAFE_GLOBALS):
                    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch.load reports bytes that are no checkpoint in many ways (KeyError, EOFError...)
        raise _load_error(path, error, trusted) from error
    if isinstance(checkpoint, dict) and "model" not in checkpoint and checkpoint and all(
        isinstance(v, torch.Tensor) for v in checkpoint.values()
    ):
        # A bare state_dict: accept it as the model weights.
        checkpoint = {"model": checkpoint}
        if hf_format.looks_like_hf_state_dict(checkpoint["model"]):  # a pytorch_model.bin of transformers
            return hf_format.read_hf_checkpoint(path, state=checkpoint["model"])
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
    if DIGEST_KEY in checkpoint:
        _verify_digest(path, checkpoint)
    ema = checkpoint.get(EMA_KEY)
    if ema is not None:
        if not isinstance(ema, dict) or not isinstance(ema.get("model"), dict):
            raise CheckpointError(f"checkpoint {path}: its {EMA_KEY!r} entry is unreadable (expected {{'model': "
                                  f"state_dict, 'updates': int, ...}}, found {str(ema)[:100]})")
        if DIGEST_KEY in ema:  # the EMA weights are what eval and predict use: checked as the model's
            _verify_digest(path, ema)
    return checkpoint


def model_weights(checkpoint: dict[str, Any], ema: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """The weights to run of a checkpoint from :func:`read_checkpoint`, and which they are: its EMA weights
    (``"ema"``, written by ``ddetr train --ema``) when it has them and ``ema`` is true, else its model weights
    (``"model"``: those training continues from)."""
    if ema and isinstance(checkpoint.get(EMA_KEY), dict):
        return checkpoint[EMA_KEY]["model"], "ema"
    return checkpoint["model"], "model"


def make_checkpoint(model_state: dict[str, torch.Tensor], configs: RunConfigs, categories: dict[int, str], *,
                    optimizer: dict | None = None, lr_scheduler: dict | None = None, epoch: int | None = None,
                    scaler: dict | None = None, ema: dict[str, Any] | None = None) -> dict[str, Any]:
    """The dict ``ddetr train`` saves (see the module docstring); the configs become plain data, and the weights
    get their digest (:func:`weights_digest`, about 0.1 s for 40M float32 parameters on a CPU with SHA extensions).
    ``ema``: ``ModelEMA.state_dict()``, saved with a digest of its weights.
    """
    checkpoint: dict[str, Any] = {"model": model_state}
    for key, value in (("optimizer", optimizer), ("lr_scheduler", lr_scheduler), ("epoch", epoch),
                       ("scaler", scaler)):
        if value is not None:
            checkpoint[key] = value
    checkpoint.update({
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "config": {"model": to_dict(configs.model), "train": to_dict(configs.train), "data": to_dict(configs.data)},
        "categories": {int(label): str(name) for label, name in categories.items()},
        DIGEST_KEY: weights_digest(model_state),
    })
    if ema is not None:
        checkpoint[EMA_KEY] = {**ema, DIGEST_KEY: weights_digest(ema["model"])}
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
        # DETR has single heads ('class_embed.weight'), Deformable DETR one per decoder layer ('class_embed.0.weight').
        theirs, mine = ("DETR" if "class_embed.weight" in d else "Deformable DETR" for d in (state_dict, own))
        hint = (f"the checkpoint holds {theirs} weights and the model is {mine}: build_model('detr') for DETR"
                if theirs != mine else "is it another variant? box refinement and two-stage add keys, single-scale "
                "has fewer input projections")
        raise CheckpointError(
            f"checkpoint does not fit the model: {len(missing)} missing key(s) {missing[:5]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:5]} ({hint})"
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


# The temporary files of save_checkpoint: ".{target name}.{8 random characters}.tmp", hex digits; the [a-z0-9_] of
# tempfile.mkstemp, which deformable-detr 0.2 used, are matched too, for its leftovers.
_TEMPORARY_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def _create_temporary(path: Path) -> tuple[int, Path]:
    """Creates the temporary file of a save of ``path`` next to it, exclusively, with mode ``0o666``: the kernel
    applies the umask (or the folder's default ACL) as for any new file, with no reading of the umask, which
    ``os.umask`` can only do by setting it (a race with other threads creating files). ``tempfile.mkstemp`` would
    give ``0o600``, which the rename would carry to the checkpoint."""
    for _ in range(100):
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), temporary
        except FileExistsError:
            continue
    raise FileExistsError(f"no unused temporary file name next to {path} after 100 tries")


def _storage_bytes(tensors: Any) -> int:
    """Bytes of the distinct storages of the tensors in ``tensors`` (nested dicts, lists and tuples): what
    ``torch.save`` writes for them (tensors that share a storage, such as tied weights, are written once)."""
    seen: dict[tuple[str, int], int] = {}

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            seen[(str(value.device), storage.data_ptr())] = storage.nbytes()
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    visit(tensors)
    return sum(seen.values())


def _out_of_space(error: BaseException, folder: Path, needed: int) -> int | None:
    """The errno (ENOSPC or EDQUOT) when ``error`` means the disk is full, else None. torch's zip writer reports a
    failed write as ``RuntimeError: ... unexpected pos N vs M`` with the ``OSError`` of the file as its context;
    without that context, the folder's free space (after the partial file is removed) decides."""
    seen, chain = set(), error
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if isinstance(chain, OSError) and chain.errno in (errno.ENOSPC, errno.EDQUOT):
            return chain.errno
        chain = chain.__cause__ or chain.__context__
    if isinstance(error, RuntimeError) and "unexpected pos" in str(error):
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            return None
        return errno.ENOSPC if free < needed else None
    return None


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> None:
    """Writes ``checkpoint`` to ``path`` atomically (temporary file in the same folder, then rename) with the
    permissions of a new file (``0o666`` less the umask).

    Raises :class:`CheckpointSpaceError` when the disk (or the quota) is full; then, as after any failure, the
    temporary file is removed and a previous checkpoint at ``path`` is intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary: Path | None = None
    try:
        handle, temporary = _create_temporary(path)
        with os.fdopen(handle, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        if not isinstance(error, Exception):
            raise
        needed = _storage_bytes(checkpoint)
        code = _out_of_space(error, path.parent, needed)
        if code is None:
            raise
        try:
            free = f", {shutil.disk_usage(path.parent).free / 1e6:.1f} MB free"
        except OSError:
            free = ""
        kept = f"the previous {path.name} is intact" if path.exists() else "no partial file is left"
        raise CheckpointSpaceError(code, f"{os.strerror(code).lower()} writing {path} (the checkpoint needs about "
                                         f"{needed / 1e6:.1f} MB{free}; {kept})") from error


def remove_interrupted_saves(folder: str | Path, min_age_s: float = 60.0) -> list[Path]:
    """Removes the temporary files that saves into ``folder`` left when their process was killed (SIGKILL, the
    out-of-memory killer, a preemption: a partial checkpoint each, ``.NAME.XXXXXXXX.tmp``, as large as a checkpoint)
    and returns their paths, sorted.

    Only regular files named exactly as :func:`save_checkpoint` names them are removed (no symlinks, folders or
    other files), and only those last modified ``min_age_s`` seconds ago or earlier: a save in progress keeps
    writing its file (a checkpoint takes a second or so), so one that another process is writing right now is left
    alone, where removing it would make that save fail. Two processes saving into one folder at once is not
    supported all the same (they overwrite each other's checkpoints); the age only keeps a cleanup from breaking
    such a save. A file of a save killed less than ``min_age_s`` ago stays until a later cleanup. A missing folder
    has nothing to remove.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    now = time.time()
    with os.scandir(folder) as entries:
        for entry in entries:
            if not _TEMPORARY_NAME.fullmatch(entry.name):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
                if not stat.S_ISREG(info.st_mode) or now - info.st_mtime < min_age_s:
                    continue
                os.unlink(entry.path)
            except FileNotFoundError:  # renamed by its save, or removed by someone else, meanwhile
                continue
            removed.append(Path(entry.path))
    return sorted(removed)


# What a checkpoint holds besides the tensors' bytes, measured on torch 2.14: per tensor, its zip record (a local
# header and a central directory entry, and padding to 64 bytes) and its pickle (for the weights also the name and
# the digest); and the configs, categories and optimizer settings.
_BYTES_PER_TENSOR = 400
_BYTES_FIXED = 64 * 1024
# Per parameter an optimizer updates, before its first step has made its state: (moment buffers, whether it keeps a
# step count tensor). Others are counted as Adam, which keeps the most of these.
_OPTIMIZER_STATE = {torch.optim.Adam: (2, True), torch.optim.AdamW: (2, True), torch.optim.SGD: (1, False),
                    torch.optim.RMSprop: (1, True), torch.optim.Adagrad: (1, True)}


def checkpoint_size_estimate(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, ema: bool = False
                             ) -> int:
    """About how many bytes the checkpoint of ``ddetr train`` for ``model`` and ``optimizer`` takes on disk: the
    state_dict's tensors, the optimizer's state (its tensors once it has stepped; before, its moment buffers per
    parameter it updates: 2 for Adam and AdamW, 3 with ``amsgrad``, 1 for SGD with momentum), and the records around
    them. ``ema``: with the EMA weights (``--ema``), a second copy of the state_dict. For a check of the free space
    before training: a save needs this much free besides the previous file, which stays until the new one is
    complete.
    """
    state = model.state_dict()
    total = (_storage_bytes(state) + _BYTES_PER_TENSOR * len(state)) * (2 if ema else 1) + _BYTES_FIXED
    if optimizer is None:
        return total
    if optimizer.state:
        tensors = [value for entry in optimizer.state.values() for value in entry.values()
                   if isinstance(value, torch.Tensor)]
        return total + _storage_bytes(tensors) + _BYTES_PER_TENSOR * len(tensors)
    moments, step = _OPTIMIZER_STATE.get(type(optimizer), (2, True))
    for group in optimizer.param_groups:
        group_moments = moments + (1 if group.get("amsgrad") else 0)
        if isinstance(optimizer, torch.optim.SGD) and not group.get("momentum"):
            group_moments = 0
        for parameter in group["params"]:
            total += group_moments * parameter.nbytes + _BYTES_PER_TENSOR * (group_moments + step)
    return total
