"""metav1.ObjectMeta as the API server checks it when a CoTrainJob is created.

Owns the checks of `k8s.io/apimachinery/pkg/api/validation.ValidateObjectMeta` that a manifest
can break (name or generateName, namespace, labels, annotations and their total size, finalizers,
owner references), with the API server's limits, so that `cotrain validate` refuses what
`kubectl apply` would and accepts what it would accept. Called by `validation.parse_job`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# k8s.io/apimachinery/pkg/util/validation
DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_SUBDOMAIN = rf"{DNS1123_LABEL}(\.{DNS1123_LABEL})*"
QUALIFIED_NAME = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
LABEL_VALUE = rf"({QUALIFIED_NAME})?"
MAX_LABEL = 63
MAX_SUBDOMAIN = 253
# The total of every annotation's key and value (TotalAnnotationSizeLimitB).
MAX_ANNOTATIONS_BYTES = 256 * 1024

# The ObjectMeta fields a manifest may carry (the server refuses others under strict field
# validation, which kubectl uses), with the JSON type each must have.
_FIELDS: dict[str, type] = {
    "name": str,
    "generateName": str,
    "namespace": str,
    "selfLink": str,
    "uid": str,
    "resourceVersion": str,
    "generation": int,
    "creationTimestamp": str,
    "deletionTimestamp": str,
    "deletionGracePeriodSeconds": int,
    "labels": dict,
    "annotations": dict,
    "ownerReferences": list,
    "finalizers": list,
    "managedFields": list,
}
_JSON_TYPE = {str: "string", int: "integer", dict: "object", list: "array"}


def _full(pattern: str, text: str) -> bool:
    return re.fullmatch(pattern, text) is not None


def is_subdomain(text: str) -> bool:
    return len(text) <= MAX_SUBDOMAIN and _full(DNS1123_SUBDOMAIN, text)


def qualified_name_problem(key: str) -> str | None:
    """Why `key` is no qualified name ("prefix/name" or "name"), or None."""
    prefix, slash, name = key.rpartition("/")
    if slash and not prefix:
        return "its prefix before '/' is empty"
    if key.count("/") > 1:
        return "it holds more than one '/'"
    if slash and not is_subdomain(prefix):
        return f"its prefix {prefix!r} is not a lowercase DNS subdomain"
    if not name or len(name) > MAX_LABEL or not _full(QUALIFIED_NAME, name):
        return (
            f"its name part must be 1-{MAX_LABEL} characters of letters, digits, '-', '_' "
            "and '.', starting and ending with a letter or digit"
        )
    return None


def check_metadata(metadata: Any) -> list[tuple[str, str]]:
    """(field path, message) for every way `metadata` breaks what the API server accepts."""
    if not isinstance(metadata, Mapping):
        return [("metadata", "must be an object (name, labels, annotations, ...)")]
    problems: list[tuple[str, str]] = []
    for key, value in metadata.items():
        path = f"metadata.{key}"
        expected = _FIELDS.get(key)
        if expected is None:
            problems.append((path, "unknown field: remove it or fix its spelling"))
        elif value is not None and (isinstance(value, bool) or not isinstance(value, expected)):
            problems.append((path, f"must be of type {_JSON_TYPE[expected]}"))
    if problems:
        return problems
    name = metadata.get("name")
    generate_name = metadata.get("generateName")
    if not name and not generate_name:
        problems.append(("metadata.name", "name or generateName is required"))
    if name and not is_subdomain(name):
        problems.append(
            ("metadata.name", f"{name!r} must be a lowercase DNS name (letters, digits, '-')")
        )
    # A generateName is a prefix: it may end in '-' (the server appends five characters).
    if generate_name and not is_subdomain(generate_name.removesuffix("-") or "x"):
        problems.append(
            (
                "metadata.generateName",
                f"{generate_name!r} must be a lowercase DNS name prefix",
            )
        )
    namespace = metadata.get("namespace")
    if namespace and (len(namespace) > MAX_LABEL or not _full(DNS1123_LABEL, namespace)):
        problems.append(("metadata.namespace", f"{namespace!r} is not a namespace name"))
    problems.extend(_labels(metadata.get("labels") or {}))
    problems.extend(_annotations(metadata.get("annotations") or {}))
    problems.extend(_finalizers(metadata.get("finalizers") or []))
    problems.extend(_owner_references(metadata.get("ownerReferences") or []))
    return problems


def _labels(labels: Mapping[str, Any]) -> list[tuple[str, str]]:
    problems = []
    for key, value in labels.items():
        path = "metadata.labels"
        why = qualified_name_problem(str(key))
        if why:
            problems.append((path, f"label key {key!r} is invalid: {why}"))
        if not isinstance(value, str):
            problems.append((path, "a label value must be a string"))
        elif len(value) > MAX_LABEL or not _full(LABEL_VALUE, value):
            problems.append(
                (
                    path,
                    f"label value {value!r} must be at most {MAX_LABEL} letters, digits, '-', "
                    "'_' and '.', starting and ending with a letter or digit",
                )
            )
    return problems


def _annotations(annotations: Mapping[str, Any]) -> list[tuple[str, str]]:
    problems = []
    total = 0
    for key, value in annotations.items():
        path = "metadata.annotations"
        why = qualified_name_problem(str(key).lower())
        if why:
            problems.append((path, f"annotation key {key!r} is invalid: {why}"))
        if not isinstance(value, str):
            problems.append((path, "an annotation value must be a string"))
            continue
        total += len(str(key).encode()) + len(value.encode())
    if total > MAX_ANNOTATIONS_BYTES:
        problems.append(
            (
                "metadata.annotations",
                f"annotations total {total} bytes, more than the API server's "
                f"{MAX_ANNOTATIONS_BYTES}: shorten them",
            )
        )
    return problems


def _finalizers(finalizers: list[Any]) -> list[tuple[str, str]]:
    problems = []
    for index, finalizer in enumerate(finalizers):
        path = f"metadata.finalizers[{index}]"
        if not isinstance(finalizer, str):
            problems.append((path, "a finalizer must be a string"))
            continue
        why = qualified_name_problem(finalizer)
        if why:
            problems.append((path, f"finalizer {finalizer!r} is invalid: {why}"))
    return problems


def _owner_references(references: list[Any]) -> list[tuple[str, str]]:
    problems = []
    for index, reference in enumerate(references):
        path = f"metadata.ownerReferences[{index}]"
        if not isinstance(reference, Mapping):
            problems.append((path, "must be an object"))
            continue
        for key in ("apiVersion", "kind", "name", "uid"):
            if not isinstance(reference.get(key), str) or not reference.get(key):
                problems.append((f"{path}.{key}", "is required"))
    return problems
