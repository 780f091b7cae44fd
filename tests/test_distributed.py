"""Two gloo processes on the CPU take the same step as one process on the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

HELPER = Path(__file__).parent / "helpers" / "distributed_step.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID")}
    single = tmp_path / "single.pt"
    subprocess.run([sys.executable, str(HELPER), str(single)], env=env, check=True, timeout=300)

    port = str(_free_port())
    distributed = tmp_path / "distributed.pt"
    ranks = [subprocess.Popen([sys.executable, str(HELPER), str(distributed)],
                              env={**env, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                   "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                                   "OMP_NUM_THREADS": "1"})
             for r in range(2)]
    assert [p.wait(timeout=300) for p in ranks] == [0, 0]

    one, two = torch.load(single), torch.load(distributed)
    for key, before in one["before"].items():
        assert torch.equal(before, two["before"][key]), key  # same initial weights
    largest_update = 0.0
    for key, after in one["after"].items():
        difference = (after - two["after"][key]).abs().max()
        assert torch.allclose(after, two["after"][key], rtol=1e-5, atol=1e-6), (key, difference)
        largest_update = max(largest_update, (after - one["before"][key]).abs().max().item())
    assert largest_update > 1e-3  # the step did move the weights


def test_a_stalled_rank_stops_the_others_after_dist_timeout_with_a_message(tmp_path):
    """Rank 1 is frozen (SIGSTOP) mid-training: rank 0 stops within --dist_timeout with a one-line error that says
    it waited for the other rank, instead of hanging for torch's 30-minute default."""
    import signal
    import time

    from helpers.tiny import TINY_MODEL_FLAGS, TINY_RUN_FLAGS, data_flags, user_environment

    from deformable_detr.data import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", num_train=8, num_val=2, image_size=64, seed=0)
    port = str(_free_port())
    command = [sys.executable, "-m", "deformable_detr", "train", *TINY_MODEL_FLAGS, *TINY_RUN_FLAGS, *data_flags(data),
               "--epochs", "100", "--batch_size", "1", "--no_progress", "--print_freq", "1", "--dist_timeout", "10",
               "--output_dir", str(tmp_path / "run")]
    env = user_environment(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    ranks = [subprocess.Popen(command, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        for line in ranks[0].stderr:  # wait until the two ranks train together
            if line.startswith("epoch 0 [2/"):
                break
        os.kill(ranks[1].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        _, err = ranks[0].communicate(timeout=120)
        waited = time.monotonic() - stopped
    finally:
        for process in ranks:
            process.kill()
            process.wait()
    last = err.strip().splitlines()[-1]
    assert ranks[0].returncode == 2, err[-2000:]
    assert last.startswith("ddetr train: rank 0 of 2: the other rank did not answer a collective within "
                           "--dist_timeout 10 s: it stalled or died"), last
    assert 10 <= waited < 60
