"""The only module of the operator that talks to the Kubernetes API (besides kopf's watches).

Owns every write the operator makes — create-if-absent children, pod deletions, status merge
patches guarded by resourceVersion, job deletion with a UID precondition, Events — through the
`kubernetes` client, off the event loop. Each call is counted in the metrics by verb and outcome;
"already exists" and "already gone" are successes, so every call is safe to repeat.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from cotrain_operator import metrics
from cotrain_operator.api.models import GROUP, KIND, PLURAL, VERSION

log = logging.getLogger(__name__)
T = TypeVar("T")
MERGE_PATCH = "application/merge-patch+json"
FIELD_MANAGER = "cotrain-operator"
COMPONENT = "cotrain-operator"
# Calls to the API in flight at once. The client is synchronous, so each one holds a thread (and
# a pooled connection) for its round trip; asyncio's default pool (cores + 4 threads) would cap a
# 2-core operator at 6, and admission is bound by round trips, not by CPU.
API_THREADS = int(os.environ.get("COTRAIN_API_THREADS", "16"))


class ConflictError(Exception):
    """The object changed since it was read (HTTP 409 on an update): reconcile again."""


def load_config() -> None:
    """In-cluster configuration in a pod, the kubeconfig ($KUBECONFIG) elsewhere."""
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]


class KubeApi:
    """Thin async wrappers over the typed clients."""

    def __init__(
        self, api_client: client.ApiClient | None = None, threads: int = API_THREADS
    ) -> None:
        if api_client is None:
            configuration = client.Configuration.get_default_copy()
            configuration.connection_pool_maxsize = max(
                threads, configuration.connection_pool_maxsize or 0
            )
            api_client = client.ApiClient(configuration)
        self.api_client = api_client
        self._executor = ThreadPoolExecutor(max(1, threads), thread_name_prefix="cotrain-api")
        self.core = client.CoreV1Api(self.api_client)
        self.rbac = client.RbacAuthorizationV1Api(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)

    async def _call(self, verb: str, resource: str, function: Callable[[], T]) -> T:
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._executor, function)
        except ApiException as error:
            metrics.API_REQUESTS.labels(verb, resource, str(error.status)).inc()
            raise
        metrics.API_REQUESTS.labels(verb, resource, "ok").inc()
        return result

    def _plain(self, value: Any) -> dict[str, Any]:
        plain = self.api_client.sanitize_for_serialization(value)  # type: ignore[no-untyped-call]
        return plain if isinstance(plain, dict) else {}

    async def create(self, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """Create `body`; None when it already exists (the earlier create won)."""
        namespace = body["metadata"]["namespace"]
        kind = body["kind"]
        creators: dict[str, Callable[[], Any]] = {
            "Pod": lambda: self.core.create_namespaced_pod(
                namespace, client.V1Pod.model_validate(body), field_manager=FIELD_MANAGER
            ),
            "ServiceAccount": lambda: self.core.create_namespaced_service_account(
                namespace,
                client.V1ServiceAccount.model_validate(body),
                field_manager=FIELD_MANAGER,
            ),
            "Role": lambda: self.rbac.create_namespaced_role(
                namespace, client.V1Role.model_validate(body), field_manager=FIELD_MANAGER
            ),
            "RoleBinding": lambda: self.rbac.create_namespaced_role_binding(
                namespace, client.V1RoleBinding.model_validate(body), field_manager=FIELD_MANAGER
            ),
        }
        try:
            created = await self._call("create", kind.lower(), creators[kind])
        except ApiException as error:
            if error.status == 409:
                return None
            raise
        return self._plain(created)

    async def delete_pod(self, namespace: str, name: str) -> None:
        try:
            await self._call(
                "delete",
                "pod",
                lambda: self.core.delete_namespaced_pod(
                    name, namespace, propagation_policy="Background"
                ),
            )
        except ApiException as error:
            if error.status != 404:
                raise

    async def patch_status(
        self, namespace: str, name: str, status: Mapping[str, Any], resource_version: str | None
    ) -> dict[str, Any] | None:
        """Merge-patch the job's status; ConflictError if it changed since `resource_version`."""
        body: dict[str, Any] = {"status": dict(status)}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            patched = await self._call(
                "patch",
                f"{PLURAL}/status",
                lambda: self.custom.patch_namespaced_custom_object_status(
                    GROUP,
                    VERSION,
                    namespace,
                    PLURAL,
                    name,
                    body,
                    field_manager=FIELD_MANAGER,
                    _content_type=MERGE_PATCH,
                ),
            )
        except ApiException as error:
            if error.status == 409:
                changed = f"{namespace}/{name} changed since {resource_version}"
                raise ConflictError(changed) from error
            if error.status == 404:
                return None
            raise
        return patched if isinstance(patched, dict) else None

    async def delete_job(self, namespace: str, name: str, uid: str) -> None:
        """Delete the job (its children go with it, by owner references) if it is still `uid`."""
        options = client.V1DeleteOptions.model_validate(
            {"preconditions": {"uid": uid}, "propagationPolicy": "Background"}
        )
        try:
            await self._call(
                "delete",
                PLURAL,
                lambda: self.custom.delete_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, name, body=options
                ),
            )
        except ApiException as error:
            if error.status not in (404, 409):
                raise

    async def post_event(
        self, job: Mapping[str, Any], event_type: str, reason: str, message: str
    ) -> None:
        """A core/v1 Event on the job, as `kubectl describe` shows them. Best effort."""
        metadata = job["metadata"]
        now = datetime.now(UTC)
        stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "generateName": f"{metadata['name']}.",
                "namespace": metadata["namespace"],
            },
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": KIND,
                "name": metadata["name"],
                "namespace": metadata["namespace"],
                "uid": metadata.get("uid"),
                "resourceVersion": metadata.get("resourceVersion"),
            },
            "type": event_type,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": COMPONENT,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            await self._call(
                "create",
                "event",
                lambda: self.core.create_namespaced_event(
                    metadata["namespace"], client.CoreV1Event.model_validate(body)
                ),
            )
        except ApiException as error:  # an Event is never worth failing a reconcile for
            log.warning("could not post event %s on %s: %s", reason, metadata["name"], error.reason)
