"""How member runs end: why, whether they are restarted, and what the success policy does."""

from __future__ import annotations

import io
import signal
import threading
import time
from pathlib import Path

import pytest

from cotrain_operator.api.contract import (
    EXIT_GPU_OOM,
    EXIT_MEMBERS_FAILED,
    REASON_BACKOFF_EXCEEDED,
    REASON_COMPLETED,
    REASON_ERROR,
    REASON_GPU_OOM,
    REASON_OOM_KILLED,
    REASON_SIGNALED,
    REASON_STOPPED,
)
from cotrain_operator.api.models import MemberPhase, SuccessPolicy
from cotrain_trainer.oom import is_gpu_oom_text
from cotrain_trainer.supervisor import (
    GPU_OOM_LINES,
    OutputPump,
    classify_exit,
    last_meaningful_line,
    oom_kill_count,
    restart_delay,
)
from tests.trainer.builders import Recorder, a_plan, a_script, supervise, supervisor_for


@pytest.mark.parametrize(
    ("returncode", "options", "exit_code", "reason", "words"),
    [
        (0, {}, 0, REASON_COMPLETED, "code 0"),
        (1, {"last_output": "ValueError: boom"}, 1, REASON_ERROR, "code 1: ValueError: boom"),
        (EXIT_GPU_OOM, {}, EXIT_GPU_OOM, REASON_GPU_OOM, "code 75"),
        (
            1,
            {"failure_reason": REASON_GPU_OOM, "failure_message": "CUDA out of memory"},
            1,
            REASON_GPU_OOM,
            "CUDA out of memory",
        ),
        (-signal.SIGSEGV, {}, 139, REASON_SIGNALED, "SIGSEGV"),
        (-signal.SIGKILL, {}, 137, REASON_SIGNALED, "SIGKILL"),
        (-signal.SIGKILL, {"oom_killed": True}, 137, REASON_OOM_KILLED, "out-of-memory killer"),
        (137, {"oom_killed": True}, 137, REASON_OOM_KILLED, "out-of-memory killer"),
        (-signal.SIGTERM, {"stopped": True}, 143, REASON_STOPPED, "SIGTERM"),
        (-signal.SIGKILL, {"stopped": True, "oom_killed": True}, 137, REASON_STOPPED, "SIGKILL"),
        (1, {"stopped": True}, 1, REASON_STOPPED, "code 1"),
        # What it printed: a program that never entered report.session.
        (
            1,
            {"gpu_oom_output": "RuntimeError: CUDA error: out of memory", "last_output": "x"},
            1,
            REASON_GPU_OOM,
            "code 1: RuntimeError: CUDA error: out of memory",
        ),
        (
            -signal.SIGABRT,
            {"gpu_oom_output": "what():  CUDA out of memory. Tried to allocate 2.00 GiB"},
            134,
            REASON_GPU_OOM,
            "aborted (SIGABRT): what():  CUDA out of memory",
        ),
        (-signal.SIGABRT, {}, 134, REASON_SIGNALED, "SIGABRT"),
    ],
)
def test_classify_exit(
    returncode: int, options: dict[str, object], exit_code: int, reason: str, words: str
) -> None:
    end = classify_exit(returncode, **options)  # type: ignore[arg-type]
    assert (end.exit_code, end.reason) == (exit_code, reason)
    assert words in end.message


