"""`cotrain submit`, `cotrain status` and `cotrain logs`: the `cotrain` commands that talk to a
cluster, called by cli.py.

Owns the connection as kubectl makes it (the kubeconfig from --kubeconfig, else $KUBECONFIG's
files merged, else ~/.kube/config; --context; the namespace from -n, else the context's, else
`default`), server-side apply of a job as field manager `cotrain-cli` (never forced), following a
job by a watch on it alone (resumed from its resourceVersion, re-listed on 410 Gone, reconnected
when dropped) into `console`'s views, streaming trainer pods' logs, and one line per API error that
says what to fix. What the commands make of the server's objects is `cluster_job`'s (pure). The
client is imported inside the functions, so `cotrain validate` does not pay for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import yaml

from cotrain_operator.api import KIND
from cotrain_operator.api.contract import LABEL_JOB, TRAINER_CONTAINER
from cotrain_operator.api.models import GROUP, PLURAL, VERSION, JobPhase, Member
from cotrain_trainer.cluster_job import (
    JOB_COLUMNS,
    exit_code,
    failure_lines,
    format_columns,
    job_members,
    job_name,
    job_phase,
    job_row,
    member_pods,
    member_statuses,
    phase_line,
)
from cotrain_trainer.console import member_lines

FIELD_MANAGER = "cotrain-cli"
APPLY_PATCH = "application/apply-patch+yaml"
RESOURCE = f"{PLURAL}.{GROUP}"
DEFAULT_KUBECONFIG = "~/.kube/config"
EXIT_INTERRUPTED = 130
# A watch asks the server to end it after this long (it is then resumed), and a read that waits
# longer than that plus a margin is a dropped connection.
WATCH_SECONDS = 300
REQUEST_TIMEOUT = (10.0, 60.0)
RECONNECT_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)


class ClusterError(Exception):
    """One line for the user: what went wrong and what to fix."""


@dataclass(frozen=True)
class Target:
    """Where to connect, as given on the command line (None: as kubectl would choose)."""

    kubeconfig: str | None = None
    context: str | None = None
    namespace: str | None = None


@dataclass
class Cluster:
    api: Any  # kubernetes.client.ApiClient
    namespace: str
    context: str
    server: str

    @property
    def custom(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self.api)

    @property
    def core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.api)


# --------------------------------------------------------------------------------------------
# connection


def kubeconfig_paths(target: Target, environ: Mapping[str, str]) -> list[Path]:
    """The kubeconfig files kubectl would read: --kubeconfig, else $KUBECONFIG's list."""
    if target.kubeconfig:
        path = Path(target.kubeconfig).expanduser()
        if not path.is_file():
            raise ClusterError(f"--kubeconfig {target.kubeconfig}: no such file")
        return [path]
    listed = [p for p in environ.get("KUBECONFIG", "").split(os.pathsep) if p]
    candidates = [Path(p).expanduser() for p in listed] or [Path(DEFAULT_KUBECONFIG).expanduser()]
    found = [path for path in candidates if path.is_file()]
    if not found:
        where = f"KUBECONFIG={environ['KUBECONFIG']}" if listed else DEFAULT_KUBECONFIG
        raise ClusterError(
            f"no kubeconfig: none found at {where}; pass --kubeconfig FILE or set KUBECONFIG"
        )
    return found


def _first_current_context(paths: list[Path]) -> str | None:
    # kubectl takes current-context from the first file that sets it; the client's merger would
    # take the last one's.
    for path in paths:
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as error:
            raise ClusterError(f"kubeconfig {path} cannot be read: {error}") from error
        if isinstance(document, dict) and document.get("current-context"):
            return str(document["current-context"])
    return None


def connect(target: Target, environ: Mapping[str, str] = os.environ) -> Cluster:
    """An API client for the target's context. Raises ClusterError."""
    from kubernetes import client
    from kubernetes.config.config_exception import ConfigException
    from kubernetes.config.kube_config import KubeConfigLoader, KubeConfigMerger

    paths = kubeconfig_paths(target, environ)
    context = target.context or _first_current_context(paths)
    shown = ", ".join(str(p) for p in paths)
    if not context:
        raise ClusterError(f"kubeconfig {shown} sets no current-context: pass --context NAME")
    try:
        merged = KubeConfigMerger(os.pathsep.join(str(p) for p in paths))  # type: ignore[no-untyped-call]
        entries = [getattr(e, "value", e) for e in merged.config.value.get("contexts") or []]
        names = [str(entry.get("name")) for entry in entries]
        if context not in names:
            known = ", ".join(names) or "none"
            raise ClusterError(f"context {context!r} is not in kubeconfig {shown} (has: {known})")
        loader = KubeConfigLoader(config_dict=merged.config, active_context=context)  # type: ignore[no-untyped-call]
        configuration = client.Configuration()
        loader.load_and_set(configuration)  # type: ignore[no-untyped-call]
        namespace = loader.current_context["context"].get("namespace")
    except ConfigException as error:
        raise ClusterError(f"kubeconfig {shown}, context {context}: {error}") from error
    configuration.retries = 0  # an unreachable server is said at once, not after retries
    return Cluster(
        api=client.ApiClient(configuration),
        namespace=target.namespace or namespace or "default",
        context=context,
        server=str(configuration.host),
    )


