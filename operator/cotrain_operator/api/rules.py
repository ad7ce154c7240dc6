"""Cross-field rules of the CoTrainJob API, each written once as CEL and once as Python.

Owns the table of rules that a JSON schema cannot express (migProfile only with MIG, compute
shares adding up to at most 100, immutable members, ...). `crd.py` places each rule's CEL in the
CRD as `x-kubernetes-validations` on the schema node of its model class, so the API server
enforces it at `kubectl apply`; `validation.py` runs the Python twin for `cotrain validate` and for
the operator, which must refuse objects that reached it without the server's checks. The messages
are identical on both paths, and the component tests feed the same invalid specs to both.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from cotrain_operator.api.metadata import MAX_LABEL, MAX_SUBDOMAIN
from cotrain_operator.api.models import (
    DNS_LABEL,
    GENERATED_SUFFIX,
    MAX_JOB_NAME,
    MAX_MEMBER_TEXT,
    CoTrainJob,
    CoTrainJobSpec,
    EnvVar,
    Member,
    MemberGPU,
    Placement,
    PlacementStrategy,
    ResourceRequirements,
    Sharing,
    SharingMode,
)
from cotrain_operator.api.quantity import MAX_QUANTITY, QUANTITY_PATTERN, parse_quantity

RESERVED_ENV_PREFIXES = ("COTRAIN_", "CUDA_MPS_")
RESERVED_ENV_NAMES = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")
# What a member's container may ask for; its GPU share comes from spec.sharing. Extended
# resources (nvidia.com/*, in any case) would be refused or double-counted in the pod.
MEMBER_RESOURCES = ("cpu", "memory", "ephemeral-storage")


def cel_quantity(value: str, check: str) -> str:
    """CEL applying `check` (a CEL expression over `{q}`, the parsed quantity) to the quantity
    `value` only when the schema's pattern admits it. The API server evaluates CEL even on values
    that failed their pattern, and parsing an unbounded exponent would pin it; the ternary never
    evaluates the parse for such a value (the pattern's own error reports it)."""
    parsed = f"quantity(string({value}))"
    return f"(string({value}).matches(r'{QUANTITY_PATTERN}') ? {check.format(q=parsed)} : true)"


# A label key: a DNS subdomain prefix, "/", and a name of at most 63 characters.
MAX_LABEL_KEY = MAX_SUBDOMAIN + 1 + MAX_LABEL
_CEL_MAX = "{q}.compareTo(quantity('" + str(MAX_QUANTITY) + "')) <= 0"


# CEL rules also run against the schema's own defaults (e.g. `placement: {}`) when the CRD is
# created, before nested defaults are filled in, so every rule guards optional keys with has().


@dataclass(frozen=True)
class Rule:
    """One cross-field rule on the schema node of `node` (a model class)."""

    node: type[BaseModel]
    # CEL with `self` bound to the node (and `oldSelf` for transition rules). None when the
    # server enforces the rule through the schema's structure (e.g. list-map key uniqueness).
    cel: str | None
    message: str
    # Where the error points, relative to the node, in the CRD's fieldPath syntax (".a.b").
    field_path: str
    check: Callable[[Any], bool]
    reason: str = "FieldValueInvalid"


@dataclass(frozen=True)
class TransitionRule:
    """A rule comparing an update with the stored object (CEL `oldSelf`)."""

    node: type[BaseModel]
    cel: str
    message: str
    field_path: str
    check: Callable[[Any, Any], bool]
    reason: str = "FieldValueForbidden"


def _compute_sum(spec: CoTrainJobSpec) -> int:
    return sum(m.gpu.compute_percent or 0 for m in spec.members)


def _unique(names: list[str]) -> bool:
    return len(names) == len(set(names))


def _known_resources(resources: ResourceRequirements) -> bool:
    return all(k in MEMBER_RESOURCES for k in [*resources.requests, *resources.limits])


def _within_max(resources: ResourceRequirements) -> bool:
    values = [*resources.requests.values(), *resources.limits.values()]
    return all(parse_quantity(v) <= MAX_QUANTITY for v in values)


def member_text_size(member: Member) -> int:
    """Characters of the member's command, args and env: what its pod's plan must carry."""
    return (
        sum(len(c) for c in member.command or [])
        + sum(len(a) for a in member.args or [])
        + sum(len(e.name) + len(e.value) for e in member.env)
    )


def _requests_within_limits(resources: ResourceRequirements) -> bool:
    return all(
        parse_quantity(resources.requests[key]) <= parse_quantity(limit)
        for key, limit in resources.limits.items()
        if key in resources.requests
    )


def _env_allowed(env: EnvVar) -> bool:
    return not env.name.startswith(RESERVED_ENV_PREFIXES) and env.name not in RESERVED_ENV_NAMES


RULES: tuple[Rule, ...] = (
    Rule(
        node=Sharing,
        cel="!has(self.migProfile) || self.mode == 'MIG'",
        message="migProfile is only used with mode MIG: remove spec.sharing.migProfile or set "
        "spec.sharing.mode to MIG",
        field_path=".migProfile",
        check=lambda s: s.mig_profile is None or s.mode == SharingMode.MIG,
    ),
    Rule(
        node=Sharing,
        cel="!has(self.mode) || self.mode != 'MIG' || has(self.migProfile)",
        message="mode MIG needs the slice to request: set spec.sharing.migProfile, e.g. 1g.10gb",
        field_path=".migProfile",
        check=lambda s: s.mode != SharingMode.MIG or s.mig_profile is not None,
        reason="FieldValueRequired",
    ),
    Rule(
        node=Placement,
        cel="!has(self.sameNode) || !self.sameNode || self.strategy == 'PodPerMember'",
        message="sameNode applies only to strategy PodPerMember (SameGPU already runs every "
        "member in one pod): remove sameNode or set strategy to PodPerMember",
        field_path=".sameNode",
        check=lambda p: not p.same_node or p.strategy == PlacementStrategy.POD_PER_MEMBER,
    ),
    Rule(
        node=Placement,
        cel=f"!has(self.nodeSelector) || self.nodeSelector.all(k, size(k) <= {MAX_LABEL_KEY})",
        message=f"nodeSelector keys are node label keys (prefix/name), at most {MAX_LABEL_KEY} "
        "characters: shorten the key",
        field_path=".nodeSelector",
        check=lambda p: all(len(k) <= MAX_LABEL_KEY for k in p.node_selector),
    ),
    Rule(
        node=CoTrainJobSpec,
        cel=None,  # the CRD declares members a list-map keyed by name
        message="member names must be unique: rename the duplicate member",
        field_path=".members",
        check=lambda s: _unique([m.name for m in s.members]),
        reason="FieldValueDuplicate",
    ),
    Rule(
        node=CoTrainJobSpec,
        cel="self.sharing.mode in ['MPS', 'Auto'] || "
        "self.members.all(m, !has(m.gpu) || !has(m.gpu.computePercent))",
        message="gpu.computePercent is an MPS share: set spec.sharing.mode to MPS (or Auto) or "
        "remove computePercent from the members",
        field_path=".members",
        check=lambda s: (
            s.sharing.mode in (SharingMode.MPS, SharingMode.AUTO)
            or all(m.gpu.compute_percent is None for m in s.members)
        ),
    ),
    Rule(
        node=CoTrainJobSpec,
        cel="self.placement.strategy != 'SameGPU' || self.members.map(m, has(m.gpu) && "
        "has(m.gpu.computePercent) ? m.gpu.computePercent : 0).sum() <= 100",
        message="the members' gpu.computePercent add up to more than 100 on one shared GPU: "
        "lower them so that they sum to at most 100",
        field_path=".members",
        check=lambda s: (
            s.placement.strategy != PlacementStrategy.SAME_GPU or _compute_sum(s) <= 100
        ),
    ),
    Rule(
        node=CoTrainJobSpec,
        cel="self.placement.strategy != 'SameGPU' || self.members.all(m, !has(m.image)) || "
        "self.members.all(m, has(m.image) && m.image == self.members[0].image)",
        message="with placement SameGPU every member runs in one trainer container: give all "
        "members the same image, or none (the trainer image), or use strategy PodPerMember",
        field_path=".members",
        check=lambda s: (
            s.placement.strategy != PlacementStrategy.SAME_GPU
            or len({m.image for m in s.members}) == 1
        ),
    ),
    Rule(
        node=CoTrainJobSpec,
        cel="self.placement.strategy == 'PodPerMember' || self.members.all(m, "
        "(!has(m.replicas) || m.replicas == 1) && "
        "(!has(m.gpu) || !has(m.gpu.count) || m.gpu.count == 1))",
        message="replicas and gpu.count above 1 need placement PodPerMember (a SameGPU pod "
        "holds one GPU share): set spec.placement.strategy to PodPerMember",
        field_path=".members",
        check=lambda s: (
            s.placement.strategy == PlacementStrategy.POD_PER_MEMBER
            or all(m.replicas == 1 and m.gpu.count == 1 for m in s.members)
        ),
    ),
    Rule(
        node=CoTrainJobSpec,
        cel="self.members.all(m, !self.members.exists(o, has(o.replicas) && o.replicas > 1 && "
        "m.name.matches('^' + o.name + '-[0-9]+$')))",
        message="a member is named like a replica of a replicated member (<member>-<index>), "
        "whose pods and names it would share: rename it",
        field_path=".members",
        check=lambda s: (
            not any(
                o.replicas > 1 and re.fullmatch(re.escape(o.name) + r"-[0-9]+", m.name)
                for m in s.members
                for o in s.members
            )
        ),
    ),
    Rule(
        node=CoTrainJobSpec,
        cel="!(self.sharing.mode in ['TimeSlicing', 'MPS']) || "
        "self.members.all(m, !has(m.gpu) || !has(m.gpu.count) || m.gpu.count == 1)",
        message="TimeSlicing and MPS give a process a fraction of one GPU: gpu.count above 1 "
        "needs mode Exclusive, MIG or Auto",
        field_path=".members",
        check=lambda s: (
            s.sharing.mode not in (SharingMode.TIME_SLICING, SharingMode.MPS)
            or all(m.gpu.count == 1 for m in s.members)
        ),
    ),
    Rule(
        node=Member,
        cel="!(has(self.steps) && has(self.epochs))",
        message="set either steps or epochs, not both",
        field_path=".steps",
        check=lambda m: m.steps is None or m.epochs is None,
    ),
    Rule(
        node=Member,
        cel="!has(self.model) || !has(self.command)",
        message="model picks a built-in model, which a command replaces: remove model or command",
        field_path=".model",
        check=lambda m: m.model is None or m.command is None,
    ),
    Rule(
        node=Member,
        cel="!has(self.args) || has(self.command)",
        message="args are passed to a command: set command too, or remove args to train the "
        "built-in model",
        field_path=".args",
        check=lambda m: m.args is None or m.command is not None,
        reason="FieldValueRequired",
    ),
    Rule(
        node=Member,
        cel=None,  # the CRD declares env a list-map keyed by name
        message="environment variable names must be unique: remove the duplicate",
        field_path=".env",
        check=lambda m: _unique([e.name for e in m.env]),
        reason="FieldValueDuplicate",
    ),
    Rule(
        node=Member,
        cel="(has(self.command) ? self.command.map(c, size(c)).sum() : 0) + "
        "(has(self.args) ? self.args.map(a, size(a)).sum() : 0) + "
        "(has(self.env) ? self.env.map(e, size(e.name) + (has(e.value) ? size(e.value) : 0))"
        f".sum() : 0) <= {MAX_MEMBER_TEXT}",
        message=f"a member's command, args and env hold at most {MAX_MEMBER_TEXT} characters "
        "together (they travel in its pod): move long scripts or data into the image or a "
        "volume",
        field_path="",
        check=lambda m: member_text_size(m) <= MAX_MEMBER_TEXT,
        reason="FieldValueInvalid",
    ),
    Rule(
        node=MemberGPU,
        cel="!has(self.memory) || "
        + cel_quantity("self.memory", "{q}.compareTo(quantity('1Mi')) >= 0"),
        message="gpu.memory is in bytes and must be at least 1Mi: write it with a unit, e.g. 4Gi",
        field_path=".memory",
        check=lambda g: g.memory is None or parse_quantity(g.memory) >= 2**20,
    ),
    Rule(
        node=MemberGPU,
        cel="!has(self.memory) || " + cel_quantity("self.memory", _CEL_MAX),
        message=f"gpu.memory is larger than Kubernetes can hold (at most {MAX_QUANTITY} bytes, "
        "8Ei less one): lower it",
        field_path=".memory",
        check=lambda g: g.memory is None or parse_quantity(g.memory) <= MAX_QUANTITY,
    ),
    Rule(
        node=ResourceRequirements,
        cel="(!has(self.requests) || self.requests.all(k, k in "
        f"{list(MEMBER_RESOURCES)!r})) && (!has(self.limits) || self.limits.all(k, k in "
        f"{list(MEMBER_RESOURCES)!r}))",
        message="a member's resources name only cpu, memory and ephemeral-storage: GPU shares "
        "come from spec.sharing, so remove nvidia.com/* (and any other resource) from resources",
        field_path="",
        check=_known_resources,
        reason="FieldValueForbidden",
    ),
    Rule(
        node=ResourceRequirements,
        cel="(!has(self.requests) || self.requests.all(k, "
        + cel_quantity("self.requests[k]", _CEL_MAX)
        + ")) && (!has(self.limits) || self.limits.all(k, "
        + cel_quantity("self.limits[k]", _CEL_MAX)
        + "))",
        message=f"a resource amount is larger than Kubernetes can hold (at most {MAX_QUANTITY}): "
        "lower it",
        field_path="",
        check=_within_max,
    ),
    Rule(
        node=ResourceRequirements,
        cel="!has(self.limits) || !has(self.requests) || self.limits.all(k, !(k in "
        "self.requests) || (string(self.requests[k]).matches(r'"
        + QUANTITY_PATTERN
        + "') && string(self.limits[k]).matches(r'"
        + QUANTITY_PATTERN
        + "') ? quantity(string(self.requests[k])).compareTo("
        "quantity(string(self.limits[k]))) <= 0 : true))",
        message="a request is larger than its limit: lower the request or raise the limit",
        field_path=".requests",
        check=_requests_within_limits,
    ),
    Rule(
        node=EnvVar,
        cel="!self.name.startsWith('COTRAIN_') && !self.name.startsWith('CUDA_MPS_') && "
        "!(self.name in ['CUDA_VISIBLE_DEVICES', 'NVIDIA_VISIBLE_DEVICES'])",
        message="COTRAIN_*, CUDA_MPS_*, CUDA_VISIBLE_DEVICES and NVIDIA_VISIBLE_DEVICES are set "
        "by the trainer from the job's spec: rename the variable",
        field_path=".name",
        check=_env_allowed,
        reason="FieldValueForbidden",
    ),
    Rule(
        node=CoTrainJob,
        cel=f"self.metadata.name.size() <= {MAX_JOB_NAME}",
        message=f"metadata.name must be at most {MAX_JOB_NAME} characters so that the names of "
        "the job's pods fit in 63: shorten it",
        field_path=".metadata.name",
        check=lambda j: len(job_name(j)) <= MAX_JOB_NAME,
    ),
    Rule(
        node=CoTrainJob,
        cel=f"self.metadata.name.matches(r'{DNS_LABEL}')",
        message="metadata.name must be a DNS label that starts with a letter (lowercase letters, "
        "digits and '-'): the job's Services and pod hostnames are named after it",
        field_path=".metadata.name",
        check=lambda j: not job_name(j) or re.fullmatch(DNS_LABEL, job_name(j)) is not None,
    ),
)


def job_name(job: CoTrainJob) -> str:
    """The name the API server gives the job: metadata.name, or generateName plus the characters
    it appends (lowercase letters and digits); "" with neither (metadata.py reports that)."""
    if job.metadata.name:
        return job.metadata.name
    if job.metadata.generate_name:
        return job.metadata.generate_name + "x" * GENERATED_SUFFIX
    return ""


TRANSITION_RULES: tuple[TransitionRule, ...] = (
    TransitionRule(
        node=CoTrainJob,
        cel="!has(oldSelf.status) || !has(oldSelf.status.startTime) || "
        "self.spec.members == oldSelf.spec.members",
        message="spec.members cannot change once the job has started (status.startTime is "
        "set): delete and recreate the job to change its members",
        field_path=".spec.members",
        check=lambda new, old: (
            old.status is None
            or old.status.start_time is None
            or new.spec.members == old.spec.members
        ),
    ),
    TransitionRule(
        node=CoTrainJob,
        cel="!has(oldSelf.status) || !has(oldSelf.status.startTime) || "
        "self.spec.sharing == oldSelf.spec.sharing",
        message="spec.sharing cannot change once the job has started (status.startTime is "
        "set): delete and recreate the job to share GPUs differently",
        field_path=".spec.sharing",
        check=lambda new, old: (
            old.status is None
            or old.status.start_time is None
            or new.spec.sharing == old.spec.sharing
        ),
    ),
)


def cel_validations(node: type[BaseModel]) -> list[dict[str, str]]:
    """The `x-kubernetes-validations` entries for one schema node, in table order."""
    entries: list[dict[str, str]] = []
    for rule in RULES:
        if rule.node is node and rule.cel is not None:
            entry = {"rule": rule.cel, "message": rule.message, "reason": rule.reason}
            # The API server only resolves fieldPath inside the schema; metadata has none.
            if rule.field_path and not rule.field_path.startswith(".metadata"):
                entry["fieldPath"] = rule.field_path
            entries.append(entry)
    for transition in TRANSITION_RULES:
        if transition.node is node:
            entries.append(
                {
                    "rule": transition.cel,
                    "message": transition.message,
                    "reason": transition.reason,
                    "fieldPath": transition.field_path,
                }
            )
    return entries
