"""No host-device synchronisation in an inference step, and in a training step only the matcher's one read of the
cost matrices (project issue 11).

CI has no GPU, so :class:`SyncRecorder` stands in for ``torch.cuda.set_sync_debug_mode("error")``: it runs a step on
the CPU and records every call that would make the host wait for a CUDA device, with the package line that made
it. Tensors are "host" tensors when they come from a read-back (``.cpu()``) or from host data (``torch.tensor``,
``torch.as_tensor``, numpy); all others stand for device tensors. Recorded:

* a read of a device value: ``.item()`` / ``int()`` / ``bool()`` / ``if tensor`` (``aten::_local_scalar_dense``,
  ``aten::is_nonzero``, ``aten::equal``), ``.tolist()``, ``.cpu()`` / ``.to("cpu")`` (a read-back: "transfer");
* an op whose output size depends on device values: ``nonzero``, ``masked_select``, boolean indexing;
* a host -> device copy that blocks: ``torch.tensor`` / ``torch.as_tensor`` with a ``device``, a host tensor's
  ``.to(device)`` without ``non_blocking=True`` (non-blocking ones are recorded as "upload", which does not wait:
  on CUDA the code pins the memory first), and an op mixing a host tensor (not 0-dim) with device tensors.

On a GPU (when there is one), the same steps run under ``torch.cuda.set_sync_debug_mode("error")`` itself.
"""

from __future__ import annotations

import traceback
import weakref
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from deformable_detr import build_model
from deformable_detr.model.postprocess import decode_detections

aten = torch.ops.aten
PACKAGE = Path(__import__("deformable_detr").__file__).resolve().parent
SMALL = dict(backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64,
             num_queries=10, enc_n_points=2, dec_n_points=2)
VARIANTS = ["deformable_detr", "single_scale", "single_scale_dc5", "box_refine", "two_stage"]

_READS = {aten._local_scalar_dense, aten.is_nonzero, aten.equal}
_DATA_DEPENDENT = {aten.nonzero, aten.masked_select, aten.nonzero_static, aten.unique_consecutive, aten._unique2}
_INDEX = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
# Built from host data when no device is given.
_HOST_FACTORIES = {torch.tensor, torch.as_tensor, torch.from_numpy}


def _where() -> str:
    """path:line (function) of the innermost package frame that made the call."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if PACKAGE in path.parents:
            return f"{path.relative_to(PACKAGE.parent)}:{frame.lineno} ({frame.name})"
    return "outside the package"


class SyncRecorder:
    """``with SyncRecorder() as recorder: ...`` then ``recorder.events``: [(kind, where)] in call order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.host: dict[int, weakref.ref] = {}  # by id: a tensor's == is elementwise
        self._modes = (_FunctionRecorder(self), _DispatchRecorder(self))

    def __enter__(self) -> SyncRecorder:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def is_host(self, tensor: torch.Tensor) -> bool:
        ref = self.host.get(id(tensor))
        return ref is not None and ref() is tensor

    def mark_host(self, outputs) -> None:
        for value in tree_flatten(outputs)[0]:
            if isinstance(value, torch.Tensor):
                self.host[id(value)] = weakref.ref(value)

    def record(self, kind: str) -> None:
        self.events.append((kind, _where()))

    def syncs(self) -> list[tuple[str, str]]:
        return [event for event in self.events if event[0] != "upload"]


