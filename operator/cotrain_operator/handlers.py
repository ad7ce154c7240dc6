"""kopf handlers: decorators only, each a one-line call into the controller.

kopf watches CoTrainJobs, the pods labelled with a job, and the nodes; it keeps no state of its
own on our objects and reads none from them (no finalizers, no progress or diff-base annotations
are needed because every handler is an event handler feeding the level-triggered controller), so
nothing a user writes into an object's annotations or finalizers can trip it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, cast

import kopf

from cotrain_operator import credentials, metrics
from cotrain_operator.api.contract import LABEL_JOB
from cotrain_operator.api.models import GROUP, PLURAL, VERSION
from cotrain_operator.controller import Controller
from cotrain_operator.k8s import KubeApi
from cotrain_operator.reconcile.queueing import KUEUE_GROUP, KUEUE_VERSION
from cotrain_operator.settings import Settings

CONTROLLER_KEY = "controller"
# The operator's settings (settings.py), read once by __main__ and handed over in kopf's memo.
SETTINGS_KEY = "settings"


# kopf's finalizer, under our group as all of kopf's state. None of our handlers needs one, so kopf
# never adds it; but it removes it from any object that carries it, which a user may well do
# (and our RBAC rightly forbids). A name with a space is no valid finalizer: no object can carry it.
KOPF_FINALIZER = f"{GROUP}/kopf never finalizes"


class NoDiffBase(kopf.DiffBaseStorage):
    """No diff-base at all: kopf reads and writes it only for change-detecting handlers, and ours
    are all event handlers feeding the level-triggered controller.

    kopf's annotation storage would parse `last-handled-configuration` on every event (a user's
    "{not json" there made kopf raise for that object on every event) and build the object's
    essence by deep-copying its body (about 250us per event, the largest item in a profile).
    """

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None
    ) -> kopf.BodyEssence:
        return cast(kopf.BodyEssence, {})

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    ours: Settings = memo[SETTINGS_KEY]
    settings.persistence.finalizer = KOPF_FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.peering.standalone = True
    # kopf keeps a task and a queue per object that had an event until it has been idle this
    # long (default 5 s): after a burst of 1,000 jobs that is 2,000 of them, ~20 MiB (bench/).
    # Our handlers only enqueue a key, so a new task per event is no loss.
    settings.batching.idle_timeout = ours.worker_idle_seconds
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = ours.watch_timeout_seconds
    settings.watching.client_timeout = settings.watching.server_timeout + 30
    settings.watching.reconnect_backoff = 0.5
    # Only our pods, filtered by the API server: without it kopf watches every pod in the cluster
    # and drops the others client-side, after parsing them and keeping a memory of each.
    settings.watching.label_selectors["", "v1", "pods"] = LABEL_JOB
    if ours.kueue:
        settings.watching.label_selectors[KUEUE_GROUP, KUEUE_VERSION, "workloads"] = LABEL_JOB
    controller = Controller(
        KubeApi(threads=ours.api_threads),
        workers=ours.workers,
        kueue=ours.kueue,
        settings=ours,
    )
    controller.start()
    memo[CONTROLLER_KEY] = controller
    if ours.metrics_port:
        metrics.serve(ours.metrics_port)


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    """kopf's watches log in as the operator's own requests do (`credentials.py`); kopf asks
    again when the API server answers 401."""
    return credentials.load()


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    await memo[CONTROLLER_KEY].stop()


# The event handlers are coroutines so that kopf calls them on the event loop, where the
# controller lives: a plain `def` would run in kopf's thread pool, costing a thread hop per event
# and touching the controller's caches and asyncio queue from another thread.
@kopf.on.event(GROUP, VERSION, PLURAL)
async def job_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    memo[CONTROLLER_KEY].on_job(event.get("type"), event["object"])


@kopf.on.event("", "v1", "pods", labels={LABEL_JOB: kopf.PRESENT})
async def pod_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    memo[CONTROLLER_KEY].on_pod(event.get("type"), event["object"])


@kopf.on.event("", "v1", "nodes")
async def node_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    memo[CONTROLLER_KEY].on_node(event.get("type"), event["object"])


def watch_kueue() -> None:
    """Watch Kueue's Workloads, ResourceFlavors and WorkloadPriorityClasses too (COTRAIN_KUEUE,
    set by deploy/components/kueue, which also grants the operator its verbs on them); called
    by __main__ before kopf starts."""

    @kopf.on.event(KUEUE_GROUP, KUEUE_VERSION, "workloads", labels={LABEL_JOB: kopf.PRESENT})
    async def workload_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
        memo[CONTROLLER_KEY].on_workload(event.get("type"), event["object"])

    @kopf.on.event(KUEUE_GROUP, KUEUE_VERSION, "resourceflavors")
    async def flavor_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
        memo[CONTROLLER_KEY].on_kueue_object("ResourceFlavor", event.get("type"), event["object"])

    @kopf.on.event(KUEUE_GROUP, KUEUE_VERSION, "workloadpriorityclasses")
    async def priority_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
        memo[CONTROLLER_KEY].on_kueue_object(
            "WorkloadPriorityClass", event.get("type"), event["object"]
        )


@kopf.on.probe(id="queue")
def queue_probe(memo: kopf.Memo, **_: Any) -> int:
    return int(metrics.QUEUE_DEPTH._value.get())
