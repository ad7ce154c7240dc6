"""GPU facts and telemetry: NVML (nvidia-ml-py) when a driver is there, "no GPU" when not.

Owns the small interfaces the rest of the trainer sees: `Device` (what a member trains on, the
CPU included, so the training code is the same minus the device), `DeviceMemory` (a framework's
count of its own process's device memory, the interface each framework's GPU device implements
and tests fake) with `device_memory_probe`, and `Telemetry` (devices, per-process GPU memory,
utilization) with two implementations, `NvmlTelemetry` and `NoGpu`.
`open_telemetry()` picks one; without an NVIDIA driver `pynvml.nvmlInit()` raises an
`NVMLError` (`NVMLError_LibraryNotFound`), which becomes a `NoGpu` that says why. Telemetry is
used by the supervisor (per-member memory) and `cotrain run` (device facts for the local plan).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from cotrain_trainer.caps import MIB


@dataclass(frozen=True)
class Device:
    """The device a member trains on, as its framework sees it; the CPU is one too."""

    kind: str  # "cuda" or "cpu"
    name: str
    total_memory_bytes: int | None = None

    @property
    def is_gpu(self) -> bool:
        return self.kind == "cuda"

    def describe(self) -> str:
        if not self.is_gpu:
            return "cpu"
        total = self.total_memory_bytes
        return f"cuda:0 ({self.name}, {total // MIB} MiB)" if total else f"cuda:0 ({self.name})"


CPU = Device(kind="cpu", name="CPU")


class DeviceMemory(Protocol):
    """A framework's count of this process's memory on its device (PyTorch's caching allocator,
    TensorFlow's BFC allocator): the per-member number the trainer reports, since NVML reports
    host PIDs that a container cannot see, and counts the CUDA context besides."""

    def memory_in_use(self) -> tuple[int, int]:
        """(bytes held now, peak bytes) of this process on the device."""


def _no_device_memory() -> tuple[int, int]:
    return 0, 0


def device_memory_probe(device: DeviceMemory | None) -> Callable[[], tuple[int, int]]:
    """The probe of `device`; on the CPU (None) one that says 0 and 0: a member training on the
    CPU holds no device memory, and says so rather than leaving the fields out."""
    return device.memory_in_use if device is not None else _no_device_memory


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class MigDevice:
    """One MIG instance of a GPU."""

    index: int
    uuid: str
    total_memory_bytes: int


@dataclass(frozen=True)
class GpuDevice:
    """Facts about one physical GPU."""

    index: int
    name: str
    uuid: str
    total_memory_bytes: int
    mig_enabled: bool = False
    mig_devices: tuple[MigDevice, ...] = field(default=())

    def describe(self) -> str:
        mib = self.total_memory_bytes // MIB
        mig = f", MIG with {len(self.mig_devices)} instance(s)" if self.mig_enabled else ""
        return f"GPU {self.index}: {self.name}, {mib} MiB{mig}"


class Telemetry(Protocol):
    """What the trainer asks about GPUs. Every method is cheap enough to call once a second."""

    @property
    def available(self) -> bool:
        """Whether any GPU can be seen."""

    @property
    def reason(self) -> str:
        """Why no GPU can be seen ("" when one can)."""

    def devices(self) -> list[GpuDevice]: ...

    def process_memory(self) -> dict[int, int]:
        """GPU memory used per process id, summed over every device (and MIG instance)."""

    def utilization(self, index: int) -> int | None:
        """Percent of time a kernel ran on GPU `index` lately; None when unknown (e.g. MIG)."""

    def close(self) -> None: ...


class NoGpu:
    """The CPU-only machine: no devices, no per-process GPU memory."""

    def __init__(self, reason: str) -> None:
        self._reason = reason

    @property
    def available(self) -> bool:
        return False

    @property
    def reason(self) -> str:
        return self._reason

    def devices(self) -> list[GpuDevice]:
        return []

    def process_memory(self) -> dict[int, int]:
        return {}

    def utilization(self, index: int) -> int | None:
        return None

    def close(self) -> None:
        return None


class NvmlTelemetry:
    """NVML through nvidia-ml-py. Errors of single queries degrade to "unknown", never raise."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml  # the pynvml module, already initialised
        self._count: int = nvml.nvmlDeviceGetCount()

    @property
    def available(self) -> bool:
        return self._count > 0

    @property
    def reason(self) -> str:
        return "" if self._count else "NVML reports no GPU"

    def _handles(self) -> list[Any]:
        return [self._nvml.nvmlDeviceGetHandleByIndex(i) for i in range(self._count)]

    def _mig_handles(self, handle: Any) -> list[Any]:
        nvml = self._nvml
        try:
            current, _pending = nvml.nvmlDeviceGetMigMode(handle)
        except nvml.NVMLError:  # NotSupported on GPUs without MIG
            return []
        if current != nvml.NVML_DEVICE_MIG_ENABLE:
            return []
        handles = []
        for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
            try:
                handles.append(nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot))
            except nvml.NVMLError:  # NotFound: an empty slot
                continue
        return handles

    def devices(self) -> list[GpuDevice]:
        nvml = self._nvml
        found = []
        for index, handle in enumerate(self._handles()):
            name = nvml.nvmlDeviceGetName(handle)
            uuid = nvml.nvmlDeviceGetUUID(handle)
            migs = self._mig_handles(handle)
            found.append(
                GpuDevice(
                    index=index,
                    name=_text(name),
                    uuid=_text(uuid),
                    total_memory_bytes=int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
                    mig_enabled=bool(migs),
                    mig_devices=tuple(
                        MigDevice(
                            index=i,
                            uuid=_text(nvml.nvmlDeviceGetUUID(mig)),
                            total_memory_bytes=int(nvml.nvmlDeviceGetMemoryInfo(mig).total),
                        )
                        for i, mig in enumerate(migs)
                    ),
                )
            )
        return found

    def process_memory(self) -> dict[int, int]:
        nvml = self._nvml
        used: dict[int, int] = {}
        for handle in self._handles():
            for target in [handle, *self._mig_handles(handle)]:
                try:
                    processes = nvml.nvmlDeviceGetComputeRunningProcesses(target)
                except nvml.NVMLError:
                    continue
                for process in processes:
                    # usedGpuMemory is None where the driver withholds it (e.g. MIG, no privilege)
                    if process.usedGpuMemory is not None:
                        used[process.pid] = used.get(process.pid, 0) + int(process.usedGpuMemory)
        return used

    def utilization(self, index: int) -> int | None:
        nvml = self._nvml
        try:
            return int(nvml.nvmlDeviceGetUtilizationRates(self._handles()[index]).gpu)
        except (nvml.NVMLError, IndexError):
            return None

    def close(self) -> None:
        with contextlib.suppress(self._nvml.NVMLError):
            self._nvml.nvmlShutdown()


def open_telemetry() -> Telemetry:
    """NVML telemetry when an NVIDIA driver answers, else `NoGpu` saying why."""
    try:
        import pynvml
    except ImportError as error:  # nvidia-ml-py is a trainer dependency; be explicit anyway
        return NoGpu(f"nvidia-ml-py is not installed ({error})")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:
        return NoGpu(f"NVML: {error}")
    try:
        return NvmlTelemetry(pynvml)
    except pynvml.NVMLError as error:
        pynvml.nvmlShutdown()
        return NoGpu(f"NVML: {error}")