GPU_OOM_LINES_SEEN = [
    # PyTorch's caching allocator (torch 2.x, and the RuntimeError of 1.x).
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
    "capacity of 79.10 GiB of which 1.25 GiB is free. Including non-PyTorch memory, this process "
    "has 6.00 GiB memory in use. Of the allocated memory 5.50 GiB is allocated by PyTorch",
    "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 4.00 GiB "
    "total capacity; 3.10 GiB already allocated; 12.19 MiB free; 3.20 GiB reserved in total)",
    "RuntimeError: CUDA out of memory. Tried to allocate 36.00 MiB (GPU 0; 7.93 GiB total)",
    # cuBLAS and cuDNN workspaces, the CUDA context.
    "RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "RuntimeError: cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
    "RuntimeError: cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE",
    "RuntimeError: CUDA error: out of memory",
    "torch.AcceleratorError: CUDA error: out of memory",
    "terminate called after throwing an instance of 'c10::OutOfMemoryError'  what():  CUDA out of "
    "memory. Tried to allocate 512.00 MiB",
    # TensorFlow outside Keras, and its allocator.
    "tensorflow.python.framework.errors_impl.ResourceExhaustedError: OOM when allocating tensor "
    "with shape[8192,8192] and type float on /job:localhost/replica:0/task:0/device:GPU:0 by "
    "allocator GPU_0_bfc [Op:MatMul]",
    "ResourceExhaustedError: {{function_node __wrapped__AddV2_device_/job:localhost/replica:0/"
    "task:0/device:GPU:0}} OOM when allocating tensor with shape[4096,4096] and type float on "
    "/job:localhost/replica:0/task:0/device:GPU:0 by allocator GPU_0_bfc",
    "E0000 00:00:1712345678.123456  4242 cuda_driver.cc:1000] failed to allocate 6.00GiB "
    "(6442450944 bytes) from device: CUDA_ERROR_OUT_OF_MEMORY: out of memory",
    "W0000 00:00:1712345678.123456  4242 bfc_allocator.cc:482] Allocator (GPU_0_bfc) ran out of "
    "memory trying to allocate 256.00MiB (rounded to 268435456)requested by op MatMul",
    # XLA.
    "jaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to "
    "allocate 17179869184 bytes.",
    "2024-05-01 12:00:00.000000: W external/xla/xla/tsl/framework/bfc_allocator.cc:291] "
    "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB",
]
NOT_GPU_OOM_LINES = [
    "GPU memory in use: 1.2 GiB; reduce memory by lowering batchSize",
    "peak memory 4.1 GiB, allocator GPU_0_bfc",
    "MemoryError",  # the host's, not the device's
    "numpy.core._exceptions._ArrayMemoryError: Unable to allocate 8.00 GiB for an array",
    "RuntimeError: [enforce fail at alloc_cpu.cpp:114] data. DefaultCPUAllocator: not enough "
    "memory: you tried to allocate 34359738368 bytes.",
    # TensorFlow on a CPU device: host memory.
    "ResourceExhaustedError: OOM when allocating tensor with shape[65536,65536] and type float on "
    "/job:localhost/replica:0/task:0/device:CPU:0 by allocator cpu",
    # TensorFlow's BFC allocator recovering from a failed allocation: not why anything ended.
    "W0000 00:00:1712345678.1  42 bfc_allocator.cc:296] Allocator (GPU_0_bfc) ran out of memory "
    "trying to allocate 2.13GiB with freed_by_count=0. The caller indicates that this is not a "
    "failure, but this may mean that there could be performance gains if more memory were "
    "available.",
    "I0000 00:00:1712345678.1  42 gpu_device.cc:2019] Created device /job:localhost/replica:0/"
    "task:0/device:GPU:0 with 6144 MB memory:  -> device: 0, name: NVIDIA H100",
]


@pytest.mark.parametrize("line", GPU_OOM_LINES_SEEN)
def test_gpu_out_of_memory_lines_are_recognised(line: str) -> None:
    assert is_gpu_oom_text(line)


@pytest.mark.parametrize("line", NOT_GPU_OOM_LINES)
def test_other_lines_are_not_a_gpu_out_of_memory(line: str) -> None:
    assert not is_gpu_oom_text(line)


def _pumped(lines: list[str]) -> OutputPump:
    pipe = io.BytesIO("".join(f"{line}\n" for line in lines).encode())
    pump = OutputPump("m", pipe, io.BytesIO(), None)
    pump.join(timeout=10.0)
    return pump


def test_the_output_pump_keeps_the_last_gpu_oom_line_of_the_run_s_end() -> None:
    oom = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    noise = "I0000 00:00:1712345678.1  42 cpu_feature_guard.cc:227] This TensorFlow binary"
    assert _pumped(["Traceback (most recent call last):", oom, noise]).gpu_oom_line() == oom
    assert _pumped(["step 1", "done"]).gpu_oom_line() == ""
    # An OOM the program caught and recovered from long before it ended is not why it ended.
    recovered = [oom, *(f"step {n}" for n in range(GPU_OOM_LINES)), "ValueError: bad shape"]
    assert _pumped(recovered).gpu_oom_line() == ""


def test_last_meaningful_line_skips_framework_log_noise() -> None:
    lines = [
        "Traceback (most recent call last):",
        "ValueError: bad shape",
        "",
        "I0000 00:00:1795313842.357755   13360 cpu_feature_guard.cc:227] This TensorFlow binary",
    ]
    assert last_meaningful_line(lines) == "ValueError: bad shape"


def test_restart_delay_doubles_up_to_a_cap() -> None:
    assert [restart_delay(n, 1.0) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]


def test_oom_kill_count_reads_cgroup_v2_memory_events(tmp_path: Path) -> None:
    events = tmp_path / "memory.events"
    events.write_text("low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\noom_group_kill 0\n")
    assert oom_kill_count(events) == 2
    assert oom_kill_count(tmp_path / "absent") is None