def api_error(error: BaseException, cluster: Cluster, doing: str) -> ClusterError:
    """One line for a failed request: the server's own message, and what to do about it."""
    import urllib3

    where = f"namespace {cluster.namespace}"
    status = getattr(error, "status", None)
    if isinstance(error, OSError | urllib3.exceptions.HTTPError) or status is None:
        reason = getattr(error, "reason", None) or error
        return ClusterError(
            f"cannot reach the API server {cluster.server} (context {cluster.context}) to "
            f"{doing}: {reason}; check the kubeconfig's server, the network, or --context"
        )
    body: Mapping[str, Any] = {}
    with contextlib.suppress(ValueError, TypeError):
        parsed = json.loads(getattr(error, "body", None) or "{}")
        body = parsed if isinstance(parsed, Mapping) else {}
    message = str(body.get("message") or getattr(error, "reason", "") or "")
    if status == 401:
        return ClusterError(
            f"the API server {cluster.server} refused the credentials of context "
            f"{cluster.context} (401 Unauthorized): log in again or fix the kubeconfig's user"
        )
    if status == 403:
        return ClusterError(
            f"forbidden to {doing} in {where}: {message}; ask for RBAC on {RESOURCE} "
            "(or pass -n with a namespace you may use)"
        )
    if status == 404:
        details = body.get("details")
        if isinstance(details, Mapping) and details.get("name"):
            return ClusterError(
                f"{KIND.lower()} {details['name']} not found in {where} "
                "(`cotrain status` lists the namespace's jobs)"
            )
        return ClusterError(
            f"the cluster has no {KIND} API ({RESOURCE}) to {doing}: install the CRD "
            "(cotrain crd | kubectl apply --server-side -f -)"
        )
    return ClusterError(f"cannot {doing} in {where}: HTTP {status}: {message}")


def _is_status(error: BaseException, code: int) -> bool:
    return getattr(error, "status", None) == code


# --------------------------------------------------------------------------------------------
# jobs


def get_job(cluster: Cluster, name: str) -> tuple[dict[str, Any], str]:
    """The job and the resourceVersion to watch it from. ClusterError when absent."""
    listed = cluster.custom.list_namespaced_custom_object(
        GROUP,
        VERSION,
        cluster.namespace,
        PLURAL,
        field_selector=f"metadata.name={name}",
        _request_timeout=REQUEST_TIMEOUT,
    )
    items = listed.get("items") or []
    if not items:
        raise ClusterError(
            f"{KIND.lower()} {name} not found in namespace {cluster.namespace} "
            "(`cotrain status` lists the namespace's jobs)"
        )
    return items[0], str(listed["metadata"]["resourceVersion"])


def list_jobs(cluster: Cluster) -> list[dict[str, Any]]:
    listed = cluster.custom.list_namespaced_custom_object(
        GROUP, VERSION, cluster.namespace, PLURAL, _request_timeout=REQUEST_TIMEOUT
    )
    return sorted(listed.get("items") or [], key=job_name)


