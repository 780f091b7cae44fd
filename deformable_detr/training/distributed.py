"""Process-group set-up (torchrun / env://, SLURM) and the few collective helpers training and evaluation need."""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedInfo:
    """Where this process stands: ``rank`` among ``world_size`` processes, ``local_rank`` on its node."""

    enabled: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _environment_ranks() -> tuple[int, int, int, int] | None:
    """(rank, world_size, local_rank, local_size) from torchrun's variables, else SLURM's, else None."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world_size = int(env["WORLD_SIZE"])
        local_size = int(env.get("LOCAL_WORLD_SIZE", torch.cuda.device_count() or 1))
        return int(env["RANK"]), world_size, int(env.get("LOCAL_RANK", 0)), local_size
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        # As the official init_distributed_mode: one task per GPU, the master address from the node list.
        rank = int(env["SLURM_PROCID"])
        world_size = int(env["SLURM_NTASKS"])
        local_size = int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
        local_rank = int(env.get("SLURM_LOCALID", rank % max(local_size, 1)))
        if "MASTER_ADDR" not in env:
            env["MASTER_ADDR"] = _first_slurm_host(env.get("SLURM_NODELIST", env.get("SLURM_JOB_NODELIST", "")))
        env.setdefault("MASTER_PORT", "29500")
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(rank), str(world_size), str(local_rank)
        return rank, world_size, local_rank, local_size
    return None


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list such as ``gpu[01-04,07],cpu1`` -> ``gpu01`` (no scontrol needed)."""
    if not nodelist:
        raise RuntimeError("SLURM_PROCID is set but SLURM_NODELIST is empty and MASTER_ADDR is not set")
    first = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist.split("]")[0] + "]"
    if "[" in first:
        prefix, ranges = first.split("[", 1)
        return prefix + ranges.rstrip("]").split(",")[0].split("-")[0]
    return first


def init_distributed(dist_url: str = "env://", device: str = "cuda", timeout: float = 600.0) -> DistributedInfo:
    """Joins the process group described by the environment (torchrun, SLURM); a single process otherwise.

    NCCL for CUDA devices, gloo on the CPU. Each process uses the GPU of its ``local_rank``. ``timeout``: seconds a
    collective waits for the other processes before it fails (torch's default is 30 minutes for gloo).
    """
    ranks = _environment_ranks()
    if ranks is None:
        return DistributedInfo()
    rank, world_size, local_rank, local_size = ranks
    if world_size == 1:
        return DistributedInfo(False, 0, 1, 0, 1)
    use_cuda = device.startswith("cuda")
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device} but CUDA is not available on rank {rank}")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method=dist_url, world_size=world_size,
                            rank=rank, timeout=datetime.timedelta(seconds=timeout))
    dist.barrier()
    return DistributedInfo(True, rank, world_size, local_rank, local_size)


# How gloo and NCCL word a peer that stalled (a timeout) or died (a closed connection).
_PEER_FAILURES = ("timed out", "timeout", "connection closed by peer", "connection reset by peer", "broken pipe")


@contextlib.contextmanager
def peer_failures_reported(info: DistributedInfo, timeout: float) -> Iterator[None]:
    """Turns the error of a collective whose peers did not answer (a stalled or dead rank) into a one-line
    :class:`TimeoutError` that says which process waited, for how long, and what to look at."""
    try:
        yield
    except RuntimeError as error:
        message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        if not info.enabled or not any(word in message.lower() for word in _PEER_FAILURES):
            raise
        others = "the other rank" if info.world_size == 2 else f"one of the other {info.world_size - 1} ranks"
        raise TimeoutError(
            f"rank {info.rank} of {info.world_size}: {others} did not answer a collective within --dist_timeout "
            f"{timeout:g} s: it stalled or died (see its log); this rank stopped. ({message})") from error


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def all_gather_objects(data: Any) -> list[Any]:
    """Every process's ``data`` (any picklable object), in rank order."""
    if not is_dist():
        return [data]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, data)
    return gathered


def reduce_dict(values: dict[str, torch.Tensor], average: bool = True) -> dict[str, torch.Tensor]:
    """Sums (or averages) scalar tensors over processes, for logging."""
    if not is_dist() or not values:
        return values
    with torch.no_grad():
        names = sorted(values)
        stacked = torch.stack([values[name].detach().float() for name in names])
        dist.all_reduce(stacked)
        if average:
            stacked /= get_world_size()
        return dict(zip(names, stacked))
