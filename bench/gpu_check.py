"""GPU proof: the mixed example's PyTorch and TensorFlow members training at once on one GPU,
each under its memory cap, through the project's own supervisor.

    .venv/bin/python bench/gpu_check.py [--steps 2000] [--seconds 20] [--out DIR] [--no-mps]

On a machine without an NVIDIA GPU (NVML finds no driver or no device) it prints a line starting
"no GPU:" and exits 0: there is nothing to prove there. On a GPU it runs, one after the other,
every member of examples/mixed-same-gpu.yaml (torch-mlp, tf-mlp; gpu.memory 6Gi each):

1. solo: each member alone (TimeSlicing), `--steps` steps, for its samples/s alone;
2. concurrent: both at once (TimeSlicing), each for about `--seconds` of training at its solo
   rate, so that they overlap; samples/s counted only while both train;
3. over cap: co-tenants over their caps while tf-mlp trains under its own: the built-in PyTorch
   member with gpu.memory 1Mi (ends through `report.session`, exit 75), a user command that
   applies its caps and allocates 256 MiB under a 64Mi cap after the co-tenant's first step and
   never enters `report.session` (ends through its printed traceback), and, when TensorFlow sees
   the GPU, the built-in TensorFlow member at 1Mi. Each must end GPUOutOfMemory, unrestarted,
   while tf-mlp trains to its last step (successPolicy AnyMember, so that a failure stops no one);
4. MPS: both at once with gpu.computePercent 50 each, under an MPS control daemon this script
   starts (`nvidia-cuda-mps-control -d`, its pipe and log directories under /tmp) and quits,
   where the binary is there and the daemon starts; skipped, saying why, otherwise.

It prints one table: per scenario and member, the device it trained on, the cap in force (as the
framework reports it), its peak device memory by the framework's own probe (what the supervisor
reports as gpuMemoryPeakBytes) and by NVML (per process, context included), samples/s, and how
it ended; then the concurrent/solo ratio and every check with PASS or FAIL. Checks: PyTorch sees
the GPU; every capped member's framework peak is within its cap; both members succeed together
(TimeSlicing and MPS); every over-cap member ends GPUOutOfMemory while the co-tenant completes.
Exit status: 0 without a GPU or when every check passes, 1 when one fails. Results also go to
DIR (default /tmp/cotrain-gpu-check): table.txt, results.json and each run's member logs.

The environment is the project's .venv as `.ci/setup` makes it: its torch wheel is a CUDA build;
tensorflow-cpu trains on the CPU, so TensorFlow's half of the proof needs
`pip install "tensorflow[and-cuda]==2.21.0"` in its place (the trainer image's choice); the
table says which device each member used.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cotrain_operator.api import parse_job
from cotrain_operator.api.contract import REASON_GPU_OOM
from cotrain_operator.api.models import MemberPhase, MemberStatus
from cotrain_trainer.caps import MIB
from cotrain_trainer.gpu import GpuDevice, Telemetry, open_telemetry
from cotrain_trainer.plan import available_cores, local_plan
from cotrain_trainer.report import EVENT_STEP, ProgressEvent, read_events
from cotrain_trainer.supervisor import Supervisor

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "mixed-same-gpu.yaml"
TORCH, TF = "torch-mlp", "tf-mlp"
RUN_LIMIT_SECONDS = 300.0  # a scenario that takes longer is stopped: something hangs

# A user's PyTorch program over its cap that never enters report.session: it waits until its
# co-tenant trains (its progress file has a step), then allocates 256 MiB under a 64 MiB cap.
OVER_CAP_COMMAND = """
import pathlib, sys, time
import torch
from cotrain_trainer import report

print("caps:", report.apply_caps(), flush=True)
co_tenant = pathlib.Path(sys.argv[1])
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    if co_tenant.exists() and '"event":"step"' in co_tenant.read_text():
        break
    time.sleep(0.1)
