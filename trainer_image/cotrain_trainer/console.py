"""What `cotrain run` shows on the terminal: live progress per member and the closing summary.

Owns three supervisor listeners (`ProgressView`: a rich progress bar per member; `LineView`: one
line per phase change, for `--no-progress` and pipes; `PodLogLines`: plain lines for a trainer
pod's log, which `kubectl logs` and `cotrain logs` show) and the summary table. Also the pod log's
line format, written here and by the supervisor's output pumps, read by `cotrain logs MEMBER`:
`[member] text`, `[member/rank] text` for a member that runs several ranks, and the supervisor's
own lines unprefixed. Reads only `MemberStatus`; imports no framework.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
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


# A member name is a DNS-1035 label (api.models.DNS_LABEL); a rank is a number.
_SOURCE = re.compile(r"\[([a-z](?:[-a-z0-9]*[a-z0-9])?)(?:/(\d+))?\](?: |$)")


def log_source(member: str, rank: int | None = None) -> str:
    """The tag of `member`'s pod log lines: its name, and the rank when it runs several."""
    return member if rank is None else f"{member}/{rank}"


def pod_log_line(source: str, text: str) -> str:
    """One line of a trainer pod's log, newline included."""
    return f"[{source}] {text}\n"


def first_step_line(
    spawned: float, launched: float | None, started: float | None, first: float
) -> str:
    """Where a member's start-up went, from its process's spawn to its first step (wall-clock
    seconds): Python and CoTrain's own imports, then its framework's import and the caps, then
    the step itself. Parts the member did not report (its own command) are left out."""
    parts = []
    if launched is not None and started is not None and spawned <= launched <= started <= first:
        parts = [
            f"Python and CoTrain {launched - spawned:.2f} s",
            f"framework and caps {started - launched:.2f} s",
            f"first step {first - started:.2f} s",
        ]
    detail = f" ({', '.join(parts)})" if parts else ""
    return f"first step {first - spawned:.2f} s after its process was started{detail}"


def line_member(line: str) -> str | None:
    """The member a pod log line came from; None for the supervisor's own lines."""
    found = _SOURCE.match(line)
    return found.group(1) if found else None


def member_lines(lines: Iterable[str], member: str) -> Iterator[str]:
    """The lines of `member` (all its ranks), prefix kept; other members' and unprefixed lines
    are left out."""
    return (line for line in lines if line_member(line) == member)


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
            self.out.write(pod_log_line(name, line))
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
