"""Who is charged when a member of a shared pod runs out of memory (#15 defect 6): the member
that ran out, unless it was within its own limit while a running co-tenant was over its own;
then it is the co-tenant's victim (CoTenantFault, restarted at no cost) and the co-tenant is
charged. Evidence: resident memory against resources.limits.memory for the kernel's OOM kill,
the frameworks' device memory against gpu.memory for a GPU out-of-memory error."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from cotrain_operator.api.contract import (
    REASON_BACKOFF_EXCEEDED,
    REASON_CO_TENANT_FAULT,
    REASON_COMPLETED,
    REASON_GPU_OOM,
    REASON_OOM_KILLED,
    PodPlan,
)
from cotrain_operator.api.models import Member, MemberPhase, MemberStatus
from cotrain_trainer.fault import (
    Usage,
    culprits,
    memory_limit_bytes,
    resident_bytes_by_group,
)
from tests.trainer.builders import Recorder, a_member, a_plan, a_script, supervise

MIB = 1 << 20
GIB = 1 << 30


@pytest.mark.parametrize(
    ("victim", "others", "blamed"),
    [
        # Within its own 700Mi while the co-tenant held 300Mi of its 200Mi: the co-tenant's fault.
        (Usage("v", 500 * MIB, 700 * MIB), [Usage("c", 300 * MIB, 200 * MIB)], ["c"]),
        # Exactly at its limit is within it; a co-tenant exactly at its own is not over.
        (Usage("v", 700 * MIB, 700 * MIB), [Usage("c", 201 * MIB, 200 * MIB)], ["c"]),
        (Usage("v", 500 * MIB, 700 * MIB), [Usage("c", 200 * MIB, 200 * MIB)], []),
        # The victim over its own limit: its own fault, whatever the others did.
        (Usage("v", 701 * MIB, 700 * MIB), [Usage("c", 300 * MIB, 200 * MIB)], []),
        # Nothing known of the victim, or no limit of its own: no evidence, it is charged.
        (Usage("v", None, 700 * MIB), [Usage("c", 300 * MIB, 200 * MIB)], []),
        (Usage("v", 100 * MIB, None), [Usage("c", 300 * MIB, 200 * MIB)], []),
        # A co-tenant with no limit of its own, never seen, or no longer running is not blamed.
        (Usage("v", 100 * MIB, 700 * MIB), [Usage("c", 300 * MIB, None)], []),
        (Usage("v", 100 * MIB, 700 * MIB), [Usage("c", None, 200 * MIB)], []),
        (Usage("v", 100 * MIB, 700 * MIB), [Usage("c", 300 * MIB, 200 * MIB, running=False)], []),
        # Units: a GiB budget is not a MiB budget (3 GiB held of a 2 GiB cap is over it).
        (Usage("v", 512 * MIB, 1 * GIB), [Usage("c", 3 * GIB, 2 * GIB)], ["c"]),
        (Usage("v", 512 * MIB, 1 * GIB), [Usage("c", 3 * GIB, 4 * GIB)], []),
        # Several over: the most over first.
        (
            Usage("v", 10 * MIB, 100 * MIB),
            [Usage("a", 150 * MIB, 100 * MIB), Usage("b", 400 * MIB, 100 * MIB)],
            ["b", "a"],
        ),
    ],
)
def test_the_culprits_are_the_running_co_tenants_over_their_own_limits(
    victim: Usage, others: list[Usage], blamed: list[str]
) -> None:
    assert [u.member for u in culprits(victim, others)] == blamed


@pytest.mark.parametrize(
    ("limits", "expected"),
    [({"memory": "512Mi"}, 512 * MIB), ({"memory": "1G"}, 10**9), ({"cpu": "1"}, None), ({}, None)],
)
def test_a_member_s_own_memory_limit_in_bytes(limits: dict[str, str], expected: int | None) -> None:
    member = a_member("m", resources={"limits": limits})
    assert memory_limit_bytes(member) == expected


def test_resident_memory_is_summed_per_process_group_from_proc(tmp_path: Path) -> None:
    page = os.sysconf("SC_PAGE_SIZE")

    def stat(pid: int, comm: str, pgrp: int, rss_pages: int) -> None:
        fields = ["S", "1", str(pgrp)] + ["0"] * 18 + [str(rss_pages)] + ["0"] * 20
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(f"{pid} ({comm}) {' '.join(fields)}\n")

    stat(10, "python", 10, 100)
    stat(11, "worker (1) x", 10, 50)  # a comm with spaces and parentheses
    stat(20, "python", 20, 7)
    stat(30, "other", 30, 999)
    (tmp_path / "self").mkdir()  # not a pid
    assert resident_bytes_by_group([10, 20, 40], tmp_path) == {
        10: 150 * page,
        20: 7 * page,
        40: 0,
    }


def test_resident_memory_of_a_real_process_group() -> None:
    hold = "import sys, time\nheld = b'x' * (96 << 20)\nprint('held', flush=True)\ntime.sleep(60)\n"
    child = subprocess.Popen(
        [sys.executable, "-c", hold], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"held\n"
        measured = resident_bytes_by_group([child.pid])[child.pid]
        assert 96 * MIB <= measured < 400 * MIB, measured
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        if child.stdout is not None:
            child.stdout.close()


# The culprit holds more than its own limit and waits (its first run); a second run succeeds.
# The victim, once the supervisor has seen both, is killed as the kernel kills (SIGKILL, the
# cgroup's oom_kill count up by one) on its first run and succeeds on its second.
CULPRIT = """
import os, sys, time
runs = sys.argv[1]
first = not os.path.exists(runs)
open(runs, "a").write("run\\n")
if first:
    held = b"x" * (64 << 20)
    victim_runs, deadline = sys.argv[2], time.monotonic() + 60
    while time.monotonic() < deadline:  # until stopped, or the victim has run twice
        if os.path.exists(victim_runs) and open(victim_runs).read().count("run") >= 2:
            break
        time.sleep(0.02)
