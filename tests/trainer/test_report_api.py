"""The reporting API for user programs: `from cotrain_trainer import report`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cotrain_operator.api.contract import EXIT_GPU_OOM, REASON_GPU_OOM
from cotrain_trainer import report
from cotrain_trainer.report import ProgressTail, ProgressWriter, parse_event, read_events
from tests.trainer.builders import PYTHON, a_plan, a_script, supervisor_for


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_steps_are_written_first_last_evenly_and_by_time(tmp_path: Path) -> None:
    path, clock = tmp_path / "p.jsonl", FakeClock()
    with ProgressWriter(path, interval=0.2, clock=clock) as writer:
        writer.started(total_steps=1000)
        for step in range(1, 1001):
            clock.now = step * 0.0001  # 0.1 s in all: the interval alone would allow one write
            writer.step(step, loss=1.0, samples=10, total_steps=1000)
    steps = [e.step for e in read_events(path) if e.event == "step"]
    assert steps == [1, *range(10, 1001, 10)]  # first, then every 1% (the last among them)


def test_loss_is_converted_only_when_written_and_rates_exclude_start_up(tmp_path: Path) -> None:
    path, clock = tmp_path / "p.jsonl", FakeClock()
    conversions = []

    class Tensor:
        def __float__(self) -> float:
            conversions.append(clock.now)
            return 0.5

    with ProgressWriter(path, interval=1.0, clock=clock) as writer:
        clock.now = 100.0  # a long start-up before the first step
        writer.step(1, loss=Tensor(), samples=32)
        for step in range(2, 12):
            clock.now += 0.2
            writer.step(step, loss=Tensor(), samples=32)
    events = [e for e in read_events(path) if e.event == "step"]
    assert [e.step for e in events] == [1, 6, 11]
    assert len(conversions) == 3
    assert events[0].samples_per_second is None  # no rate from the start-up
    assert events[1].samples_per_second == pytest.approx(5 * 32 / 1.0)


def test_non_finite_losses_are_dropped(tmp_path: Path) -> None:
    with ProgressWriter(tmp_path / "p.jsonl") as writer:
        writer.step(1, loss=float("nan"), total_steps=2)
        writer.step(2, loss=float("inf"), total_steps=2)
    assert [e.loss for e in read_events(tmp_path / "p.jsonl")] == [None, None]
    assert "NaN" not in (tmp_path / "p.jsonl").read_text()


def test_without_a_progress_file_every_call_is_a_silent_no_op(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("COTRAIN_PROGRESS_FILE", raising=False)
    monkeypatch.setattr(report, "_default", None)
    with report.session(total_steps=3):
        report.step(step=1, loss=1.0, samples=4, total_steps=3)
        report.epoch(1)
    assert not report.writer().enabled
    assert report.apply_caps() == {}


def test_session_turns_a_gpu_oom_into_an_event_and_exit_75(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    torch = pytest.importorskip("torch")
    monkeypatch.setenv("COTRAIN_PROGRESS_FILE", str(tmp_path / "p.jsonl"))
    monkeypatch.setattr(report, "_default", None)

    @report.session()
    def train() -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(SystemExit) as exited:
        train()
    assert exited.value.code == EXIT_GPU_OOM
    events = read_events(tmp_path / "p.jsonl")
    assert [e.event for e in events] == ["started", "failed"]
    assert events[1].reason == REASON_GPU_OOM
    assert events[1].message == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert "Traceback" in capsys.readouterr().err
    report.writer().close()


def test_session_lets_other_errors_through_and_marks_success(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COTRAIN_PROGRESS_FILE", str(tmp_path / "p.jsonl"))
    monkeypatch.setattr(report, "_default", None)
    with pytest.raises(ValueError, match="bug"), report.session():
        raise ValueError("bug")
    with report.session():
        pass
    assert [e.event for e in read_events(tmp_path / "p.jsonl")] == ["started", "completed"]
    report.writer().close()


def test_tensorflow_resource_exhausted_on_a_gpu_is_a_gpu_oom() -> None:
    tf = pytest.importorskip("tensorflow")
    on_gpu = tf.errors.ResourceExhaustedError(
        None,
        None,
        "OOM when allocating tensor with shape[8192,8192] on "
        "/job:localhost/replica:0/task:0/device:GPU:0 by allocator GPU_0_bfc",
    )
    on_host = tf.errors.ResourceExhaustedError(None, None, "OOM by allocator cpu")
    assert report.is_gpu_oom(on_gpu)
    assert not report.is_gpu_oom(on_host)
    with pytest.raises(RuntimeError) as wrapped:
        raise RuntimeError("wrapped") from on_gpu
    assert report.is_gpu_oom(wrapped.value)
    assert not report.is_gpu_oom(MemoryError())


@pytest.mark.parametrize(
    ("error", "gpu_oom"),
    [
        (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate`"), True),
        (RuntimeError("cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE"), True),
        (RuntimeError("CUDA error: out of memory"), True),  # the CUDA context could not be made
        (RuntimeError("DefaultCPUAllocator: not enough memory"), False),
        (MemoryError(), False),
    ],
)
def test_a_gpu_oom_raised_as_a_plain_error_is_recognised_by_its_text(
    error: BaseException, gpu_oom: bool
) -> None:
    assert report.is_gpu_oom(error) == gpu_oom


def test_session_turns_a_cublas_workspace_oom_into_exit_75(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COTRAIN_PROGRESS_FILE", str(tmp_path / "p.jsonl"))
    monkeypatch.setattr(report, "_default", None)
    with pytest.raises(SystemExit) as exited, report.session():
        raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate`")
    assert exited.value.code == EXIT_GPU_OOM
    assert [e.reason for e in read_events(tmp_path / "p.jsonl")] == [None, REASON_GPU_OOM]
    assert "CUBLAS_STATUS_ALLOC_FAILED" in capsys.readouterr().err
    report.writer().close()


USER_LOOP = """
import {framework}
from cotrain_trainer import report