class _FunctionRecorder(TorchFunctionMode):
    def __init__(self, recorder: SyncRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        recorder = self.recorder
        this = args[0] if args and isinstance(args[0], torch.Tensor) else None
        host = this is not None and recorder.is_host(this)
        # Where a .cpu / .cuda / .to moves to. Everything runs on the CPU here, so the spelling tells a read-back
        # (.cpu(), .to("cpu")) from a move to the device the model runs on (.to(tensor.device), .to(tensor)).
        target = None
        if func is torch.Tensor.cpu:
            target = "host"
        elif func is torch.Tensor.cuda:
            target = "device"
        elif func is torch.Tensor.to:
            for value in (*args[1:], kwargs.get("device")):
                if isinstance(value, str):
                    target = "host" if value == "cpu" else "device"
                elif isinstance(value, (torch.device, torch.Tensor)):
                    target = "device"
        upload = False
        if this is not None and not host:
            if target == "host":
                recorder.record("transfer")
            elif func is torch.Tensor.tolist:
                recorder.record("tolist")
        elif this is not None and host and target is not None:
            # In this CPU simulation a host tensor moved to the (cpu) device stands for an upload.
            upload = True
            recorder.record("upload" if kwargs.get("non_blocking") else "blocking upload")
        elif func in _HOST_FACTORIES and kwargs.get("device") is not None:
            recorder.record("blocking upload")
        result = func(*args, **kwargs)
        if result is this and (upload or target == "host"):
            # On the CPU a move returns the tensor itself; a real transfer makes a copy, so does the simulation.
            result = result.clone()
        if upload:
            recorder.host.pop(id(result), None)
        elif ((this is not None and not host and target == "host") or func is torch.Tensor.pin_memory
              or (func in _HOST_FACTORIES and kwargs.get("device") is None)):
            recorder.mark_host(result)
        return result


class _DispatchRecorder(TorchDispatchMode):
    def __init__(self, recorder: SyncRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        recorder = self.recorder
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        host = [recorder.is_host(t) for t in tensors]
        packet = func.overloadpacket
        if tensors and all(host):
            result = func(*args, **kwargs)
            recorder.mark_host(result)  # host work on host data
            return result
        if packet in _READS:
            recorder.record(f"read ({packet.__name__})")
        elif packet in _DATA_DEPENDENT:
            recorder.record(f"data-dependent size ({packet.__name__})")
        elif packet in _INDEX and any(t is not None and t.dtype == torch.bool for t in tree_flatten(args[1])[0]):
            recorder.record(f"boolean index ({packet.__name__})")
        elif any(h and t.dim() > 0 for h, t in zip(host, tensors)):
            recorder.record(f"host tensor in a device op ({packet.__name__})")
        return func(*args, **kwargs)


def _model(variant: str, device: str):
    options = {**SMALL, "backbone": "resnet50"} if variant == "single_scale_dc5" else SMALL
    torch.manual_seed(0)
    model, criterion, _ = build_model(variant, num_classes=5, **options)
    return model.to(device), criterion


def _batch(device: str):
    images = torch.randn(2, 3, 64, 80, device=device)
    mask = torch.zeros(2, 64, 80, dtype=torch.bool, device=device)
    mask[1, 40:, :] = True  # the second image is 40 x 80
    targets = [{"labels": torch.tensor([1, 4], device=device),
                "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]], device=device)},
               {"labels": torch.zeros(0, dtype=torch.int64, device=device), "boxes": torch.zeros(0, 4, device=device)}]
    sizes = torch.tensor([[64, 80], [40, 80]], device=device)
    return images, mask, targets, sizes


def _inference_step(model, images, mask, sizes):
    with torch.no_grad():
        outputs = model(images, mask)
        return decode_detections(outputs.pred_logits, outputs.pred_boxes, sizes)


def _training_step(model, criterion, images, mask, targets):
    losses = criterion(model(images, mask), targets)
    criterion.total_loss(losses).backward()
    return losses


@pytest.mark.parametrize("variant", VARIANTS)
def test_inference_step_never_waits_for_the_device(variant):
    model, _ = _model(variant, "cpu")
    model.eval()
    images, mask, _, sizes = _batch("cpu")
    _inference_step(model, images, mask, sizes)  # first call outside: one-time work (kernel compilation, caches)
    with SyncRecorder() as recorder:
        _inference_step(model, images, mask, sizes)
    assert recorder.syncs() == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_step_waits_only_for_the_matcher_transfer(variant):
    model, criterion = _model(variant, "cpu")
    model.train()
    images, mask, targets, _ = _batch("cpu")
    with SyncRecorder() as recorder:
        _training_step(model, criterion, images, mask, targets)
    syncs = recorder.syncs()
    assert [kind for kind, _ in syncs] == ["transfer"], syncs
    assert "host_cost_matrices" in syncs[0][1]
    # Host data goes to the device only through deformable_detr.device.upload (pinned, non-blocking): the level
    # start indices, the offset normalisers, the assignments of all layers (one copy).
    uploads = [where.split(" ")[-1] for kind, where in recorder.events if kind == "upload"]
    assert uploads and set(uploads) == {"(upload)"}, uploads


def test_recorder_sees_the_syncs_it_is_meant_to_see():
    device_tensor = torch.arange(6.0)
    with SyncRecorder() as recorder:
        device_tensor.sum().item()
        bool(device_tensor.max() > 1)
        device_tensor[device_tensor > 2]
        device_tensor.nonzero()
        device_tensor.tolist()
        host = device_tensor.cpu()
        host.sum().item()  # host work on a host copy: free
        torch.tensor([1, 2], device=device_tensor.device)
        device_tensor + torch.tensor([1.0] * 6)  # a host tensor in a device op: an implicit blocking copy
        torch.tensor([0, 1]).to(device_tensor.device, non_blocking=True)
    kinds = [kind for kind, _ in recorder.events]
    assert kinds == ["read (_local_scalar_dense)", "read (_local_scalar_dense)", "boolean index (index)",
                     "data-dependent size (nonzero)", "tolist", "transfer", "blocking upload",
                     "host tensor in a device op (add)", "upload"], kinds


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
def _cuda_steps_under_sync_debug_mode(variant):
    model, criterion = _model(variant, "cuda")
    images, mask, targets, sizes = _batch("cuda")
    model.eval()
    _inference_step(model, images, mask, sizes)  # warm-up: kernel compilation and caches may wait once
    model.train()
    _training_step(model, criterion, images, mask, targets)
    model.zero_grad()
    torch.cuda.synchronize()
    model.eval()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _inference_step(model, images, mask, sizes)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    model.train()
    # The matcher's one read of the cost matrices is the training step's only wait: make it the first thing the
    # host waits for, and require that nothing waits before it.
    transfers = []
    original_cpu = torch.Tensor.cpu

    def cpu(tensor, *args, **kwargs):
        torch.cuda.set_sync_debug_mode("default")
        transfers.append(_where())
        try:
            return original_cpu(tensor, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    torch.Tensor.cpu = cpu
    torch.cuda.set_sync_debug_mode("error")
    try:
        _training_step(model, criterion, images, mask, targets)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.Tensor.cpu = original_cpu
    assert len(transfers) == 1 and "host_cost_matrices" in transfers[0], transfers


# The GPU test exists only where CUDA does (the project runs no skipped tests).
if torch.cuda.is_available():
    test_cuda_steps_under_sync_debug_mode = _cuda_steps_under_sync_debug_mode