"""
VICTIM = """
import os, signal, sys, time
runs, seen, counter = sys.argv[1], sys.argv[2], sys.argv[3]
first = not os.path.exists(runs)
open(runs, "a").write("run\\n")
if first:
    while not os.path.exists(seen):
        time.sleep(0.01)
    with open(counter, "w") as events:
        events.write("oom 1\\noom_kill 1\\n")
    os.kill(os.getpid(), signal.SIGKILL)
"""


class Witness:
    """The supervisor's real resident-memory sampler, which also says (a file) once it has
    seen every member running and one of them holding at least ``held`` bytes."""

    def __init__(self, seen: Path, members: int, held: int) -> None:
        self.seen, self.members, self.held = seen, members, held

    def __call__(self, groups: Iterable[int]) -> dict[int, int]:
        got = resident_bytes_by_group(groups)
        if len(got) == self.members and all(got.values()) and max(got.values()) >= self.held:
            self.seen.touch()
        return got


def _limited(member: Member, memory: str) -> Member:
    resources = member.resources.model_copy(update={"limits": {"memory": memory}})
    return member.model_copy(update={"resources": resources})


def _oom_killed_pod(
    tmp_path: Path, culprit_limit: str, victim_limit: str
) -> tuple[PodPlan, dict[str, Any]]:
    counter = tmp_path / "memory.events"
    counter.write_text("oom 0\noom_kill 0\n")
    culprit = a_script(
        "culprit", CULPRIT, "PyTorch", str(tmp_path / "culprit.runs"), str(tmp_path / "victim.runs")
    )
    victim = a_script(
        "victim", VICTIM, "PyTorch", str(tmp_path / "victim.runs"), str(tmp_path / "seen"),
        str(counter),
    )  # fmt: skip
    plan = a_plan(_limited(victim, victim_limit), _limited(culprit, culprit_limit), backoff_limit=1)
    options = {
        "oom_counters": [counter],
        "resident_memory": Witness(tmp_path / "seen", members=2, held=64 * MIB),
        "memory_sample_interval": 0.02,
    }
    return plan, options


def _first_restart(recorder: Recorder, name: str) -> MemberStatus:
    """The status ``name`` was first reported with while it waited to restart."""
    waiting = [s for n, s, _ in recorder.changes if n == name and s.phase == MemberPhase.RESTARTING]
    assert waiting, recorder.changes
    return waiting[0]


def _runs(tmp_path: Path, name: str) -> int:
    return (tmp_path / f"{name}.runs").read_text().count("run")


def test_a_member_oom_killed_within_its_limit_is_the_victim_of_a_co_tenant_over_its_own(
    tmp_path: Path,
) -> None:
    plan, options = _oom_killed_pod(tmp_path, culprit_limit="32Mi", victim_limit="512Mi")
    recorder = Recorder()
    result = supervise(plan, tmp_path / "work", listeners=[recorder], **options)
    assert result.succeeded, result.members
    victim, culprit = result.members["victim"], result.members["culprit"]
    # The victim: restarted at no cost, and said so while it restarted.
    assert victim.restarts == 0, victim
    assert _runs(tmp_path, "victim") == 2
    restarting = _first_restart(recorder, "victim")
    assert restarting.reason == REASON_CO_TENANT_FAULT
    assert restarting.message is not None
    assert "culprit" in restarting.message
    assert "of its 512MiB limit (memory) while co-tenant culprit held" in restarting.message
    assert "of its 32MiB limit" in restarting.message
    # The culprit: stopped and charged one restart, in its own words.
    assert culprit.restarts == 1, culprit
    assert _runs(tmp_path, "culprit") == 2
    charged = _first_restart(recorder, "culprit")
    assert charged.reason == REASON_OOM_KILLED
    assert charged.message is not None
    assert "over its own limit" in charged.message
    assert "victim" in charged.message
    assert (victim.reason, culprit.reason) == (REASON_COMPLETED, REASON_COMPLETED)


def test_a_member_oom_killed_over_its_own_limit_is_charged_and_its_co_tenant_left_alone(
    tmp_path: Path,
) -> None:
    # The same pod, but the victim's own limit is below what it held: its own fault.
    plan, options = _oom_killed_pod(tmp_path, culprit_limit="32Mi", victim_limit="1Mi")
    recorder = Recorder()
    result = supervise(plan, tmp_path / "work", listeners=[recorder], **options)
    victim, culprit = result.members["victim"], result.members["culprit"]
    assert victim.restarts == 1, victim  # charged, as any OOM kill
    assert _runs(tmp_path, "victim") == 2
    reasons = [s.reason for n, s, _ in recorder.changes if n == "victim"]
    assert REASON_OOM_KILLED in reasons, reasons
    assert REASON_CO_TENANT_FAULT not in reasons, reasons
    # The co-tenant ran its first run to its end untouched: never charged, never restarted.
    assert culprit.restarts == 0, culprit
    assert _runs(tmp_path, "culprit") == 1
    assert result.succeeded, result.members


# GPU memory as the frameworks' probes report it (the supervisor's reliable source): the
# culprit reports holding 3 GiB of its 2 GiB budget, the victim 256 MiB of its 1 GiB, then fails
# with a CUDA out-of-memory error in its output.
GPU_CULPRIT = """
import os, sys, time
from cotrain_trainer import report
runs = sys.argv[1]
first = not os.path.exists(runs)
open(runs, "a").write("run\\n")
if first:
    report.writer().memory_probe = lambda: (3 << 30, 3 << 30)
    report.step(step=1, loss=1.0, samples=1, total_steps=1000)
    open(sys.argv[2], "w").close()
    time.sleep(60)
