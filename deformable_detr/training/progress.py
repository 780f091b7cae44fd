"""Progress of the training and evaluation loops: a tqdm bar on a terminal, plain log lines anywhere else.

A tqdm bar redraws itself with carriage returns. Written to a file (SLURM, nohup, ``> log``) an epoch's redraws become
one ``\\r``-joined line, and turning the bar off removed every per-iteration figure. So the bar is only drawn where it
can be redrawn (the stream is a terminal and the bar is wanted); everywhere else ``Progress`` writes one complete,
flushed line every ``print_freq`` iterations and at the last one, as the official MetricLogger does::

    epoch 3 [  40/125]  eta 0:01:09  loss 4.123 (avg 4.512)  loss_ce 0.910  loss_bbox 0.350  loss_giou 0.770  \
lr 2.0e-04  1.23 it/s  mem 812 MiB

and, when the loop ends, one summary line (``epoch 3 done: 125 it in 0:01:41 (1.23 it/s)  loss avg 4.512``).
"""

from __future__ import annotations

import datetime
import sys
import time
from types import TracebackType
from typing import TextIO

import torch
from tqdm import tqdm


def peak_memory_mib(device: torch.device) -> float | None:
    """Peak memory in MiB: what the CUDA caching allocator handed out on ``device`` (it excludes the allocator's cache
    and the CUDA context), else the process's peak resident set; None where the platform reports neither."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # Windows has no getrusage
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in bytes on macOS, in KiB on Linux and the BSDs.
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _duration(seconds: float) -> str:
    """``0:01:09``: whole seconds, as the official logs print times."""
    return str(datetime.timedelta(seconds=int(seconds)))


def _speed(iterations: int, seconds: float) -> str:
    """``1.23 it/s``, or ``4.56 s/it`` below one iteration per second (as tqdm), where it/s would read ``0.22``."""
    if seconds <= 0:
        return "? it/s"
    rate = iterations / seconds
    return f"{rate:.2f} it/s" if rate >= 1 else f"{1 / rate:.2f} s/it"


class Progress:
    """Reports the progress of one loop over ``total`` iterations, in one of three modes:

    * bar: a tqdm bar on ``stream`` with the loss (and lr) as postfix, when ``bar`` is true and ``stream.isatty()``;
    * lines: one line every ``print_freq`` iterations and at the last, then a summary line, in every other case;
      ``print_freq=0`` keeps only the summary line;
    * silent: nothing, when ``quiet`` is true (the processes other than the main one in distributed training).

    Use as a context manager around the loop and call :meth:`update` once per iteration, after the step::

        with Progress(f"epoch {epoch}", len(loader), device=device) as progress:
            for batch in loader:
                ...
                progress.update(loss=loss_value, lr=lr, terms={"loss_ce": ...})

    Args:
        description: the prefix of the bar and of each line (``"epoch 3"``, ``"eval"``).
        total: the number of iterations (``len(data_loader)``); None when unknown (no eta then).
        bar: draw a tqdm bar when ``stream`` is a terminal; False writes lines on a terminal too.
        print_freq: iterations between two lines; 0 for no per-iteration line.
        device: where the model runs, for the memory figure (CUDA peak allocation, else the peak resident set).
        stream: where to write; None is ``sys.stderr`` as it is when the loop starts (so that a test's or a caller's
            redirection of ``sys.stderr`` applies).
        quiet: write nothing.
    """

    def __init__(self, description: str, total: int | None, *, bar: bool = True, print_freq: int = 10,
                 device: torch.device | None = None, stream: TextIO | None = None, quiet: bool = False) -> None:
        if print_freq < 0:
            raise ValueError(f"print_freq must be >= 0 (0: no per-iteration line), got {print_freq}")
        if total is not None and total < 0:
            raise ValueError(f"total must be >= 0 or None, got {total}")
        self.description = description
        self.total = total
        self.print_freq = print_freq
        self.device = device if device is not None else torch.device("cpu")
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.iterations = 0
        self._loss_sum = 0.0
        self._start = time.perf_counter()
        self._bar: tqdm | None = None
        if not quiet and bar and _isatty(self.stream):
            self._bar = tqdm(total=total, desc=description, file=self.stream, dynamic_ncols=True, leave=True)

    @property
    def mode(self) -> str:
        """``"bar"``, ``"lines"`` or ``"silent"``."""
        return "silent" if self.quiet else "bar" if self._bar is not None else "lines"

    def update(self, loss: float, lr: float | None = None, terms: dict[str, float] | None = None) -> None:
        """Counts one iteration whose total loss is ``loss``; ``lr`` and the loss ``terms`` (name -> value, printed in
        this order) go into the line. In line mode, writes the line when the iteration is a multiple of
        ``print_freq`` or the last one."""
        self.iterations += 1
        self._loss_sum += loss
        if self._bar is not None:
            postfix = {"loss": f"{loss:.3f}"}
            if lr is not None:
                postfix["lr"] = f"{lr:.1e}"
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(1)
            return
        if self.quiet or self.print_freq == 0:
            return
        if self.iterations % self.print_freq == 0 or self.iterations == self.total:
            self._write(self._line(loss, lr, terms or {}))

    def _line(self, loss: float, lr: float | None, terms: dict[str, float]) -> str:
        elapsed = time.perf_counter() - self._start
        if self.total is not None:
            counter = f"[{self.iterations:>{len(str(self.total))}}/{self.total}]"
            eta = elapsed / self.iterations * (self.total - self.iterations)
            fields = [f"{self.description} {counter}", f"eta {_duration(eta)}"]
        else:
            fields = [f"{self.description} [{self.iterations}]"]
        fields.append(f"loss {loss:.3f} (avg {self._loss_sum / self.iterations:.3f})")
        fields.extend(f"{name} {value:.3f}" for name, value in terms.items())
        if lr is not None:
            fields.append(f"lr {lr:.1e}")
        fields.append(_speed(self.iterations, elapsed))
        memory = peak_memory_mib(self.device)
        if memory is not None:
            fields.append(f"mem {memory:.0f} MiB")
        return "  ".join(fields)

    def _write(self, line: str) -> None:
        # Flushed at once: a redirected stderr may be block-buffered, and a log that lags behind the run is no log.
        self.stream.write(line + "\n")
        self.stream.flush()

    def close(self, completed: bool = True) -> None:
        """Ends the bar, or writes the summary line in line mode when the loop ``completed`` (not after an error)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            return
        if self.quiet or not completed or self.iterations == 0:
            return
        elapsed = time.perf_counter() - self._start
        self._write(f"{self.description} done: {self.iterations} it in {_duration(elapsed)} "
                    f"({_speed(self.iterations, elapsed)})  loss avg {self._loss_sum / self.iterations:.3f}")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close(completed=exc_type is None)


def _isatty(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal; streams without ``isatty`` (or closed ones) are not."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