def test_oom_kill_count_reads_cgroup_v1_oom_control_where_there_is_no_v2(tmp_path: Path) -> None:
    v1 = tmp_path / "memory.oom_control"
    v1.write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    assert oom_kill_count(tmp_path / "no-v2-here", v1) == 3
    # v2 first where both are (a hybrid host's unified hierarchy holds no memory controller, so
    # its memory.events is absent; a v2 host has no memory/ directory).
    v2 = tmp_path / "memory.events"
    v2.write_text("oom 1\noom_kill 1\n")
    assert oom_kill_count(v2, v1) == 1
    # A kernel before 4.13 has oom_control without the counter: unknown, not zero.
    old = tmp_path / "old.oom_control"
    old.write_text("oom_kill_disable 0\nunder_oom 0\n")
    assert oom_kill_count(old) is None


SIMULATED_CUDA_OOM = """
import torch
from cotrain_trainer import report

report.apply_caps()
with report.session(total_steps=10):
    report.step(step=1, loss=2.5, samples=32, total_steps=10)
    raise torch.cuda.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 4.00 GiB total capacity)"
    )
"""


@pytest.mark.slow
def test_a_gpu_oom_ends_the_member_as_gpu_out_of_memory_without_restarts(tmp_path: Path) -> None:
    plan = a_plan(a_script("oom", SIMULATED_CUDA_OOM), backoff_limit=2)
    result = supervise(plan, tmp_path)
    status = result.members["oom"]
    assert not result.succeeded
    assert status.phase == MemberPhase.FAILED
    assert status.reason == REASON_GPU_OOM
    assert status.exit_code == EXIT_GPU_OOM
    assert status.restarts == 0  # a cap that was too small is too small again
    assert status.message is not None
    assert "CUDA out of memory. Tried to allocate" in status.message
    assert status.first_loss == 2.5
    # The user program applied its caps in-process through the same runner as built-in members.
    assert result.caps["oom"]["intraOpThreads"] == 1
    assert result.caps["oom"]["memoryCap"] == "none: no GPU"


PRINTED_CUDA_OOM = """
import sys
with open(sys.argv[1], "a") as runs:
    runs.write("run\\n")
print("step 1 loss 2.30", flush=True)
sys.stderr.write(
    "Traceback (most recent call last):\\n"
    '  File "train.py", line 41, in <module>\\n'
    "    loss.backward()\\n"
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
    "capacity of 79.10 GiB of which 1.25 GiB is free. Process 4242 has 6.00 GiB memory in use.\\n"
)
sys.exit(1)
"""


def test_a_gpu_oom_in_a_program_s_output_ends_it_as_gpu_out_of_memory_without_restarts(
    tmp_path: Path,
) -> None:
    """A user's command that never enters report.session, prints a CUDA OOM traceback and exits
    1: not a generic crash restarted up to the backoff limit."""
    runs = tmp_path / "runs.txt"
    plan = a_plan(a_script("oom", PRINTED_CUDA_OOM, "PyTorch", str(runs)), backoff_limit=2)
    result = supervise(plan, tmp_path)
    status = result.members["oom"]
    assert runs.read_text().count("run") == 1  # never restarted: a too-small cap stays too small
    assert (status.phase, status.reason, status.exit_code) == (
        MemberPhase.FAILED,
        REASON_GPU_OOM,
        1,
    )
    assert status.restarts == 0
    assert status.message is not None
    assert (
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB" in status.message
    )
    assert "not restarted" in status.message
    assert result.exit_code == EXIT_MEMBERS_FAILED


CRASH = """
import sys
with open(sys.argv[1], "a") as runs:
    runs.write("run\\n")
raise ValueError("boom")
"""


def test_a_crashing_member_is_restarted_up_to_the_backoff_limit(tmp_path: Path) -> None:
    runs = tmp_path / "runs.txt"
    recorder = Recorder()
    plan = a_plan(a_script("crash", CRASH, "PyTorch", str(runs)), backoff_limit=2)
    result = supervise(plan, tmp_path, listeners=[recorder])
    status = result.members["crash"]
    assert runs.read_text().count("run") == 3  # the first run and two restarts
    assert status.phase == MemberPhase.FAILED
    assert status.reason == REASON_BACKOFF_EXCEEDED
    assert status.restarts == 2
    assert status.exit_code == 1
    assert status.message is not None
    assert "ValueError: boom" in status.message
    assert result.exit_code == EXIT_MEMBERS_FAILED
    phases = [s.phase for _, s, _ in recorder.changes]
    assert phases.count(MemberPhase.RESTARTING) == 2
    assert [s.restarts for _, s, final in recorder.changes if final] == [2]