for step in range(1, 4):
    report.step(step=step, loss=1.0, samples=4, total_steps=3)
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("framework", "module"), [("PyTorch", "torch"), ("TensorFlow", "tensorflow")]
)
def test_a_user_program_reporting_with_report_step_alone_reports_its_device_memory(
    framework: str, module: str, tmp_path: Path
) -> None:
    plan = a_plan(a_script("user", USER_LOOP.format(framework=module), framework))
    supervisor = supervisor_for(plan, tmp_path)
    result = supervisor.run()
    assert result.succeeded, result.members["user"].message
    steps = [e for e in read_events(supervisor.progress_path("user")) if e.event == "step"]
    assert [e.step for e in steps] == [1, 2, 3]
    # Its framework's probe, found without the program asking: 0 on this CPU.
    assert {(e.gpu_memory_bytes, e.gpu_memory_peak_bytes) for e in steps} == {(0, 0)}
    status = result.members["user"]
    assert (status.gpu_memory_bytes, status.gpu_memory_peak_bytes) == (0, 0)


def test_tail_reads_only_whole_new_lines(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    tail = ProgressTail(path)
    assert tail.read() == []  # not there yet
    path.write_text('{"event":"step","step":1}\n{"event":"st')
    assert [e.step for e in tail.read()] == [1]
    with path.open("a") as stream:
        stream.write('ep","step":2}\nnot json\n[1]\n{"event":"step","step":-3,"loss":"x"}\n')
    assert [e.step for e in tail.read()] == [2]  # junk and invalid values are skipped


def test_parse_event_keeps_only_sane_values() -> None:
    event = parse_event('{"event":"step","step":-1,"loss":NaN,"samplesPerSecond":5,"extra":1}')
    assert event is not None
    assert (event.step, event.loss, event.samples_per_second) == (None, None, 5.0)


def test_report_imports_no_framework_and_the_trainer_no_kopf() -> None:
    code = (
        "import sys\n"
        "from cotrain_trainer import report, supervisor, reporter, cli, gpu, plan, console\n"
        "loaded = {'torch', 'tensorflow', 'keras', 'kopf'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run(
        [PYTHON, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
