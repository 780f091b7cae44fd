"""Multi-scale deformable attention (MSDA), one public call with per-device backends.

``ms_deform_attn`` validates its inputs and dispatches to a backend:

* ``reference``: pure PyTorch (``reference.py``), any device and float dtype, twice differentiable. It is the
  specification the faster backends are tested against.
* ``cpu``: Numba kernels (``cpu.py``, needs ``numba``; compiled at first use and cached on disk). float32 and float64
  run natively; any other floating dtype (float16, bfloat16) is cast to float32 for the op and the output cast back
  to it (the casts are ordinary autograd ops, so the gradients come back in the input dtypes).
* ``triton``: Triton kernels (``triton_kernels.py``, needs ``triton``) for CUDA tensors; on CPU tensors only when
  ``TRITON_INTERPRET=1`` (Triton's interpreter: slow, it is how CI tests the kernels without a GPU).

``backend="auto"`` picks ``triton`` for CUDA tensors when triton is installed, ``cpu`` for CPU tensors when numba is
installed, and ``reference`` otherwise (other devices, or the package missing). A backend asked for by name that
cannot run raises ``RuntimeError`` saying why; there is no silent fallback. ``available_backends(device)`` lists
what can run.

torch integration: the fast backends are ``torch.library`` custom ops (``deformable_detr::ms_deform_attn_cpu`` and
``deformable_detr::ms_deform_attn_triton``, each with a ``..._backward`` op), with ``register_autograd`` and
``register_fake``, so ``torch.compile(fullgraph=True)`` traces them as single graph nodes without a graph break.
Spatial shapes travel as a flat ``int[]`` (H_0, W_0, H_1, W_1, ...); the triton op builds the (L, 2) shape and level
start tensors on the device from pinned memory with a non-blocking copy, cached per (shapes, device), so no call
waits for the device. The custom ops' backward is not itself differentiable (no double backward; use
``reference`` for that). The caller's ``level_start_index`` is checked for shape only; every backend derives the
level starts from ``spatial_shapes``, so they cannot disagree with it.

Precision policy: ``value`` is read in its own dtype and the sampling locations and attention weights in float32
(or float64), never in half precision: a bfloat16 location has 8 significant bits, half a pixel on a 134-pixel-wide
map. Every backend accumulates in float32 (float64 for float64) and returns ``value``'s dtype.

* Under autocast (enabled for ``value``'s device type, with a float16 / bfloat16 autocast dtype): a float32 or half
  ``value`` is cast to the autocast dtype (in the model it already is: ``value_proj`` runs under autocast), half
  locations and weights are cast to float32, the op runs with autocast off, and the output is in the autocast dtype.
  The largest memory stream, the gathered value features, is then half the bytes; ``triton`` reads it as it is,
  ``cpu`` and ``reference`` compute on a float32 copy (the Numba kernels and ``grid_sample`` want one dtype).
* Without autocast, a float16 / bfloat16 ``value`` is handled the same way (half locations and weights up-cast).
* float32 and float64 inputs are left as they are (autocast never down-casts float64); then the three must agree.
The casts are ordinary autograd ops, so each gradient comes back in its input's dtype.

Determinism: ``reference`` and ``cpu`` give the same bits on every run on the CPU. ``triton`` accumulates grad_value
with atomic adds, whose order varies on a GPU; under ``torch.use_deterministic_algorithms(True)`` (``ddetr train
--deterministic``) it sums in a fixed order instead (see ``triton_kernels.py``). On CUDA, ``reference``'s
``grid_sample`` backward has no deterministic kernel, and torch reports that itself.
"""

from __future__ import annotations

import importlib
import os

import torch
from torch import Tensor

from deformable_detr.ops.reference import ms_deform_attn_reference


class BackendUnavailableError(RuntimeError):
    """An MSDA backend asked for by name cannot run on these inputs (wrong device, package missing)."""


