"""The only module of the operator that talks to the Kubernetes API (besides kopf's watches).

Owns every write the operator makes — create-if-absent children, pod deletions, status merge
patches guarded by resourceVersion, job deletion with a UID precondition, Events — as plain JSON
over one urllib3 connection pool with the operator's credentials (`credentials.py`), off the
event loop. Each call is counted in the metrics by verb and outcome; "already exists" and
"already gone" are successes, so every call is safe to repeat.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlencode

import kopf
import urllib3

from cotrain_operator import credentials, metrics
from cotrain_operator.api.models import GROUP, KIND, PLURAL, VERSION
from cotrain_operator.reconcile.access import POLICY_NAME
from cotrain_operator.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
MERGE_PATCH = "application/merge-patch+json"
FIELD_MANAGER = "cotrain-operator"
COMPONENT = "cotrain-operator"
# Calls to the API in flight at once (the setting COTRAIN_API_THREADS). Each one holds a thread
# (and a pooled connection) for its round trip; asyncio's default pool (cores + 4 threads) would
# cap a 2-core operator at 6, and admission is bound by round trips, not by CPU.
API_THREADS = Settings.api_threads
# No request the operator makes takes long; one that hangs must not hold its thread for ever.
TIMEOUT = urllib3.Timeout(connect=10.0, read=60.0)


class ApiError(Exception):
    """The API server answered with an error: its HTTP status, reason and body (a Status)."""

    def __init__(self, status: int, reason: str | None, body: str | None = None) -> None:
        super().__init__(f"HTTP {status} {reason or ''}".strip())
        self.status = status
        self.reason = reason
        self.body = body


class ConflictError(Exception):
    """The object changed since it was read (HTTP 409 on an update): reconcile again."""


class Session:
    """A connection pool and the headers that carry one identity; `relogin` reads the
    credentials again (the token a 401 says is stale) and keeps the pool when only the token
    or password changed."""

    def __init__(
        self,
        login: Callable[[], kopf.ConnectionInfo] = credentials.load,
        connections: int = API_THREADS,
    ) -> None:
        self._login = login
        self._connections = connections
        self._lock = threading.Lock()
        self._tls: tuple[Any, ...] | None = None
        self.server = ""
        self._use(login())

    def _use(self, info: kopf.ConnectionInfo) -> None:
        headers = {"Accept": "application/json"}
        if info.token:
            headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
        elif info.username and info.password:
            pair = base64.b64encode(f"{info.username}:{info.password}".encode()).decode()
            headers["Authorization"] = f"Basic {pair}"
        tls = (info.ca_path, info.ca_data, info.insecure, info.certificate_path,
               info.certificate_data, info.private_key_path, info.private_key_data)  # fmt: skip
        if tls != self._tls or info.server != self.server:
            self.pool = urllib3.PoolManager(
                num_pools=2,
                maxsize=self._connections,
                ssl_context=info.as_ssl_context() if info.server.startswith("https:") else None,
                timeout=TIMEOUT,
                retries=False,
            )
            self._tls = tls
            self.server = info.server
        self.headers = headers

    def relogin(self, stale: Mapping[str, str]) -> None:
        with self._lock:
            if self.headers is stale:  # not yet done by another thread that saw the same 401
                self._use(self._login())


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
    """Async wrappers that send and receive plain JSON.

    The bodies are plain dicts already (the builders make them), and so are the answers the
    caches keep: the `kubernetes` client's typed methods would validate every body into its
    pydantic models, dump it back to JSON, and parse each answer into models that the operator
    would turn back into dicts, which cost more CPU than the rest of admitting a job.
    """

    def __init__(self, session: Session | None = None, threads: int = API_THREADS) -> None:
        self.session = session if session is not None else Session(connections=threads)
        self._executor = ThreadPoolExecutor(max(1, threads), thread_name_prefix="cotrain-api")

    def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        """One request; the answer's JSON, or ApiError (404, 409, ...). A 401 is answered by
        logging in again and trying once more."""
        session = self.session
        url = session.server + path + (f"?{urlencode(query)}" if query else "")
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(2):
            headers = session.headers
            response = session.pool.request(
                method, url, body=data, headers={**headers, "Content-Type": content_type}
            )
            if response.status != 401 or attempt:
                break
            session.relogin(headers)
        if not 200 <= response.status <= 299:
            text = response.data.decode("utf-8", "replace") if response.data else None
            raise ApiError(response.status, response.reason, text)
        return json.loads(response.data) if response.data else None

    async def _call(self, verb: str, resource: str, function: Callable[[], T]) -> T:
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._executor, function)
        except ApiError as error:
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
        except ApiError as error:
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
        except ApiError as error:
            if error.status != 404:
                raise

    async def delete_workload(self, namespace: str, name: str) -> None:
        prefix, plural = COLLECTIONS["Workload"]
        path = f"{prefix}/namespaces/{namespace}/{plural}/{name}"
        try:
            await self._call("delete", "workload", lambda: self._request("DELETE", path))
        except ApiError as error:
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
        except ApiError as error:
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
            except ApiError as error:
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
        except ApiError as error:
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
        except ApiError as error:  # an Event is never worth failing a reconcile for
            log.warning(
                "could not post event %s on %s: %s",
                reason,
                metadata["name"],
                error.reason,
            )
