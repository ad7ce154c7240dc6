"""Builders for the trainer tests: members, pod plans, a recording listener, a supervisor."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from cotrain_operator.api.contract import PlannedBudget, PodPlan
from cotrain_operator.api.models import Member, MemberStatus, SharingMode, SuccessPolicy
from cotrain_trainer.supervisor import Supervisor, SupervisorResult

PYTHON = sys.executable


def a_member(name: str, framework: str = "PyTorch", **fields: Any) -> Member:
    return Member.model_validate({"name": name, "framework": framework, **fields})


def a_script(name: str, code: str, framework: str = "PyTorch", *args: str) -> Member:
    """A member whose own command is `python -c code args...`."""
    return a_member(name, framework, command=[PYTHON, "-c", code], args=list(args) or None)


def a_plan(
    *members: Member,
    mode: SharingMode = SharingMode.TIME_SLICING,
    backoff_limit: int = 0,
    success_policy: SuccessPolicy = SuccessPolicy.ALL_MEMBERS,
    restarts: dict[str, int] | None = None,
    cpu_threads: int = 1,
    memory_bytes: int | None = None,
    compute_percent: int | None = None,
    device_memory_bytes: int | None = None,
) -> PodPlan:
    return PodPlan(
        job="test-job",
        mode=mode,
        members=list(members),
        budgets={
            m.name: PlannedBudget(
                memory_bytes=memory_bytes, compute_percent=compute_percent, cpu_threads=cpu_threads
            )
            for m in members
        },
        device_memory_bytes=device_memory_bytes,
        backoff_limit=backoff_limit,
        success_policy=success_policy,
        restarts=restarts or {},
    )


class Recorder:
    """A supervisor listener that keeps every change and checks that each final comes once."""

    def __init__(self) -> None:
        self.changes: list[tuple[str, MemberStatus, bool]] = []
        self.finals: dict[str, MemberStatus] = {}

    def member_changed(self, name: str, status: MemberStatus, *, final: bool = False) -> None:
        assert name not in self.finals, f"{name} changed after its final report"
        self.changes.append((name, status, final))
        if final:
            self.finals[name] = status

    def tick(self) -> None:
        return None


def supervisor_for(plan: PodPlan, work_dir: Path, **options: Any) -> Supervisor:
    options.setdefault("restart_backoff", 0.05)
    options.setdefault("grace_period", 3.0)
    options.setdefault("poll_interval", 0.05)
    return Supervisor(plan, work_dir, **options)


def supervise(plan: PodPlan, work_dir: Path, **options: Any) -> SupervisorResult:
    return supervisor_for(plan, work_dir, **options).run()
