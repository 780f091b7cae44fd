"""The torch device a run uses (``auto`` is the fastest one this machine has), and host data sent to it without
waiting."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import Tensor


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto``: cuda when available, else cpu; any other name or device as given. A CUDA device on a machine
    without one is a ``ValueError`` that says so, rather than torch's error at the first tensor moved there."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device {device!r} is no torch device ({error}); use auto, cpu, cuda or cuda:N") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine (use --device cpu, or auto)")
    return resolved


def upload(host: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device`` without the host waiting: a copy from pageable memory blocks until the device has
    caught up, one from pinned memory is queued on the current stream (PyTorch's pinned-memory cache keeps the
    buffer until the copy is done). On the CPU, the tensor itself."""
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True) -> Iterator[None]:
    """Within the block, torch's ops use their deterministic kernels (``torch.use_deterministic_algorithms``), the
    attention op's triton backward included (it then sums grad_value in a fixed order instead of with atomic adds),
    so that a run on a GPU repeats bit for bit. An op without a deterministic kernel warns, naming itself, rather than
    stopping the run (``warn_only``). The previous settings come back afterwards. ``enabled=False``: nothing changes.
    """
    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark)
    # cuBLAS is deterministic only with a fixed workspace configuration (torch refuses matmuls otherwise); it is read
    # when the first cuBLAS handle is created, so it stays set for the process.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = before[2]
