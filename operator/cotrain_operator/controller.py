"""The controller: watch caches, a work queue keyed by job, and workers that reconcile.

Owns the level-triggered loop in the manner of controller-runtime: kopf's watch events fill
in-memory caches of jobs, their pods and the GPU nodes (so a reconcile reads nothing from the
API), and enqueue the job's key; a key is reconciled by one worker at a time, events that arrive
meanwhile mark it dirty, failures are retried with exponential backoff, and a decision can ask to
be looked at again later (deadlines, TTLs). Called by `handlers.py`; acts through `k8s.py`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from sys import intern
from typing import Any, TypeVar

from cotrain_operator import metrics
from cotrain_operator.api.contract import LABEL_JOB, REASON_FAILED_CREATE
from cotrain_operator.api.models import read_member_report
from cotrain_operator.k8s import ApiError, ConflictError, KubeApi
from cotrain_operator.reconcile.access import build_trainer_identity
from cotrain_operator.reconcile.create_errors import CreateOutcome, classify, refusal_message
from cotrain_operator.reconcile.job import TERMINAL, Decision, decide, failed_create
from cotrain_operator.reconcile.placement import held_share
from cotrain_operator.reconcile.queueing import KueueObjects, parse_flavor, queue_name
from cotrain_operator.settings import DecisionSettings, Settings
from cotrain_operator.sharing import GpuNode, parse_node
from cotrain_operator.sharing.inventory import less_held

log = logging.getLogger(__name__)
Key = tuple[str, str]  # (namespace, name)
T = TypeVar("T")
MAX_BACKOFF_SECONDS = 60.0
PHASES = ("Pending", "Running", "Succeeded", "Failed", "Suspended")
# Status fields that only inform: the progress column and the node a pod was bound to. A status
# patch that changes nothing else waits until `status_refresh_seconds` (a setting) after the
# job's last status write (phases, conditions and members are written at once), so that trainer
# reports, every few seconds from every member, do not each cost the API server a second write.
INFORMATIONAL = frozenset({"progress", "sharing"})
# A decision that takes longer is logged: every accepted spec decides in milliseconds.
SLOW_DECIDE_SECONDS = 1.0


class Controller:
    def __init__(
        self,
        api: KubeApi,
        workers: int = 4,
        kueue: bool = False,
        settings: Settings | None = None,
    ) -> None:
        self.api = api
        self.workers = workers
        self.settings = settings if settings is not None else Settings()
        # Queueing with Kueue (deploy/components/kueue): the jobs' Workloads, by job, and the
        # cluster's ResourceFlavors and WorkloadPriorityClasses; None when the operator does not.
        self.kueue: KueueObjects | None = KueueObjects({}, {}) if kueue else None
        self.workloads: dict[Key, dict[str, Any]] = {}
        # Jobs that found no room for a pod: looked at again when a GPU share is released.
        self._waiting_capacity: set[Key] = set()
        self._decider = ThreadPoolExecutor(max(1, workers), thread_name_prefix="cotrain-decide")
        self.jobs: dict[Key, dict[str, Any]] = {}
        self.pods: dict[Key, dict[str, dict[str, Any]]] = defaultdict(dict)
        # namespace -> pod name -> job name, for the pods above: pod names are per namespace.
        self._pod_jobs: dict[str, dict[str, str]] = defaultdict(dict)
        self.nodes: dict[str, GpuNode] = {}
        # The GPU shares our live, bound pods hold: per node, and each pod's part of it.
        self._held: dict[str, Counter[str]] = defaultdict(Counter)
        self._pod_holds: dict[Key, tuple[str, dict[str, int]]] = {}
        self._queue: asyncio.Queue[Key] = asyncio.Queue()
        self._queued: set[Key] = set()
        self._active: set[Key] = set()
        self._dirty: set[Key] = set()
        self._failures: dict[Key, int] = defaultdict(int)
        self._timers: dict[Key, asyncio.TimerHandle] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._phases: dict[Key, str] = {}
        self._status_written: dict[Key, float] = {}  # time.monotonic() of the last status patch
        self._phase_counts: dict[str, int] = defaultdict(int)
        # Each job's per-member series, and the members' status they were last set from.
        self._member_series = metrics.MemberSeries()
        self._reported: dict[Key, Any] = {}
        # Per namespace, the creation of its trainer identity: done, or under way (shared).
        self._identities: dict[str, asyncio.Future[None]] = {}
        for phase in PHASES:
            metrics.JOBS.labels(phase).set(0)

    # -- events -------------------------------------------------------------------------------

    def on_job(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        key = _key(body)
        if event_type == "DELETED":
            self.jobs.pop(key, None)
            self.pods.pop(key, None)
            self.workloads.pop(key, None)
            self._waiting_capacity.discard(key)
            self._failures.pop(key, None)
            self._status_written.pop(key, None)
            timer = self._timers.pop(key, None)
            if timer:
                timer.cancel()
            self._count_phase(key)
            self._reported.pop(key, None)
            self._member_series.forget(*key)
            return
        if not _same_version(self.jobs.get(key), body):
            self.jobs[key] = _cached(body)
        self._count_phase(key)
        self._export_members(key, body)
        self.enqueue(key)

    def _export_members(self, key: Key, body: Mapping[str, Any]) -> None:
        """The job's per-member series, when its members' status has changed."""
        status = body.get("status")
        raw = status.get("members") if isinstance(status, Mapping) else None
        if raw == self._reported.get(key):
            return
        self._reported[key] = raw
        spec = body.get("spec")
        members = spec.get("members") if isinstance(spec, Mapping) else None
        names = (
            {m.get("name") for m in members or [] if isinstance(m, Mapping)}
            if isinstance(members, list)
            else set()
        )
        reports = {
            str(name): read_member_report(entry)
            for name, entry in (raw.items() if isinstance(raw, Mapping) else ())
            if name in names
        }
        self._member_series.update(key[0], key[1], reports)

    def on_pod(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        metadata = body.get("metadata") or {}
        job_name = (metadata.get("labels") or {}).get(LABEL_JOB)
        if not job_name:
            return
        key = (str(metadata.get("namespace")), str(job_name))
        name = str(metadata.get("name"))
        if event_type == "DELETED":
            pods = self.pods.get(key)
            if pods is not None:
                pods.pop(name, None)
                if not pods and key not in self.jobs:
                    del self.pods[key]
            names = self._pod_jobs.get(key[0])
            if names is not None and names.pop(name, None) is not None and not names:
                del self._pod_jobs[key[0]]
        else:
            if not _same_version(self.pods[key].get(name), body):
                self.pods[key][name] = _cached(body)
            self._pod_jobs[key[0]][name] = key[1]
        self._count_held((key[0], name), None if event_type == "DELETED" else body)
        if key in self.jobs:
            self.enqueue(key)

    def _count_held(self, pod: Key, body: Mapping[str, Any] | None) -> None:
        """Keep the GPU shares our live pods hold per node in step with one pod's event."""
        before = self._pod_holds.pop(pod, None)
        if before is not None:
            node, shares = before
            for resource, amount in shares.items():
                self._held[node][resource] -= amount
                if not self._held[node][resource]:
                    del self._held[node][resource]
            if not self._held[node]:
                del self._held[node]
        now = held_share(body) if body is not None else None
        if before is not None and now is None:
            # A share is free again: the jobs that found no room may fit now.
            waiting, self._waiting_capacity = self._waiting_capacity, set()
            for key in waiting:
                self.enqueue(key)
        if now is not None:
            self._pod_holds[pod] = now
            node, shares = now
            for resource, amount in shares.items():
                self._held[node][resource] += amount

    def free_nodes(self) -> list[GpuNode]:
        """The GPU nodes less the shares our live pods hold on them (kube-scheduler counts the
        pods of others too; its verdict on each pod reaches the job's conditions)."""
        return [less_held(node, self._held.get(name, {})) for name, node in self.nodes.items()]

    def on_node(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        name = str((body.get("metadata") or {}).get("name"))
        node = None if event_type == "DELETED" else parse_node(body)
        before = self.nodes.get(name)
        if node is None:
            self.nodes.pop(name, None)
        else:
            self.nodes[name] = node
        if node != before:
            # Capacity changed: jobs still waiting for a place may fit now.
            for key, job in self.jobs.items():
                if (job.get("status") or {}).get("phase") in (None, "Pending", "Suspended"):
                    self.enqueue(key)

    def on_workload(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """A Kueue Workload labelled with one of our jobs (whose it is, by owner, is checked
        when the job is reconciled: the job's own event may come later)."""
        metadata = body.get("metadata") or {}
        job_name = (metadata.get("labels") or {}).get(LABEL_JOB)
        if not job_name:
            return
        key = (str(metadata.get("namespace")), str(job_name))
        if event_type == "DELETED":
            cached = self.workloads.get(key)
            if cached is not None and cached["metadata"].get("uid") == metadata.get("uid"):
                del self.workloads[key]
        else:
            self.workloads[key] = _cached(body)
        if key in self.jobs:
            self.enqueue(key)

    def on_kueue_object(self, kind: str, event_type: str | None, body: Mapping[str, Any]) -> None:
        """A ResourceFlavor or a WorkloadPriorityClass: the queued jobs look again."""
        if self.kueue is None:
            return
        name = str((body.get("metadata") or {}).get("name"))
        flavors = dict(self.kueue.flavors)
        priorities = dict(self.kueue.priorities)
        if kind == "ResourceFlavor":
            flavors.pop(name, None)
            if event_type != "DELETED":
                flavors[name] = parse_flavor(body)
        else:
            priorities.pop(name, None)
            value = body.get("value")
            if event_type != "DELETED" and isinstance(value, int):
                priorities[name] = value
        self.kueue = KueueObjects(flavors, priorities)
        for key, job in self.jobs.items():
            if queue_name(job) is not None:
                self.enqueue(key)

    # -- queue --------------------------------------------------------------------------------

    def enqueue(self, key: Key, delay: float = 0.0) -> None:
        if delay > 0:
            timer = self._timers.pop(key, None)
            if timer:
                timer.cancel()
            loop = asyncio.get_running_loop()
            self._timers[key] = loop.call_later(delay, self.enqueue, key)
            return
        if key in self._active:
            self._dirty.add(key)
            return
        if key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)
            metrics.QUEUE_DEPTH.set(self._queue.qsize())

    def start(self) -> None:
        for index in range(self.workers):
            self._tasks.append(asyncio.create_task(self._work(), name=f"cotrain-worker-{index}"))
        self._tasks.append(asyncio.create_task(self._check_trainer_policy()))

    async def _check_trainer_policy(self) -> None:
        """Say so, once at start, when nothing keeps a trainer pod to its own job's status."""
        try:
            missing = await self.api.missing_trainer_policy()
        except ApiError as error:
            log.warning(
                "cannot check for the trainer admission policy (HTTP %s %s)",
                error.status,
                error.reason,
            )
            return
        metrics.TRAINER_POLICY.set(0 if missing else 1)
        if missing:
            log.warning(
                "%s not found: a trainer pod may write the status of any CoTrainJob in its "
                "namespace; install deploy/base/trainer.yaml (Kubernetes 1.30 or later)",
                " and ".join(missing),
            )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for timer in self._timers.values():
            timer.cancel()
        self._decider.shutdown(wait=False, cancel_futures=True)

    def idle(self) -> bool:
        return not self._queued and not self._active

    async def _work(self) -> None:
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            metrics.QUEUE_DEPTH.set(self._queue.qsize())
            self._active.add(key)
            try:
                await self._reconcile_and_schedule(key)
            finally:
                self._active.discard(key)
                if key in self._dirty:
                    self._dirty.discard(key)
                    self.enqueue(key)

    async def _reconcile_and_schedule(self, key: Key) -> None:
        started = time.perf_counter()
        try:
            decision = await self.reconcile(key)
        except ConflictError:
            metrics.RECONCILE_ERRORS.labels("conflict").inc()
            log.info("%s/%s changed while reconciling; again with the fresh object", *key)
            self.enqueue(key, delay=0.2)
            return
        except ApiError as error:
            metrics.RECONCILE_ERRORS.labels(f"http{error.status}").inc()
            self._retry(key, f"API error {error.status} {error.reason}")
            return
        except Exception:  # a bug must not take the other jobs down with it
            metrics.RECONCILE_ERRORS.labels("internal").inc()
            log.exception("reconciling %s/%s failed", *key)
            self._retry(key, "internal error")
            return
        finally:
            metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)
        self._failures.pop(key, None)
        if decision is not None and decision.requeue_after is not None:
            self.enqueue(key, delay=decision.requeue_after)

    def _retry(self, key: Key, why: str) -> None:
        self._failures[key] += 1
        delay = min(MAX_BACKOFF_SECONDS, 0.5 * 2 ** (self._failures[key] - 1))
        log.warning("reconciling %s/%s: %s; retrying in %.1fs", *key, why, delay)
        self.enqueue(key, delay=delay)

    # -- one reconcile ------------------------------------------------------------------------

    async def reconcile(self, key: Key) -> Decision | None:
        body = self.jobs.get(key)
        if body is None:
            return None
        namespace, name = key
        # decide() is pure CPU; in a thread of its own no job, however hostile its spec, can hold
        # the event loop (the watches, the other jobs' API calls, the liveness probe).
        decision = await asyncio.get_running_loop().run_in_executor(
            self._decider,
            _timed_decide,
            key,
            body,
            list(self.pods.get(key, {}).values()),
            self.free_nodes(),
            datetime.now(UTC),
            dict(self._pod_jobs.get(namespace) or {}),
            list(self.nodes.values()),
            _owned(self.workloads.get(key), body),
            self.kueue,
            self.settings.decisions,
        )
        if decision.waits_for_capacity:
            self._waiting_capacity.add(key)
        if decision.create:
            log.info(
                "%s/%s: creating %s",
                namespace,
                name,
                ", ".join(f"{c['kind']} {c['metadata']['name']}" for c in decision.create),
            )
        if any(c["kind"] == "Pod" for c in decision.create):
            await self._ensure_trainer_identity(namespace)
        results = await asyncio.gather(
            *(self.api.create(c) for c in decision.create), return_exceptions=True
        )
        refused: list[tuple[dict[str, Any], ApiError]] = []
        for child, created in zip(decision.create, results, strict=True):
            if isinstance(created, ApiError):
                refused.append((child, created))
            elif isinstance(created, BaseException):
                raise created
            elif child["kind"] == "Workload" and created is not None:
                # The watch may have brought it already, with Kueue's admission on it: the
                # answer to the create is older than that.
                known = self.workloads.get(key)
                if known is None or known["metadata"].get("uid") != created["metadata"].get("uid"):
                    self.workloads[key] = _cached(created)
            elif child["kind"] == "Pod":
                if created is not None:
                    self.pods[key][child["metadata"]["name"]] = _cached(created)
                else:
                    # It exists: ours (the watch is behind) or another job's, whose pod event
                    # may not have come yet. A look again shortly tells which.
                    decision.requeue(1.0)
        if refused:
            decision = await self._refused(key, body, refused)
        await self._carry_out(key, body, decision)
        return decision

    async def _refused(
        self, key: Key, body: Mapping[str, Any], refused: list[tuple[dict[str, Any], ApiError]]
    ) -> Decision:
        """The job's answer to children the API server refused: fail it, once, when no retry can
        help; otherwise say so once per run of failures and raise to retry with backoff."""
        judged = [
            (child, error, classify(error.status, _server_message(error), child["kind"]))
            for child, error in refused
        ]
        for child, error, outcome in judged:
            if outcome is CreateOutcome.FAIL_JOB:
                message = refusal_message(
                    child["kind"], child["metadata"]["name"], error.status, _server_message(error)
                )
                log.warning("%s/%s: %s", *key, message)
                pods = list(self.pods.get(key, {}).values())
                return failed_create(body, pods, message, datetime.now(UTC))
        if any(outcome is CreateOutcome.RECREATE_IDENTITY for _, _, outcome in judged):
            self._identities.pop(key[0], None)  # someone deleted it: the retry makes it again
        child, error, _ = judged[0]
        if not self._failures.get(key):
            message = refusal_message(
                child["kind"], child["metadata"]["name"], error.status, _server_message(error)
            )
            await self.api.post_event(body, "Warning", REASON_FAILED_CREATE, message + "; retrying")
        raise error

    async def _carry_out(self, key: Key, body: Mapping[str, Any], decision: Decision) -> None:
        """Deletions, the status patch, Events and the job's own deletion, in that order."""
        namespace, name = key
        for pod in decision.delete_pods:
            log.info("%s/%s: deleting pod %s (job %s)", namespace, name, pod, decision.phase)
        await _all(self.api.delete_pod(namespace, pod) for pod in decision.delete_pods)
        workload = self.workloads.get(key)
        if decision.delete_workload:
            log.info("%s/%s: deleting Workload %s", namespace, name, decision.delete_workload)
            await self.api.delete_workload(namespace, decision.delete_workload)
        elif decision.workload_status and workload is not None:
            patched = await self.api.patch_workload_status(
                namespace,
                workload["metadata"]["name"],
                decision.workload_status,
                workload["metadata"].get("resourceVersion"),
            )
            if patched is not None and self.workloads.get(key) is workload:
                self.workloads[key] = _cached(patched)
        wait = self._refresh_wait(key, decision.status_patch)
        if wait > 0:
            decision.requeue(wait)
        elif decision.status_patch:
            patched = await self.api.patch_status(
                namespace, name, decision.status_patch, body["metadata"].get("resourceVersion")
            )
            self._status_written[key] = time.monotonic()
            if patched is not None and self.jobs.get(key) is body:
                self.jobs[key] = _cached(patched)
                self._count_phase(key)
        await _all(
            self.api.post_event(body, event.type, event.reason, event.message)
            for event in decision.events
        )
        if decision.delete_job:
            await self.api.delete_job(namespace, name, body["metadata"]["uid"])

    async def _ensure_trainer_identity(self, namespace: str) -> None:
        """The namespace's trainer ServiceAccount and RoleBinding, before its first pod: created
        once per namespace and operator run (an existing one counts), not once per job; the
        jobs of a burst in a new namespace wait for the one creation under way."""
        creating = self._identities.get(namespace)
        if creating is None:
            creating = asyncio.ensure_future(self._create_trainer_identity(namespace))
            self._identities[namespace] = creating
        try:
            await asyncio.shield(creating)
        except Exception:
            if self._identities.get(namespace) is creating:
                del self._identities[namespace]  # the next reconcile tries again
            raise

    async def _create_trainer_identity(self, namespace: str) -> None:
        await _all(self.api.create(c) for c in build_trainer_identity(namespace))

    def _refresh_wait(self, key: Key, patch: Mapping[str, Any]) -> float:
        """Seconds to hold back a status patch that only refreshes informational fields."""
        written = self._status_written.get(key)
        if not patch or written is None or not patch.keys() <= INFORMATIONAL:
            return 0.0
        return written + self.settings.status_refresh_seconds - time.monotonic()

    def _count_phase(self, key: Key) -> None:
        """Keep the jobs-by-phase gauge in step with one job: O(1) per event, not O(jobs)."""
        job = self.jobs.get(key)
        new = None if job is None else str((job.get("status") or {}).get("phase") or "Pending")
        old = self._phases.pop(key, None)
        if new is not None:
            self._phases[key] = new
        if old == new:
            return
        for phase, change in ((old, -1), (new, 1)):
            if phase is not None:
                self._phase_counts[phase] += change
                if phase in PHASES:
                    metrics.JOBS.labels(phase).set(self._phase_counts[phase])

    def finished(self, key: Key) -> bool:
        return (self.jobs.get(key, {}).get("status") or {}).get("phase") in TERMINAL


