"""The only module of the operator that talks to the Kubernetes API (besides kopf's watches).

Owns every write the operator makes — create-if-absent children, pod deletions, status merge
patches guarded by resourceVersion, job deletion with a UID precondition, Events — as plain JSON
over the `kubernetes` client's connection pool and credentials, off the event loop. Each call is
counted in the metrics by verb and outcome; "already exists" and "already gone" are successes,
so every call is safe to repeat.
"""

from __future__ import annotations

import asyncio
import functools
import json
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
from cotrain_operator.reconcile.access import POLICY_NAME

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


# Where each kind of child is created: (API path prefix, plural).
COLLECTIONS = {
    "Pod": ("/api/v1", "pods"),
    "ServiceAccount": ("/api/v1", "serviceaccounts"),
    "Service": ("/api/v1", "services"),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    "Workload": ("/apis/kueue.x-k8s.io/v1beta2", "workloads"),
}
JOBS_PATH = f"/apis/{GROUP}/{VERSION}"
ADMISSION_PATH = "/apis/admissionregistration.k8s.io/v1"


class KubeApi:
    """Async wrappers that send and receive plain JSON over the `kubernetes` client's
    connection pool and credentials.

    The typed methods would validate every body into the client's pydantic models, dump it back
    to JSON, and parse each answer into models that the operator then turns back into dicts;
    that round trip cost more CPU than the rest of admitting a job. The bodies here are already
    plain dicts (the builders make them), and so are the answers the caches keep.
    """

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

    def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        """One request with the client's credentials (refreshed as it refreshes them); the
        answer's JSON, or ApiException (404, 409, ...) as the typed methods raise it."""
        headers = {"Accept": "application/json", "Content-Type": content_type}
        method, url, headers, _, _ = self.api_client.param_serialize(
            method=method,
            resource_path=path,
            query_params=list((query or {}).items()),
            header_params=headers,
            auth_settings=["BearerToken"],
        )
        response = self.api_client.call_api(method, url, header_params=headers, body=body)
        data = response.read()  # type: ignore[no-untyped-call]
        if not 200 <= response.status <= 299:
            text = data.decode("utf-8", "replace") if data else None
            raise ApiException.from_response(http_resp=response, body=text, data=None)
        return json.loads(data) if data else None

    async def _call(self, verb: str, resource: str, function: Callable[[], T]) -> T:
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._executor, function)
        except ApiException as error:
            metrics.API_REQUESTS.labels(verb, resource, str(error.status)).inc()
            raise
        metrics.API_REQUESTS.labels(verb, resource, "ok").inc()
        return result

    async def create(self, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """Create `body`; None when it already exists (the earlier create won)."""
        namespace = body["metadata"]["namespace"]
        kind = body["kind"]
        prefix, plural = COLLECTIONS[kind]
        path = f"{prefix}/namespaces/{namespace}/{plural}"
        try:
            created = await self._call(
                "create",
                kind.lower(),
                lambda: self._request("POST", path, body, {"fieldManager": FIELD_MANAGER}),
            )
        except ApiException as error:
            if error.status == 409:
                return None
            raise
        return created if isinstance(created, dict) else {}

    async def delete_pod(self, namespace: str, name: str) -> None:
        path = f"/api/v1/namespaces/{namespace}/pods/{name}"
        try:
            await self._call(
                "delete",
                "pod",
                lambda: self._request("DELETE", path, query={"propagationPolicy": "Background"}),
            )
        except ApiException as error:
            if error.status != 404:
                raise

    async def delete_workload(self, namespace: str, name: str) -> None:
        prefix, plural = COLLECTIONS["Workload"]
        path = f"{prefix}/namespaces/{namespace}/{plural}/{name}"
        try:
            await self._call("delete", "workload", lambda: self._request("DELETE", path))
        except ApiException as error:
            if error.status != 404:
                raise

    async def patch_workload_status(
        self,
        namespace: str,
        name: str,
        status: Mapping[str, Any],
        resource_version: str | None,
    ) -> dict[str, Any] | None:
        """Merge-patch a Kueue Workload's status, as `patch_status` does the job's."""
        prefix, plural = COLLECTIONS["Workload"]
        return await self._patch_status(
            f"{prefix}/namespaces/{namespace}/{plural}/{name}/status",
            "workloads/status",
            status,
            resource_version,
        )

    async def patch_status(
        self,
        namespace: str,
        name: str,
        status: Mapping[str, Any],
        resource_version: str | None,
    ) -> dict[str, Any] | None:
        """Merge-patch the job's status; ConflictError if it changed since `resource_version`."""
        path = f"{JOBS_PATH}/namespaces/{namespace}/{PLURAL}/{name}/status"
        return await self._patch_status(path, f"{PLURAL}/status", status, resource_version)

    async def _patch_status(
        self,
        path: str,
        resource: str,
        status: Mapping[str, Any],
        resource_version: str | None,
    ) -> dict[str, Any] | None:
        body: dict[str, Any] = {"status": dict(status)}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            patched = await self._call(
                "patch",
                resource,
                lambda: self._request(
                    "PATCH", path, body, {"fieldManager": FIELD_MANAGER}, MERGE_PATCH
                ),
            )
        except ApiException as error:
            if error.status == 409:
                raise ConflictError(f"{path} changed since {resource_version}") from error
            if error.status == 404:
                return None
            raise
        return patched if isinstance(patched, dict) else None

    async def missing_trainer_policy(self) -> list[str]:
        """Which of the trainer's admission policy and its binding (deploy/base/trainer.yaml)
        the cluster lacks, as "<plural>/<name>"."""
        missing = []
        for plural in ("validatingadmissionpolicies", "validatingadmissionpolicybindings"):
            path = f"{ADMISSION_PATH}/{plural}/{POLICY_NAME}"
            try:
                await self._call("get", plural, functools.partial(self._request, "GET", path))
            except ApiException as error:
                if error.status != 404:
                    raise
                missing.append(f"{plural}/{POLICY_NAME}")
        return missing

    async def delete_job(self, namespace: str, name: str, uid: str) -> None:
        """Delete the job (its children go with it, by owner references) if it is still `uid`."""
        options = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "preconditions": {"uid": uid},
            "propagationPolicy": "Background",
        }
        path = f"{JOBS_PATH}/namespaces/{namespace}/{PLURAL}/{name}"
        try:
            await self._call("delete", PLURAL, lambda: self._request("DELETE", path, options))
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
        path = f"/api/v1/namespaces/{metadata['namespace']}/events"
        try:
            await self._call("create", "event", lambda: self._request("POST", path, body))
        except ApiException as error:  # an Event is never worth failing a reconcile for
            log.warning(
                "could not post event %s on %s: %s",
                reason,
                metadata["name"],
                error.reason,
            )
