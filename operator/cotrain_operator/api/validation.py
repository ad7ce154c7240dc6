"""Validation of CoTrainJob documents with the same rules as the CRD.

Owns turning a raw document (parsed YAML or an API object) into a `CoTrainJob` or a list of
violations, each naming the field path and the fix. Called by `cotrain validate`, by `cotrain run`
before it starts anything, and by the operator for objects that reached it without the API
server's checks (they end as Failed/InvalidSpec).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from cotrain_operator.api.metadata import MAX_ANNOTATIONS_BYTES, check_metadata
from cotrain_operator.api.models import API_VERSION, KIND, CoTrainJob
from cotrain_operator.api.rules import RULES, TRANSITION_RULES

# Hints for fields whose pattern alone would not tell a user what to write.
_PATTERN_HINTS = {
    "name": "use lowercase letters, digits and '-', starting with a letter",
    "migProfile": "use a MIG profile name such as 1g.10gb, 3g.40gb or 1g.10gb+me",
    "image": "an image reference has no spaces, e.g. registry.example.com/team/trainer:1.0",
}
# A float that Go's JSON encoder writes without a fraction or exponent, which the API server then
# decodes as an integer: kubectl sends `5.0` in YAML as 5.
_INTEGRAL_FLOAT_LIMIT = 1e21
_INT64 = 2**63


@dataclass(frozen=True)
class Violation:
    """One reason a document is not a valid CoTrainJob."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path or '<root>'}: {self.message}"


class InvalidJobError(ValueError):
    """A CoTrainJob that breaks the API's rules; `violations` says where and how to fix it."""

    def __init__(self, violations: list[Violation]) -> None:
        self.violations = violations
        super().__init__("; ".join(str(v) for v in violations))


