"""`cotrain validate` reads YAML as kubectl does: the same plain scalars become the same JSON.

kubectl itself is the reference: `kubectl create --dry-run=client -o json` decodes a manifest
(go-yaml's YAML 1.1 rules, then sigs.k8s.io/yaml's JSON) and prints what it would send. Every
generated scalar is put into one CoTrainJob and both readings are compared value by value, types
included (`y` is a boolean to kubectl, `08` the number 8, `1:30` a string).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cotrain_operator.api import InvalidJobError, parse_job
from cotrain_operator.api.manifest import load_all
from tests.controlplane.cluster import ControlPlane

TRICKY = [
    "y", "Y", "n", "N", "yes", "No", "on", "OFF", "true", "False", "~", "null", "Null",
    "08", "09", "010", "0o17", "0O17", "0x1F", "0b101", "-0b11", "+5", "-0", "1_000", "0x_1f",
    "1:30", "1:30:00", "2024-01-01", "2024-01-01T10:00:00Z", "2024-1-1 10:00:00",
    "5.0", "5.", ".5", "1e3", "1E-3", "1.5e+3", "-1e3", "1e999999", "1e400", "-1e400",
    "1e-400", ".inf", "-.Inf", "+.INF", ".nan", "9223372036854775807", "9223372036854775808",
    "18446744073709551615", "18446744073709551616", "-9223372036854775809", "0.0", "00",
    "4Gi", "500m", "1_0.5", "._5", "1.2.3", "0x", "0b", "0o", "+", "e3", "inf", "NaN",
]  # fmt: skip

_NUMERIC = st.from_regex(
    r"\A[-+]?(0[xXoObB][0-9a-fA-F_]{0,5}|[0-9_]{1,8}(\.[0-9_]{0,4})?([eE][-+]?[0-9]{1,4})?"
    r"|\.[0-9_]{1,4}([eE][-+]?[0-9]{1,3})?|[0-9]{1,2}(:[0-9]{1,2}){1,2})\Z",
    fullmatch=True,
)
SCALARS = st.one_of(st.sampled_from(TRICKY), _NUMERIC, st.from_regex(r"\A[a-zA-Z.~]{1,5}\Z"))


def _plain(text: str) -> bool:
    """Whether `text` can stand as a plain scalar value in a block mapping."""
    try:
        node = yaml.compose(f"k: {text}\n")
    except yaml.YAMLError:
        return False
    if not isinstance(node, yaml.MappingNode) or len(node.value) != 1:
        return False
    value = node.value[0][1]
    return isinstance(value, yaml.ScalarNode) and value.style is None and value.value == text


def _document(scalars: list[str]) -> str:
    lines = [f"  v{i}: {text}" for i, text in enumerate(scalars)]
    return (
        "apiVersion: cotrain.dev/v1alpha1\nkind: CoTrainJob\nmetadata:\n  name: yaml\n"
        "spec:\n" + "\n".join(lines) + "\n"
    )


def _reading(value: Any) -> tuple[str, Any]:
    """A value as the API server would decode it: JSON integers within int64 exactly, other
    numbers as float64 (so 5.0 and 5 are one reading)."""
    if isinstance(value, bool):
        return "boolean", value
    if isinstance(value, int | float):
        if float(value).is_integer() and -(2**63) <= value < 2**63:
            return "number", int(value)
        return "number", float(value)
    return type(value).__name__, value


def _kubectl_reads(cluster: ControlPlane, text: str) -> dict[str, Any] | str:
    result = cluster.kubectl(
        "create", "--dry-run=client", "-o", "json", "--validate=false", "-f", "-",
        input=text, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        return result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def _compare(cluster: ControlPlane, scalars: list[str]) -> None:
    text = _document(scalars)
    theirs = _kubectl_reads(cluster, text)
    try:
        ours: dict[str, Any] | str = next(load_all(text))
    except ValueError as error:
        ours = str(error)
    if isinstance(theirs, str) or isinstance(ours, str):
        # One side could not make JSON of it (NaN, infinity): then neither may.
        assert isinstance(theirs, str), (theirs, ours)
        assert isinstance(ours, str), (theirs, ours)
        return
    for index, scalar in enumerate(scalars):
        key = f"v{index}"
        mine, kubectl = ours["spec"][key], theirs["spec"][key]
        assert _reading(mine) == _reading(kubectl), (
            f"{scalar!r}: cotrain reads {mine!r}, kubectl {kubectl!r}"
        )


def test_tricky_scalars_read_as_kubectl_reads_them(cluster: ControlPlane) -> None:
    finite = [s for s in TRICKY if s.lower().lstrip("+-") not in (".inf", ".nan")]
    assert all(_plain(s) for s in finite)
    _compare(cluster, finite)
    # kubectl cannot send NaN or infinity, and neither does cotrain.
    for special in (".inf", "-.Inf", ".nan"):
        _compare(cluster, [special])


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scalars=st.lists(SCALARS.filter(_plain), min_size=1, max_size=40))
def test_generated_scalars_read_as_kubectl_reads_them(
    cluster: ControlPlane, scalars: list[str]
) -> None:
    _compare(cluster, [s for s in scalars if s.lower().lstrip("+-") not in (".inf", ".nan")])


def test_a_name_kubectl_reads_as_a_boolean_is_refused(cluster: ControlPlane) -> None:
    text = _document([]).replace("name: yaml", "name: y")
    assert "cannot unmarshal bool" in str(_kubectl_reads(cluster, text))
    document = next(load_all(text))
    with pytest.raises(InvalidJobError, match=r"metadata\.name: must be of type string"):
        parse_job(document)
