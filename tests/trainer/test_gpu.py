"""GPU telemetry: the real no-driver path on this machine, and NVML facts through a fake."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from cotrain_trainer import gpu
from cotrain_trainer.gpu import NoGpu, NvmlTelemetry, open_telemetry


def test_without_a_driver_telemetry_says_no_gpu_cleanly() -> None:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has an NVIDIA driver")
    telemetry = open_telemetry()
    assert isinstance(telemetry, NoGpu)
    assert not telemetry.available
    assert telemetry.reason.startswith("NVML: ")
    assert telemetry.devices() == []
    assert telemetry.process_memory() == {}
    assert telemetry.utilization(0) is None
    telemetry.close()


class FakeNvml:
    """The slice of pynvml that the telemetry uses: one H100 in MIG mode with two instances,
    one plain A10, and compute processes on each."""

    NVMLError = pynvml.NVMLError
    NVML_DEVICE_MIG_ENABLE = 1

    def __init__(self) -> None:
        self.shutdown = False
        h100 = {"name": b"NVIDIA H100 80GB HBM3", "uuid": "GPU-h100", "total": 80 * 2**30}
        a10 = {"name": "NVIDIA A10", "uuid": "GPU-a10", "total": 24 * 2**30}
        self.devices = [h100, a10]
        self.migs = {
            0: [
                {"uuid": "MIG-1", "total": 10 * 2**30},
                None,
                {"uuid": "MIG-2", "total": 20 * 2**30},
            ]
        }
        self.processes = {
            "GPU-h100": [],
            "MIG-1": [SimpleNamespace(pid=10, usedGpuMemory=2**30)],
            "MIG-2": [SimpleNamespace(pid=11, usedGpuMemory=None)],  # withheld
            "GPU-a10": [
                SimpleNamespace(pid=10, usedGpuMemory=2**29),
                SimpleNamespace(pid=12, usedGpuMemory=3 * 2**30),
            ],
        }

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802 (pynvml names)
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> dict[str, Any]:  # noqa: N802 (pynvml names)
        return {"index": index, **self.devices[index]}

    def nvmlDeviceGetName(self, handle: dict[str, Any]) -> Any:  # noqa: N802 (pynvml names)
        return handle["name"]

    def nvmlDeviceGetUUID(self, handle: dict[str, Any]) -> str:  # noqa: N802 (pynvml names)
        return str(handle["uuid"])

    def nvmlDeviceGetMemoryInfo(self, handle: dict[str, Any]) -> Any:  # noqa: N802 (pynvml names)
        return SimpleNamespace(total=handle["total"])

    def nvmlDeviceGetMigMode(self, handle: dict[str, Any]) -> tuple[int, int]:  # noqa: N802 (pynvml names)
        if handle.get("index") not in self.migs:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return 1, 1

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: dict[str, Any]) -> int:  # noqa: N802 (pynvml names)
        return len(self.migs[handle["index"]])

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: dict[str, Any], slot: int) -> Any:  # noqa: N802 (pynvml names)
        mig = self.migs[handle["index"]][slot]
        if mig is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return mig

    def nvmlDeviceGetComputeRunningProcesses(self, handle: dict[str, Any]) -> list[Any]:  # noqa: N802 (pynvml names)
        return list(self.processes[handle["uuid"]])

    def nvmlDeviceGetUtilizationRates(self, handle: dict[str, Any]) -> Any:  # noqa: N802 (pynvml names)
        if handle.get("index") in self.migs:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return SimpleNamespace(gpu=37)

    def nvmlShutdown(self) -> None:  # noqa: N802 (pynvml names)
        self.shutdown = True


def test_nvml_device_facts_mig_and_per_process_memory() -> None:
    nvml = FakeNvml()
    telemetry = NvmlTelemetry(nvml)
    assert telemetry.available
    assert telemetry.reason == ""
    h100, a10 = telemetry.devices()
    assert (h100.name, h100.total_memory_bytes, h100.mig_enabled) == (
        "NVIDIA H100 80GB HBM3",
        80 * 2**30,
        True,
    )
    assert [m.uuid for m in h100.mig_devices] == ["MIG-1", "MIG-2"]
    assert h100.describe() == "GPU 0: NVIDIA H100 80GB HBM3, 81920 MiB, MIG with 2 instance(s)"
    assert not a10.mig_enabled
    assert a10.mig_devices == ()
    assert telemetry.process_memory() == {10: 2**30 + 2**29, 12: 3 * 2**30}
    assert telemetry.utilization(0) is None  # not reported under MIG
    assert telemetry.utilization(1) == 37
    assert telemetry.utilization(5) is None
    telemetry.close()
    assert nvml.shutdown


def test_open_telemetry_uses_nvml_when_it_initialises(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml()
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    for name in ("nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex", "nvmlShutdown"):
        monkeypatch.setattr(pynvml, name, getattr(fake, name))
    telemetry = open_telemetry()
    assert isinstance(telemetry, gpu.NvmlTelemetry)
    assert telemetry.available
