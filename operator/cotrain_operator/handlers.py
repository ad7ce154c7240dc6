"""kopf handlers: decorators only, each a one-line call into the controller.

kopf watches CoTrainJobs, the pods labelled with a job, and the nodes; it keeps no state of its
own on our objects (no finalizers, no progress or diff-base annotations are needed because every
handler is an event handler feeding the level-triggered controller), and where kopf would store
anything it does so under our API group.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any, cast

import kopf

from cotrain_operator import metrics
from cotrain_operator.api.models import GROUP, PLURAL, VERSION
from cotrain_operator.controller import Controller
from cotrain_operator.k8s import KubeApi, load_config
from cotrain_operator.reconcile.children import LABEL_JOB

CONTROLLER_KEY = "controller"


class DiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """kopf's annotations diff-base storage, building the same essence for less.

    kopf builds an object's essence on every event, even for event handlers, by deep-copying the
    whole body and then dropping `status` and most of `metadata`: about 250us per event for our
    jobs and pods, the largest single item in a profile of the operator. Without extra fields
    (handlers filtering on status fields) the essence never includes those parts, so copy a body
    that lacks them in the first place: 75us for a job, 155us for a pod, the same essence.
    """

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None
    ) -> kopf.BodyEssence:
        extra = list(extra_fields or [])
        if not extra:
            raw = {key: value for key, value in body.items() if key != "status"}
            metadata = body.get("metadata")
            if isinstance(metadata, Mapping):
                raw["metadata"] = {k: v for k, v in metadata.items() if k != "managedFields"}
            body = kopf.Body(cast(kopf.RawBody, raw))
        return super().build(body=body, extra_fields=extra)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = DiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.peering.standalone = True
    # kopf keeps a task and a queue per object that had an event until it has been idle this
    # long (default 5 s): after a burst of 1,000 jobs that is 2,000 of them, ~20 MiB (bench/).
    # Our handlers only enqueue a key, so a new task per event is no loss.
    settings.batching.idle_timeout = float(os.environ.get("COTRAIN_WORKER_IDLE_SECONDS", "1"))
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = int(os.environ.get("COTRAIN_WATCH_TIMEOUT", "300"))
    settings.watching.client_timeout = settings.watching.server_timeout + 30
    settings.watching.reconnect_backoff = 0.5
    # Only our pods, filtered by the API server: without it kopf watches every pod in the cluster
    # and drops the others client-side, after parsing them and keeping a memory of each.
    settings.watching.label_selectors["", "v1", "pods"] = LABEL_JOB
    load_config()
    controller = Controller(KubeApi(), workers=int(os.environ.get("COTRAIN_WORKERS", "16")))
    controller.start()
    memo[CONTROLLER_KEY] = controller
    port = int(os.environ.get("COTRAIN_METRICS_PORT", "8080"))
    if port:
        metrics.serve(port)


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


@kopf.on.probe(id="queue")
def queue_probe(memo: kopf.Memo, **_: Any) -> int:
    return int(metrics.QUEUE_DEPTH._value.get())
