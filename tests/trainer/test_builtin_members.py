"""Built-in members train real PyTorch and TensorFlow models side by side on the CPU, with caps
that each framework reports in force, and import only their own framework."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cotrain_operator.api.models import MemberPhase
from cotrain_trainer.report import EVENT_STEP, read_events
from cotrain_trainer.reporter import member_report
from cotrain_trainer.supervisor import Supervisor, SupervisorResult
from tests.trainer.builders import PYTHON, Recorder, a_member, a_plan, supervisor_for

pytestmark = pytest.mark.slow

STEPS = 40


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Supervisor, SupervisorResult]:
    """One supervisor run: a PyTorch CNN and a TensorFlow CNN, one thread each."""
    plan = a_plan(
        a_member("torch-cnn", "PyTorch", model="CNN", steps=STEPS, batchSize=32),
        a_member("tf-cnn", "TensorFlow", model="CNN", steps=STEPS, batchSize=32),
        cpu_threads=1,
        memory_bytes=2**30,
    )
    supervisor = supervisor_for(plan, tmp_path_factory.mktemp("cnn"), listeners=[Recorder()])
    return supervisor, supervisor.run()


def test_both_frameworks_train_and_their_loss_falls(
    cnn_run: tuple[Supervisor, SupervisorResult],
) -> None:
    supervisor, result = cnn_run
    assert result.succeeded, {n: s.message for n, s in result.members.items()}
    for name, status in result.members.items():
        assert status.phase == MemberPhase.SUCCEEDED, name
        assert status.step == status.total_steps == STEPS
        assert status.loss is not None
        assert status.first_loss is not None
        assert status.loss < status.first_loss, name
        assert status.samples_per_second
        assert status.samples_per_second > 0
        steps = [e for e in read_events(supervisor.progress_path(name)) if e.event == EVENT_STEP]
        assert steps[0].step == 1
        assert steps[-1].step == STEPS


def test_each_framework_reports_the_thread_caps_in_force(
    cnn_run: tuple[Supervisor, SupervisorResult],
) -> None:
    _, result = cnn_run
    # torch.get_num_threads()/get_num_interop_threads() and
    # tf.config.threading.get_intra/inter_op_parallelism_threads(), read in each member process
    for name in ("torch-cnn", "tf-cnn"):
        caps = result.caps[name]
        assert caps["intraOpThreads"] == 1, name
        assert caps["interOpThreads"] == 1, name
        assert caps["device"] == "cpu"
        assert caps["memoryCap"] == "none: no GPU"  # a budget, but no device to cap


def test_each_member_reports_its_device_memory_as_its_framework_counts_it(
    cnn_run: tuple[Supervisor, SupervisorResult],
) -> None:
    supervisor, result = cnn_run
    for name, status in result.members.items():
        steps = [e for e in read_events(supervisor.progress_path(name)) if e.event == EVENT_STEP]
        # On the CPU the probe says 0: present, not left out (the member holds no device memory).
        assert {(e.gpu_memory_bytes, e.gpu_memory_peak_bytes) for e in steps} == {(0, 0)}, name
        assert (status.gpu_memory_bytes, status.gpu_memory_peak_bytes) == (0, 0), name
        report = member_report(status, now=0.0)
        assert (report["gpuMemoryBytes"], report["gpuMemoryPeakBytes"]) == (0, 0), name


def test_the_listener_gets_one_final_report_per_member(
    cnn_run: tuple[Supervisor, SupervisorResult],
) -> None:
    supervisor, _ = cnn_run
    recorder = supervisor.listeners[0]
    assert isinstance(recorder, Recorder)
    assert set(recorder.finals) == {"torch-cnn", "tf-cnn"}
    phases = [s.phase for n, s, _ in recorder.changes if n == "tf-cnn"]
    assert phases[0] == MemberPhase.RUNNING
    assert phases[-1] == MemberPhase.SUCCEEDED


@pytest.mark.parametrize(
    ("runner", "own", "other"),
    [("torch", "torch", "tensorflow"), ("tensorflow", "tensorflow", "torch")],
)
def test_a_member_process_imports_only_its_own_framework(
    runner: str, own: str, other: str, tmp_path: Path
) -> None:
    code = (
        f"import sys, cotrain_trainer.member, cotrain_trainer.frameworks.{runner}\n"
        f"assert {own!r} in sys.modules\n"
        f"assert {other!r} not in sys.modules, 'imported {other}'\n"
        "assert 'kopf' not in sys.modules\n"
    )
    result = subprocess.run(
        [PYTHON, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
