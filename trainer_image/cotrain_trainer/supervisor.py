"""The supervisor: runs one pod's members side by side, each as its own OS process, to the end.

Owns starting each member (the built-in runner `python -m cotrain_trainer.member`, or the member's
own command) with its caps in its environment, tailing its progress file (its device memory comes
from there, as its framework counts it; NVML's per-process count only for a member that reports
none), restarting a failed member within the backoff limit, running a data-parallel member as a
gang of ranks (started, stopped and restarted together; see `distributed`), classifying why each
run ended (from its exit status, its own "failed" event, and what it printed: a GPU
out-of-memory error is recognised in its output too, see `oom`), applying the success policy,
stopping members cleanly on request (SIGTERM to the member's process group, then SIGKILL after a
grace period), and telling listeners (the status reporter, a terminal view) about every change.
`cotrain supervise` runs it in a pod and `cotrain run` on a workstation: one code path for both.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, Protocol, TextIO

from cotrain_operator.api.contract import (
    EXIT_GPU_OOM,
    EXIT_MEMBERS_FAILED,
    REASON_BACKOFF_EXCEEDED,
    REASON_CO_TENANT_FAULT,
    REASON_COMPLETED,
    REASON_ERROR,
    REASON_GPU_OOM,
    REASON_OOM_KILLED,
    REASON_SIGNALED,
    REASON_STOPPED,
    MemberTopology,
    PlannedBudget,
    PodPlan,
)
from cotrain_operator.api.models import Member, MemberPhase, MemberStatus, SuccessPolicy
from cotrain_trainer.caps import member_launch, with_python_first
from cotrain_trainer.console import first_step_line, log_source, pod_log_line
from cotrain_trainer.distributed import Rank, member_ranks, rank_env, spans_pods
from cotrain_trainer.fault import Usage, culprits, memory_limit_bytes, resident_bytes_by_group
from cotrain_trainer.gpu import NoGpu, Telemetry
from cotrain_trainer.oom import is_gpu_oom_text
from cotrain_trainer.report import (
    EVENT_FAILED,
    EVENT_STARTED,
    EVENT_STEP,
    ProgressEvent,
    ProgressTail,
)

log = logging.getLogger(__name__)

ACTIVE = (MemberPhase.PENDING, MemberPhase.RUNNING, MemberPhase.RESTARTING)
TERMINAL = (MemberPhase.SUCCEEDED, MemberPhase.FAILED)
MAX_RESTART_DELAY_SECONDS = 30.0
MESSAGE_LIMIT = 4096
# Exit code of the supervisor when a member whose replicas run in several pods failed within
# its backoff: a pod failure, so the operator recreates the member's pods together (any non-zero
# code other than EXIT_MEMBERS_FAILED is one).
EXIT_POD_RETRY = 1
# Where the kernel counts its OOM kills in the container's memory cgroup, as an `oom_kill N`
# line: memory.events on cgroup v2, memory.oom_control on cgroup v1 (Linux 4.13 and later; many
# GPU nodes still run v1, and the test node does).
CGROUP_OOM_COUNTERS = (
    Path("/sys/fs/cgroup/memory.events"),
    Path("/sys/fs/cgroup/memory/memory.oom_control"),
)
# glog lines (TensorFlow, absl) that say nothing about why a program ended.
_LOG_NOISE = re.compile(r"^([IWEF]\d{4} \d\d:\d\d:\d\d|WARNING: All log messages before absl)")
# A GPU out-of-memory line counts for the exit only among a run's last lines of output: an OOM
# that the program caught and recovered from long before it ended is not why it ended.
GPU_OOM_LINES = 200


# --------------------------------------------------------------------------------------------
# pure decisions


@dataclass(frozen=True)
class RunEnd:
    """Why one run of a member ended, as the contract names it."""

    exit_code: int
    reason: str
    message: str


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def last_meaningful_line(lines: Sequence[str]) -> str:
    """The last output line that may say why a program ended (framework log noise skipped)."""
    for line in reversed(lines):
        text = line.strip()
        if text and not _LOG_NOISE.match(text):
            return text
    return ""


def classify_exit(
    returncode: int,
    *,
    failure_reason: str | None = None,
    failure_message: str | None = None,
    stopped: bool = False,
    oom_killed: bool = False,
    last_output: str = "",
    gpu_oom_output: str = "",
) -> RunEnd:
    """Why a member's run ended, from its exit status and what it said before ending.

    `failure_reason` comes from the member's own "failed" event (e.g. GPUOutOfMemory), `stopped`
    says the supervisor asked it to stop, `oom_killed` that the kernel's OOM-kill count rose,
    `gpu_oom_output` is a line of its last output that reports a GPU out-of-memory error (a
    program that never entered `report.session`, or an OOM raised as a plain RuntimeError): with
    an error exit, or an abort (a C++ OOM that nothing caught), the run ended of it.
    """
    detail = f": {last_output}" if last_output else ""
    if returncode == 0:
        return RunEnd(0, REASON_COMPLETED, "exited with code 0")
    if returncode < 0:
        signum = -returncode
        name = signal_name(signum)
        if stopped:
            return RunEnd(128 + signum, REASON_STOPPED, f"stopped ({name})")
        if signum == signal.SIGKILL and oom_killed:
            return RunEnd(
                128 + signum,
                REASON_OOM_KILLED,
                "killed by the kernel's out-of-memory killer (SIGKILL): raise the memory limit",
            )
        if signum == signal.SIGABRT and gpu_oom_output:
            return RunEnd(128 + signum, REASON_GPU_OOM, f"aborted (SIGABRT): {gpu_oom_output}")
        return RunEnd(128 + signum, REASON_SIGNALED, f"killed by {name}{detail}")
    if failure_reason == REASON_GPU_OOM or returncode == EXIT_GPU_OOM or gpu_oom_output:
        said = f": {gpu_oom_output}" if gpu_oom_output else detail
        message = failure_message or f"exited with code {returncode}{said}"
        return RunEnd(returncode, REASON_GPU_OOM, message)
    if stopped:
        return RunEnd(returncode, REASON_STOPPED, f"stopped (exited with code {returncode})")
    if returncode == 128 + signal.SIGKILL and oom_killed:  # a shell reports its child's SIGKILL
        return RunEnd(
            returncode,
            REASON_OOM_KILLED,
            "killed by the kernel's out-of-memory killer (SIGKILL): raise the memory limit",
        )
    return RunEnd(returncode, REASON_ERROR, f"exited with code {returncode}{detail}")


def restart_delay(restarts_done: int, base: float) -> float:
    """Seconds before restart number `restarts_done + 1`: base, doubling, at most 30 s."""
    return float(min(MAX_RESTART_DELAY_SECONDS, base * 2**restarts_done))


def apply_event(status: MemberStatus, event: ProgressEvent) -> None:
    """Fold one progress event into a member's status (in place)."""
    if event.event == EVENT_STARTED:
        # A new run trains from the start: its progress replaces the previous run's.
        status.step = 0
        status.total_steps = event.total_steps
        status.epoch = status.loss = status.first_loss = status.samples_per_second = None
        return
    if event.step is not None and event.event == EVENT_STEP:
        status.step = event.step
    if event.total_steps is not None:
        status.total_steps = event.total_steps
    if event.epoch is not None:
        status.epoch = event.epoch
    if event.loss is not None:
        status.loss = event.loss
        if status.first_loss is None:
            status.first_loss = event.loss
    if event.samples_per_second is not None:
        status.samples_per_second = event.samples_per_second