BACKENDS = ("reference", "cpu", "triton")
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _check_inputs(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]] | Tensor,
    level_start_index: Tensor | None,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> list[tuple[int, int]]:
    """Checks ranks, sizes and dtypes; returns ``spatial_shapes`` as a list of Python (H, W) pairs."""
    if isinstance(spatial_shapes, Tensor):
        # A tensor costs one device->host copy here; callers that care pass a list.
        spatial_shapes = [tuple(int(s) for s in hw) for hw in spatial_shapes.tolist()]
    shapes = [tuple(hw) for hw in spatial_shapes]
    if not shapes or any(len(hw) != 2 or hw[0] < 1 or hw[1] < 1 for hw in shapes):
        raise ValueError(f"spatial_shapes must be a non-empty list of positive (H, W) pairs, got {spatial_shapes}")
    if value.dim() != 4:
        raise ValueError(
            f"value must have shape (batch, sum(H_l * W_l), num_heads, head_dim), got {tuple(value.shape)}"
        )
    if not value.is_floating_point():
        raise ValueError(f"value must be a floating-point tensor, got {value.dtype}")
    batch, num_values, num_heads, _ = value.shape
    expected_values = sum(h * w for h, w in shapes)
    if num_values != expected_values:
        raise ValueError(
            f"value has {num_values} positions on dim 1 but spatial_shapes {shapes} sum to {expected_values}"
        )
    num_levels = len(shapes)
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            "sampling_locations must have shape (batch, num_queries, num_heads, num_levels, num_points, 2), "
            f"got {tuple(sampling_locations.shape)}"
        )
    if sampling_locations.shape[0] != batch or sampling_locations.shape[2] != num_heads:
        raise ValueError(
            f"sampling_locations {tuple(sampling_locations.shape)} does not match value {tuple(value.shape)} "
            "in batch (dim 0) or num_heads (dim 2)"
        )
    if sampling_locations.shape[3] != num_levels:
        raise ValueError(
            f"sampling_locations has {sampling_locations.shape[3]} levels on dim 3, spatial_shapes has {num_levels}"
        )
    expected_weights = tuple(sampling_locations.shape[:5])
    if tuple(attention_weights.shape) != expected_weights:
        raise ValueError(
            "attention_weights must have shape (batch, num_queries, num_heads, num_levels, num_points) = "
            f"{expected_weights}, got {tuple(attention_weights.shape)}"
        )
    for name, tensor in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if tensor.dtype != value.dtype and not (value.dtype in _HALF_DTYPES and tensor.dtype == torch.float32):
            raise ValueError(f"{name} has dtype {tensor.dtype}, value has {value.dtype}; they must agree (or be "
                             "float32 with a float16 / bfloat16 value)")
        if tensor.device != value.device:
            raise ValueError(f"{name} is on {tensor.device}, value on {value.device}; they must agree")
    if level_start_index is not None and level_start_index.shape != (num_levels,):
        raise ValueError(f"level_start_index must have shape ({num_levels},), got {tuple(level_start_index.shape)}")
    return shapes


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]] | Tensor,
    level_start_index: Tensor | None,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    backend: str = "auto",
) -> Tensor:
    """Multi-scale deformable attention (Zhu et al. 2020, eq. 3).

    Args:
        value: (batch, sum(H_l * W_l), num_heads, head_dim).
        spatial_shapes: (num_levels, 2) as a list of (H_l, W_l) ints (preferred: no device sync) or an int64 tensor.
        level_start_index: (num_levels,) start of each level on dim 1 of ``value``; only checked here (every backend
            derives it from ``spatial_shapes``), kept so that callers of the official signature work unchanged.
        sampling_locations: (batch, num_queries, num_heads, num_levels, num_points, 2), (x, y) in [0, 1] on the
            map (points outside read zeros).
        attention_weights: (batch, num_queries, num_heads, num_levels, num_points).
        backend: ``"auto"`` or one of ``BACKENDS`` (see the module docstring).

    Returns:
        (batch, num_queries, num_heads * head_dim), dtype of ``value`` (under autocast: the autocast dtype).
    """
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"unknown MSDA backend {backend!r}; valid: 'auto', " + ", ".join(map(repr, BACKENDS)))
    device_type = value.device.type
    if _autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        half = torch.get_autocast_dtype(device_type)
        if half in _HALF_DTYPES and value.dtype in (torch.float32, *_HALF_DTYPES):
            value = value.to(half)
        with torch.autocast(device_type, enabled=False):
            return ms_deform_attn(
                value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend=backend
            )
    if value.dtype in _HALF_DTYPES:
        # Locations and weights in float32 (see the precision policy in the module docstring).
        sampling_locations, attention_weights = sampling_locations.float(), attention_weights.float()
    shapes = _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    chosen = _resolve_backend(backend, value.device)
    if chosen == "triton":  # reads a half value as it is, accumulates in float32
        return torch.ops.deformable_detr.ms_deform_attn_triton(
            value, [size for height_width in shapes for size in height_width], sampling_locations, attention_weights
        )
    # grid_sample and the Numba kernels (float32 / float64 only) want one dtype: a half value goes through float32.
    compute = value.float() if value.dtype in _HALF_DTYPES else value
    if chosen == "reference":
        output = ms_deform_attn_reference(compute, shapes, sampling_locations, attention_weights)
    else:
        output = torch.ops.deformable_detr.ms_deform_attn_cpu(
            compute, [size for height_width in shapes for size in height_width], sampling_locations, attention_weights
        )
    return output.to(value.dtype)


