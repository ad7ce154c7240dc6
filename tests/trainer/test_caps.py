"""Caps: the numbers and environment each member gets, and the framework's own view of them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cotrain_operator.api.budget import cpu_threads, memory_budgets
from cotrain_operator.api.contract import (
    ENV_DEVICE_MEMORY_BYTES,
    ENV_MEMBER,
    ENV_MEMBER_BUDGET,
    ENV_PROGRESS_FILE,
    PlannedBudget,
)
from cotrain_operator.api.models import SharingMode
from cotrain_trainer.caps import (
    member_launch,
    memory_fraction,
    memory_limit_mib,
    mps_pinned_limit,
    thread_env,
)
from cotrain_trainer.cli import load_job
from cotrain_trainer.gpu import CPU, GpuDevice
from cotrain_trainer.plan import local_plan
from tests.trainer.builders import a_member, a_plan, a_script, supervise

ROOT = Path(__file__).resolve().parents[2]
GIB = 2**30
MIB = 2**20


@pytest.mark.parametrize(
    ("budget", "card", "fraction"),
    [
        (6 * GIB, 24 * GIB, 0.25),
        (8 * GIB, 80 * GIB, 0.1),
        # TimeSlicing, 4 replicas of an 80 GiB card, gpu.memory 6Gi: of the card, not of the
        # 20 GiB share (0.3 would let the process take 24 GiB).
        (6 * GIB, 80 * GIB, 0.075),
        # Both in bytes: a budget in MiB (6144) or a card in MiB (81920) would be off by 2**20.
        (6 * GIB, 81920 * MIB, 0.075),
        (512 * MIB, 80 * GIB, 1 / 160),
        (100 * GIB, 80 * GIB, 1.0),  # never more than the card (the runner warns)
        (80 * GIB, 80 * GIB, 1.0),
        (None, 80 * GIB, None),  # no budget: no cap
        (0, 80 * GIB, None),  # a zero budget: no cap either
        (6 * GIB, None, None),  # unknown card: no fraction
        (6 * GIB, 0, None),
    ],
)
def test_torch_memory_fraction_is_of_the_whole_card(
    budget: int | None, card: int | None, fraction: float | None
) -> None:
    assert memory_fraction(budget, card) == fraction


class FakeCuda:
    """A CUDA device as the PyTorch runner's memory cap sees it (`CudaMemory`)."""

    def __init__(self, total: int, in_use: tuple[int, int] = (0, 0)) -> None:
        self.total = total
        self.fractions: list[float] = []
        self.in_use = in_use

    def total_memory_bytes(self) -> int:
        return self.total

    def set_memory_fraction(self, fraction: float) -> None:
        self.fractions.append(fraction)

    def memory_in_use(self) -> tuple[int, int]:
        return self.in_use


