"""The torch device a run uses (``auto`` is the fastest one this machine has), and host data sent to it without
waiting."""

from __future__ import annotations

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
