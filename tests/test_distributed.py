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