def job_succeeded(policy: SuccessPolicy, phases: Sequence[MemberPhase | None]) -> bool:
    if policy == SuccessPolicy.ANY_MEMBER:
        return MemberPhase.SUCCEEDED in phases
    return all(phase == MemberPhase.SUCCEEDED for phase in phases)


def oom_kill_count(*paths: Path) -> int | None:
    """The kernel's OOM-kill count of this container's memory cgroup (v2 or v1: the first of
    ``paths``, CGROUP_OOM_COUNTERS by default, that has one), or None where none can be read."""
    for path in paths or CGROUP_OOM_COUNTERS:
        try:
            for line in path.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            continue
    return None


# --------------------------------------------------------------------------------------------
# processes


class Listener(Protocol):
    """Told about every change of every member; `final` once, when the member is done."""

    def member_changed(self, name: str, status: MemberStatus, *, final: bool = False) -> None: ...

    def tick(self) -> None: ...


class OutputPump:
    """Copies a member's output (stdout and stderr, merged) to its log file, optionally to a
    stream with a "[member] " prefix, keeps the last lines for the exit message, and remembers
    the last line that reports a GPU out-of-memory error."""

    def __init__(self, name: str, pipe: IO[bytes], log_file: IO[bytes], echo: TextIO | None):
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self.lines = 0
        self._gpu_oom: tuple[int, str] | None = None  # (line number, line)
        self._name, self._pipe, self._log, self._echo = name, pipe, log_file, echo
        self._thread = threading.Thread(target=self._run, name=f"output-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self._pipe, self._log:
            for raw in iter(self._pipe.readline, b""):
                self._log.write(raw)
                self._log.flush()
                line = raw.decode("utf-8", errors="replace").rstrip("\n")
                self.tail.append(line)
                self.lines += 1
                if is_gpu_oom_text(line):
                    self._gpu_oom = (self.lines, line.strip())
                if self._echo is not None:
                    self._echo.write(pod_log_line(self._name, line))
                    self._echo.flush()

    def gpu_oom_line(self, within: int = GPU_OOM_LINES) -> str:
        """The last GPU out-of-memory line among the last `within` lines ("" when none)."""
        if self._gpu_oom is None or self.lines - self._gpu_oom[0] >= within:
            return ""
        return self._gpu_oom[1]

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


@dataclass
class _RankRun:
    """One process of a member (one rank of a data-parallel member; the only one otherwise)."""

    rank: Rank
    progress_path: Path
    log_path: Path
    tail: ProgressTail
    process: subprocess.Popen[bytes] | None = None
    output: OutputPump | None = None
    failure: ProgressEvent | None = None
    end: RunEnd | None = None
    oom_kills_at_start: int | None = None
    # This run's start-up (wall clock): spawned here, then what its started event says; the
    # first step's line is echoed once per run.
    spawned: float | None = None
    launched: float | None = None
    started: float | None = None

    @property
    def is_chief(self) -> bool:
        """Rank 0: the one whose progress is the member's."""
        return self.rank.rank == 0


@dataclass
class _MemberRun:
    """The supervisor's state of one member (mutable; only the supervisor's thread touches it).

    A member runs as a gang of ranks: they start together, the first one that fails stops the
    others, and they restart together (one restart); the member succeeds when every rank has.
    """

    spec: Member
    budget: PlannedBudget
    status: MemberStatus
    ranks: list[_RankRun]
    restarts_left: int
    topology: MemberTopology | None = None
    runs: int = 0
    restarts_here: int = 0
    restart_at: float | None = None
    in_run: bool = False
    stop_message: str | None = None
    stop_deadline: float | None = None
    gang_end: RunEnd | None = None  # the first failure of this run, which stops the others
    handed_over: bool = False  # restarts with its replicas in other pods: the operator's job
    caps: dict[str, Any] = field(default_factory=dict)
    # Its framework reports its device memory (the reliable count): NVML then says nothing.
    probe_seen: bool = False
    # Its processes' resident memory when last sampled (in a pod of several members only).
    resident_bytes: int | None = None
    free_restart: bool = False  # the next restart costs nothing: it was a co-tenant's victim
    changed: bool = True
    final_sent: bool = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def phase(self) -> MemberPhase | None:
        return self.status.phase

    @property
    def done(self) -> bool:
        return self.phase in TERMINAL or self.handed_over

    @property
    def running(self) -> list[_RankRun]:
        return [r for r in self.ranks if r.process is not None]


@dataclass(frozen=True)
class SupervisorResult:
    """How the members ended and whether the job succeeded by its success policy."""

    succeeded: bool
    members: dict[str, MemberStatus]
    caps: dict[str, dict[str, Any]]
    started_at: float
    finished_at: float
    stopped_by: str | None = None  # why the supervisor was asked to stop, if it was
    stop_signal: int | None = None
    pod_retry: bool = False  # a member spanning pods failed: restart the pods together

    @property
    def exit_code(self) -> int:
        """The pod's exit code: 0; EXIT_MEMBERS_FAILED when members failed for good (the
        operator fails the job); 128+signal when stopped by one, EXIT_POD_RETRY when a member
        whose replicas span pods failed within its backoff (the operator may retry)."""
        if self.succeeded:
            return 0
        if self.stop_signal is not None:
            return 128 + self.stop_signal
        if self.pod_retry:
            return EXIT_POD_RETRY
        return EXIT_MEMBERS_FAILED


class Supervisor:
    """Runs the members of one `PodPlan` until each has succeeded or failed for good."""

    def __init__(
        self,
        plan: PodPlan,
        work_dir: Path,
        listeners: Sequence[Listener] = (),
        telemetry: Telemetry | None = None,
        *,
        echo: TextIO | None = None,
        grace_period: float = 10.0,
        restart_backoff: float = 1.0,
        poll_interval: float = 0.1,
        gpu_sample_interval: float = 1.0,
        memory_sample_interval: float = 0.5,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        oom_counters: Sequence[Path] = CGROUP_OOM_COUNTERS,
        resident_memory: Callable[[Iterable[int]], dict[int, int]] = resident_bytes_by_group,
    ) -> None:
        missing = [m.name for m in plan.members if m.name not in plan.budgets]
        if missing:
            raise ValueError(f"the pod plan has no budget for member(s) {', '.join(missing)}")
        unknown = sorted(set(plan.topology) - {m.name for m in plan.members})
        if unknown:
            raise ValueError(f"the pod plan has a topology for unknown member(s) {unknown}")
        self.plan = plan
        self.work_dir = work_dir
        self.listeners = list(listeners)
        self.telemetry: Telemetry = telemetry or NoGpu("no telemetry")
        self.echo = echo
        self.grace_period = grace_period
        self.restart_backoff = restart_backoff
        self.poll_interval = poll_interval
        self.gpu_sample_interval = gpu_sample_interval
        self.memory_sample_interval = memory_sample_interval
        self.oom_counters = tuple(oom_counters)
        self.resident_memory = resident_memory
        self._next_memory_sample = 0.0
        # Members inherit the supervisor's environment (CUDA_MPS_PIPE_DIRECTORY, proxies, ...)
        # but not its own COTRAIN_* variables: theirs are set per member.
        inherited = os.environ if environ is None else environ
        self.environ = {k: v for k, v in inherited.items() if not k.startswith("COTRAIN_")}
        self._clock = clock
        self._stop_message: str | None = None
        self._stop_signal: int | None = None
        self._kill_requested = False
        self._policy_stopped = False
        self._pod_retry = False
        self._next_gpu_sample = 0.0
        self.device_memory_bytes = plan.device_memory_bytes
        if self.device_memory_bytes is None:
            devices = self.telemetry.devices()
            self.device_memory_bytes = devices[0].total_memory_bytes if devices else None
        self.members = [self._prepare(member) for member in plan.members]

    # -- requests (safe from a signal handler) -------------------------------------------

    @property
    def stop_requested(self) -> bool:
        return self._stop_message is not None

    def request_stop(self, message: str, signum: int | None = None) -> None:
        """Stop every member cleanly (SIGTERM, SIGKILL after the grace period)."""
        if self._stop_message is None:
            self._stop_message, self._stop_signal = message, signum

    def request_kill(self) -> None:
        """Kill every member now (a second Ctrl-C)."""
        self._kill_requested = True

    # -- files -----------------------------------------------------------------------------

    def progress_path(self, name: str, rank: int = 0) -> Path:
        """The progress file of a member's rank (rank 0's is the member's)."""
        suffix = f".rank{rank}" if rank else ""
        return self.work_dir / "progress" / f"{name}{suffix}.jsonl"

    def log_path(self, name: str, rank: int = 0) -> Path:
        suffix = f".rank{rank}" if rank else ""
        return self.work_dir / "logs" / f"{name}{suffix}.log"

    def member_pids(self, name: str) -> list[int]:
        """The process ids of a member's running processes (its ranks; each leads its own
        process group)."""
        member = next(m for m in self.members if m.name == name)
        return [r.process.pid for r in member.ranks if r.process is not None]

    def _prepare(self, member: Member) -> _MemberRun:
        spent = self.plan.restarts.get(member.name, 0)
        topology = self.plan.topology.get(member.name)
        ranks = []
        for rank in member_ranks(member, topology):
            progress_path = self.progress_path(member.name, rank.rank)
            log_path = self.log_path(member.name, rank.rank)
            for path in (progress_path, log_path):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"")  # a rerun into the same directory starts afresh
            ranks.append(_RankRun(rank, progress_path, log_path, ProgressTail(progress_path)))
        return _MemberRun(
            spec=member,
            budget=self.plan.budgets[member.name],
            status=MemberStatus(phase=MemberPhase.PENDING, restarts=spent),
            ranks=ranks,
            restarts_left=max(0, self.plan.backoff_limit - spent),
            topology=topology,
        )

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> SupervisorResult:
        started = time.time()
        try:
            for member in self.members:
                self._launch(member)
            while True:
                now = self._clock()
                if self._stop_message is not None:
                    self._stop_all(self._stop_message, now)
                for member in self.members:
                    self._read_progress(member)
                    self._check_exit(member, now)
                self._apply_success_policy(now)
                self._restart_due(now)
                self._escalate(now)
                self._sample_gpu(now)
                self._sample_memory(now)
                self._notify()
                if all(m.done for m in self.members):
                    break
                time.sleep(self.poll_interval)
        finally:
            self._kill_everything()
        return SupervisorResult(
            succeeded=job_succeeded(self.plan.success_policy, [m.phase for m in self.members]),
            members={m.name: m.status.model_copy() for m in self.members},
            caps={m.name: dict(m.caps) for m in self.members},
            started_at=started,
            finished_at=time.time(),
            stopped_by=self._stop_message,
            stop_signal=self._stop_signal,
            pod_retry=self._pod_retry,
        )

    def _launch(self, member: _MemberRun) -> None:
        member.runs += 1
        member.restart_at = None
        member.gang_end = None
        member.stop_deadline = None
        member.resident_bytes = None  # evidence of this run only
        member.in_run = True
        member.status.phase = MemberPhase.RUNNING
        member.changed = True
        for rank in member.ranks:
            rank.failure, rank.end = None, None
        for rank in member.ranks:
            if member.gang_end is not None:  # an earlier rank could not start
                rank.end = RunEnd(0, REASON_STOPPED, "not started")
                continue
            self._launch_rank(member, rank)

    def _launch_rank(self, member: _MemberRun, rank: _RankRun) -> None:
        try:
            extra = rank_env(member.spec, member.topology, rank.rank)
            launch = member_launch(
                member.spec,
                member.budget,
                self.plan.mode,
                str(rank.progress_path),
                self.device_memory_bytes,
                processes=rank.rank.local_world_size,
                rank_env=extra,
            )
        except ValueError as error:  # a topology the member cannot run with
            self._rank_ended(member, rank, RunEnd(2, REASON_ERROR, str(error)), self._clock())
            return
        env = with_python_first({**self.environ, **launch.env})
        log_file = rank.log_path.open("ab")
        who = member.name if len(member.ranks) == 1 else f"{member.name} {rank.rank.label}"
        log_file.write(f"--- {who}: run {member.runs}: {' '.join(launch.argv)}\n".encode())
        log_file.flush()
        rank.oom_kills_at_start = oom_kill_count(*self.oom_counters)
        try:
            process = subprocess.Popen(
                launch.argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: signals reach its children too
            )
        except OSError as error:
            log_file.write(f"cannot start: {error}\n".encode())
            log_file.close()
            self._rank_ended(
                member, rank, RunEnd(127, REASON_ERROR, f"cannot start: {error}"), self._clock()
            )
            return
        assert process.stdout is not None  # stdout=PIPE
        rank.process = process
        rank.spawned, rank.launched, rank.started = time.time(), None, None
        prefix = log_source(member.name, None if len(member.ranks) == 1 else rank.rank.rank)
        rank.output = OutputPump(prefix, process.stdout, log_file, self.echo)

    def _read_progress(self, member: _MemberRun) -> None:
        for rank in member.ranks:
            for event in rank.tail.read():
                if event.event == EVENT_STARTED and event.caps and rank is member.ranks[0]:
                    member.caps = dict(event.caps)
                if event.event == EVENT_FAILED:
                    rank.failure = event
                if not rank.is_chief:
                    continue  # other ranks' progress only tells how they failed
                self._say_first_step(member, rank, event)
                apply_event(member.status, event)
                if event.gpu_memory_bytes is not None:
                    member.probe_seen = True
                    member.status.gpu_memory_bytes = event.gpu_memory_bytes
                if event.gpu_memory_peak_bytes is not None:
                    member.status.gpu_memory_peak_bytes = event.gpu_memory_peak_bytes
                member.changed = True

    def _say_first_step(self, member: _MemberRun, rank: _RankRun, event: ProgressEvent) -> None:
        """In a pod's log: how long the member's start-up took, and where it went."""
        if event.event == EVENT_STARTED:
            rank.launched, rank.started = event.launched, event.time
            return
        first = event.event == EVENT_STEP and event.step and not member.status.step
        if not first or self.echo is None or rank.spawned is None or event.time is None:
            return
        source = log_source(member.name, None if len(member.ranks) == 1 else rank.rank.rank)
        line = first_step_line(rank.spawned, rank.launched, rank.started, event.time)
        self.echo.write(pod_log_line(source, line))
        self.echo.flush()

    def _check_exit(self, member: _MemberRun, now: float) -> None:
        for rank in member.ranks:
            process = rank.process
            if process is None or process.poll() is None:
                continue
            returncode = process.returncode
            rank.process = None
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)  # whatever it left behind ends with it
            if rank.output is not None:
                rank.output.join(timeout=2.0)
            self._read_progress(member)  # what it wrote just before it ended
            kills = oom_kill_count(*self.oom_counters)
            end = classify_exit(
                returncode,
                failure_reason=rank.failure.reason if rank.failure else None,
                failure_message=rank.failure.message if rank.failure else None,
                stopped=member.stop_message is not None or member.gang_end is not None,
                oom_killed=(
                    kills is not None
                    and rank.oom_kills_at_start is not None
                    and kills > rank.oom_kills_at_start
                ),
                last_output=last_meaningful_line(list(rank.output.tail) if rank.output else []),
                gpu_oom_output=rank.output.gpu_oom_line() if rank.output else "",
            )
            self._rank_ended(member, rank, end, now)
        if member.in_run and all(rank.end is not None for rank in member.ranks):
            self._gang_ended(member, now)

    def _rank_ended(self, member: _MemberRun, rank: _RankRun, end: RunEnd, now: float) -> None:
        """One rank ended; the first to fail stops the others (they restart together)."""
        rank.end = end
        member.changed = True
        if end.reason == REASON_COMPLETED or member.gang_end is not None:
            return
        if member.stop_message is not None:
            return
        if len(member.ranks) > 1 or (member.topology and member.topology.replicas > 1):
            end = RunEnd(end.exit_code, end.reason, f"{rank.rank.label}: {end.message}")
        member.gang_end = end
        others = member.running
        if others:
            member.stop_deadline = now + self.grace_period
            for other in others:
                _signal_group(other.process, signal.SIGTERM)

    def _gang_ended(self, member: _MemberRun, now: float) -> None:
        member.in_run = False
        member.stop_deadline = None
        if member.gang_end is not None:
            end = member.gang_end
        else:
            ends = [rank.end for rank in member.ranks if rank.end is not None]
            failed = [e for e in ends if e.reason != REASON_COMPLETED]
            end = failed[0] if failed else ends[0]
        self._run_ended(member, end, now)

    def _run_ended(self, member: _MemberRun, end: RunEnd, now: float | None = None) -> None:
        status = member.status
        status.exit_code = end.exit_code
        member.changed = True
        if end.reason == REASON_COMPLETED:
            status.phase, status.reason, status.message = MemberPhase.SUCCEEDED, end.reason, None
            return
        if member.stop_message is not None:
            status.phase, status.reason = MemberPhase.FAILED, REASON_STOPPED
            status.message = _clip(f"{member.stop_message}; {end.message}")
            return
        now = now if now is not None else self._clock()
        blamed = self._at_fault(member, end)
        if blamed:
            self._co_tenant_fault(member, end, blamed, now)
            return
        status.reason = end.reason
        if end.reason == REASON_GPU_OOM:
            # A cap that was too small is too small again: restarting only delays co-tenants.
            status.phase = MemberPhase.FAILED
            status.message = _clip(
                f"{end.message} (not restarted: raise spec.members[{member.name}].gpu.memory "
                "or lower batchSize)"
            )
            return
        limit = self.plan.backoff_limit
        if member.restarts_left > 0 and spans_pods(member.topology):
            # Its other replicas run in other pods: only the operator can restart them all.
            member.handed_over = True
            self._pod_retry = True
            status.phase = MemberPhase.RESTARTING
            status.message = _clip(
                f"{end.message}; its replicas span pods: the pod exits so that they restart "
                f"together (restart {status.restarts + 1} of {limit})"
            )
            return
        if member.restarts_left > 0:
            delay = restart_delay(member.restarts_here, self.restart_backoff)
            member.restart_at = now + delay
            status.phase = MemberPhase.RESTARTING
            status.message = _clip(
                f"{end.message}; restart {status.restarts + 1} of {limit} in {delay:.1f}s"
            )
            return
        status.phase, status.reason = MemberPhase.FAILED, REASON_BACKOFF_EXCEEDED
        status.message = _clip(
            f"{end.reason}: {end.message}; backoffLimit {limit} reached after "
            f"{status.restarts} restart(s)"
        )

    # -- who was at fault (see cotrain_trainer.fault) ---------------------------------------

    def _usage(self, member: _MemberRun, reason: str | None, *, own: bool = False) -> Usage:
        """What is known of ``member``'s use of the pool that ran out: resident memory against
        its resources.limits.memory for an OOM kill, device memory (the frameworks' probes)
        against its gpu.memory budget for a GPU OOM; its peak for the member that ran out."""
        running = bool(member.running)
        if reason == REASON_OOM_KILLED:
            return Usage(
                member.name, member.resident_bytes, memory_limit_bytes(member.spec), running
            )
        used = member.status.gpu_memory_bytes
        if own:
            used = member.status.gpu_memory_peak_bytes or used
        return Usage(member.name, used, member.budget.memory_bytes, running)

    def _at_fault(self, member: _MemberRun, end: RunEnd) -> list[tuple[_MemberRun, Usage]]:
        """The running co-tenants to charge for ``member``'s out-of-memory end, if it was
        their fault; none otherwise (``member`` is then charged, as for any failure)."""
        if end.reason not in (REASON_OOM_KILLED, REASON_GPU_OOM) or len(self.members) < 2:
            return []
        if spans_pods(member.topology):
            return []  # its restart is the operator's, with its replicas in other pods
        others = [m for m in self.members if m is not member]
        for other in others:  # what they hold now, not at the last tick
            self._read_progress(other)
        self._sample_memory(self._clock(), force=True)
        by_name = {m.name: m for m in others}
        found = culprits(
            self._usage(member, end.reason, own=True),
            [self._usage(m, end.reason) for m in others if m.gang_end is None],
        )
        return [(by_name[u.member], u) for u in found]

    def _co_tenant_fault(
        self,
        victim: _MemberRun,
        end: RunEnd,
        blamed: list[tuple[_MemberRun, Usage]],
        now: float,
    ) -> None:
        """``victim`` ran out while within its own limit because ``blamed`` were over theirs:
        it restarts at no cost to its backoffLimit, and each of them is stopped and charged."""
        pool = "memory" if end.reason == REASON_OOM_KILLED else "GPU memory"
        mine = self._usage(victim, end.reason, own=True)
        held = "; ".join(f"{u.member} held {u.describe()}" for _, u in blamed)
        delay = restart_delay(0, self.restart_backoff)
        status = victim.status
        status.phase, status.reason = MemberPhase.RESTARTING, REASON_CO_TENANT_FAULT
        status.message = _clip(
            f"{end.reason}: {end.message}; it held {mine.describe()} ({pool}) while "
            f"co-tenant {held}: restarted in {delay:.1f}s at no cost to its backoffLimit"
        )
        victim.restart_at = now + delay
        victim.free_restart = True
        for culprit, usage in blamed:
            self._charge(
                culprit,
                RunEnd(
                    128 + signal.SIGTERM,
                    end.reason,
                    f"it held {usage.describe()} ({pool}), over its own limit, so "
                    f"co-tenant {victim.name} ran out ({end.reason}); stopped",
                ),
                now,
            )

    def _charge(self, member: _MemberRun, end: RunEnd, now: float) -> None:
        """Stop a co-tenant found at fault: its run ends as ``end``, and counts as any failure
        of that kind does (an OOM kill against backoffLimit; a GPU OOM is not restarted)."""
        running = member.running
        if not running or member.gang_end is not None or member.stop_message is not None:
            return
        member.gang_end = end
        member.stop_deadline = now + self.grace_period
        for rank in running:
            _signal_group(rank.process, signal.SIGTERM)

    def _sample_memory(self, now: float, *, force: bool = False) -> None:
        """Each running member's resident memory (its ranks' process groups), kept as evidence
        for an OOM kill; only in a pod of several members, where there is someone to blame."""
        if len(self.members) < 2 or (now < self._next_memory_sample and not force):
            return
        self._next_memory_sample = now + self.memory_sample_interval
        groups = {m.name: [r.process.pid for r in m.running if r.process] for m in self.members}
        try:
            resident = self.resident_memory(pid for pids in groups.values() for pid in pids)
        except OSError as error:  # evidence is best effort; training goes on without it
            log.warning("reading resident memory failed: %s", error)
            return
        for member in self.members:
            pids = groups[member.name]
            if pids and any(pid in resident for pid in pids):
                member.resident_bytes = sum(resident.get(pid, 0) for pid in pids)

    def _restart_due(self, now: float) -> None:
        for member in self.members:
            due = member.restart_at is not None and now >= member.restart_at
            if member.phase == MemberPhase.RESTARTING and due and not member.handed_over:
                if member.free_restart:
                    member.free_restart = False
                else:
                    member.restarts_left -= 1
                    member.restarts_here += 1
                    member.status.restarts += 1
                self._launch(member)

    def _apply_success_policy(self, now: float) -> None:
        if self._policy_stopped or not any(m.phase in ACTIVE and not m.done for m in self.members):
            return
        if self.plan.success_policy == SuccessPolicy.ANY_MEMBER:
            winner = next((m for m in self.members if m.phase == MemberPhase.SUCCEEDED), None)
            if winner is not None:
                self._policy_stopped = True
                self._stop_all(
                    f"stopped: member {winner.name} succeeded (successPolicy AnyMember)", now
                )
            return
        loser = next(
            (
                m
                for m in self.members
                if (m.phase == MemberPhase.FAILED and m.status.reason != REASON_STOPPED)
                or m.handed_over
            ),
            None,
        )
        if loser is not None:
            self._policy_stopped = True
            self._stop_all(
                f"stopped: member {loser.name} failed with {loser.status.reason} "
                "(successPolicy AllMembers)",
                now,
            )

    def _stop_all(self, message: str, now: float) -> None:
        for member in self.members:
            if member.done or member.stop_message is not None:
                continue
            member.stop_message = message
            running = member.running
            if running:
                member.stop_deadline = now + self.grace_period
                for rank in running:
                    _signal_group(rank.process, signal.SIGTERM)
            elif not member.in_run:  # waiting to restart, or never started
                status = member.status
                why = message
                if status.phase == MemberPhase.RESTARTING and status.reason:
                    why = f"{message}; it was to restart after {status.reason}: {status.message}"
                status.phase, status.reason = MemberPhase.FAILED, REASON_STOPPED
                status.message = _clip(why)
                member.changed = True

    def _escalate(self, now: float) -> None:
        for member in self.members:
            running = member.running
            if not running:
                continue
            overdue = member.stop_deadline is not None and now >= member.stop_deadline
            if self._kill_requested or overdue:
                if self._kill_requested and member.stop_message is None:
                    member.stop_message = self._stop_message or "killed"
                for rank in running:
                    _signal_group(rank.process, signal.SIGKILL)

    def _sample_gpu(self, now: float) -> None:
        if not self.telemetry.available or now < self._next_gpu_sample:
            return
        self._next_gpu_sample = now + self.gpu_sample_interval
        try:
            used_by_pid = self.telemetry.process_memory()
        except Exception as error:  # telemetry is best effort; training goes on without it
            log.warning("GPU telemetry failed: %s", error)
            return
        groups: dict[int, int] = {}
        for pid, used in used_by_pid.items():
            try:
                group = os.getpgid(pid)
            except (ProcessLookupError, PermissionError):
                continue  # not ours, or in another PID namespace
            groups[group] = groups.get(group, 0) + used
        for member in self.members:
            pids = [r.process.pid for r in member.ranks if r.process is not None]
            # NVML only for a member whose framework says nothing (a program that never reports):
            # in a container it lists host PIDs, which rarely match ours and may match wrongly.
            if member.probe_seen or not any(pid in groups for pid in pids):
                continue
            used = sum(groups.get(pid, 0) for pid in pids)  # every device of the member here
            member.status.gpu_memory_bytes = used
            peak = member.status.gpu_memory_peak_bytes or 0
            member.status.gpu_memory_peak_bytes = max(used, peak)
            member.changed = True

    def _notify(self) -> None:
        for member in self.members:
            if not member.changed or member.final_sent:
                continue
            member.changed = False
            final = member.done
            member.final_sent = final
            for listener in self.listeners:
                listener.member_changed(member.name, member.status.model_copy(), final=final)
        for listener in self.listeners:
            listener.tick()

    def _kill_everything(self) -> None:
        """Leave no member behind, whatever ended the loop."""
        for member in self.members:
            for rank in member.ranks:
                if rank.process is not None and rank.process.poll() is None:
                    _signal_group(rank.process, signal.SIGKILL)
                    rank.process.wait()
                if rank.output is not None:
                    rank.output.join(timeout=2.0)


def _signal_group(process: subprocess.Popen[bytes] | None, signum: int) -> None:
    if process is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


def _clip(text: str) -> str:
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 3] + "..."


@contextlib.contextmanager
def stop_on_signals(
    supervisor: Supervisor, signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)
) -> Iterator[None]:
    """While inside: the first SIGINT/SIGTERM stops the members cleanly, a second kills them."""

    def handle(signum: int, frame: FrameType | None) -> None:
        if supervisor.stop_requested:
            supervisor.request_kill()
        else:
            supervisor.request_stop(f"stopped by {signal_name(signum)}", signum)

    previous = {signum: signal.signal(signum, handle) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
