"""Progress reporting for member programs: `from cotrain_trainer import report`.

Owns the progress-event format in both directions: what a member writes (JSON lines appended to
$COTRAIN_PROGRESS_FILE) and how the supervisor reads it back (`ProgressTail`, `ProgressEvent`).
The built-in models and the PyTorch/Keras hooks in `frameworks/` write through this module too,
so there is one format and one writer.

A user program reports like this::

    from cotrain_trainer import report

    with report.session(total_steps=1000):   # marks completion; a GPU OOM exits as GPUOutOfMemory
        for step in range(1, 1001):
            loss = train_step()
            report.step(step=step, loss=loss, samples=batch_size, total_steps=1000)

`report.step` is cheap to call every step: it writes the first and the last step, and otherwise
one event per 0.2 s or per 1% of `total_steps`, whichever comes first; it converts `loss` with
float() only when it writes, so a framework tensor costs no device sync on the other steps.
`samples` is the number of samples of this call (the batch size); samples/s is measured between
writes, so start-up time never counts. Each step written carries the process's device memory,
now and at its peak (`gpuMemoryBytes`, `gpuMemoryPeakBytes`), as the framework's own allocator
counts it: NVML reports host PIDs that a container cannot see. On the CPU both are 0 (the
member holds no device memory); they are left out only when the program imported no framework.
Outside a CoTrain member ($COTRAIN_PROGRESS_FILE unset) every call is a silent no-op.
`report.session()` also works as a decorator.
`report.apply_caps()` applies the member's thread and GPU-memory caps in a user program (call it
right after importing the framework, before building the model).

This module imports no ML framework; it only looks at frameworks the program already imported.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, SupportsFloat

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from cotrain_operator.api.contract import ENV_PROGRESS_FILE, EXIT_GPU_OOM, REASON_GPU_OOM
from cotrain_trainer.oom import is_gpu_oom_text

PROGRESS_INTERVAL_SECONDS = 0.2
# Besides every 0.2 s, a step event at least every 1/100 of the planned steps, so that a short
# run still draws a loss curve; a long one writes at most 100 more events for it.
CURVE_POINTS = 100

EVENT_STARTED = "started"
EVENT_STEP = "step"
EVENT_EPOCH = "epoch"
EVENT_COMPLETED = "completed"
EVENT_FAILED = "failed"

Loss = SupportsFloat | Callable[[], float]
# (bytes in use now, peak bytes) of this process's GPU memory as its framework sees it; (0, 0)
# on the CPU, (None, None) when there is no framework to ask.
MemoryProbe = Callable[[], tuple[int | None, int | None]]


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


class ProgressWriter:
    """Appends progress events to one file; rate-limits steps. Thread-safe."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        interval: float = PROGRESS_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._file = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115
        self._interval = interval
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._started = False
        self._steps_written = 0
        self._last_write = 0.0
        self._samples = 0
        self.memory_probe: MemoryProbe | None = None
        self.caps: dict[str, Any] = {}  # announced with the "started" event

    @property
    def enabled(self) -> bool:
        return self._file is not None

    def _write(self, event: dict[str, Any]) -> None:
        if self._file is None:
            return
        record = {"event": event.pop("event"), "time": round(self._wall_clock(), 6)}
        record.update((k, v) for k, v in event.items() if v is not None)
        self._file.write(json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n")
        self._file.flush()

    def started(
        self,
        total_steps: int | None = None,
        caps: Mapping[str, Any] | None = None,
        launched: float | None = None,
    ) -> None:
        """A run of the program began (written once per process); ``launched``: when its
        process started (wall clock), if earlier than now."""
        with self._lock:
            if self._started:
                return
            self._started = True
            announced = dict(caps or self.caps)
            event = {
                "event": EVENT_STARTED,
                "totalSteps": total_steps,
                "caps": announced,
                "launched": None if launched is None else round(launched, 6),
            }
            self._write({k: v for k, v in event.items() if v or k == "event"})

    def due(self, step: int, total_steps: int | None = None) -> bool:
        """Whether a step event would be written now: the first, the last, one of the
        CURVE_POINTS evenly spaced steps, or the interval since the previous one has passed."""
        if self._steps_written == 0:
            return True
        stride = max(1, (total_steps or 0) // CURVE_POINTS)
        if total_steps and (step >= total_steps or step % stride == 0):
            return True
        return self._clock() - self._last_write >= self._interval

    def step(
        self,
        step: int,
        loss: Loss | None = None,
        samples: int | None = None,
        total_steps: int | None = None,
        epoch: int | None = None,
    ) -> bool:
        """Count a training step; write it when due. Returns whether it was written."""
        if self._file is None:
            return False
        with self._lock:
            self._samples += samples or 0
            if not self.due(step, total_steps):
                return False
            now = self._clock()
            rate = None
            if self._steps_written and now > self._last_write and self._samples:
                rate = self._samples / (now - self._last_write)
            value = loss() if callable(loss) else (float(loss) if loss is not None else None)
            used, peak = self._device_memory()
            self._write(
                {
                    "event": EVENT_STEP,
                    "step": step,
                    "totalSteps": total_steps,
                    "epoch": epoch,
                    "loss": _finite(value),
                    "samplesPerSecond": _finite(rate),
                    "gpuMemoryBytes": used,
                    "gpuMemoryPeakBytes": peak,
                }
            )
            self._steps_written += 1
            self._last_write = now
            self._samples = 0
            return True

    def _device_memory(self) -> tuple[int | None, int | None]:
        if self.memory_probe is None:
            return None, None
        try:
            return self.memory_probe()
        except Exception:  # a probe that fails must not stop training; the fields stay out
            return None, None

    def epoch(self, epoch: int) -> None:
        """`epoch` passes over the data are complete."""
        with self._lock:
            self._write({"event": EVENT_EPOCH, "epoch": epoch})

    def completed(self) -> None:
        with self._lock:
            self._write({"event": EVENT_COMPLETED})

    def failed(self, reason: str, message: str) -> None:
        with self._lock:
            self._write({"event": EVENT_FAILED, "reason": reason, "message": message[:1024]})

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> ProgressWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_default: ProgressWriter | None = None
_default_lock = threading.Lock()


class ImportedFrameworkMemory:
    """The memory probe of a user program that reports with `report.step` alone: that of the
    framework the program imported (its member's own first), looked up at each write until
    there is one, since the program may import it after its first report. Imports no framework
    of its own; (None, None) while the program has imported none."""

    def __init__(self) -> None:
        self._probe: MemoryProbe | None = None

    def __call__(self) -> tuple[int | None, int | None]:
        if self._probe is None:
            from cotrain_trainer.frameworks import imported_runner

            runner = imported_runner()
            if runner is None:
                return None, None
            self._probe = runner.memory_probe()
        return self._probe()


def writer() -> ProgressWriter:
    """This process's writer, to $COTRAIN_PROGRESS_FILE (a no-op writer when it is unset); it
    reports the device memory of the framework the program imported (`ImportedFrameworkMemory`)
    unless a framework hook sets its own probe."""
    global _default
    with _default_lock:
        if _default is None:
            _default = ProgressWriter(os.environ.get(ENV_PROGRESS_FILE) or None)
            _default.memory_probe = ImportedFrameworkMemory()
        return _default


def step(
    step: int,
    loss: Loss | None = None,
    samples: int | None = None,
    total_steps: int | None = None,
    epoch: int | None = None,
) -> None:
    """Report training step `step` (1-based); see the module docstring."""
    writer().step(step, loss=loss, samples=samples, total_steps=total_steps, epoch=epoch)


def epoch(n: int) -> None:
    """Report that `n` epochs are complete."""
    writer().epoch(n)


def is_gpu_oom(error: BaseException) -> bool:
    """Whether `error` (or what caused it) is a framework's GPU out-of-memory error: by its
    class, or by its text for the ones raised as plain RuntimeErrors (cuBLAS/cuDNN workspace,
    CUDA context; see `oom`)."""
    seen: BaseException | None = error
    for _ in range(8):  # the cause chain of a wrapped error; bounded against cycles
        if seen is None:
            return False
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(seen, torch.OutOfMemoryError):
            return True
        if is_gpu_oom_text(str(seen)):
            return True
        tf = sys.modules.get("tensorflow")
        if tf is not None and isinstance(seen, tf.errors.ResourceExhaustedError):
            # Host-memory exhaustion raises the same class; a GPU allocator names its device.
            text = str(seen)
            if "GPU" in text or "gpu" in text or "CUDA" in text:
                return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextlib.contextmanager
def session(total_steps: int | None = None) -> Iterator[ProgressWriter]:
    """Run a training program's body: marks it started and completed, and turns a framework's
    GPU out-of-memory error into a GPUOutOfMemory event and exit code EXIT_GPU_OOM (75), so the
    supervisor can tell "the cap is too small" from a bug. Other errors propagate unchanged."""
    progress = writer()
    progress.started(total_steps)
    try:
        yield progress
    except Exception as error:
        if not is_gpu_oom(error):
            raise
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        progress.failed(REASON_GPU_OOM, f"{type(error).__name__}: {first_line}")
        traceback.print_exception(error)
        sys.stderr.flush()
        raise SystemExit(EXIT_GPU_OOM) from error
    progress.completed()


def apply_caps() -> dict[str, Any]:
    """Apply this member's thread and GPU-memory caps in the calling program, for the framework
    of its spec (importing it), and return what was applied (announced to the supervisor with
    the run's start). Call it once, right after importing the framework and before
    `session()`. Outside a CoTrain member it does nothing and returns {}."""
    from cotrain_trainer.frameworks import load_member_context

    context = load_member_context()
    if context is None:
        return {}
    caps = context.runner.apply_caps(
        context.budget, context.device_memory_bytes, devices=context.member.gpu.count
    ).as_event()
    writer().caps = caps
    return caps


# --------------------------------------------------------------------------------------------
# reading (the supervisor's side)


class ProgressEvent(BaseModel):
    """One progress event as the supervisor reads it; values are untrusted and checked."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    event: str
    time: float | None = None
    step: int | None = None
    total_steps: int | None = None
    epoch: int | None = None
    loss: float | None = None
    samples_per_second: float | None = None
    gpu_memory_bytes: int | None = None
    gpu_memory_peak_bytes: int | None = None
    reason: str | None = None
    message: str | None = None
    caps: dict[str, Any] | None = None
    launched: float | None = None  # of a started event: when the process began (wall clock)

    @field_validator("loss", "samples_per_second", "time", "launched")
    @classmethod
    def _finite_only(cls, value: float | None) -> float | None:
        return _finite(value)

    @field_validator("step", "total_steps", "epoch", "gpu_memory_bytes", "gpu_memory_peak_bytes")
    @classmethod
    def _not_negative(cls, value: int | None) -> int | None:
        return value if value is None or value >= 0 else None


def parse_event(line: str) -> ProgressEvent | None:
    """The event on one line, or None for a line that is not one."""
    try:
        raw = json.loads(line)
    except ValueError:
        return None
    if not isinstance(raw, dict):
        return None
    try:
        return ProgressEvent.model_validate(raw)
    except ValidationError:
        return None


class ProgressTail:
    """Reads the events appended to a progress file since the last read (like `tail -f`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def read(self) -> list[ProgressEvent]:
        try:
            with self.path.open("rb") as stream:
                stream.seek(self._offset)
                chunk = stream.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()  # an unfinished last line waits for the next read
        events = []
        for line in lines:
            event = parse_event(line.decode("utf-8", errors="replace"))
            if event is not None:
                events.append(event)
        return events


def read_events(path: Path) -> list[ProgressEvent]:
    """Every event in a progress file."""
    return ProgressTail(path).read()