steps = co_tenant.read_text().count('"event":"step"') if co_tenant.exists() else 0
print(f"co-tenant has reported {steps} step(s); allocating 256 MiB", flush=True)
x = torch.empty(64 * 2**20, dtype=torch.float32, device="cuda")
torch.cuda.synchronize()
print("allocated 256 MiB: the cap did not hold", flush=True)
"""


# --------------------------------------------------------------------------------------------
# measuring


class NvmlPeaks:
    """The machine's telemetry, passed through to the supervisor, keeping each process's peak of
    NVML's per-process memory (on this host NVML's PIDs are ours)."""

    def __init__(self, inner: Telemetry) -> None:
        self.inner = inner
        self.peak_by_pid: dict[int, int] = {}

    @property
    def available(self) -> bool:
        return self.inner.available

    @property
    def reason(self) -> str:
        return self.inner.reason

    def devices(self) -> list[GpuDevice]:
        return self.inner.devices()

    def process_memory(self) -> dict[int, int]:
        used = self.inner.process_memory()
        for pid, size in used.items():
            self.peak_by_pid[pid] = max(size, self.peak_by_pid.get(pid, 0))
        return used

    def utilization(self, index: int) -> int | None:
        return self.inner.utilization(index)

    def close(self) -> None:
        self.inner.close()


class PidLog:
    """A supervisor listener that notes which process ids each member ran as."""

    def __init__(self) -> None:
        self.supervisor: Supervisor | None = None
        self.pids: dict[str, set[int]] = {}

    def member_changed(self, name: str, status: MemberStatus, *, final: bool = False) -> None:
        self.tick()

    def tick(self) -> None:
        if self.supervisor is None:
            return
        for member in self.supervisor.plan.members:
            self.pids.setdefault(member.name, set()).update(
                self.supervisor.member_pids(member.name)
            )


@dataclass
class Row:
    """One member of one scenario, as the table shows it."""

    scenario: str
    member: str
    framework: str
    device: str
    cap: str
    budget_bytes: int | None
    probe_peak_bytes: int | None
    nvml_peak_bytes: int | None
    samples_per_second: float | None
    phase: str
    reason: str | None
    restarts: int
    step: int | None
    total_steps: int | None
    message: str | None = None


@dataclass
class Run:
    """One scenario's supervisor run."""

    scenario: str
    rows: dict[str, Row] = field(default_factory=dict)
    window: tuple[float, float] | None = None  # when every member of the run was training


def step_points(events: Sequence[ProgressEvent]) -> list[tuple[float, int]]:
    return [
        (e.time, e.step)
        for e in events
        if e.event == EVENT_STEP and e.time is not None and e.step is not None
    ]


def samples_per_second(
    points: Sequence[tuple[float, int]], batch: int, window: tuple[float, float] | None = None
) -> float | None:
    """Training throughput between the first and the last step event (inside `window`, when
    given): start-up never counts."""
    if window is not None:
        points = [p for p in points if window[0] <= p[0] <= window[1]]
    if len(points) < 2 or points[-1][0] <= points[0][0]:
        return None
    return (points[-1][1] - points[0][1]) * batch / (points[-1][0] - points[0][0])


def overlap(traces: Sequence[Sequence[tuple[float, int]]]) -> tuple[float, float] | None:
    if any(len(t) < 2 for t in traces):
        return None
    start, end = max(t[0][0] for t in traces), min(t[-1][0] for t in traces)
    return (start, end) if end > start else None


# --------------------------------------------------------------------------------------------
# running


def example_document() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return document


