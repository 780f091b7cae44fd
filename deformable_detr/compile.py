"""``--compile`` / ``Detector(..., compile=True)``: ``torch.compile`` of the model, with the cost of its first call
reported once.

Only the model is compiled: the criterion and the Hungarian matcher do host work (scipy) that would split the graph.
torch.compile compiles at the first call, so that call's time is what compiling costs; a call with a new input size
may compile again (after the first such call, dynamic sizes), which is not reported.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def compile_model(model: nn.Module, report: Callable[[str], None] = _to_stderr, name: str = "model",
                  backend: str = "inductor") -> nn.Module:
    """``torch.compile(model, backend=backend)``: a module that shares ``model``'s parameters and buffers and calls
    its compiled forward; after its first call, ``report("<name> compiled in X s ...")`` is called once (default: a
    line on stderr, where the attention kernels announce their compilation too).

    Save and load weights through ``model`` itself: the compiled module's ``state_dict`` names carry the prefix
    ``_orig_mod.``. ``train()`` / ``eval()`` on the compiled module reach ``model``.
    """
    compiled = torch.compile(model, backend=backend)
    started: list[float] = []

    # Hooks of the compiled wrapper run outside the compiled region (those of ``model`` would be traced into it).
    def before(module: nn.Module, args: Any) -> None:
        started.append(time.perf_counter())

    def after(module: nn.Module, args: Any, output: Any) -> None:
        seconds = time.perf_counter() - started[-1]
        before_handle.remove()
        after_handle.remove()
        report(f"{name} compiled in {seconds:.1f} s (torch.compile, the first call; a training step's backward "
               "compiles at its first call too)" if module.training else
               f"{name} compiled in {seconds:.1f} s (torch.compile, the first call)")

    before_handle = compiled.register_forward_pre_hook(before)
    after_handle = compiled.register_forward_hook(after)
    return compiled