def _timed_decide(
    key: Key,
    body: Mapping[str, Any],
    pods: list[dict[str, Any]],
    nodes: list[GpuNode],
    now: datetime,
    pod_jobs: dict[str, str],
    capacity: list[GpuNode],
    workload: Mapping[str, Any] | None,
    kueue: KueueObjects | None,
    settings: DecisionSettings,
) -> Decision:
    started = time.perf_counter()
    decision = decide(
        body,
        pods,
        nodes,
        now,
        pod_jobs,
        capacity=capacity,
        workload=workload,
        kueue=kueue,
        settings=settings,
    )
    took = time.perf_counter() - started
    metrics.DECIDE_SECONDS.observe(took)
    if took > SLOW_DECIDE_SECONDS:
        log.warning("%s/%s: deciding took %.1fs", *key, took)
    return decision


def _owned(workload: Mapping[str, Any] | None, job: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The Workload if `job` (this very object, by uid) owns it: one left by an earlier job of
    the same name is not this job's, and goes with that job."""
    if workload is None:
        return None
    uid = (job.get("metadata") or {}).get("uid")
    owners = (workload.get("metadata") or {}).get("ownerReferences") or []
    return workload if any(o.get("uid") == uid for o in owners) else None


def _server_message(error: ApiError) -> str:
    """The API server's own words in a refusal (its Status message), else the HTTP reason."""
    try:
        status = json.loads(error.body or "")
    except (TypeError, ValueError):
        status = None
    if isinstance(status, dict) and isinstance(status.get("message"), str):
        return str(status["message"])
    return str(error.reason or "no answer")


async def _all(calls: Iterable[Awaitable[T]]) -> list[T]:
    """Run the calls concurrently; once all have ended, raise the first error if any did."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]


def _cached(body: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of an object to keep in a cache, less metadata.managedFields (the field managers'
    bookkeeping, about half of a job's or a pod's memory; no decision reads it), with its keys
    and short strings interned: each JSON document brings its own copy of every key
    ("metadata", "resourceVersion", ...) and of each repeated value (a namespace, an env
    name, "Pending"), which a cache of 1,000 jobs and pods held a thousand times over:
    45 -> 34 KiB per job and pod (bench/README.md)."""
    copy: dict[str, Any] = {}
    for key, value in body.items():
        if key == "metadata" and isinstance(value, Mapping):
            value = {k: v for k, v in value.items() if k != "managedFields"}
        copy[intern(key)] = _interned(value)
    return copy


def _same_version(cached: Mapping[str, Any] | None, body: Mapping[str, Any]) -> bool:
    """Whether the cache holds this very version of the object already: the watch's echo of a
    write whose answer the controller cached (the pod it created, the status it patched), which
    is not taken apart and interned again."""
    if cached is None:
        return False
    kept, event = cached.get("metadata") or {}, body.get("metadata") or {}
    version = event.get("resourceVersion")
    return (
        version is not None
        and kept.get("resourceVersion") == version
        and kept.get("uid") == event.get("uid")
    )


def _interned(value: Any) -> Any:
    if isinstance(value, dict):
        return {intern(k) if isinstance(k, str) else k: _interned(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_interned(v) for v in value]
    if isinstance(value, str) and len(value) <= 64:
        return intern(value)
    return value


def _key(body: Mapping[str, Any]) -> Key:
    metadata = body.get("metadata") or {}
    return str(metadata.get("namespace")), str(metadata.get("name"))
