"""The contract between the operator and the trainer inside a pod.

Owns what the operator puts into a trainer pod and what the trainer reads from it: one JSON
document, the `PodPlan`, in the environment variable `COTRAIN_POD_PLAN`, plus where to report.
The operator builds a plan per pod (every member for SameGPU, one for PodPerMember); `cotrain run`
builds one locally from the job file. Both sides import only this module, so the two cannot drift.
Also the trainer pod's labels and container name, by which `cotrain logs` finds a job's pods.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from cotrain_operator.api.models import GROUP, Member, SharingMode, SuccessPolicy

# Labels of a job's trainer pods: every pod has the job's and its group's (and attempt's); a pod
# that holds one member (PodPerMember, replicas) has the member's too, and a replica's index.
LABEL_JOB = f"{GROUP}/job"
LABEL_GROUP = f"{GROUP}/group"
LABEL_ATTEMPT = f"{GROUP}/attempt"
LABEL_MEMBER = f"{GROUP}/member"
LABEL_REPLICA = f"{GROUP}/replica"
TRAINER_CONTAINER = "trainer"

# Environment of the trainer container.
ENV_POD_PLAN = "COTRAIN_POD_PLAN"
# Where the supervisor reports: "kubernetes" (merge-patch the job's status subresource with the
# pod's service account) or "local" (terminal and a status file).
ENV_REPORT_MODE = "COTRAIN_REPORT"
# The service-account directory (token, ca.crt, namespace); the in-cluster default unless a test
# kubelet points it elsewhere.
ENV_SERVICEACCOUNT_DIR = "COTRAIN_SERVICEACCOUNT_DIR"
DEFAULT_SERVICEACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# Seconds between two status reports of one member (the final report is always sent).
ENV_REPORT_INTERVAL = "COTRAIN_REPORT_INTERVAL"
DEFAULT_REPORT_INTERVAL_SECONDS = 5.0

# Set by the supervisor in each member process.
ENV_MEMBER = "COTRAIN_MEMBER"  # the member's spec as JSON
ENV_MEMBER_BUDGET = "COTRAIN_MEMBER_BUDGET"  # the member's MemberBudget as JSON
ENV_PROGRESS_FILE = "COTRAIN_PROGRESS_FILE"  # where the member appends JSON-lines progress
ENV_DEVICE_MEMORY_BYTES = "COTRAIN_DEVICE_MEMORY_BYTES"  # total memory of the device, if known

# Exit code of a member process that died of a GPU out-of-memory error it recognised.
EXIT_GPU_OOM = 75
# Exit code of the supervisor when its members failed for good (backoff spent, or the success
# policy can no longer be met): the operator fails the job instead of recreating the pod. Any
# other non-zero exit (a crash, OOMKilled, eviction) is a pod failure, retried within backoff.
EXIT_MEMBERS_FAILED = 3

# Reasons of a job's Failed condition that a change of spec can cure: the operator tries again
# when metadata.generation moves on.
REASON_INVALID_SPEC = "InvalidSpec"
REASON_FAILED_CREATE = "FailedCreate"  # the API server refused a child the job needs

# Member failure reasons the operator and the trainer agree on.
REASON_COMPLETED = "Completed"
REASON_ERROR = "Error"
REASON_GPU_OOM = "GPUOutOfMemory"
REASON_OOM_KILLED = "OOMKilled"
REASON_SIGNALED = "Signaled"
REASON_CO_TENANT_FAULT = "CoTenantFault"
REASON_BACKOFF_EXCEEDED = "BackoffLimitExceeded"
REASON_STOPPED = "Stopped"


class _Wire(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class PlannedBudget(_Wire):
    """One member's GPU share as planned by the operator (or `cotrain run`)."""

    memory_bytes: int | None = Field(default=None, ge=0)
    compute_percent: int | None = Field(default=None, ge=1, le=100)
    cpu_threads: int = Field(ge=1)


class MemberTopology(_Wire):
    """Where one member's processes sit in its data-parallel world (replicas x processes).

    A PyTorch member runs `procs_per_replica` processes per replica (one per device) with
    MASTER_ADDR/MASTER_PORT/WORLD_SIZE/RANK/LOCAL_RANK; a TensorFlow member runs one worker per
    replica with TF_CONFIG listing `worker_hosts`. A pod runs the replica `replica_indices[0]`;
    `cotrain run` runs every replica on the one machine.
    """

    replicas: int = Field(default=1, ge=1)
    procs_per_replica: int = Field(default=1, ge=1)
    replica_indices: list[int] = Field(default_factory=lambda: [0])
    master_addr: str = "127.0.0.1"
    master_port: int = Field(default=29500, ge=1, le=65535)
    worker_hosts: list[str] = Field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.replicas * self.procs_per_replica


class PodPlan(_Wire):
    """Everything the trainer in one pod needs to run its members."""

    job: str
    namespace: str = "default"
    mode: SharingMode  # resolved: never Auto
    members: list[Member] = Field(min_length=1)
    budgets: dict[str, PlannedBudget]
    device_memory_bytes: int | None = Field(default=None, ge=0)
    backoff_limit: int = Field(default=3, ge=0)
    success_policy: SuccessPolicy = SuccessPolicy.ALL_MEMBERS
    # Restarts already spent per member in earlier pods of this job (the operator's count).
    restarts: dict[str, int] = Field(default_factory=dict)
    # Data-parallel members (replicas or gpu.count above 1); absent: one process, no peers.
    topology: dict[str, MemberTopology] = Field(default_factory=dict)
