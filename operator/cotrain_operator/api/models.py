"""The CoTrainJob API (cotrain.dev/v1alpha1): the one source of truth for spec and status.

Owns the pydantic models, their defaults and every per-field constraint. The CRD in `crds/` is
rendered from these models by `crd.py`; cross-field rules live in `rules.py` so that the same
rule is enforced by the API server (as CEL) and by `cotrain validate` (as Python).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from cotrain_operator.api.quantity import Quantity

GROUP = "cotrain.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "CoTrainJob"
PLURAL = "cotrainjobs"
SINGULAR = "cotrainjob"
SHORT_NAMES = ("ctj",)
CATEGORIES = ("all", "cotrain", "ml")

MAX_MEMBERS = 8
MAX_REPLICAS = 64
MAX_DEVICES_PER_REPLICA = 8
# Child objects are named "<job>-<member>[-suffix]"; both parts are capped so that every child
# name stays a valid 63-character DNS label.
MAX_JOB_NAME = 40
MAX_MEMBER_NAME = 15
# The characters the API server appends to a generateName.
GENERATED_SUFFIX = 5
# A member's command, args and env travel in its pod's plan: bounded so that the largest job and
# its pods stay far below etcd's 1.5 MiB per object.
MAX_MEMBER_TEXT = 32 * 1024
# Job and member names: DNS-1035 labels, since the job's Services and pod hostnames carry them.
DNS_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
# Durations in seconds, as int32 like a batch/v1 Job's (68 years).
MAX_SECONDS = 2**31 - 1
# An image reference: printable ASCII, no spaces (a pod refuses surrounding whitespace).
IMAGE_PATTERN = r"^[!-~]+$"
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
MIG_PROFILE = r"^[1-7]g\.[0-9]+gb(\+me)?$"


class Framework(StrEnum):
    """The training framework a member runs."""

    PYTORCH = "PyTorch"
    TENSORFLOW = "TensorFlow"


class SharingMode(StrEnum):
    """How the job's pods share GPUs."""

    AUTO = "Auto"
    EXCLUSIVE = "Exclusive"
    TIME_SLICING = "TimeSlicing"
    MPS = "MPS"
    MIG = "MIG"


class PlacementStrategy(StrEnum):
    """Where members run relative to each other."""

    SAME_GPU = "SameGPU"
    POD_PER_MEMBER = "PodPerMember"


class SuccessPolicy(StrEnum):
    """When the job as a whole counts as succeeded."""

    ALL_MEMBERS = "AllMembers"
    ANY_MEMBER = "AnyMember"


class BuiltinModel(StrEnum):
    """Small built-in models trained on synthetic data, for smoke runs and demos."""

    MLP = "MLP"
    CNN = "CNN"


class JobPhase(StrEnum):
    """The job's coarse state; conditions carry the detail."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


class MemberPhase(StrEnum):
    """One member's state."""

    PENDING = "Pending"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class ConditionStatus(StrEnum):
    """metav1.ConditionStatus."""

    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class _Model(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are an error."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=False,
        validate_default=True,
    )


class _StatusModel(_Model):
    """Status is written by the operator and reporters; unknown keys are dropped, not fatal."""

    model_config = ConfigDict(extra="ignore")


# --------------------------------------------------------------------------------------------
# spec


class EnvVar(_Model):
    """An environment variable set in the member's process."""

    name: str = Field(
        min_length=1,
        max_length=128,
        pattern=ENV_NAME,
        description="Variable name. Names starting with COTRAIN_ or CUDA_MPS_ and "
        "CUDA_VISIBLE_DEVICES are reserved for the trainer.",
    )
    value: str = Field(default="", max_length=4096, description="Variable value.")


class ResourceRequirements(_Model):
    """CPU, memory and ephemeral storage for the member's container; GPU shares come from
    spec.sharing. Each amount is a quantity of at most 8Ei less one."""

    requests: dict[str, Quantity] = Field(
        default_factory=dict,
        max_length=8,
        description="Minimum resources, e.g. {cpu: '1', memory: 2Gi}: cpu, memory and "
        "ephemeral-storage only. Do not list nvidia.com/* resources: the operator requests the "
        "GPU share from spec.sharing.",
    )
    limits: dict[str, Quantity] = Field(
        default_factory=dict,
        max_length=8,
        description="Maximum resources, e.g. {cpu: '2', memory: 4Gi}. A cpu limit also caps the "
        "member's framework threads.",
    )


