"""The `cotrain` command: `crd`, `validate`, `explain`, `run` (the local trainer), `submit`,
`status` and `logs` (a cluster's jobs) and `supervise` (the trainer pod's entry point).

Owns argument parsing and what each local subcommand prints; the work is done by the API package
(validation, CRD rendering), by the supervisor (running members), by the reporter and, for the
cluster commands, by `cluster.py`. Exit codes: 0 success, 1 invalid input, a failed job or an
error from the cluster, 2 usage errors, 130 a `cotrain run` or a followed job stopped by Ctrl-C
(a job in a cluster keeps running); `cotrain supervise` exits as the operator expects (see
`SupervisorResult.exit_code`).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import yaml
from pydantic import ValidationError

from cotrain_operator.api import KIND, CoTrainJob, InvalidJobError, parse_job
from cotrain_operator.api.contract import ENV_POD_PLAN, ENV_REPORT_MODE, PodPlan
from cotrain_operator.api.crd import object_schema, render_crd_yaml
from cotrain_operator.api.manifest import ManifestError, load_all
from cotrain_operator.api.models import (
    CoTrainJobSpec,
    CoTrainJobStatus,
    JobPhase,
    Member,
    MemberBudget,
    MemberPhase,
    MemberStatus,
    SharingStatus,
)
from cotrain_operator.api.validation import applied_size_violation
from cotrain_trainer.reporter import rfc3339


def load_documents(path: str) -> Iterator[tuple[str, Any]]:
    """(label, document) for every YAML document in `path` ('-' reads stdin)."""
    if path == "-":
        text, source = sys.stdin.read(), "<stdin>"
    else:
        text, source = Path(path).read_text(encoding="utf-8"), path
    for index, document in enumerate(load_all(text)):
        yield f"{source}#{index + 1}" if index else source, document


def load_job_document(path: str) -> dict[str, Any]:
    """The one CoTrainJob document in `path`, as written, once it validates: InvalidJobError
    (or ValueError) when there is not one or it is invalid."""
    jobs = [
        doc for _, doc in load_documents(path) if isinstance(doc, dict) and doc.get("kind") == KIND
    ]
    if len(jobs) != 1:
        raise ValueError(f"{path}: expected exactly one {KIND} document, found {len(jobs)}")
    parse_job(jobs[0])
    return jobs[0]


def load_job(path: str) -> CoTrainJob:
    """The one CoTrainJob in `path`; InvalidJobError (or ValueError) when there is not one."""
    return parse_job(load_job_document(path))


def validate_files(paths: Sequence[str], out: TextIO) -> int:
    """Print a verdict per CoTrainJob, judged as `kubectl apply` would judge it; return the
    number of invalid documents."""
    invalid = 0
    for path in paths:
        try:
            documents = list(load_documents(path))
        except (OSError, UnicodeDecodeError, yaml.YAMLError, ManifestError) as error:
            out.write(f"{path}: cannot read: {error}\n")
            invalid += 1
            continue
        jobs = 0
        for label, document in documents:
            if not isinstance(document, dict):
                out.write(f"{label}: not a mapping: a CoTrainJob is a YAML object\n")
                invalid += 1
                continue
            if document.get("kind") != KIND:
                continue  # other manifests in the same file are not ours to judge
            jobs += 1
            metadata = document.get("metadata")
            name = metadata.get("name") if isinstance(metadata, dict) else None
            name = name if isinstance(name, str) and name else "<unnamed>"
            violations = []
            try:
                parse_job(document)
            except InvalidJobError as error:
                violations.extend(error.violations)
            too_large = applied_size_violation(document)
            if too_large is not None:
                violations.append(too_large)
            if violations:
                invalid += 1
                out.write(f"{label}: {KIND} {name} is invalid:\n")
                for violation in violations:
                    out.write(f"  {violation}\n")
            else:
                out.write(f"{label}: {KIND} {name} is valid\n")
        if jobs == 0 and documents:
            out.write(f"{path}: holds no {KIND} document\n")
            invalid += 1
    return invalid


def _explain(path: str, out: TextIO) -> int:
    parts = [p for p in path.split(".") if p]
    if parts and parts[0].lower() in (KIND.lower(), "cotrainjobs", "ctj"):
        parts = parts[1:]
    root: dict[str, Any] = {
        "description": inspect.cleandoc(CoTrainJob.__doc__ or ""),
        "type": "object",
        "properties": {
            "spec": object_schema(CoTrainJobSpec),
            "status": object_schema(CoTrainJobStatus),
        },
    }
    node = root
    for part in parts:
        node = node.get("items", node)
        properties = node.get("properties") or {}
        if part not in properties:
            known = ", ".join(properties) or "none"
            out.write(f"field {part!r} does not exist here; fields: {known}\n")
            return 1
        node = properties[part]
    item = node.get("items", node)
    out.write(f"FIELD: {'.'.join(parts) or KIND}  <{node.get('type', 'int-or-string')}>\n\n")
    out.write(f"DESCRIPTION:\n  {node.get('description', '')}\n")
    if "enum" in node:
        out.write(f"  One of: {', '.join(node['enum'])}\n")
    if "default" in node:
        out.write(f"  Default: {node['default']}\n")
    fields = item.get("properties") or {}
    if fields:
        out.write("\nFIELDS:\n")
        required = set(item.get("required", []))
        for name, sub in fields.items():
            flag = " -required-" if name in required else ""
            out.write(f"  {name}  <{sub.get('type', 'int-or-string')}>{flag}\n")
            out.write(f"    {sub.get('description', '')}\n")
    return 0


def _job_status(
    plan: PodPlan, statuses: dict[str, MemberStatus], phase: JobPhase, started: float
) -> CoTrainJobStatus:
    """The job-level fields that the operator would set in a cluster."""
    ready = sum(s.phase in (MemberPhase.RUNNING, MemberPhase.SUCCEEDED) for s in statuses.values())
    planned = sum(s.total_steps or 0 for s in statuses.values())
    done = sum(min(s.step or 0, s.total_steps or 0) for s in statuses.values())
    return CoTrainJobStatus(
        phase=phase,
        start_time=rfc3339(started),
        completion_time=None if phase == JobPhase.RUNNING else rfc3339(time.time()),
        ready_members=f"{ready}/{len(plan.members)}",
        progress=f"{100 * done // planned}%" if planned else None,
        sharing=SharingStatus(
            mode=plan.mode,
            budget={
                name: MemberBudget(
                    memory_bytes=budget.memory_bytes, compute_percent=budget.compute_percent
                )
                for name, budget in plan.budgets.items()
            },
        ),
    )


def _caps_line(member: Member, caps: dict[str, Any]) -> str:
    name = member.name
    if not caps and member.command:
        return f"{name}: own command; thread caps in its environment (report.apply_caps() not used)"
    if not caps:
        return f"{name}: did not start training"
    world = f"; {caps['worldSize']} data-parallel processes" if "worldSize" in caps else ""
    return (
        f"{name}: {caps.get('intraOpThreads')} intra-op / {caps.get('interOpThreads')} inter-op "
        f"thread(s) on {caps.get('device')}; GPU memory cap: {caps.get('memoryCap')}{world}"
    )


def run_job(path: str, out_dir: str | None, progress: bool = True) -> int:
    """`cotrain run`: validate, plan for this machine, train every member, report, plot."""
    from rich.console import Console

    from cotrain_trainer.console import LineView, ProgressView, summary_table
    from cotrain_trainer.gpu import open_telemetry
    from cotrain_trainer.plan import available_cores, local_plan
    from cotrain_trainer.plot import loss_series, plot_losses
    from cotrain_trainer.reporter import LocalSink, StatusReporter, report_interval
    from cotrain_trainer.supervisor import Supervisor, stop_on_signals

    console = Console(highlight=False)
    if not console.is_terminal:  # a pipe or a log: no need to squeeze lines into 80 columns
        console = Console(highlight=False, width=max(console.width, 120))
    try:
        job = load_job(path)
    except (OSError, ValueError, yaml.YAMLError) as error:
        _print_invalid(path, error, sys.stdout)
        return 1
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    telemetry = open_telemetry()
    try:
        local = local_plan(job, telemetry.devices(), available_cores(), telemetry.reason)
        plan = local.plan
        out = Path(out_dir) if out_dir else Path("cotrain-runs") / plan.job
        out.mkdir(parents=True, exist_ok=True)
        for note in local.notes:
            console.print(note, markup=False)
        started = time.time()
        statuses = {m.name: MemberStatus(phase=MemberPhase.PENDING) for m in plan.members}
        running = _job_status(plan, statuses, JobPhase.RUNNING, started)
        sink = LocalSink(out / "status.yaml", running)
        reporter = StatusReporter(sink, report_interval())
        view: ProgressView | LineView = (
            ProgressView(plan.members, console) if progress else LineView(console)
        )
        supervisor = Supervisor(plan, out, [reporter, view], telemetry)
        live = view if isinstance(view, ProgressView) else contextlib.nullcontext()
        with stop_on_signals(supervisor), live:
            result = supervisor.run()
    finally:
        telemetry.close()
    reporter.close()
    phase = JobPhase.SUCCEEDED if result.succeeded else JobPhase.FAILED
    sink.status = _job_status(plan, result.members, phase, started)
    sink.write()
    plot = plot_losses(
        {
            f"{m.name} ({m.framework.value})": loss_series(supervisor.progress_path(m.name))
            for m in plan.members
        },
        out / "loss.png",
        f"{plan.job}: training loss",
    )
    for member in plan.members:
        console.print(_caps_line(member, result.caps.get(member.name, {})), markup=False)
    console.print(summary_table(plan.members, result.members))
    for member in plan.members:
        status = result.members[member.name]
        if status.phase != MemberPhase.SUCCEEDED and status.message:
            console.print(f"{member.name}: {status.reason}: {status.message}", markup=False)
            console.print(f"  log: {supervisor.log_path(member.name)}", markup=False)
    console.print(f"status: {out / 'status.yaml'}", markup=False)
    console.print(f"plot:   {plot}", markup=False)
    console.print(f"logs:   {out / 'logs'}", markup=False)
    if result.succeeded:
        return 0
    return 1 if result.stop_signal is None else 128 + result.stop_signal


def supervise(work_dir: str | None, status_file: str | None) -> int:
    """`cotrain supervise`: the trainer pod. Runs the members of $COTRAIN_POD_PLAN and reports
    to the job's status (COTRAIN_REPORT=kubernetes, the default) or locally."""
    from cotrain_trainer.console import PodLogLines
    from cotrain_trainer.gpu import open_telemetry
    from cotrain_trainer.reporter import (
        KubernetesSink,
        LocalSink,
        Sink,
        SinkConfigError,
        StatusReporter,
        report_interval,
    )
    from cotrain_trainer.supervisor import Listener, Supervisor, stop_on_signals

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    err = sys.stderr
    raw = os.environ.get(ENV_POD_PLAN)
    if not raw:
        err.write(f"cotrain supervise: ${ENV_POD_PLAN} is not set (the operator sets it)\n")
        return 2
    try:
        plan = PodPlan.model_validate_json(raw)
    except ValidationError as error:
        err.write(f"cotrain supervise: ${ENV_POD_PLAN} is not a valid pod plan: {error}\n")
        return 2
    mode = os.environ.get(ENV_REPORT_MODE, "kubernetes")
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="cotrain-"))
    started = time.time()
    local_sink: LocalSink | None = None
    sink: Sink
    if mode == "kubernetes":
        try:
            sink = KubernetesSink.in_cluster(plan.namespace, plan.job)
        except SinkConfigError as error:
            err.write(f"cotrain supervise: {error}\n")
            return 2
    elif mode == "local":
        statuses = {m.name: MemberStatus(phase=MemberPhase.PENDING) for m in plan.members}
        local_sink = LocalSink(
            Path(status_file) if status_file else work / "status.yaml",
            _job_status(plan, statuses, JobPhase.RUNNING, started),
            stream=sys.stdout,
        )
        sink = local_sink
    else:
        err.write(f"cotrain supervise: ${ENV_REPORT_MODE} is {mode!r}: use kubernetes or local\n")
        return 2
    reporter = StatusReporter(sink, report_interval())
    telemetry = open_telemetry()
    try:
        listeners: list[Listener] = [reporter, PodLogLines(sys.stdout)]
        supervisor = Supervisor(plan, work, listeners, telemetry, echo=sys.stdout)
        with stop_on_signals(supervisor):
            result = supervisor.run()
    except ValueError as error:
        err.write(f"cotrain supervise: {error}\n")
        return 2
    finally:
        telemetry.close()
    reporter.close(timeout=15.0)
    if local_sink is not None:
        phase = JobPhase.SUCCEEDED if result.succeeded else JobPhase.FAILED
        local_sink.status = _job_status(plan, result.members, phase, started)
        local_sink.write()
    verdict = "succeeded" if result.succeeded else "did not succeed"
    print(f"cotrain supervise: job {plan.job} {verdict} (exit {result.exit_code})", flush=True)
    return result.exit_code


