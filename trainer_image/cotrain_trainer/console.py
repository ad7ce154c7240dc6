"""What `cotrain run` shows on the terminal: live progress per member and the closing summary.

Owns three supervisor listeners (`ProgressView`: a rich progress bar per member; `LineView`: one
line per phase change, for `--no-progress` and pipes; `PodLogLines`: plain lines for a trainer
pod's log, which `kubectl logs` shows) and the summary table. Reads only `MemberStatus`; imports
no framework.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import TextIO

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from cotrain_operator.api.models import Member, MemberPhase, MemberStatus

_PHASE_STYLE = {
    MemberPhase.SUCCEEDED: "green",
    MemberPhase.FAILED: "red",
    MemberPhase.RESTARTING: "yellow",
}


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _phase(status: MemberStatus) -> str:
    phase = status.phase or MemberPhase.PENDING
    style = _PHASE_STYLE.get(phase)
    return f"[{style}]{phase.value}[/]" if style else phase.value


class ProgressView:
    """A live progress bar per member: steps, loss, samples/s and phase."""

    def __init__(self, members: list[Member], console: Console) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]} samples/s"),
            TextColumn("{task.fields[phase]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self.tasks: dict[str, TaskID] = {
            m.name: self.progress.add_task(
                f"{m.name} ({m.framework.value})", total=None, loss="-", rate="-", phase="Pending"
            )
            for m in members
        }

    def __enter__(self) -> ProgressView:
        self.progress.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.progress.stop()

    def member_changed(self, name: str, status: MemberStatus, *, final: bool = False) -> None:
        self.progress.update(
            self.tasks[name],
            completed=status.step or 0,
            total=status.total_steps,
            loss=_loss(status.loss),
            rate=_rate(status.samples_per_second),
            phase=_phase(status),
        )

    def tick(self) -> None:
        return None


class LineView:
    """A line per member whenever its phase changes (no live display)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.phases: dict[str, MemberPhase | None] = {}

    def member_changed(self, name: str, status: MemberStatus, *, final: bool = False) -> None:
        if self.phases.get(name) == status.phase and not final:
            return
        self.phases[name] = status.phase
        detail = f" ({status.reason}: {status.message})" if status.message else ""
        self.console.print(f"{name}: {_phase(status)}{detail}", highlight=False)

    def tick(self) -> None:
        return None


class PodLogLines:
    """Lines for a trainer pod's log, prefixed ``[member]`` as the members' own output is: each
    phase change, and each tenth of the steps with the loss and throughput, so that
    ``kubectl logs`` tells how every member is doing without the job's status."""

    TENTHS = 10

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.phases: dict[str, MemberPhase | None] = {}
        self.tenths: dict[str, int] = {}

    def member_changed(self, name: str, status: MemberStatus, *, final: bool = False) -> None:
        lines = []
        if status.total_steps and status.step is not None:
            tenth = min(self.TENTHS, status.step * self.TENTHS // status.total_steps)
            if tenth > self.tenths.get(name, 0):
                self.tenths[name] = tenth
                lines.append(
                    f"step {status.step}/{status.total_steps} loss {_loss(status.loss)} "
                    f"samples/s {_rate(status.samples_per_second)}"
                )
        if self.phases.get(name) != status.phase or final:
            self.phases[name] = status.phase
            phase = (status.phase or MemberPhase.PENDING).value
            detail = f" ({status.reason}: {status.message})" if status.message else ""
            lines.append(f"{phase}{detail}")
        for line in lines:
            self.out.write(f"[{name}] {line}\n")
        if lines:
            self.out.flush()

    def tick(self) -> None:
        return None


def summary_table(members: list[Member], statuses: Mapping[str, MemberStatus]) -> Table:
    """member, framework, phase, steps, first loss → final loss, samples/s, reason."""
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("member", "framework", "phase", "steps", "loss", "samples/s", "reason"):
        numeric = column in ("steps", "samples/s")
        table.add_column(column, justify="right" if numeric else "left", no_wrap=not numeric)
    for member in members:
        status = statuses.get(member.name, MemberStatus())
        steps = f"{status.step or 0}/{status.total_steps}" if status.total_steps else "-"
        table.add_row(
            member.name,
            member.framework.value,
            _phase(status),
            steps,
            f"{_loss(status.first_loss)} → {_loss(status.loss)}",
            _rate(status.samples_per_second),
            status.reason or "-",
        )
    return table