class MemberGPU(_Model):
    """The member's share of its GPU."""

    memory: Quantity | None = Field(
        default=None,
        description="GPU memory cap for this member, e.g. 4Gi (at least 1Mi, at most 8Ei less "
        "one). The trainer enforces it in the framework (PyTorch per-process memory fraction, "
        "TensorFlow logical device memory_limit) and, under MPS, with "
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT. Unset: an equal share of the memory left after the "
        "members that set one.",
    )
    compute_percent: int | None = Field(
        default=None,
        ge=1,
        le=100,
        description="Share of the GPU's streaming multiprocessors for this member under MPS "
        "(CUDA_MPS_ACTIVE_THREAD_PERCENTAGE), 1-100. With placement SameGPU the members' "
        "shares add up to at most 100.",
    )
    count: int = Field(
        default=1,
        ge=1,
        le=MAX_DEVICES_PER_REPLICA,
        description="Devices (whole GPUs or MIG slices) per replica of the member; a PyTorch "
        "member runs one data-parallel process per device, a TensorFlow member one worker "
        "that mirrors its model over them. More than 1 needs placement PodPerMember and a "
        "mode that gives whole devices (Exclusive, MIG or Auto).",
    )


class Member(_Model):
    """One training process (or pod) of the job: a PyTorch or TensorFlow program."""

    name: str = Field(
        min_length=1,
        max_length=MAX_MEMBER_NAME,
        pattern=DNS_LABEL,
        description="Unique name of the member within the job: a lowercase DNS label of at most "
        f"{MAX_MEMBER_NAME} characters. It keys status.members.",
    )
    framework: Framework = Field(description="The framework the member trains with.")
    image: str | None = Field(
        default=None,
        min_length=1,
        max_length=512,
        pattern=IMAGE_PATTERN,
        description="Container image. Defaults to the CoTrain trainer image, which holds both "
        "frameworks.",
    )
    command: list[Annotated[str, Field(max_length=4096)]] | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="Program to run instead of the built-in model, e.g. [python, train.py]. It "
        "reports progress through cotrain_trainer.report (see the README). command, args and "
        "env hold at most 32768 characters together.",
    )
    args: list[Annotated[str, Field(max_length=4096)]] | None = Field(
        default=None,
        max_length=256,
        description="Arguments to the command.",
    )
    model: BuiltinModel | None = Field(
        default=None,
        description="Built-in model to train when no command is given: MLP (default) or CNN, "
        "on synthetic data.",
    )
    epochs: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="Passes over the data set. Set epochs or steps, not both.",
    )
    steps: int | None = Field(
        default=None,
        ge=1,
        le=100_000_000,
        description="Optimizer steps to train for. Set epochs or steps, not both; with neither "
        "the built-in models train 200 steps.",
    )
    replicas: int = Field(
        default=1,
        ge=1,
        le=MAX_REPLICAS,
        description="Pods of this member training data-parallel (PyTorch: torch.distributed; "
        "TensorFlow: MultiWorkerMirroredStrategy). The replicas start together and restart "
        "together. More than 1 needs placement PodPerMember.",
    )
    batch_size: int = Field(
        default=64, ge=1, le=65_536, description="Samples per optimizer step (per process)."
    )
    learning_rate: float = Field(
        default=0.001, gt=0, le=10, description="Optimizer learning rate for built-in models."
    )
    cpu_threads: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="Framework intra-op threads for this member. Unset: derived from the cpu "
        "limit, or the node's cores divided among the members that share them, so co-tenants "
        "do not thrash.",
    )
    gpu: MemberGPU = Field(
        default_factory=MemberGPU,
        description="The member's GPU memory and compute caps.",
        json_schema_extra={"default": {}},
    )
    resources: ResourceRequirements = Field(
        default_factory=ResourceRequirements,
        description="CPU and memory requests and limits of the member.",
        json_schema_extra={"default": {}},
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        max_length=64,
        description="Extra environment variables for the member's process.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )


class Sharing(_Model):
    """How the job's pods share GPUs."""

    mode: SharingMode = Field(
        default=SharingMode.AUTO,
        description="Auto (resolved from GPU Feature Discovery node labels), Exclusive (a whole "
        "GPU), TimeSlicing (a time-sliced replica), MPS (an MPS share) or MIG (a MIG slice).",
    )
    mig_profile: str | None = Field(
        default=None,
        max_length=32,
        pattern=MIG_PROFILE,
        description="MIG profile of the slice to request, e.g. 1g.10gb or 3g.40gb. Only with "
        "mode MIG, where it is required.",
    )


class Placement(_Model):
    """Where the job's members run."""

    strategy: PlacementStrategy = Field(
        default=PlacementStrategy.SAME_GPU,
        description="SameGPU: one pod holds one GPU share and runs every member as its own "
        "process on it (co-training guaranteed). PodPerMember: one pod per member, each with "
        "its own share.",
    )
    same_node: bool = Field(
        default=False,
        description="PodPerMember only: schedule every member's pod on one node.",
    )
    node_selector: dict[str, Annotated[str, Field(max_length=63)]] = Field(
        default_factory=dict,
        max_length=32,
        description="Extra node labels the job's pods require, added to those the sharing mode "
        "needs.",
    )


class RunPolicy(_Model):
    """Retries, deadlines, clean-up and suspension."""

    backoff_limit: int = Field(
        default=3,
        ge=0,
        le=100,
        description="Restarts allowed per member before the job fails.",
    )
    active_deadline_seconds: int | None = Field(
        default=None,
        ge=1,
        le=MAX_SECONDS,
        description="Seconds the job may run after it starts before it fails with reason "
        "DeadlineExceeded.",
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None,
        ge=0,
        le=MAX_SECONDS,
        description="Delete the job this many seconds after it succeeds or fails.",
    )
    suspend: bool = Field(
        default=False,
        description="While true the job has no pods (admission controllers such as Kueue set "
        "it); setting it removes running pods, clearing it resumes the job.",
    )


class CoTrainJobSpec(_Model):
    """The desired state of a CoTrainJob."""

    members: list[Member] = Field(
        min_length=1,
        max_length=MAX_MEMBERS,
        description=f"The training programs of the job, 1 to {MAX_MEMBERS}, with unique names.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    sharing: Sharing = Field(
        default_factory=Sharing,
        description="How the job's pods share GPUs.",
        json_schema_extra={"default": {}},
    )
    placement: Placement = Field(
        default_factory=Placement,
        description="Where the members run relative to each other.",
        json_schema_extra={"default": {}},
    )
    run_policy: RunPolicy = Field(
        default_factory=RunPolicy,
        description="Retries, deadlines, clean-up and suspension.",
        json_schema_extra={"default": {}},
    )
    success_policy: SuccessPolicy = Field(
        default=SuccessPolicy.ALL_MEMBERS,
        description="AllMembers: the job succeeds when every member has. AnyMember: when one "
        "has (the others are then stopped).",
    )


# --------------------------------------------------------------------------------------------
# status


class Condition(_StatusModel):
    """metav1.Condition: one aspect of the job's state."""

    type: str = Field(
        max_length=316,
        pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
        r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$",
        description="Condition type: Admitted, Schedulable, Running, Succeeded, Failed, "
        "Suspended, and for generic tooling (kstatus) Reconciling and Stalled.",
    )
    status: ConditionStatus = Field(description="True, False or Unknown.")
    observed_generation: int | None = Field(
        default=None, ge=0, description="The .metadata.generation the condition was set from."
    )
    last_transition_time: str = Field(
        json_schema_extra={"format": "date-time"},
        description="When the condition last changed status.",
    )
    reason: str = Field(
        min_length=1,
        max_length=1024,
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        description="Machine-readable CamelCase reason for the last transition.",
    )
    message: str = Field(max_length=32768, description="Human-readable detail.")


class MemberBudget(_StatusModel):
    """The GPU share the operator planned for one member."""

    memory_bytes: int | None = Field(
        default=None, ge=0, description="GPU memory cap in bytes; unset when unknown."
    )
    compute_percent: int | None = Field(
        default=None, ge=1, le=100, description="MPS active thread percentage."
    )


class SharingStatus(_StatusModel):
    """How the job's GPU sharing was resolved."""

    mode: SharingMode | None = Field(
        default=None, description="The resolved sharing mode (never Auto)."
    )
    resource: str | None = Field(
        default=None,
        max_length=253,
        description="The extended resource each pod requests, e.g. nvidia.com/gpu.shared.",
    )
    node: str | None = Field(default=None, max_length=253, description="The node chosen.")
    gpu_product: str | None = Field(
        default=None, max_length=253, description="The node's GPU model (nvidia.com/gpu.product)."
    )
    budget: dict[str, MemberBudget] = Field(
        default_factory=dict,
        max_length=MAX_MEMBERS,
        description="Per-member GPU budget, by member name.",
    )


class MemberStatus(_StatusModel):
    """Progress and outcome of one member, merged from the trainer's reports."""

    phase: MemberPhase | None = Field(default=None, description="The member's state.")
    restarts: int = Field(default=0, ge=0, description="Restarts so far (within backoffLimit).")
    step: int | None = Field(default=None, ge=0, description="Optimizer steps done.")
    total_steps: int | None = Field(default=None, ge=0, description="Steps planned.")
    epoch: int | None = Field(default=None, ge=0, description="Epochs completed.")
    loss: float | None = Field(
        default=None, description="Training loss at the last report (finite values only)."
    )
    first_loss: float | None = Field(default=None, description="Training loss at the first step.")
    samples_per_second: float | None = Field(
        default=None, ge=0, description="Training throughput at the last report."
    )
    gpu_memory_bytes: int | None = Field(
        default=None,
        ge=0,
        description="Device memory the member's process holds now, as its framework counts it "
        "(NVML for a member that reports none); 0 on the CPU.",
    )
    gpu_memory_peak_bytes: int | None = Field(
        default=None, ge=0, description="Peak GPU memory of the member's process."
    )
    last_report_time: str | None = Field(
        default=None,
        json_schema_extra={"format": "date-time"},
        description="When the trainer last reported.",
    )
    exit_code: int | None = Field(default=None, description="Exit code of the last run.")
    reason: str | None = Field(
        default=None,
        max_length=128,
        description="Why the member ended, e.g. Completed, Error, GPUOutOfMemory, OOMKilled, "
        "CoTenantFault, DeadlineExceeded.",
    )
    message: str | None = Field(default=None, max_length=4096, description="Detail.")


def read_member_report(raw: Any) -> MemberStatus:
    """A member's status as reported by its trainer, keeping only fields that validate."""
    if not isinstance(raw, Mapping):
        return MemberStatus()
    kept: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, float) and not math.isfinite(value):
            continue
        try:
            MemberStatus.model_validate({key: value})
        except ValidationError:
            continue
        kept[key] = value
    return MemberStatus.model_validate(kept)