def _print_invalid(path: str, error: Exception, out: TextIO) -> None:
    """What `cotrain run` and `cotrain submit` say of a file they cannot use."""
    if isinstance(error, InvalidJobError):
        out.write(f"{path}: {KIND} is invalid:\n")
        out.writelines(f"  {violation}\n" for violation in error.violations)
    else:
        out.write(f"{path}: {error}\n")


def _cluster_command(args: argparse.Namespace) -> int:
    """submit, status, logs: validate locally what can be, then let cluster.py talk to the API."""
    from cotrain_trainer import cluster

    target = cluster.Target(args.kubeconfig, args.context, args.namespace)
    out, err = sys.stdout, sys.stderr
    if args.command == "submit":
        try:
            document = load_job_document(args.file)
        except (OSError, ValueError, yaml.YAMLError, ManifestError) as error:
            _print_invalid(args.file, error, out)
            return 1
        return cluster.submit(args.file, document, target, args.follow, out, err)
    if args.command == "status":
        return cluster.status(args.job, target, args.watch, out, err)
    return cluster.logs(args.job, args.member, target, args.follow, args.tail, out, err)


def _add_target(parser: argparse.ArgumentParser) -> None:
    """Where a cluster command connects, as kubectl's flags say it."""
    parser.add_argument(
        "--kubeconfig",
        metavar="FILE",
        help="kubeconfig file (default: $KUBECONFIG's files merged, else ~/.kube/config)",
    )
    parser.add_argument("--context", metavar="NAME", help="kubeconfig context (default: current)")
    parser.add_argument(
        "-n",
        "--namespace",
        metavar="NS",
        help="namespace (default: the file's, else the context's, else default)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cotrain",
        description="Run PyTorch and TensorFlow training side by side on shared GPUs.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("crd", help="print the CoTrainJob CustomResourceDefinition")
    validate = commands.add_parser(
        "validate", help="check CoTrainJob YAML with the same rules as the CRD"
    )
    validate.add_argument("files", nargs="+", metavar="FILE", help="YAML files, or - for stdin")
    explain = commands.add_parser("explain", help="describe a CoTrainJob field")
    explain.add_argument("field", nargs="?", default="", help="e.g. spec.members.gpu")
    run = commands.add_parser(
        "run", help="train a CoTrainJob's members side by side on this machine (no cluster)"
    )
    run.add_argument("file", metavar="FILE", help="a YAML file holding one CoTrainJob")
    run.add_argument(
        "--out",
        metavar="DIR",
        help="where to write status, plot and logs (default: ./cotrain-runs/<job name>)",
    )
    run.add_argument(
        "--no-progress", action="store_true", help="print a line per change, no progress bars"
    )
    submit = commands.add_parser(
        "submit", help="validate a CoTrainJob, apply it to a cluster (server-side) and follow it"
    )
    submit.add_argument("file", metavar="FILE", help="a YAML file holding one CoTrainJob")
    submit.add_argument(
        "-w",
        "--follow",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="follow the job until it ends, as `status JOB -w` (default: on)",
    )
    _add_target(submit)
    status = commands.add_parser(
        "status", help="a cluster's jobs; with JOB its members; with -w follow it to its end"
    )
    status.add_argument("job", nargs="?", metavar="JOB", help="a CoTrainJob's name")
    status.add_argument(
        "-w", "--watch", action="store_true", help="follow JOB live until it succeeds or fails"
    )
    _add_target(status)
    logs = commands.add_parser("logs", help="the logs of a job's trainer pods")
    logs.add_argument("job", metavar="JOB", help="a CoTrainJob's name")
    logs.add_argument(
        "member", nargs="?", metavar="MEMBER", help="only this member's lines (all its ranks)"
    )
    logs.add_argument("-f", "--follow", action="store_true", help="stream the logs as they grow")
    logs.add_argument(
        "--tail",
        type=int,
        metavar="N",
        help="the last N lines of each pod's log (before MEMBER's lines are picked)",
    )
    _add_target(logs)
    supervise = commands.add_parser(
        "supervise",
        help=f"run a trainer pod's members from ${ENV_POD_PLAN} (the trainer image's entry point)",
    )
    supervise.add_argument(
        "--work-dir", metavar="DIR", help="progress files and logs (default: a new temp dir)"
    )
    supervise.add_argument(
        "--status-file", metavar="FILE", help=f"with {ENV_REPORT_MODE}=local: the status YAML"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = sys.stdout
    if args.command == "crd":
        out.write(render_crd_yaml())
        return 0
    if args.command == "validate":
        return 1 if validate_files(args.files, out) else 0
    if args.command == "explain":
        return _explain(args.field, out)
    if args.command == "run":
        return run_job(args.file, args.out, progress=not args.no_progress)
    if args.command == "supervise":
        return supervise(args.work_dir, args.status_file)
    if args.command in ("submit", "status", "logs"):
        if args.command == "status" and args.watch and args.job is None:
            build_parser().error("status -w needs JOB")
        return _cluster_command(args)
    raise AssertionError(f"unhandled command {args.command}")  # argparse rules this out


if __name__ == "__main__":
    sys.exit(main())