@pytest.mark.parametrize(
    ("budget", "card", "fraction", "described"),
    [
        # The plan's share (device_memory_bytes, 20 GiB here) plays no part: only the card.
        (6 * GIB, 80 * GIB, 6 / 80, "fraction 0.0750 of 81920 MiB"),
        (6 * GIB, 24 * GIB, 0.25, "fraction 0.2500 of 24576 MiB"),
        (20 * GIB, 10 * GIB, 1.0, "fraction 1.0000 of 10240 MiB (the budget, 20480 MiB, is"),
        (None, 80 * GIB, None, "none: no memory budget"),
        (0, 80 * GIB, None, "none: no memory budget"),
    ],
)
def test_torch_cap_passes_the_budget_over_the_whole_card_to_the_device(
    budget: int | None,
    card: int,
    fraction: float | None,
    described: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pytest.importorskip("torch")
    from cotrain_trainer.frameworks import torch as torch_runner

    cuda = FakeCuda(card)
    plan_budget = PlannedBudget(memory_bytes=budget, cpu_threads=1)
    assert torch_runner.apply_memory_cap(plan_budget, cuda).startswith(described)
    assert cuda.fractions == ([] if fraction is None else [pytest.approx(fraction)])
    if fraction is not None and budget is not None and budget <= card:
        # What torch then allows this process: its budget, to the byte.
        assert cuda.fractions[0] * card == pytest.approx(budget)
    over = [r for r in caplog.records if "more than the device" in r.getMessage()]
    assert len(over) == (1 if budget is not None and budget > card else 0)


@pytest.mark.parametrize(
    ("memory", "mib", "pinned"),
    [
        (6 * GIB, 6144, "0=6144M"),  # MiB: TensorFlow multiplies memory_limit by 2**20
        (6_000_000_000, 5722, "0=5722M"),  # a budget in bytes, not MB (6000) nor GiB (6)
        (1536 * MIB + 1, 1536, "0=1536M"),  # rounded down: the cap never exceeds the budget
        (MIB - 1, 1, "0=1M"),  # at least 1 MiB
        (0, None, None),  # a zero budget: no cap
        (None, None, None),
    ],
)
def test_tensorflow_memory_limit_and_mps_pinned_limit(
    memory: int | None, mib: int | None, pinned: str | None
) -> None:
    assert memory_limit_mib(memory) == mib
    assert mps_pinned_limit(memory) == pinned


class FakeTfGpu:
    """A GPU as the TensorFlow runner's memory cap sees it (`TfGpu`)."""

    def __init__(self) -> None:
        self.limits: list[int] = []
        self.growth = False

    def limit_memory(self, mib: int) -> None:
        self.limits.append(mib)

    def grow_memory(self) -> None:
        self.growth = True

    def memory_in_use(self) -> tuple[int, int]:
        return 0, 0


@pytest.mark.parametrize(
    ("budget", "devices", "limit", "described"),
    [
        (6 * GIB, 1, 6144, "memory_limit 6144 MiB"),
        (6 * GIB, 2, 6144, "memory_limit 6144 MiB each"),  # the budget is per device
        (1536 * MIB + 1, 1, 1536, "memory_limit 1536 MiB"),
        (None, 1, None, "growth: no memory budget"),  # never the whole card at once
        (0, 1, None, "growth: no memory budget"),
    ],
)
def test_tensorflow_cap_passes_the_budget_in_mib_to_each_device(
    budget: int | None, devices: int, limit: int | None, described: str
) -> None:
    pytest.importorskip("tensorflow")
    from cotrain_trainer.frameworks import tensorflow as tf_runner

    gpus = [FakeTfGpu() for _ in range(devices)]
    plan_budget = PlannedBudget(memory_bytes=budget, cpu_threads=1)
    assert tf_runner.apply_memory_cap(plan_budget, gpus) == described
    for gpu in gpus:
        assert gpu.limits == ([] if limit is None else [limit])
        assert gpu.growth == (limit is None)


def test_thread_env_caps_both_frameworks() -> None:
    assert thread_env(3) == {
        "OMP_NUM_THREADS": "3",
        "MKL_NUM_THREADS": "3",
        "OPENBLAS_NUM_THREADS": "3",
        "TF_NUM_INTRAOP_THREADS": "3",
        "TF_NUM_INTEROP_THREADS": "1",
    }


def test_launch_env_under_mps_and_without() -> None:
    member = a_member(
        "torch", env=[{"name": "OMP_NUM_THREADS", "value": "4"}, {"name": "X", "value": "y"}]
    )
    budget = PlannedBudget(memory_bytes=8 * GIB, compute_percent=60, cpu_threads=2)
    mps = member_launch(member, budget, SharingMode.MPS, "/tmp/p.jsonl", 80 * GIB).env
    assert mps["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "60"
    assert mps["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=8192M"
    assert mps["OMP_NUM_THREADS"] == "4"  # the member's own env wins over the default cap
    assert mps["TF_NUM_INTRAOP_THREADS"] == "2"
    assert mps["X"] == "y"
    assert mps[ENV_PROGRESS_FILE] == "/tmp/p.jsonl"
    assert mps[ENV_DEVICE_MEMORY_BYTES] == str(80 * GIB)
    assert json.loads(mps[ENV_MEMBER])["name"] == "torch"
    assert json.loads(mps[ENV_MEMBER_BUDGET]) == {
        "memoryBytes": 8 * GIB,
        "computePercent": 60,
        "cpuThreads": 2,
    }
    sliced = member_launch(member, budget, SharingMode.TIME_SLICING, "/tmp/p.jsonl", None).env
    assert not any(name.startswith("CUDA_MPS_") for name in sliced)
    assert ENV_DEVICE_MEMORY_BYTES not in sliced


def test_a_built_in_member_runs_the_member_module_and_a_user_member_its_command() -> None:
    budget = PlannedBudget(cpu_threads=1)
    built_in = member_launch(a_member("m"), budget, SharingMode.MPS, "p", None, python="/py")
    assert built_in.argv == ["/py", "-m", "cotrain_trainer.member"]
    own = a_member("m", "TensorFlow", command=["python", "train.py"], args=["--fast"])
    launch = member_launch(own, budget, SharingMode.MPS, "p", None)
    assert launch.argv == ["python", "train.py", "--fast"]
    assert launch.env["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"  # no whole-card grab by default


@pytest.mark.parametrize(
    ("fields", "members", "cores", "threads"),
    [
        ({}, 2, 2, 1),
        ({}, 3, 2, 1),  # never zero
        ({}, 2, 16, 8),
        ({"cpuThreads": 3}, 2, 2, 3),
        ({"resources": {"limits": {"cpu": "500m"}}}, 1, 16, 1),
        ({"resources": {"limits": {"cpu": "1.5"}}}, 1, 16, 2),
        ({"resources": {"limits": {"cpu": "8"}}}, 1, 4, 4),  # at most the cores here
    ],
)
def test_local_cpu_threads(fields: dict[str, Any], members: int, cores: int, threads: int) -> None:
    assert cpu_threads(a_member("m", **fields), members, cores) == threads


def test_local_memory_budgets_split_the_rest_equally() -> None:
    members = [
        a_member("a", gpu={"memory": "6Gi"}),
        a_member("b"),
        a_member("c", "TensorFlow"),
    ]
    assert memory_budgets(members, 24 * GIB) == {"a": 6 * GIB, "b": 9 * GIB, "c": 9 * GIB}
    assert memory_budgets(members, None) == {"a": 6 * GIB, "b": None, "c": None}


def test_gpu_memory_cap_is_skipped_cleanly_without_a_gpu() -> None:
    torch = pytest.importorskip("torch")
    from cotrain_trainer.frameworks import torch as torch_runner

    budget = PlannedBudget(memory_bytes=6 * GIB, cpu_threads=1)
    # The framework itself refuses on this machine: AssertionError on a CPU build, RuntimeError
    # ("Found no NVIDIA driver") on a CUDA build without a driver.
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.set_per_process_memory_fraction(0.25, 0)
    assert torch_runner.cuda_device() is None
    assert torch_runner.detect_device(None) == CPU
    assert torch_runner.apply_memory_cap(budget, None) == "none: no GPU"


def test_tensorflow_gpu_memory_cap_is_skipped_cleanly_without_a_gpu() -> None:
    tf = pytest.importorskip("tensorflow")
    from cotrain_trainer.frameworks import tensorflow as tf_runner

    cpu = tf.config.list_physical_devices("CPU")[0]
    # TensorFlow refuses GPU memory configuration on a CPU device.
    with pytest.raises(ValueError, match="not supported"):
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration(memory_limit=1024)]
        )
    gpus = tf.config.list_physical_devices("GPU")
    assert gpus == []
    budget = PlannedBudget(memory_bytes=6 * GIB, cpu_threads=1)
    assert tf_runner.apply_memory_cap(budget, gpus) == "none: no GPU"


ENV_DUMP = """
import json, os, sys
names = [n for n in os.environ if n.startswith(("CUDA_", "OMP_", "MKL_", "TF_", "COTRAIN_"))]
json.dump({n: os.environ[n] for n in names}, open(sys.argv[1], "w"))
"""


def test_an_mps_member_process_sees_its_limits(tmp_path: Path) -> None:
    seen = tmp_path / "env.json"
    member = a_script("dump", ENV_DUMP, "TensorFlow", str(seen))
    plan = a_plan(
        member,
        mode=SharingMode.MPS,
        cpu_threads=2,
        memory_bytes=8 * GIB,
        compute_percent=60,
        device_memory_bytes=80 * GIB,
    )
    result = supervise(plan, tmp_path)
    assert result.succeeded
    env = json.loads(seen.read_text())
    assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "60"
    assert env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=8192M"
    assert env["OMP_NUM_THREADS"] == env["TF_NUM_INTRAOP_THREADS"] == "2"
    assert env["TF_NUM_INTEROP_THREADS"] == "1"
    assert env[ENV_DEVICE_MEMORY_BYTES] == str(80 * GIB)
    assert json.loads(env[ENV_MEMBER_BUDGET])["computePercent"] == 60


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.yaml")))
def test_every_example_plans_for_this_machine(example: str) -> None:
    job = load_job(str(ROOT / "examples" / example))
    local = local_plan(job, [], cores=2, no_gpu_reason="NVML: NVML Shared Library Not Found")
    assert not local.on_gpu
    assert local.notes[0] == (
        "no GPU found (NVML: NVML Shared Library Not Found): members run on the CPU"
    )
    assert local.plan.mode != SharingMode.AUTO
    assert set(local.plan.budgets) == {m.name for m in job.spec.members}
    for budget in local.plan.budgets.values():
        assert budget.memory_bytes is None  # nothing to cap on the CPU
        assert budget.cpu_threads >= 1


def test_a_local_gpu_gets_budgets_and_auto_resolves_from_it() -> None:
    job = load_job(str(ROOT / "examples" / "auto-queued.yaml"))
    a100 = GpuDevice(index=0, name="A100", uuid="GPU-1", total_memory_bytes=40 * GIB)
    local = local_plan(job, [a100], cores=8)
    assert local.plan.mode == SharingMode.TIME_SLICING
    assert local.plan.device_memory_bytes == 40 * GIB
    assert local.plan.budgets["torch"].memory_bytes == 2 * GIB
    assert local.plan.budgets["tf"].memory_bytes == 38 * GIB
    assert local.plan.budgets["tf"].cpu_threads == 4
    policy = job.spec.run_policy.model_copy(update={"suspend": True})
    suspended = job.model_copy(update={"spec": job.spec.model_copy(update={"run_policy": policy})})
    notes = local_plan(suspended, [a100], cores=8).notes
    assert "spec.runPolicy.suspend is ignored by cotrain run" in notes
    mig = GpuDevice(
        index=0, name="H100", uuid="GPU-2", total_memory_bytes=80 * GIB, mig_enabled=True
    )
    assert local_plan(job, [mig], cores=8).plan.mode == SharingMode.MIG
