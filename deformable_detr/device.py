"""The torch device a run uses: ``auto`` is the fastest one this machine has."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto``: cuda when available, else cpu; any other name or device as given."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
