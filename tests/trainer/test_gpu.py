"""GPU telemetry: the real no-driver path on this machine, NVML facts through a fake, and the
framework memory probes that every member reports."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from cotrain_operator.api.contract import ENV_MEMBER
from cotrain_trainer import gpu
from cotrain_trainer.frameworks import imported_runner
from cotrain_trainer.gpu import NoGpu, NvmlTelemetry, device_memory_probe, open_telemetry
from cotrain_trainer.report import ProgressWriter, read_events
from tests.trainer.builders import PYTHON


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


class FakeDeviceMemory:
    """A framework's count of this process's device memory (`DeviceMemory`)."""

    def memory_in_use(self) -> tuple[int, int]:
        return 3 * 2**30, 5 * 2**30


def test_the_memory_probe_reads_the_device_and_says_zero_on_the_cpu() -> None:
    assert device_memory_probe(FakeDeviceMemory())() == (3 * 2**30, 5 * 2**30)
    assert device_memory_probe(None)() == (0, 0)  # present and 0: no device memory held


def test_each_framework_probe_says_zero_on_this_cpu() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("tensorflow")
    from cotrain_trainer.frameworks import tensorflow as tf_runner
    from cotrain_trainer.frameworks import torch as torch_runner

    if torch_runner.cuda_device() is not None:
        pytest.skip("this machine has a CUDA device")
    assert torch_runner.memory_probe()() == (0, 0)
    assert tf_runner.memory_probe()() == (0, 0)


def test_step_records_carry_the_probe_and_a_failing_probe_stops_nothing(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"

    def broken() -> tuple[int | None, int | None]:
        raise RuntimeError("CUDA driver gone")

    with ProgressWriter(path, interval=0.0) as writer:
        writer.memory_probe = device_memory_probe(FakeDeviceMemory())
        writer.step(1, loss=1.0, samples=4)
        writer.memory_probe = broken
        writer.step(2, loss=1.0, samples=4)
    first, second = read_events(path)
    assert (first.gpu_memory_bytes, first.gpu_memory_peak_bytes) == (3 * 2**30, 5 * 2**30)
    assert (second.step, second.gpu_memory_bytes, second.gpu_memory_peak_bytes) == (2, None, None)


@pytest.mark.parametrize(
    ("framework", "runner"), [("PyTorch", "torch"), ("TensorFlow", "tensorflow")]
)
def test_the_user_api_probes_the_framework_the_program_imported(
    framework: str, runner: str
) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("tensorflow")
    member = json.dumps({"name": "m", "framework": framework})
    found = imported_runner({ENV_MEMBER: member})
    assert found is not None
    assert found.__name__ == f"cotrain_trainer.frameworks.{runner}"  # type: ignore[attr-defined]


def test_the_user_api_probes_nothing_when_no_framework_is_imported(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from cotrain_trainer import report\n"
        "from cotrain_trainer.frameworks import imported_runner\n"
        "assert imported_runner() is None\n"
        "assert report.ImportedFrameworkMemory()() == (None, None)\n"
        "assert 'torch' not in sys.modules and 'tensorflow' not in sys.modules\n"
    )
    result = subprocess.run(
        [PYTHON, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