def format_path(location: tuple[int | str, ...]) -> str:
    """('spec', 'members', 0, 'gpu') -> 'spec.members[0].gpu'."""
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _describe(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    location = error["loc"]
    field = str(location[-1]) if location else ""
    given = error.get("input")
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "unknown field: remove it or fix its spelling (kubectl explain cotrainjob.spec)"
    if kind == "enum":
        expected = error.get("ctx", {}).get("expected", "")
        return f"must be one of {expected} (got {given!r})"
    if kind == "string_pattern_mismatch":
        hint = _PATTERN_HINTS.get(field, f"it must match {error['ctx']['pattern']}")
        return f"{given!r} is not allowed: {hint}"
    message = str(error["msg"])
    if kind.startswith(("greater", "less", "too_", "string_too", "int_", "float_", "bool_")):
        return f"{message} (got {given!r})" if not isinstance(given, dict | list) else message
    return message


def _walk(model: BaseModel, path: str) -> Iterator[tuple[BaseModel, str]]:
    """Every model instance in the tree with its wire path (camelCase aliases)."""
    yield model, path
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        key = info.alias or name
        child = f"{path}.{key}" if path else key
        if isinstance(value, BaseModel):
            yield from _walk(value, child)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from _walk(item, f"{child}[{index}]")


def _join(path: str, field_path: str) -> str:
    suffix = field_path.lstrip(".")
    if not suffix:
        return path
    return f"{path}.{suffix}" if path else suffix


def check_rules(job: CoTrainJob, old: CoTrainJob | None = None) -> list[Violation]:
    """The cross-field rules (the CRD's CEL, in Python) that `job` breaks."""
    violations: list[Violation] = []
    for node, path in _walk(job, ""):
        for rule in RULES:
            if rule.node is type(node) and not rule.check(node):
                violations.append(Violation(_join(path, rule.field_path), rule.message))
    if old is not None:
        for transition in TRANSITION_RULES:
            if transition.node is CoTrainJob and not transition.check(job, old):
                violations.append(Violation(_join("", transition.field_path), transition.message))
    return violations


def _to_json(document: Mapping[str, Any]) -> str:
    # YAML may hold dates and timestamps; the API server would see them as strings.
    return json.dumps(document, default=str)


def _number(value: float) -> float | int:
    if value.is_integer() and abs(value) < _INTEGRAL_FLOAT_LIMIT and -_INT64 <= value < _INT64:
        return int(value)
    return value


def _without_nulls(value: Any) -> Any:
    """The spec as the API server stores it: null fields pruned (and then defaulted, which the
    model does), integral floats read as integers."""
    if isinstance(value, Mapping):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    if isinstance(value, float):
        return _number(value)
    return value


def as_the_api_server_reads(
    document: Mapping[str, Any], with_status: bool = False
) -> dict[str, Any]:
    """`document` as the API server would hold it: on create without its status (a subresource
    of its own, ignored there); `with_status` for a stored object."""
    read: dict[str, Any] = {}
    for key, value in document.items():
        if key == "status" and not with_status:
            continue
        if key == "metadata" and isinstance(value, Mapping):
            value = {k: _without_nulls(v) for k, v in value.items() if v is not None}
        elif key == "spec":
            value = _without_nulls(value)
        read[key] = value
    return read


def parse_job(document: Mapping[str, Any], old: Mapping[str, Any] | None = None) -> CoTrainJob:
    """A valid CoTrainJob from `document`, or InvalidJobError with every violation found.

    Never raises anything else, whatever `document` holds: the operator and the CLI rely on it."""
    if not isinstance(document, Mapping):
        raise InvalidJobError([Violation("", "a CoTrainJob is a YAML or JSON object")])
    violations: list[Violation] = []
    if document.get("apiVersion") != API_VERSION:
        violations.append(
            Violation("apiVersion", f"must be {API_VERSION} (got {document.get('apiVersion')!r})")
        )
    if document.get("kind") != KIND:
        violations.append(Violation("kind", f"must be {KIND} (got {document.get('kind')!r})"))
    read = as_the_api_server_reads(document)
    metadata_problems = [
        Violation(path, message) for path, message in check_metadata(read.get("metadata", {}))
    ]
    violations.extend(metadata_problems)
    if metadata_problems:
        # The model reads only the parts of metadata whose form is now known to be right.
        read["metadata"] = {}
    try:
        # Strict JSON-mode validation has the API server's typing: "3" is no integer and "yes"
        # no boolean, while enum names and int-or-string quantities arrive as plain JSON values.
        job = CoTrainJob.model_validate_json(_to_json(read), strict=True)
    except ValidationError as error:
        for item in error.errors():
            violations.append(Violation(format_path(tuple(item["loc"])), _describe(item)))
        raise InvalidJobError(violations) from None
    old_job = (
        CoTrainJob.model_validate_json(
            _to_json(as_the_api_server_reads(old, with_status=True)), strict=True
        )
        if old is not None
        else None
    )
    violations.extend(check_rules(job, old_job))
    if violations:
        raise InvalidJobError(violations)
    return job


LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def applied_size_violation(document: Mapping[str, Any]) -> Violation | None:
    """Why `kubectl apply` would refuse `document` for its size, or None: apply keeps a copy of
    the whole object in an annotation, and all annotations together hold at most 256 KiB."""
    metadata = document.get("metadata")
    annotations = metadata.get("annotations") if isinstance(metadata, Mapping) else None
    others = {
        k: v
        for k, v in (annotations if isinstance(annotations, Mapping) else {}).items()
        if k != LAST_APPLIED and isinstance(v, str)
    }
    copy = json.dumps(document, separators=(",", ":"), ensure_ascii=False, default=str)
    total = len(LAST_APPLIED) + len(copy.encode()) + 1
    total += sum(len(k.encode()) + len(v.encode()) for k, v in others.items())
    if total <= MAX_ANNOTATIONS_BYTES:
        return None
    return Violation(
        "",
        f"the job is too large for kubectl apply: it keeps a copy of the job in the annotation "
        f"{LAST_APPLIED}, and the job's annotations would hold {total} bytes, more than "
        f"{MAX_ANNOTATIONS_BYTES}; shorten command, args and env (move scripts into the image) "
        "or use kubectl create",
    )