def available_backends(device: torch.device | str = "cpu") -> tuple[str, ...]:
    """The backends of ``BACKENDS`` that can run on tensors of ``device`` in this process."""
    device = torch.device(device)
    return tuple(name for name in BACKENDS if _why_unavailable(name, device) is None)


def _resolve_backend(backend: str, device: torch.device) -> str:
    """The backend to run: ``backend`` itself if it can run on ``device`` (else RuntimeError), or auto's choice."""
    if backend == "auto":
        fast = {"cuda": "triton", "cpu": "cpu"}.get(device.type)
        return fast if fast is not None and _why_unavailable(fast, device) is None else "reference"
    reason = _why_unavailable(backend, device)
    if reason is not None:
        raise BackendUnavailableError(f"MSDA backend {backend!r} cannot run here: {reason}")
    return backend


def _why_unavailable(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on tensors of ``device``, or None when it can."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"it runs on CPU tensors and value is on {device} (use 'triton' or 'reference')"
        return _import_problem("numba")
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return (
                "it runs on CUDA tensors and value is on cpu (set TRITON_INTERPRET=1 before triton is imported to "
                "run the kernels in Triton's interpreter on CPU)"
            )
    elif device.type != "cuda":
        return f"it runs on CUDA tensors and value is on {device}"
    return _import_problem("triton")


_IMPORT_PROBLEMS: dict[str, str | None] = {}


@torch.compiler.assume_constant_result
def _import_problem(module: str) -> str | None:
    """None if ``module`` imports, else why not. Cached: a failed import is not retried in this process.

    (``assume_constant_result``: under torch.compile the check runs once at trace time instead of being traced.)
    """
    if module not in _IMPORT_PROBLEMS:
        try:
            importlib.import_module(module)
        except ImportError as error:
            _IMPORT_PROBLEMS[module] = f"{module} cannot be imported ({error}); install it with pip install {module}"
        else:
            _IMPORT_PROBLEMS[module] = None
    return _IMPORT_PROBLEMS[module]


@torch.compiler.assume_constant_result
def _autocast_available(device_type: str) -> bool:
    """``torch.amp.is_autocast_available``, constant for a device type. torch.compile of torch 2.11 cannot trace it
    (seen on an H200: a graph break, an error under ``fullgraph=True``); 2.14 can."""
    return torch.amp.is_autocast_available(device_type)


def _pairs(flat_shapes: list[int]) -> list[tuple[int, int]]:
    """[H_0, W_0, H_1, W_1, ...] -> [(H_0, W_0), (H_1, W_1), ...]."""
    return list(zip(flat_shapes[0::2], flat_shapes[1::2]))


def _output_like(value: Tensor, sampling_locations: Tensor) -> Tensor:
    """An empty (batch, num_queries, num_heads * head_dim) tensor: the fake (meta) result of the forward ops."""
    batch, _, num_heads, head_dim = value.shape
    return value.new_empty(batch, sampling_locations.shape[1], num_heads * head_dim)


def _gradients_like(value: Tensor, sampling_locations: Tensor, attention_weights: Tensor) -> tuple[Tensor, ...]:
    """Empty contiguous tensors shaped like the three differentiable inputs: the fake result of the backward ops."""
    return tuple(tensor.new_empty(tensor.shape) for tensor in (value, sampling_locations, attention_weights))


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    value, flat_shapes, sampling_locations, attention_weights = inputs
    ctx.save_for_backward(value, sampling_locations, attention_weights)
    ctx.flat_shapes = flat_shapes


# --- cpu backend: Numba kernels, imported at the first call ---


@torch.library.custom_op("deformable_detr::ms_deform_attn_cpu", mutates_args=(), device_types="cpu")
def _ms_deform_attn_cpu(
    value: Tensor, spatial_shapes: list[int], sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    from deformable_detr.ops import cpu

    return cpu.msda_forward(value, _pairs(spatial_shapes), sampling_locations, attention_weights)


@torch.library.custom_op("deformable_detr::ms_deform_attn_cpu_backward", mutates_args=(), device_types="cpu")
def _ms_deform_attn_cpu_backward(
    grad_output: Tensor, value: Tensor, spatial_shapes: list[int], sampling_locations: Tensor,
    attention_weights: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    from deformable_detr.ops import cpu

    return cpu.msda_backward(grad_output, value, _pairs(spatial_shapes), sampling_locations, attention_weights)


def _backward_cpu(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
    value, sampling_locations, attention_weights = ctx.saved_tensors
    grads = _ms_deform_attn_cpu_backward(grad_output, value, ctx.flat_shapes, sampling_locations, attention_weights)
    return grads[0], None, grads[1], grads[2]


_ms_deform_attn_cpu.register_fake(lambda value, shapes, locations, weights: _output_like(value, locations))
_ms_deform_attn_cpu_backward.register_fake(
    lambda grad_output, value, shapes, locations, weights: _gradients_like(value, locations, weights)
)
_ms_deform_attn_cpu.register_autograd(_backward_cpu, setup_context=_setup_context)


# --- triton backend: CUDA, or CPU under TRITON_INTERPRET=1; triton_kernels is imported at the first call ---

_SHAPE_TENSORS: dict[tuple[tuple[int, ...], torch.device], tuple[Tensor, Tensor]] = {}
_SHAPE_TENSORS_MAX = 64  # distinct (shapes, device) pairs kept; multi-scale training sees a few dozen shapes


def _shape_tensors(flat_shapes: list[int], device: torch.device) -> tuple[Tensor, Tensor]:
    """(spatial_shapes (L, 2), level_start_index (L,)) int64 on ``device``, without the host waiting for it."""
    key = (tuple(flat_shapes), device)
    cached = _SHAPE_TENSORS.get(key)
    if cached is None:
        shapes = torch.tensor(flat_shapes, dtype=torch.long).view(-1, 2)
        starts = torch.zeros(len(shapes), dtype=torch.long)
        starts[1:] = (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]
        if device.type == "cuda":
            # From pinned memory a non-blocking copy is queued on the current stream and the host goes on; kernels
            # queued after it on that stream see the data.
            shapes, starts = (tensor.pin_memory().to(device, non_blocking=True) for tensor in (shapes, starts))
        else:
            shapes, starts = shapes.to(device), starts.to(device)
        if len(_SHAPE_TENSORS) >= _SHAPE_TENSORS_MAX:
            _SHAPE_TENSORS.clear()
        cached = _SHAPE_TENSORS[key] = (shapes, starts)
    return cached


@torch.library.custom_op("deformable_detr::ms_deform_attn_triton", mutates_args=())
def _ms_deform_attn_triton(
    value: Tensor, spatial_shapes: list[int], sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    from deformable_detr.ops import triton_kernels

    shapes, starts = _shape_tensors(spatial_shapes, value.device)
    return triton_kernels.msda_forward(value, shapes, starts, sampling_locations, attention_weights)


@torch.library.custom_op("deformable_detr::ms_deform_attn_triton_backward", mutates_args=())
def _ms_deform_attn_triton_backward(
    grad_output: Tensor, value: Tensor, spatial_shapes: list[int], sampling_locations: Tensor,
    attention_weights: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    from deformable_detr.ops import triton_kernels

    shapes, starts = _shape_tensors(spatial_shapes, value.device)
    # torch.use_deterministic_algorithms(True) asks every op for run-to-run identical results: grad_value is then
    # summed in a fixed order instead of with atomic adds (read at run time, so a compiled graph follows it too).
    return triton_kernels.msda_backward(grad_output, value, shapes, starts, sampling_locations, attention_weights,
                                        deterministic=torch.are_deterministic_algorithms_enabled())


def _backward_triton(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
    value, sampling_locations, attention_weights = ctx.saved_tensors
    grads = _ms_deform_attn_triton_backward(
        grad_output, value, ctx.flat_shapes, sampling_locations, attention_weights
    )
    return grads[0], None, grads[1], grads[2]


_ms_deform_attn_triton.register_fake(lambda value, shapes, locations, weights: _output_like(value, locations))
_ms_deform_attn_triton_backward.register_fake(
    lambda grad_output, value, shapes, locations, weights: _gradients_like(value, locations, weights)
)
_ms_deform_attn_triton.register_autograd(_backward_triton, setup_context=_setup_context)


def level_start_index_of(spatial_shapes: list[tuple[int, int]], device: torch.device | None = None) -> Tensor:
    """(num_levels,) int64: offset of each level in the concatenated (sum(H_l * W_l)) axis."""
    starts, total = [], 0
    for height, width in spatial_shapes:
        starts.append(total)
        total += height * width
    return torch.tensor(starts, dtype=torch.long, device=device)


__all__ = ["BACKENDS", "BackendUnavailableError", "available_backends", "level_start_index_of", "ms_deform_attn",
           "ms_deform_attn_reference"]
