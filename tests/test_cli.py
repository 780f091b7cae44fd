"""``ddetr`` as a user runs it: help without torch, one spelling rule, one-line errors with exit code 2,
suggestions for misspelled flags; ``ddetr verify`` in a separate process, its exit codes and saved arrays."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np
import pytest

from deformable_detr.cli import build_parser, main, normalise_flags

SUBCOMMANDS = ["demo", "train", "eval", "predict", "verify", "make-synthetic", "plot", "export onnx"]


def _ddetr(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deformable_detr", *args], capture_output=True, text=True,
                          timeout=600, **kwargs)


def test_help_imports_no_torch():
    # What makes `ddetr --help` fast: the parser is built from the configs alone.
    code = ("import sys\nfrom deformable_detr.cli import main\n"
            f"for command in {[c.split() for c in [''] + SUBCOMMANDS]!r}:\n"
            "    try:\n        main([*command, '--help'])\n    except SystemExit as exit:\n"
            "        assert exit.code == 0, command\n"
            "heavy = sorted(m for m in ('torch', 'numpy', 'matplotlib', 'pycocotools') if m in sys.modules)\n"
            "assert not heavy, heavy\nprint('light')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("light"), result.stderr[-2000:]


def test_version_and_help_show_defaults_and_choices():
    from deformable_detr import __version__

    result = _ddetr("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"deformable-detr {__version__}"
    train_help = _ddetr("train", "--help").stdout
    assert "--lr LR" in train_help and "(default: 0.0002)" in train_help
    assert "{resnet18,resnet34,resnet50,resnet101}" in train_help and "--no_aux_loss" in train_help
    eval_help = _ddetr("eval", "--help").stdout
    # eval has its own short list: data, run and backend settings, no training recipe.
    assert "--val_json" in eval_help and "--msda_backend" in eval_help
    assert "--lr " not in eval_help and "--epochs" not in eval_help and "--enc_layers" not in eval_help


def _option_strings(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every long flag of every subcommand -> its parser."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update({f"{name} {k}": v for k, v in _option_strings(sub).items()})
        else:
            found.update({option: parser for option in action.option_strings if option.startswith("--")})
    return found


def test_every_flag_of_every_subcommand_also_works_hyphenated():
    flags = _option_strings(build_parser())
    underscored = [f for f in flags if "_" in f.split(" ")[-1]]
    assert len(underscored) > 80
    for key in underscored:
        flag = key.split(" ")[-1]
        assert normalise_flags([flag.replace("_", "-")]) == [flag], flag
    # No flag is spelt with a hyphen (the rule: underscores, hyphens accepted as an alias).
    assert not [f for f in flags if "-" in f.split(" ")[-1][2:]]
    assert normalise_flags(["--score-threshold=0.3", "--", "--keep-me"]) == ["--score_threshold=0.3", "--",
                                                                            "--keep-me"]


def test_the_same_word_works_in_every_subcommand(tmp_path):
    parser = build_parser()
    checkpoint, image = str(tmp_path / "c.pth"), str(tmp_path / "i.png")
    for argv in (["train", "--batch-size", "3"], ["eval", checkpoint, "--batch-size", "3"],
                 ["predict", checkpoint, image, "--out", "o", "--batch-size", "3"]):
        assert parser.parse_args(normalise_flags(argv)).batch_size == 3, argv


def test_a_misspelled_flag_gets_a_suggestion():
    result = _ddetr("train", "--lrr", "1e-3")
    assert result.returncode == 2
    assert "unrecognized argument" in result.stderr and "did you mean --lr?" in result.stderr
    result = _ddetr("predict", "c.pth", "x.png", "--out", "o", "--score-treshold", "0.3")
    assert result.returncode == 2 and "did you mean --score_threshold?" in result.stderr


@pytest.mark.parametrize("argv", [
    ["train", "--coco_path", "/nonexistent/coco", "--device", "cpu"],
    ["train", "--train_images", "x", "--lr", "-1"],
    ["train", "--val_size", "900", "--max_size", "800"],
    ["train", "--batch_size", "0"],
    ["train", "--position_embedding", "learned"],
    ["train", "--eval"],
    ["eval", "/nonexistent/checkpoint.pth"],
    ["predict", "/nonexistent/checkpoint.pth", "a.png", "--out", "OUT"],
    ["export", "onnx", "/nonexistent/checkpoint.pth", "x.onnx"],
    ["verify", "/nonexistent/reference.npz"],
    ["plot", "/nonexistent/run"],
])
def test_user_errors_are_one_line_and_exit_2(argv, tmp_path):
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in argv]
    result = _ddetr(*argv, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr and lines, result.stderr
    assert lines[0].startswith("ddetr "), lines
    assert len(lines) == 1 or "layout" in result.stderr, result.stderr  # the COCO layout is listed on purpose
    assert not (tmp_path / "out").exists()  # nothing written by a failed start


def test_debug_shows_the_traceback(tmp_path):
    result = _ddetr("eval", str(tmp_path / "absent.pth"), "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr and "CheckpointError" in result.stderr


def test_verify_passes_and_saves_under_the_reference_names(reference_path, tmp_path):
    out = tmp_path / "computed.npz"
    result = _ddetr("verify", str(reference_path / "msda_core.npz"), "--save", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS  msda.grad_sampling_locations" in result.stdout
    assert "all checks passed" in result.stdout
    saved = np.load(out)
    reference = np.load(reference_path / "msda_core.npz")
    assert set(saved.files) == {"msda.output", "msda.grad_value", "msda.grad_sampling_locations",
                                "msda.grad_attention_weights"}
    np.testing.assert_allclose(saved["msda.output"], reference["msda.output"], rtol=1e-12, atol=1e-14)


def test_verify_fails_on_a_wrong_reference(reference_path, tmp_path):
    reference = dict(np.load(reference_path / "msda_core.npz"))
    reference["msda.output"] = reference["msda.output"] * 1.001
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, **reference)
    result = _ddetr("verify", str(wrong), "--failures-only")
    assert result.returncode == 1
    assert "FAIL  msda.output" in result.stdout and "SOME CHECKS FAILED" in result.stdout


def test_verify_rejects_a_file_that_is_not_a_reference(tmp_path):
    other = tmp_path / "other.npz"
    np.savez(other, weights=np.zeros(3))
    result = _ddetr("verify", str(other))
    assert result.returncode == 2
    assert "not a reference file" in result.stderr and "meta.variant" in result.stderr
    not_npz = tmp_path / "notes.npz"
    not_npz.write_text("hello")
    result = _ddetr("verify", str(not_npz))
    assert result.returncode == 2 and "not a numpy .npz archive" in result.stderr


def test_verify_checks_the_detr_files_of_a_folder(reference_path, tmp_path):
    folder = tmp_path / "refs"
    folder.mkdir()
    for name in ("detr.npz", "msda_core.npz"):
        (folder / name).symlink_to(reference_path / name)
    result = _ddetr("verify", str(folder), "--backend", "reference")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SKIP" not in result.stdout and "msda_core.npz: 4 passed" in result.stdout
    assert "detr.npz: 353 passed, 0 failed" in result.stdout


def test_verify_with_a_backend_that_cannot_run_says_why(reference_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "deformable_detr", "verify", str(reference_path / "msda_core.npz"),
                             "--backend", "triton", "--device", "cpu"], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 2
    assert "backend 'triton' cannot run here: it runs on CUDA tensors" in result.stderr


def test_main_returns_the_exit_code_in_process(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "absent")]) == 2
    assert "no such file" in capsys.readouterr().err
