"""Faults that lose work or hide it: corrupted weights, unreadable files, saves killed midway, permissions, a full
disk, and the size a checkpoint needs."""

from __future__ import annotations

import errno
import os
import pathlib
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from deformable_detr import build_model
from deformable_detr.checkpoint import (
    DIGEST_KEY,
    CheckpointError,
    CheckpointSpaceError,
    checkpoint_size_estimate,
    load_checkpoint,
    make_checkpoint,
    read_checkpoint,
    remove_interrupted_saves,
    save_checkpoint,
    weights_digest,
)
from deformable_detr.config import DataConfig, RunConfigs, TrainConfig, model_config
from deformable_detr.training.optimizer import build_optimizer

SMALL = dict(backbone="resnet18", hidden_dim=64, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=128,
             num_queries=10)
CONFIGS = RunConfigs(model_config("single_scale", num_classes=5, **SMALL), TrainConfig(), DataConfig(coco_path="c"))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("single_scale", num_classes=5, **SMALL)[0]


def _flip_bytes_of_record(path: Path, suffix: str) -> None:
    """Flips 4 bytes in the middle of the data of the zip record whose name ends with ``suffix``: what a bad disk
    sector or a damaged copy does; the archive itself stays valid (torch does not check the records' CRCs)."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(suffix))
    data = bytearray(path.read_bytes())
    # A local file header: 30 bytes, then the name and the extra field, whose lengths are at offsets 26 and 28.
    name_length = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little")
    extra_length = int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_length + extra_length + info.file_size // 2
    data[start:start + 4] = bytes(b ^ 0xFF for b in data[start:start + 4])
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------------------------- weights digest


def test_flipped_bytes_in_the_weights_are_reported_as_corruption(model, tmp_path):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(path, make_checkpoint(model.state_dict(), CONFIGS, {1: "a"}))
    read_checkpoint(path)  # intact: the digest matches
    _flip_bytes_of_record(path, "/data/0")  # the first tensor pickled: the state_dict's first
    first = next(iter(model.state_dict()))
    silently = torch.load(path, weights_only=True)  # what torch alone does: other weights, no error
    assert not torch.equal(silently["model"][first], model.state_dict()[first])
    message = f"checkpoint {path}: the weights are corrupted: tensor '{first}' differs from the digest saved with them"
    with pytest.raises(CheckpointError, match=f"^{message}") as error:
        read_checkpoint(path)
    assert "flipped bytes" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(CheckpointError, match="the weights are corrupted"):
        load_checkpoint(build_model("single_scale", num_classes=5, **SMALL)[0], path)


def test_checkpoints_without_a_digest_still_load(model, tmp_path):
    official = tmp_path / "r50_deformable_detr-checkpoint.pth"
    torch.save({"model": model.state_dict(), "epoch": 49}, official)  # the official layout: no digest
    assert DIGEST_KEY not in read_checkpoint(official)
    load_checkpoint(build_model("single_scale", num_classes=5, **SMALL)[0], official)
    older = make_checkpoint(model.state_dict(), CONFIGS, {1: "a"})  # format 2 as written before the digest
    del older[DIGEST_KEY]
    save_checkpoint(tmp_path / "older.pth", older)
    assert read_checkpoint(tmp_path / "older.pth")["format_version"] == 2
    ours = tmp_path / "ours.pth"
    save_checkpoint(ours, make_checkpoint(model.state_dict(), CONFIGS, {1: "a"}))
    assert torch.load(ours, weights_only=True)[DIGEST_KEY]["algorithm"] == "sha256"  # plain data


def test_the_digest_covers_dtype_shape_and_values_and_not_the_memory_layout(tmp_path):
    state = {"half": torch.randn(3, 5).bfloat16(), "flag": torch.tensor(True), "count": torch.tensor(7),
             "empty": torch.zeros(0, 4), "transposed": torch.randn(4, 6).t()}
    path = tmp_path / "odd.pth"
    save_checkpoint(path, {"model": state, DIGEST_KEY: weights_digest(state)})
    assert torch.equal(read_checkpoint(path)["model"]["transposed"], state["transposed"])
    digests = weights_digest({"a": torch.zeros(2, 3), "b": torch.zeros(3, 2), "c": torch.zeros(2, 3, dtype=torch.int32),
                              "d": torch.zeros(2, 3).t().contiguous().t()})["tensors"]
    assert len({digests["a"], digests["b"], digests["c"]}) == 3 and digests["d"] == digests["a"]
    altered = {**state, "count": torch.tensor(8)}
    save_checkpoint(path, {"model": altered, DIGEST_KEY: weights_digest(state)})
    with pytest.raises(CheckpointError, match="tensor 'count' differs"):
        read_checkpoint(path)
    save_checkpoint(path, {"model": {"extra": torch.ones(1)}, DIGEST_KEY: weights_digest(state)})
    with pytest.raises(CheckpointError, match=r"5 tensor\(s\) missing .*1 unexpected \['extra'\]"):
        read_checkpoint(path)
    save_checkpoint(path, {"model": state, DIGEST_KEY: weights_digest(state, "blake2b")})  # as a later version may
    assert read_checkpoint(path)[DIGEST_KEY]["algorithm"] == "blake2b"
    save_checkpoint(path, {"model": state, DIGEST_KEY: {"algorithm": "crc7", "tensors": {}}})
    with pytest.raises(CheckpointError, match="its 'model_digest' is unreadable"):
        read_checkpoint(path)


# -------------------------------------------------------------------------------------------- unreadable files


def _forms(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Each unreadable form of a checkpoint: (its path, what its error must say)."""
    good = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.randn(64, 64)}}, good)
    legacy = tmp_path / "legacy.pth"
    torch.save({"model": {"w": torch.randn(64, 64)}}, legacy, _use_new_zipfile_serialization=False)
    noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy()
    contents = {
        "settings.json": (b'{"lr": 0.0002, "epochs": 50}\n', "unreadable, not a PyTorch checkpoint file"),
        "notes.txt": (b"epoch 3: AP 0.41\n", "unreadable, not a PyTorch checkpoint file"),
        "empty.pth": (b"", "unreadable, an empty file"),
        "one_byte.pth": (b"\x80", "unreadable or truncated file, corrupted or not a checkpoint"),
        "garbage_pickle.pth": (b"\x80" + noise.tobytes(), "unreadable or truncated file, corrupted or not a "
                                                           "checkpoint"),
        "garbage_zip.pth": (b"PK\x03\x04" + noise.tobytes(), "unreadable or truncated file, a damaged zip archive"),
        "truncated.pth": (good.read_bytes()[:good.stat().st_size // 2], "unreadable or truncated file, a damaged zip"),
        "truncated_legacy.pth": (legacy.read_bytes()[:legacy.stat().st_size // 2],
                                 "unreadable or truncated file, corrupted or not a checkpoint"),
        "plain_pickle.pth": (pickle.dumps({"model": {}}, protocol=2),
                             "unreadable or truncated file, corrupted or not a checkpoint"),
    }
    forms = {}
    for name, (data, expected) in contents.items():
        (tmp_path / name).write_bytes(data)
        forms[name] = (tmp_path / name, expected)
    other_zip = tmp_path / "images.zip.pth"
    with zipfile.ZipFile(other_zip, "w") as archive:
        archive.writestr("image.jpg", b"\xff\xd8")
    forms["other_zip"] = (other_zip, "unreadable, a zip archive that torch.save did not write")
    (tmp_path / "run").mkdir()
    forms["directory"] = (tmp_path / "run", "a directory, not a file")
    return forms


def test_every_unreadable_form_is_one_line_naming_the_file_and_what_was_expected(tmp_path):
    for name, (path, expected) in _forms(tmp_path).items():
        with pytest.raises(CheckpointError) as error:
            read_checkpoint(path)
        message = str(error.value)
        assert message.startswith(f"checkpoint {path}: {expected}"), (name, message)
        assert "\n" not in message and "trusted=True" not in message, (name, message)
        assert "torch.save" in message, (name, message)  # what was expected


def test_a_directory_holding_a_checkpoint_is_pointed_at_it(model, tmp_path):
    save_checkpoint(tmp_path / "checkpoint.pth", {"model": {"w": torch.ones(1)}})
    with pytest.raises(CheckpointError, match=f"a directory, not a file.*did you mean {tmp_path / 'checkpoint.pth'}"):
        read_checkpoint(tmp_path)


def test_a_python_object_that_safe_loading_refuses_gets_the_trusted_advice(tmp_path):
    path = tmp_path / "with_object.pth"
    torch.save({"model": {"w": torch.ones(2)}, "root": pathlib.PurePosixPath("/data")}, path)
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(path)
    assert str(error.value) == (f"checkpoint {path}: holds Python objects that safe loading refuses (GLOBAL "
                                "pathlib.PurePosixPath); if you trust the file, load it with trusted=True")
    assert read_checkpoint(path, trusted=True)["root"] == pathlib.PurePosixPath("/data")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x80\x02" + bytes(range(200, 256)) * 8)
    with pytest.raises(CheckpointError, match="corrupted or not a checkpoint") as error:
        read_checkpoint(garbage, trusted=True)  # the full unpickler fails on garbage too, differently
    assert "\n" not in str(error.value)


def test_the_commands_report_unreadable_checkpoints_in_one_line(tmp_path, capsys):
    from deformable_detr.cli import main

    forms = _forms(tmp_path)
    for command, name in ((["train", "--resume"], "notes.txt"), (["eval"], "truncated.pth"),
                          (["eval", "--resume"], "directory"), (["train", "--resume"], "one_byte.pth")):
        path, expected = forms[name]
        assert main([*command, str(path)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"ddetr {command[0]}: checkpoint {path}: {expected}"), lines
    # In a process of its own, as a user runs it: no warning of torch's about garbage read as a pickle protocol.
    path, expected = forms["garbage_pickle.pth"]
    result = subprocess.run([sys.executable, "-m", "deformable_detr", "eval", str(path)], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert result.stderr.startswith(f"ddetr eval: checkpoint {path}: {expected}"), result.stderr


# ------------------------------------------------------------------------------------------------ interrupted saves


def test_remove_interrupted_saves_removes_only_what_saves_leave(tmp_path):
    leftovers = [tmp_path / ".checkpoint.pth.0f3a9b2c.tmp", tmp_path / ".checkpoint0004.pth.k2_9xq0a.tmp"]
    kept = [tmp_path / name for name in ("checkpoint.pth", ".checkpoint.pth.tmp", "checkpoint.pth.0f3a9b2c.tmp",
                                         ".checkpoint.pth.0f3a9b2.tmp", ".checkpoint.pth.0F3A9B2C.tmp",
                                         ".checkpoint.pth.0f3a9b2c.tmp.bak", "log.txt")]
    for path in leftovers + kept:
        path.write_bytes(b"partial")
    (tmp_path / ".folder.0f3a9b2c.tmp").mkdir()
    (tmp_path / ".link.pth.0f3a9b2c.tmp").symlink_to(tmp_path / "log.txt")
    hour_ago = time.time() - 3600
    for path in tmp_path.iterdir():
        os.utime(path, (hour_ago, hour_ago), follow_symlinks=False)
    fresh = tmp_path / ".checkpoint.pth.aaaa1111.tmp"
    fresh.write_bytes(b"being written")  # a save that may still be running elsewhere
    assert remove_interrupted_saves(tmp_path) == sorted(leftovers)
    assert all(path.exists() for path in kept) and fresh.exists()
    assert (tmp_path / ".folder.0f3a9b2c.tmp").is_dir() and (tmp_path / ".link.pth.0f3a9b2c.tmp").is_symlink()
    assert remove_interrupted_saves(tmp_path, min_age_s=0) == [fresh]
    assert remove_interrupted_saves(tmp_path / "absent") == []


def test_a_save_killed_midway_leaves_a_temporary_file_that_cleanup_removes(tmp_path):
    """A real SIGKILL while ``save_checkpoint`` writes: the previous checkpoint is intact, the partial temporary file
    stays until :func:`remove_interrupted_saves`."""
    target = tmp_path / "checkpoint.pth"
    script = textwrap.dedent(f"""
        import sys, torch
        from deformable_detr.checkpoint import save_checkpoint
        weights = {{"model": {{f"w{{i}}": torch.full((1024, 1024), float(i)) for i in range(8)}}}}  # 32 MB
        save_checkpoint({str(target)!r}, weights)
        print("saved", flush=True)
        while True:
            save_checkpoint({str(target)!r}, weights)
    """)
    for _ in range(5):  # the kill may land between two saves, with no temporary file: then again
        process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        try:
            assert process.stdout.readline().strip() == "saved"
            deadline = time.monotonic() + 60
            while not list(tmp_path.glob(".checkpoint.pth.*.tmp")) and time.monotonic() < deadline:
                time.sleep(0.001)
            os.kill(process.pid, signal.SIGKILL)
        finally:
            process.kill()
            process.wait(timeout=60)
            process.stdout.close()
        assert process.returncode == -signal.SIGKILL
        leftovers = sorted(tmp_path.glob(".checkpoint.pth.*.tmp"))
        if leftovers:
            break
    assert leftovers, "no save was interrupted in 5 tries"
    assert torch.equal(read_checkpoint(target)["model"]["w7"], torch.full((1024, 1024), 7.0))
    assert remove_interrupted_saves(tmp_path, min_age_s=0) == leftovers
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint.pth"]


# ------------------------------------------------------------------------------------------------------ permissions


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoints_get_the_permissions_of_a_new_file(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        save_checkpoint(tmp_path / "checkpoint.pth", {"model": {"w": torch.ones(1)}})
        save_checkpoint(tmp_path / "run" / "checkpoint.pth", {"model": {"w": torch.ones(1)}})
        save_checkpoint(tmp_path / "checkpoint.pth", {"model": {"w": torch.zeros(1)}})  # over an existing one
    finally:
        os.umask(previous)
    assert (tmp_path / "checkpoint.pth").stat().st_mode & 0o777 == mode
    assert (tmp_path / "run" / "checkpoint.pth").stat().st_mode & 0o777 == mode


# ------------------------------------------------------------------------------------------------------- full disk


def _failing_save(kind: str):
    """A torch.save that writes part of the checkpoint and fails as a full disk makes it fail."""

    def save(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04" + bytes(4096))
        if kind == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        if kind == "edquot":
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        if kind == "zip_writer":  # what torch's zip writer raises when the file's write fails
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662") from None
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662")

    return save


@pytest.mark.parametrize("kind", ["enospc", "zip_writer", "zip_writer_without_context", "edquot"])
def test_a_full_disk_is_one_line_and_the_previous_checkpoint_is_intact(tmp_path, monkeypatch, kind):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}})
    monkeypatch.setattr(torch, "save", _failing_save(kind))
    if kind == "zip_writer_without_context":  # then the free space decides
        monkeypatch.setattr(shutil, "disk_usage", lambda folder: SimpleNamespace(total=10**9, used=10**9, free=1000))
    with pytest.raises(CheckpointSpaceError) as error:
        save_checkpoint(path, {"model": {"w": torch.zeros(250_000)}})
    reason = "disk quota exceeded" if kind == "edquot" else "no space left on device"
    assert str(error.value).startswith(f"{reason} writing {path} (the checkpoint needs about 1.0 MB, ")
    assert str(error.value).endswith("; the previous checkpoint.pth is intact)") and "\n" not in str(error.value)
    assert isinstance(error.value, OSError) and error.value.errno == (errno.EDQUOT if kind == "edquot" else
                                                                      errno.ENOSPC)
    monkeypatch.undo()
    assert sorted(tmp_path.iterdir()) == [path] and torch.equal(read_checkpoint(path)["model"]["w"], torch.ones(3))
    monkeypatch.setattr(torch, "save", _failing_save("enospc"))
    with pytest.raises(CheckpointSpaceError, match=r"; no partial file is left\)$"):
        save_checkpoint(tmp_path / "new.pth", {"model": {"w": torch.zeros(1)}})
    assert sorted(tmp_path.iterdir()) == [path]


def test_other_write_failures_are_not_reported_as_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", _failing_save("zip_writer_without_context"))  # with room to spare
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: SimpleNamespace(total=10**12, used=0, free=10**12))
    with pytest.raises(RuntimeError, match="unexpected pos") as error:
        save_checkpoint(tmp_path / "checkpoint.pth", {"model": {"w": torch.zeros(1)}})
    assert not isinstance(error.value, OSError)

    def broken(obj, file, *args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError) as error:
        save_checkpoint(tmp_path / "checkpoint.pth", {"model": {"w": torch.zeros(1)}})
    assert error.value.errno == errno.EIO and not isinstance(error.value, CheckpointSpaceError)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------- size estimate


@pytest.mark.parametrize("sgd", [False, True])
def test_the_size_estimate_is_within_10_percent_of_the_saved_checkpoint(model, tmp_path, sgd):
    optimizer = build_optimizer(model, sgd=sgd)
    estimate = checkpoint_size_estimate(model, optimizer)  # before the first step: no optimizer state yet
    assert optimizer.state == {}
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter) if parameter.requires_grad else None
    optimizer.step()
    path = tmp_path / "checkpoint.pth"
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 40)
    save_checkpoint(path, make_checkpoint(model.state_dict(), CONFIGS, {1: "a"}, optimizer=optimizer.state_dict(),
                                          lr_scheduler=scheduler.state_dict(), epoch=0))
    size = path.stat().st_size
    assert abs(estimate - size) <= 0.1 * size, (estimate, size)
    assert abs(checkpoint_size_estimate(model, optimizer) - size) <= 0.1 * size  # from the state, after the step
    model_only = tmp_path / "weights.pth"
    save_checkpoint(model_only, {"model": model.state_dict()})
    assert abs(checkpoint_size_estimate(model) - model_only.stat().st_size) <= 0.1 * model_only.stat().st_size
    model.zero_grad(set_to_none=True)
