"""Checks of computed arrays against reference arrays: the comparison measures and the one-line result that
``ddetr verify`` prints, shared by the model, MSDA and data reference checks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


class ReferenceFileError(ValueError):
    """The file is not a reference file this tool knows, or lacks arrays it needs."""


@dataclass
class Check:
    name: str
    error: float
    tolerance: float
    passed: bool
    measure: str

    def line(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        return f"{status}  {self.name:<78} {self.measure:<9} {self.error:10.3e} <= {self.tolerance:9.3e}"


def max_rel(computed: np.ndarray, reference: np.ndarray) -> float:
    """max|a - b| / max|b| over finite entries; non-finite entries must agree exactly (inf where inf)."""
    computed = np.asarray(computed, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if computed.shape != reference.shape:
        return math.inf
    finite = np.isfinite(reference)
    if not np.array_equal(np.isfinite(computed), finite) or not np.array_equal(computed[~finite], reference[~finite]):
        return math.inf
    if not finite.any():
        return 0.0
    scale = np.abs(reference[finite]).max()
    diff = np.abs(computed[finite] - reference[finite]).max()
    return float(diff / scale) if scale > 0 else float(diff)


def rel_l2(computed: np.ndarray, reference: np.ndarray) -> float:
    reference = np.asarray(reference, dtype=np.float64)
    computed = np.asarray(computed, dtype=np.float64)
    if computed.shape != reference.shape:
        return math.inf
    norm = np.linalg.norm(reference)
    diff = np.linalg.norm(computed - reference)
    return float(diff / norm) if norm > 0 else float(diff)


def exact(computed: np.ndarray, reference: np.ndarray) -> float:
    """0 when equal in shape and value, else 1."""
    computed, reference = np.asarray(computed), np.asarray(reference)
    return 0.0 if computed.shape == reference.shape and np.array_equal(computed, reference) else 1.0


def require(reference: dict[str, np.ndarray], keys: list[str], what: str) -> None:
    missing = [k for k in keys if k not in reference]
    if missing:
        raise ReferenceFileError(f"{what}: missing array(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")