def run_scenario(
    scenario: str,
    document: Mapping[str, Any],
    telemetry: Telemetry,
    out: Path,
    environ: Mapping[str, str] | None = None,
    measure_together: bool = False,
) -> Run:
    """Plan `document` for this machine and run it through the supervisor."""
    job = parse_job(document)
    local = local_plan(job, telemetry.devices(), available_cores())
    work = out / scenario
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    nvml = NvmlPeaks(telemetry)
    pids = PidLog()
    supervisor = Supervisor(
        local.plan,
        work,
        [pids],
        nvml,
        gpu_sample_interval=0.25,
        restart_backoff=1.0,
        environ={**os.environ, **(environ or {})},
    )
    pids.supervisor = supervisor
    # Raise the supervisor's own stop (SIGTERM, then SIGKILL) if a run hangs.
    watchdog = threading.Timer(
        RUN_LIMIT_SECONDS, supervisor.request_stop, args=(f"stopped: over {RUN_LIMIT_SECONDS}s",)
    )
    watchdog.daemon = True
    watchdog.start()
    try:
        result = supervisor.run()
    finally:
        watchdog.cancel()
    traces = {
        m.name: step_points(read_events(supervisor.progress_path(m.name)))
        for m in local.plan.members
    }
    run = Run(scenario)
    if measure_together:
        run.window = overlap(list(traces.values()))
    for member in local.plan.members:
        status = result.members[member.name]
        caps = result.caps.get(member.name, {})
        peaks = [
            nvml.peak_by_pid[p] for p in pids.pids.get(member.name, ()) if p in nvml.peak_by_pid
        ]
        run.rows[member.name] = Row(
            scenario=scenario,
            member=member.name,
            framework=member.framework.value,
            device=str(caps.get("device", "-")),
            cap=str(caps.get("memoryCap", "-")),
            budget_bytes=local.plan.budgets[member.name].memory_bytes,
            probe_peak_bytes=status.gpu_memory_peak_bytes,
            nvml_peak_bytes=max(peaks) if peaks else None,
            samples_per_second=samples_per_second(
                traces[member.name], member.batch_size, run.window
            ),
            phase=status.phase.value if status.phase else "-",
            reason=status.reason,
            restarts=status.restarts,
            step=status.step,
            total_steps=status.total_steps,
            message=status.message,
        )
        if status.phase != MemberPhase.SUCCEEDED:
            log = supervisor.log_path(member.name)
            tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
            print(f"--- {scenario}/{member.name}: {status.reason}: {status.message}", flush=True)
            for line in tail:
                print(f"    {line}", flush=True)
    return run


def with_members(document: Mapping[str, Any], members: list[dict[str, Any]]) -> dict[str, Any]:
    changed = copy.deepcopy(dict(document))
    changed["spec"]["members"] = members
    return changed


def member_of(document: Mapping[str, Any], source: str, **changes: Any) -> dict[str, Any]:
    """A copy of the example's member `source`, with `changes` (gpu merged)."""
    found = next(m for m in document["spec"]["members"] if m["name"] == source)
    member: dict[str, Any] = copy.deepcopy(found)
    for key, value in changes.items():
        if key == "gpu":
            member["gpu"] = {**member.get("gpu", {}), **value}
        else:
            member[key] = value
    return member


def steps_for(rate: float | None, batch: int, seconds: float, fallback: int) -> int:
    """Steps that train for about `seconds` at `rate` samples/s."""
    if not rate:
        return fallback
    return max(fallback, math.ceil(rate * seconds / batch))


# --------------------------------------------------------------------------------------------
# MPS


@dataclass
class MpsDaemon:
    control: str
    environ: dict[str, str]
    log_dir: Path

    def quit(self) -> None:
        subprocess.run(
            [self.control],
            input="quit\n",
            text=True,
            env={**os.environ, **self.environ},
            capture_output=True,
            timeout=30,
            check=False,
        )

    def server_started(self) -> bool:
        log = self.log_dir / "control.log"
        return log.exists() and "Starting new server" in log.read_text(errors="replace")


def start_mps() -> MpsDaemon | str:
    """An MPS control daemon of this script's own, or why there is none."""
    control = shutil.which("nvidia-cuda-mps-control")
    if control is None:
        return "nvidia-cuda-mps-control is not on PATH"
    root = Path(tempfile.mkdtemp(prefix="cotrain-mps-", dir="/tmp"))
    pipe, log_dir = root / "pipe", root / "log"
    pipe.mkdir()
    log_dir.mkdir()
    environ = {"CUDA_MPS_PIPE_DIRECTORY": str(pipe), "CUDA_MPS_LOG_DIRECTORY": str(log_dir)}
    try:
        started = subprocess.run(
            [control, "-d"],
            env={**os.environ, **environ},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"nvidia-cuda-mps-control -d failed: {error}"
    if started.returncode != 0:
        said = (started.stderr or started.stdout).strip()
        return f"nvidia-cuda-mps-control -d exited {started.returncode}: {said}"
    return MpsDaemon(control, environ, log_dir)


# --------------------------------------------------------------------------------------------
# the report


def mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MIB:,.1f}"


def rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def table(rows: Sequence[Row]) -> str:
    header = (
        "scenario",
        "member",
        "device",
        "cap in force",
        "probe peak MiB",
        "NVML peak MiB",
        "samples/s",
        "end",
    )
    lines = [
        (
            r.scenario,
            r.member,
            r.device,
            r.cap,
            mib(r.probe_peak_bytes),
            mib(r.nvml_peak_bytes),
            rate(r.samples_per_second),
            f"{r.phase}/{r.reason or '-'}" + (f" ({r.restarts} restarts)" if r.restarts else ""),
        )
        for r in rows
    ]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *lines, strict=True)]
    return "\n".join(
        " | ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True))
        for line in [header, tuple("-" * w for w in widths), *lines]
    )


def cap_bytes(row: Row) -> int | None:
    """The bytes the member's framework may hold: its budget (torch's fraction of the whole
    device is budget/device; TensorFlow's memory_limit is the budget in whole MiB)."""
    if row.budget_bytes is None:
        return None
    if row.framework == "TensorFlow":
        return (row.budget_bytes // MIB) * MIB
    return row.budget_bytes


def on_gpu(row: Row) -> bool:
    return row.device.startswith("cuda")


class Checks:
    def __init__(self) -> None:
        self.results: list[tuple[bool, str]] = []

    def check(self, ok: bool, what: str) -> None:
        self.results.append((ok, what))

    @property
    def passed(self) -> bool:
        return all(ok for ok, _ in self.results)

    def lines(self) -> list[str]:
        return [f"{'PASS' if ok else 'FAIL'}  {what}" for ok, what in self.results]


def check_caps_held(checks: Checks, run: Run) -> None:
    for row in run.rows.values():
        limit = cap_bytes(row)
        if not on_gpu(row) or limit is None or row.phase != MemberPhase.SUCCEEDED.value:
            continue
        peak = row.probe_peak_bytes
        checks.check(
            peak is not None and 0 < peak <= limit,
            f"{run.scenario}/{row.member}: framework peak {mib(peak)} MiB within its cap "
            f"{mib(limit)} MiB",
        )


def check_together(checks: Checks, run: Run) -> None:
    done = all(r.phase == MemberPhase.SUCCEEDED.value for r in run.rows.values())
    checks.check(done, f"{run.scenario}: every member succeeded")
    checks.check(run.window is not None, f"{run.scenario}: the members trained at the same time")


# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=2000, help="steps of each solo run")
    parser.add_argument(
        "--seconds", type=float, default=20.0, help="training seconds of each concurrent member"
    )
    parser.add_argument("--out", default="/tmp/cotrain-gpu-check", help="where results go")
    parser.add_argument("--no-mps", action="store_true", help="skip the MPS scenario")
    args = parser.parse_args(argv)

    telemetry = open_telemetry()
    if not telemetry.available:
        print(f"no GPU: {telemetry.reason or 'NVML reports no device'}; nothing to prove here")
        telemetry.close()
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = telemetry.devices()[0]
    print(f"{device.describe()}; {available_cores()} CPU core(s); results in {out}", flush=True)
    document = example_document()
    checks = Checks()
    runs: list[Run] = []
    notes: list[str] = []
    try:
        # 1. solo
        solo: dict[str, Row] = {}
        for name in (TORCH, TF):
            member = member_of(document, name, steps=args.steps)
            run = run_scenario(f"solo-{name}", with_members(document, [member]), telemetry, out)
            runs.append(run)
            solo[name] = run.rows[name]
            check_caps_held(checks, run)
        checks.check(on_gpu(solo[TORCH]), f"PyTorch trains on the GPU ({solo[TORCH].device})")
        tf_on_gpu = on_gpu(solo[TF])
        if not tf_on_gpu:
            notes.append(
                "TensorFlow trained on the CPU here (tensorflow-cpu): its GPU half needs "
                '`pip install "tensorflow[and-cuda]==2.21.0"` (the trainer image\'s build)'
            )

        # 2. concurrent, TimeSlicing
        pair = [
            member_of(
                document,
                name,
                steps=steps_for(
                    solo[name].samples_per_second,
                    int(member_of(document, name)["batchSize"]),
                    args.seconds,
                    args.steps,
                ),
            )
            for name in (TORCH, TF)
        ]
        together = run_scenario(
            "concurrent", with_members(document, pair), telemetry, out, measure_together=True
        )
        runs.append(together)
        check_together(checks, together)
        check_caps_held(checks, together)
        for name in (TORCH, TF):
            alone, shared = solo[name].samples_per_second, together.rows[name].samples_per_second
            if alone and shared:
                notes.append(f"{name}: concurrent/solo samples/s = {shared / alone:.2f}")

        # 3. over cap, with a co-tenant training under its own cap
        co_tenant = pair[1]
        over = [
            member_of(document, TORCH, name="torch-over", gpu={"memory": "1Mi"}),
            {
                "name": "torch-own-over",
                "framework": "PyTorch",
                "command": [sys.executable, "-c", OVER_CAP_COMMAND],
                "args": [str(out / "over-cap" / "progress" / f"{TF}.jsonl")],
                "gpu": {"memory": "64Mi"},
            },
        ]
        if tf_on_gpu:
            over.append(member_of(document, TF, name="tf-over", gpu={"memory": "1Mi"}))
        over_doc = with_members(document, [*over, co_tenant])
        over_doc["spec"]["successPolicy"] = "AnyMember"  # a failure stops no co-tenant
        over_run = run_scenario("over-cap", over_doc, telemetry, out)
        runs.append(over_run)
        for member in over:
            row = over_run.rows[member["name"]]
            checks.check(
                row.reason == REASON_GPU_OOM and row.restarts == 0,
                f"over-cap/{row.member} (gpu.memory {member['gpu']['memory']}) ended "
                f"GPUOutOfMemory, not restarted (got {row.phase}/{row.reason})",
            )
        tenant = over_run.rows[TF]
        checks.check(
            tenant.phase == MemberPhase.SUCCEEDED.value
            and tenant.step is not None
            and tenant.step == tenant.total_steps,
            f"over-cap/{TF}: the co-tenant trained to its last step ({tenant.step} of "
            f"{tenant.total_steps})",
        )

        # 4. MPS
        if args.no_mps:
            notes.append("MPS: skipped (--no-mps)")
        else:
            daemon = start_mps()
            if isinstance(daemon, str):
                notes.append(f"MPS: skipped: {daemon}")
            else:
                try:
                    mps_pair = [
                        {**m, "gpu": {**m.get("gpu", {}), "computePercent": 50}} for m in pair
                    ]
                    mps_doc = with_members(document, mps_pair)
                    mps_doc["spec"]["sharing"] = {"mode": "MPS"}
                    mps = run_scenario(
                        "mps", mps_doc, telemetry, out, daemon.environ, measure_together=True
                    )
                finally:
                    daemon.quit()
                runs.append(mps)
                check_together(checks, mps)
                check_caps_held(checks, mps)
                served = "says" if daemon.server_started() else "does not say"
                notes.append(f"MPS: the daemon's control.log {served} it started a server")
    finally:
        telemetry.close()

    rows = [row for run in runs for row in run.rows.values()]
    for row in rows:
        if row.budget_bytes is not None:
            row.cap = f"{row.cap} [budget {mib(row.budget_bytes)} MiB]"
    text = "\n".join([table(rows), "", *notes, "", *checks.lines()])
    print()
    print(text)
    (out / "table.txt").write_text(text + "\n")
    (out / "results.json").write_text(
        json.dumps(
            {
                "device": device.describe(),
                "rows": [asdict(r) for r in rows],
                "notes": notes,
                "checks": [{"ok": ok, "check": what} for ok, what in checks.results],
            },
            indent=2,
        )
    )
    print(f"\n{'every check passed' if checks.passed else 'a check FAILED'}")
    return 0 if checks.passed else 1


if __name__ == "__main__":
    sys.exit(main())