class CoTrainJobStatus(_StatusModel):
    """The observed state of a CoTrainJob."""

    phase: JobPhase | None = Field(default=None, description="The job's coarse state.")
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        description="The job's conditions (metav1.Condition).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="The .metadata.generation the status reflects."
    )
    start_time: str | None = Field(
        default=None,
        json_schema_extra={"format": "date-time"},
        description="When the operator first created the job's pods.",
    )
    completion_time: str | None = Field(
        default=None,
        json_schema_extra={"format": "date-time"},
        description="When the job succeeded or failed.",
    )
    sharing: SharingStatus | None = Field(
        default=None, description="How GPU sharing was resolved for the job."
    )
    ready_members: str | None = Field(
        default=None, max_length=16, description="Running or succeeded members / all, e.g. 2/2."
    )
    progress: str | None = Field(
        default=None, max_length=16, description="Steps done over steps planned, e.g. 45%."
    )
    members: dict[str, MemberStatus] = Field(
        default_factory=dict,
        max_length=MAX_MEMBERS,
        description="Per-member progress, by member name; each reporter merge-patches only its "
        "own key.",
    )


class ObjectMeta(BaseModel):
    """The part of metav1.ObjectMeta that `cotrain validate` and the operator read."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, alias_generator=to_camel)

    name: str | None = None
    generate_name: str | None = None
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class CoTrainJob(_Model):
    """CoTrainJob runs PyTorch and TensorFlow training side by side on shared GPUs.

    Limits: metadata.name is a DNS label (lowercase letters, digits and '-', starting with a
    letter) of at most 40 characters; at most 8 members; a quantity is at most 32 characters
    (at most 19 integer and 9 fraction digits, an exponent of at most two digits) and at most
    9223372036854775807 (8Ei less one); a member's command, args and env hold at most 32768
    characters together; kubectl apply keeps a copy of the job in an annotation, so the job
    must stay under 256 KiB of JSON for it (kubectl create has no such limit).
    """

    KIND: ClassVar[str] = KIND

    api_version: str = Field(
        default=API_VERSION, alias="apiVersion", description="cotrain.dev/v1alpha1"
    )
    kind: str = Field(default=KIND, description="CoTrainJob")
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: CoTrainJobSpec
    status: CoTrainJobStatus | None = None

    def member(self, name: str) -> Member:
        """The member called `name`; KeyError if there is none."""
        for member in self.spec.members:
            if member.name == name:
                return member
        raise KeyError(name)


def dump(model: BaseModel) -> dict[str, Any]:
    """The wire form of a model: camelCase keys, unset optionals left out."""
    return model.model_dump(by_alias=True, exclude_none=True, mode="json")