"""
GPU_VICTIM = """
import os, sys, time
from cotrain_trainer import report
runs, reported = sys.argv[1], sys.argv[2]
first = not os.path.exists(runs)
open(runs, "a").write("run\\n")
if first:
    report.writer().memory_probe = lambda: (256 << 20, 256 << 20)
    report.step(step=1, loss=1.0, samples=1, total_steps=1)
    while not os.path.exists(reported):
        time.sleep(0.01)
    sys.stderr.write("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\\n")
    sys.exit(1)
"""


def _gpu_pod(tmp_path: Path, victim_budget: int) -> PodPlan:
    culprit = a_script(
        "culprit", GPU_CULPRIT, "PyTorch", str(tmp_path / "culprit.runs"), str(tmp_path / "rep")
    )
    victim = a_script(
        "victim", GPU_VICTIM, "PyTorch", str(tmp_path / "victim.runs"), str(tmp_path / "rep")
    )
    plan = a_plan(victim, culprit, backoff_limit=1)
    budgets = {"victim": victim_budget, "culprit": 2 * GIB}
    for name, memory in budgets.items():
        plan.budgets[name] = plan.budgets[name].model_copy(update={"memory_bytes": memory})
    return plan


@pytest.mark.slow
def test_a_gpu_oom_within_the_member_s_budget_is_the_fault_of_a_co_tenant_over_its_own(
    tmp_path: Path,
) -> None:
    recorder = Recorder()
    result = supervise(
        _gpu_pod(tmp_path, victim_budget=1 * GIB),
        tmp_path / "w",
        listeners=[recorder],
        restart_backoff=5.0,
    )
    victim, culprit = result.members["victim"], result.members["culprit"]
    assert victim.restarts == 0, victim
    assert victim.reason != REASON_GPU_OOM, victim
    # The culprit's failure ends the job (AllMembers), which stops the victim, most likely while
    # it waits to restart (restart_backoff 5 s): its final status then says why it was to
    # restart; else its CoTenantFault was reported while it waited.
    seen = [s.message or "" for n, s, _ in recorder.changes if n == "victim"]
    said = [m for m in seen if REASON_CO_TENANT_FAULT in m]
    assert said, seen
    assert "co-tenant culprit held 3072MiB of its 2048MiB limit" in said[-1], said
    # The culprit's cap did not hold it: a GPU OOM of its own making, not restarted.
    assert culprit.phase == MemberPhase.FAILED, culprit
    assert culprit.reason == REASON_GPU_OOM, culprit
    assert culprit.message is not None
    assert "3072MiB of its 2048MiB limit (GPU memory)" in culprit.message, culprit.message
    assert _runs(tmp_path, "culprit") == 1
    assert not result.succeeded


@pytest.mark.slow
def test_a_gpu_oom_over_the_member_s_own_budget_is_its_own(tmp_path: Path) -> None:
    result = supervise(_gpu_pod(tmp_path, victim_budget=128 * MIB), tmp_path / "w")
    victim, culprit = result.members["victim"], result.members["culprit"]
    assert (victim.phase, victim.reason, victim.restarts) == (MemberPhase.FAILED, REASON_GPU_OOM, 0)
    assert _runs(tmp_path, "victim") == 1
    # Under AllMembers the co-tenant is then stopped, not blamed.
    assert culprit.reason not in (REASON_GPU_OOM, REASON_BACKOFF_EXCEEDED), culprit