def test_restarts_spent_in_earlier_pods_count_against_the_limit(tmp_path: Path) -> None:
    runs = tmp_path / "runs.txt"
    plan = a_plan(
        a_script("crash", CRASH, "PyTorch", str(runs)), backoff_limit=2, restarts={"crash": 1}
    )
    status = supervise(plan, tmp_path).members["crash"]
    assert runs.read_text().count("run") == 2
    assert status.restarts == 2
    assert status.reason == REASON_BACKOFF_EXCEEDED


FLAKY = """
import pathlib, sys
runs = pathlib.Path(sys.argv[1])
runs.write_text(runs.read_text() + "run\\n" if runs.exists() else "run\\n")
sys.exit(0 if runs.read_text().count("run") == 2 else 3)
"""


def test_a_member_that_succeeds_on_restart_succeeds(tmp_path: Path) -> None:
    plan = a_plan(a_script("flaky", FLAKY, "PyTorch", str(tmp_path / "runs")), backoff_limit=3)
    result = supervise(plan, tmp_path)
    status = result.members["flaky"]
    assert result.succeeded
    assert result.exit_code == 0
    assert (status.phase, status.reason, status.restarts) == (
        MemberPhase.SUCCEEDED,
        REASON_COMPLETED,
        1,
    )


def test_a_member_killed_by_a_signal_is_signaled(tmp_path: Path) -> None:
    plan = a_plan(a_script("segv", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"))
    status = supervise(plan, tmp_path).members["segv"]
    assert status.phase == MemberPhase.FAILED
    assert status.exit_code == 139
    assert status.message is not None
    assert "Signaled: killed by SIGSEGV" in status.message


def test_a_member_that_cannot_start_fails_with_a_message(tmp_path: Path) -> None:
    member = a_script("typo", "").model_copy(update={"command": ["no-such-program-cotrain"]})
    status = supervise(a_plan(member), tmp_path).members["typo"]
    assert status.phase == MemberPhase.FAILED
    assert status.exit_code == 127
    assert status.message is not None
    assert "cannot start" in status.message


SLEEPER = "import time; time.sleep(120)"


def test_any_member_stops_the_others_once_one_succeeds(tmp_path: Path) -> None:
    plan = a_plan(
        a_script("quick", "pass"),
        a_script("slow", SLEEPER, "TensorFlow"),
        success_policy=SuccessPolicy.ANY_MEMBER,
    )
    started = time.monotonic()
    result = supervise(plan, tmp_path)
    assert time.monotonic() - started < 30
    assert result.succeeded
    assert result.exit_code == 0
    slow = result.members["slow"]
    assert (slow.phase, slow.reason, slow.exit_code) == (MemberPhase.FAILED, REASON_STOPPED, 143)
    assert slow.message is not None
    assert "member quick succeeded" in slow.message


def test_all_members_stops_the_others_once_one_fails_for_good(tmp_path: Path) -> None:
    plan = a_plan(a_script("bad", "raise SystemExit(4)"), a_script("slow", SLEEPER))
    result = supervise(plan, tmp_path)
    assert not result.succeeded
    assert result.exit_code == EXIT_MEMBERS_FAILED
    assert result.members["bad"].reason == REASON_BACKOFF_EXCEEDED
    assert result.members["slow"].reason == REASON_STOPPED


STUBBORN = """
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(120)
"""


def _when_ready(log: Path, action: object) -> threading.Thread:
    def wait() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if log.exists() and "ready" in log.read_text().splitlines():  # a line of its own
                break
            time.sleep(0.05)
        action()  # type: ignore[operator]

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread


def test_stop_sends_sigterm_then_sigkill_after_the_grace_period(tmp_path: Path) -> None:
    plan = a_plan(a_script("stubborn", STUBBORN), a_script("polite", SLEEPER, "TensorFlow"))
    supervisor = supervisor_for(plan, tmp_path, grace_period=0.5)
    _when_ready(
        supervisor.log_path("stubborn"),
        lambda: supervisor.request_stop("stopped by test", signal.SIGTERM),
    )
    result = supervisor.run()
    stubborn, polite = result.members["stubborn"], result.members["polite"]
    assert (stubborn.reason, stubborn.exit_code) == (REASON_STOPPED, 137)  # SIGKILL, at last
    assert (polite.reason, polite.exit_code) == (REASON_STOPPED, 143)
    assert stubborn.message is not None
    assert stubborn.message.startswith("stopped by test")
    assert not result.succeeded
    assert result.exit_code == 128 + signal.SIGTERM  # the operator may retry an evicted pod