def apply_job(cluster: Cluster, document: dict[str, Any]) -> str:
    """Server-side apply of `document` as field manager cotrain-cli, not forced: `created`,
    `configured` or `unchanged`. A conflict with another manager is a ClusterError."""
    name = str(document["metadata"]["name"])
    try:
        before = cluster.custom.get_namespaced_custom_object(
            GROUP, VERSION, cluster.namespace, PLURAL, name, _request_timeout=REQUEST_TIMEOUT
        )
    except Exception as error:
        if not _is_status(error, 404):
            raise
        before = None
    try:
        applied, code, _ = cluster.custom.patch_namespaced_custom_object_with_http_info(
            GROUP,
            VERSION,
            cluster.namespace,
            PLURAL,
            name,
            document,
            field_manager=FIELD_MANAGER,
            force=False,
            _content_type=APPLY_PATCH,
            _request_timeout=REQUEST_TIMEOUT,
        )
    except Exception as error:
        if _is_status(error, 409):
            raise ClusterError(conflict_message(error, name, cluster.namespace)) from error
        if _is_status(error, 422) or _is_status(error, 400):
            body = json.loads(getattr(error, "body", None) or "{}")
            raise ClusterError(
                f"the API server refused {KIND.lower()} {name}: {body.get('message', error)}"
            ) from error
        raise
    if code == 201 or before is None:
        return "created"
    same = applied["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    return "unchanged" if same else "configured"


def conflict_message(error: BaseException, name: str, namespace: str) -> str:
    """Which fields another field manager owns, and the two ways out."""
    try:
        body = json.loads(getattr(error, "body", None) or "{}")
    except ValueError:
        body = {}
    causes = (body.get("details") or {}).get("causes") or []
    fields = "; ".join(
        str(cause.get("message") or cause.get("field")) for cause in causes if cause
    ) or str(body.get("message") or error)
    return (
        f"cannot apply {KIND.lower()} {name} in namespace {namespace}: another field manager "
        f"owns fields that differ ({fields}); {FIELD_MANAGER} does not take them over. Either "
        "edit the file to agree with the cluster, or take them: kubectl apply --server-side "
        f"--force-conflicts --field-manager={FIELD_MANAGER} -f FILE"
    )


def watch_job(
    cluster: Cluster, name: str, resource_version: str, say: Callable[[str], None]
) -> Iterator[dict[str, Any] | None]:
    """The job after each change, from `resource_version` on; None once it is deleted.

    A watch that the server ends is resumed from the last resourceVersion seen (bookmarks
    included); one that is dropped is resumed after a backoff; an expired resourceVersion (410
    Gone) makes a fresh list, whose job is yielded before watching on."""
    from kubernetes.watch.watch import iter_resp_lines

    version: str | None = resource_version
    failures = 0
    while True:
        if version is None:  # re-list
            try:
                job, version = get_job(cluster, name)
            except ClusterError:
                yield None
                return
            yield job
        try:
            response = cluster.custom.list_namespaced_custom_object(
                GROUP,
                VERSION,
                cluster.namespace,
                PLURAL,
                field_selector=f"metadata.name={name}",
                resource_version=version,
                allow_watch_bookmarks=True,
                timeout_seconds=WATCH_SECONDS,
                watch=True,
                _preload_content=False,
                _request_timeout=(REQUEST_TIMEOUT[0], WATCH_SECONDS + 30),
            )
            try:
                for line in iter_resp_lines(response):  # type: ignore[no-untyped-call]
                    if not line:
                        continue
                    event = json.loads(line)
                    kind, job = event.get("type"), event.get("object") or {}
                    if kind == "ERROR":
                        if job.get("code") == 410:
                            version = None
                            break
                        raise ClusterError(f"watching {KIND.lower()} {name}: {job.get('message')}")
                    version = str(job.get("metadata", {}).get("resourceVersion") or version)
                    failures = 0
                    if kind == "DELETED":
                        yield None
                        return
                    if kind != "BOOKMARK":
                        yield job
            finally:
                response.release_conn()
        except ClusterError:
            raise
        except Exception as error:
            if _is_status(error, 410):
                version = None
                continue
            if getattr(error, "status", None) not in (None, 429, 500, 502, 503, 504):
                raise
            delay = RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)]
            failures += 1
            if failures == 1:
                say(f"the watch of {KIND.lower()} {name} dropped ({error}); reconnecting")
            time.sleep(delay)


# --------------------------------------------------------------------------------------------
# what the commands show


def _console(out: TextIO) -> Any:
    from rich.console import Console

    console = Console(file=out, highlight=False)
    if not console.is_terminal:  # a pipe or a log: no need to squeeze lines into 80 columns
        console = Console(file=out, highlight=False, width=max(console.width, 120))
    return console


def _line_buffered(out: TextIO) -> None:
    # A pipe is block-buffered: a follower (a test, `grep`) must see each line when it happens.
    reconfigure = getattr(out, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(line_buffering=True)


def show_job(console: Any, job: Mapping[str, Any], members: list[Member]) -> int | None:
    """The summary table, the phase line and, for a failed job, why: what `status JOB` and a
    followed job's end print. Returns the job's exit code (None while it runs)."""
    from cotrain_trainer.console import summary_table

    console.print(summary_table(members, member_statuses(job)))
    console.print(phase_line(job), markup=False, soft_wrap=True)
    code = exit_code(job_phase(job))
    if job_phase(job) == JobPhase.FAILED:
        for line in failure_lines(job, members):
            console.print(line, markup=False, soft_wrap=True)
    return code


def follow(cluster: Cluster, name: str, out: TextIO) -> int:
    """`status JOB -w`: live progress until the job ends; its exit code, 130 on Ctrl-C."""
    from cotrain_trainer.console import PodLogLines, ProgressView

    _line_buffered(out)
    console = _console(out)
    job, version = get_job(cluster, name)
    try:
        members = job_members(job)
    except ValueError as error:
        raise ClusterError(str(error)) from error
    view: ProgressView | PodLogLines = (
        ProgressView(members, console) if console.is_terminal else PodLogLines(out)
    )
    phase = job_phase(job)

    def feed(job: Mapping[str, Any]) -> None:
        statuses = member_statuses(job)
        for member in members:
            if member.name in statuses:
                view.member_changed(member.name, statuses[member.name])

    live = view if isinstance(view, ProgressView) else contextlib.nullcontext()
    deleted = False
    try:  # from the line that says Ctrl-C is safe on: a Ctrl-C after it gets the answer
        console.print(
            f"following {KIND.lower()} {name} in namespace {cluster.namespace} "
            "(Ctrl-C stops following, not the job)",
            markup=False,
            soft_wrap=True,
        )
        if phase is not None:
            console.print(f"{KIND.lower()} {name}: {phase.value}", markup=False, soft_wrap=True)
        with live:
            feed(job)
            if exit_code(phase) is None:
                for changed in watch_job(cluster, name, version, console.log):
                    if changed is None:
                        deleted = True
                        break
                    job = changed
                    feed(job)
                    if job_phase(job) != phase:
                        phase = job_phase(job)
                        if not isinstance(view, ProgressView) and phase is not None:
                            console.print(
                                f"{KIND.lower()} {name}: {phase.value}",
                                markup=False,
                                soft_wrap=True,
                            )
                    if exit_code(phase) is not None:
                        break
    except KeyboardInterrupt:
        console.print(
            f"stopped following; {KIND.lower()} {name} keeps running in namespace "
            f"{cluster.namespace}. Follow it again: cotrain status {name} -w -n "
            f"{cluster.namespace}",
            markup=False,
            soft_wrap=True,
        )
        return EXIT_INTERRUPTED
    if deleted:
        console.print(f"{KIND.lower()} {name} was deleted", markup=False, soft_wrap=True)
        return 1
    code = show_job(console, job, members)
    return 1 if code is None else code


# --------------------------------------------------------------------------------------------
# the commands


def _run(target: Target, err: TextIO, doing: str, command: Callable[[Cluster], int]) -> int:
    """Connect and run `command`; any error is one line on `err` and exit 1."""
    try:
        cluster = connect(target)
    except ClusterError as error:
        err.write(f"cotrain: {error}\n")
        return 1
    try:
        return command(cluster)
    except ClusterError as error:
        err.write(f"cotrain: {error}\n")
        return 1
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as error:
        import urllib3

        if getattr(error, "status", None) is None and not isinstance(
            error, OSError | urllib3.exceptions.HTTPError
        ):
            raise  # a bug of ours: the traceback is the report
        err.write(f"cotrain: {api_error(error, cluster, doing)}\n")
        return 1
    finally:
        cluster.api.close()


def submit(
    path: str, document: dict[str, Any], target: Target, watch: bool, out: TextIO, err: TextIO
) -> int:
    """`cotrain submit FILE` once cli.py has validated `document` (the job as written, so that
    cotrain-cli owns only the fields the file sets): server-side apply, then follow the job."""
    metadata = document.setdefault("metadata", {})
    name = metadata.get("name")
    if not name:
        out.write(f"{path}: submit needs metadata.name (server-side apply cannot generateName)\n")
        return 1
    written = metadata.get("namespace")
    if target.namespace and written and written != target.namespace:
        out.write(
            f"{path}: the job's namespace {written!r} does not match -n {target.namespace!r}: "
            "drop one of them\n"
        )
        return 1
    target = Target(target.kubeconfig, target.context, target.namespace or written)

    def command(cluster: Cluster) -> int:
        document["metadata"]["namespace"] = cluster.namespace
        verb = apply_job(cluster, document)
        _line_buffered(out)
        out.write(f"{RESOURCE}/{name} {verb} in namespace {cluster.namespace}\n")
        return follow(cluster, name, out) if watch else 0

    return _run(target, err, f"apply {RESOURCE}/{name}", command)


def status(job: str | None, target: Target, watch: bool, out: TextIO, err: TextIO) -> int:
    """`cotrain status`: the namespace's jobs; with JOB its members; with -w followed."""

    def command(cluster: Cluster) -> int:
        if job is None:
            jobs = list_jobs(cluster)
            if not jobs:
                err.write(f"No {KIND} in namespace {cluster.namespace}.\n")
                return 0
            now = datetime.now(UTC)
            out.write(format_columns([JOB_COLUMNS, *(job_row(j, now) for j in jobs)]))
            return 0
        if watch:
            return follow(cluster, job, out)
        found, _ = get_job(cluster, job)
        try:
            members = job_members(found)
        except ValueError as error:
            raise ClusterError(str(error)) from error
        show_job(_console(out), found, members)
        return 0

    doing = f"read {RESOURCE}" + (f"/{job}" if job else "")
    return _run(target, err, doing, command)


# --------------------------------------------------------------------------------------------
# logs


def pod_log_lines(cluster: Cluster, pod: str, follow: bool, tail: int | None) -> Iterator[str]:
    """The trainer container's log of `pod`, line by line (as it comes when following)."""
    from kubernetes.watch.watch import iter_resp_lines

    options: dict[str, Any] = {"container": TRAINER_CONTAINER, "follow": follow}
    if tail is not None and tail >= 0:
        options["tail_lines"] = tail
    if not follow:
        # Followed, a member may print nothing for hours: no read timeout then (the client
        # takes no "connect only" timeout; the pod list before this one has reached the server).
        options["_request_timeout"] = REQUEST_TIMEOUT
    response = cluster.core.read_namespaced_pod_log(
        pod, cluster.namespace, _preload_content=False, **options
    )
    try:
        yield from iter_resp_lines(response)  # type: ignore[no-untyped-call]
    finally:
        response.release_conn()


def job_log_lines(
    cluster: Cluster,
    job: str,
    member: str | None,
    follow: bool = False,
    tail: int | None = None,
    warn: Callable[[str], None] = lambda line: None,
) -> Iterator[str]:
    """The log lines of a job's current trainer pods, only `member`'s when given (its prefix
    kept, every rank's). One pod is read in order; several are read by a thread each and
    interleaved line by line as the lines arrive. A pod whose log cannot be read (not started
    yet) is passed to `warn` and skipped. ClusterError for an unknown job or member."""
    found, _ = get_job(cluster, job)
    try:
        members = [m.name for m in job_members(found)]
    except ValueError as error:
        raise ClusterError(str(error)) from error
    if member is not None and member not in members:
        raise ClusterError(
            f"{KIND.lower()} {job} has no member {member!r}; its members: {', '.join(members)}"
        )
    listed = cluster.core.list_namespaced_pod(
        cluster.namespace, label_selector=f"{LABEL_JOB}={job}", _request_timeout=REQUEST_TIMEOUT
    )
    pods = cluster.api.sanitize_for_serialization(listed).get("items") or []
    chosen = [str(p["metadata"]["name"]) for p in member_pods(pods, member)]
    if not chosen:
        held = f" holding member {member}" if member else ""
        raise ClusterError(
            f"{KIND.lower()} {job} has no trainer pod{held} yet ({phase_line(found)})"
        )

    def read(pod: str) -> Iterator[str]:
        try:
            lines = pod_log_lines(cluster, pod, follow, tail)
            yield from (member_lines(lines, member) if member else lines)
        except Exception as error:
            if getattr(error, "status", None) is None:
                raise
            warn(f"pod {pod}: {api_error(error, cluster, f'read the log of pod {pod}')}")

    if len(chosen) == 1:
        yield from read(chosen[0])
        return
    lines: queue.Queue[str | None] = queue.Queue()

    def pump(pod: str) -> None:
        try:
            for line in read(pod):
                lines.put(line)
        except Exception as error:  # a dropped stream of one pod ends that pod's lines only
            warn(f"pod {pod}: {error}")
        finally:
            lines.put(None)

    for pod in chosen:
        threading.Thread(target=pump, args=(pod,), name=f"logs-{pod}", daemon=True).start()
    running = len(chosen)
    while running:
        line = lines.get()
        if line is None:
            running -= 1
        else:
            yield line


def logs(
    job: str,
    member: str | None,
    target: Target,
    follow: bool,
    tail: int | None,
    out: TextIO,
    err: TextIO,
) -> int:
    """`cotrain logs JOB [MEMBER]`."""

    def warn(text: str) -> None:
        err.write(f"cotrain: {text}\n")

    def command(cluster: Cluster) -> int:
        _line_buffered(out)
        for line in job_log_lines(cluster, job, member, follow, tail, warn):
            out.write(f"{line}\n")
        return 0

    return _run(target, err, f"read the logs of {RESOURCE}/{job}", command)
