"""Hostile and odd specs: each class the fuzzer found as a named regression, and properties that
would have found them: validation never raises anything but InvalidJobError, and `decide` never
raises nor dawdles on any job it may see, whatever its pods and its (untrusted) status say.
"""

from __future__ import annotations

import io
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cotrain_operator.api import InvalidJobError, parse_job
from cotrain_operator.api.quantity import parse_quantity
from cotrain_operator.reconcile.create_errors import CreateOutcome, classify, refusal_message
from cotrain_operator.reconcile.job import decide
from cotrain_operator.reconcile.placement import place
from cotrain_operator.sharing import GpuNode, parse_node
from cotrain_trainer.cli import validate_files
from tests.fixtures.jobs import a_job
from tests.fixtures.nodes import gpu_node
from tests.fixtures.spec_strategies import JUNK, job_documents

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
NODES: list[GpuNode] = [
    n
    for n in (
        parse_node(gpu_node("ts", sharing="time-slicing", replicas=4, memory_mib=81920)),
        parse_node(gpu_node("mps", sharing="mps", replicas=2, memory_mib=81920)),
        parse_node(gpu_node("x", count=8, memory_mib=81920)),
        parse_node(gpu_node("mig", mig={"1g.10gb": (7, 9856), "7g.80gb+me": (1, 80896)})),
    )
    if n is not None
]
# A decision takes a few milliseconds of CPU; this bound only catches big-number arithmetic (46 s
# of it). CPU time of this thread, not wall time: another process on the cores slows neither.
DECIDE_BUDGET_SECONDS = 1.0


def _stored(document: dict[str, Any]) -> dict[str, Any]:
    body = json.loads(json.dumps(document))
    body["metadata"] = {**body["metadata"], "namespace": "ns", "uid": "u1", "generation": 1}
    return body


# -- 1. one job stalls the operator ---------------------------------------------------------


def test_class_1_the_worst_quantity_the_schema_admits_is_placed_at_once() -> None:
    document = a_job().sharing(mode="Exclusive").gpu(memory="9223372036854775807").build()
    job = parse_job(document)
    started = time.thread_time()
    placed = place(job, NODES)
    decision = decide(_stored(document), [], NODES, NOW)
    assert time.thread_time() - started < DECIDE_BUDGET_SECONDS
    assert type(placed).__name__ == "Unschedulable"  # 8 EiB fits no GPU
    assert decision.phase == "Pending"


# -- 2. one request pins the API server -----------------------------------------------------


@pytest.mark.parametrize("text", ["1e999999", "1e99999999", "1e100", "123e4567"])
def test_class_2_an_unbounded_exponent_is_no_quantity(text: str) -> None:
    with pytest.raises(ValueError, match="is not a quantity"):
        parse_quantity(text)


# -- 3. Python validation crashes -----------------------------------------------------------


@pytest.mark.parametrize("memory", ["1e1000000", "1e-1000000", "1E999999999"])
def test_class_3_a_huge_exponent_is_an_invalid_spec_not_a_crash(memory: str) -> None:
    with pytest.raises(InvalidJobError, match="is not a quantity"):
        parse_job(a_job().gpu(memory=memory).build())
    decision = decide(_stored(a_job().gpu(memory=memory).build()), [], NODES, NOW)
    assert decision.status_patch["conditions"][0]["reason"] == "InvalidSpec"


def test_class_3_metadata_that_is_no_object_is_reported_by_validate(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("apiVersion: cotrain.dev/v1alpha1\nkind: CoTrainJob\nmetadata: 1.5\nspec: {}\n")
    out = io.StringIO()
    assert validate_files([str(path)], out) == 1
    assert "metadata: must be an object" in out.getvalue()


# -- 4. accepted by both validators, refused as a child -------------------------------------


@pytest.mark.parametrize(
    ("document", "path"),
    [
        (a_job("a.b").placement(strategy="PodPerMember").member(0, replicas=2).build(), "name"),
        (a_job().member(resources={"limits": {"NVIDIA.com/gpu": 1}}).build(), "resources"),
        (a_job().member(0, image=" t:1").member(1, image=" t:1").build(), "image"),
    ],
    ids=["dotted-name-with-replicas", "gpu-resource-in-another-case", "image-with-whitespace"],
)
def test_class_4_what_a_child_would_be_refused_for_is_refused_up_front(
    document: dict[str, Any], path: str
) -> None:
    with pytest.raises(InvalidJobError) as raised:
        parse_job(document)
    assert any(v.path.endswith(path) for v in raised.value.violations), raised.value


@pytest.mark.parametrize(
    ("status", "message", "outcome"),
    [
        (
            422,
            'Pod "x" is invalid: spec.containers[0].image: Invalid value',
            CreateOutcome.FAIL_JOB,
        ),
        (400, "the body of the request was in an unknown format", CreateOutcome.FAIL_JOB),
        (413, "Request entity too large", CreateOutcome.FAIL_JOB),
        (403, 'pods "x" is forbidden: violates PodSecurity "restricted"', CreateOutcome.FAIL_JOB),
        (403, "maximum cpu usage per Container is 1, but limit is 2", CreateOutcome.FAIL_JOB),
        (403, "ValidatingAdmissionPolicy 'p' denied request", CreateOutcome.FAIL_JOB),
        (403, "exceeded quota: q, requested: pods=1, used: pods=1", CreateOutcome.RETRY),
        (403, 'User "op" cannot create resource "pods"', CreateOutcome.RETRY),
        (403, "status unknown for quota: q, resource: pods", CreateOutcome.RETRY),
        (
            403,
            "unable to create new content in namespace t because it is being terminated",
            CreateOutcome.RETRY,
        ),
        (
            403,
            "error looking up service account t/cotrain-trainer: serviceaccount "
            '"cotrain-trainer" not found',
            CreateOutcome.RECREATE_IDENTITY,
        ),
        (500, "etcdserver: request timed out", CreateOutcome.RETRY),
        (429, "too many requests", CreateOutcome.RETRY),
        (409, "Operation cannot be fulfilled", CreateOutcome.RETRY),
        (None, "connection reset", CreateOutcome.RETRY),
    ],
)
def test_class_4_refused_creates_are_failed_only_when_no_retry_can_help(
    status: int | None, message: str, outcome: CreateOutcome
) -> None:
    assert classify(status, message) is outcome


def test_a_workload_refused_because_kueue_is_not_installed_is_retried_and_says_so() -> None:
    message = "the server could not find the requested resource"
    assert classify(404, message, "Workload") is CreateOutcome.RETRY
    assert classify(404, message, "Pod") is CreateOutcome.FAIL_JOB
    said = refusal_message("Workload", "cotrainjob-a-1", 404, message)
    assert "install Kueue" in said
    assert "docs/kueue.md" in said


# -- 5. the validators disagree -------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["Demo", "demo-", "jöb", "", "a" * 253, "a.b", "9job", "a_b"], ids=repr
)
def test_class_5_job_names_the_server_refuses_are_refused(name: str) -> None:
    with pytest.raises(InvalidJobError, match=r"metadata\.name"):
        parse_job(a_job(name).build())


def test_class_5_a_generated_name_over_40_is_refused() -> None:
    document = a_job().build()
    document["metadata"] = {"generateName": "g" * 36}
    with pytest.raises(InvalidJobError, match="at most 40"):
        parse_job(document)
    document["metadata"] = {"generateName": "g" * 35}
    assert parse_job(document).metadata.generate_name == "g" * 35


@pytest.mark.parametrize(
    "metadata",
    [
        {"name": "demo", "labels": {"team": "-ml"}},
        {"name": "demo", "labels": {"a/b/c": "x"}},
        {"name": "demo", "finalizers": "x"},
        {"name": "demo", "finalizers": ["bad name"]},
        {"name": "demo", "annotations": {"note": 1}},
        {"name": "demo", "annotations": {"note": "x" * (256 * 1024)}},
        {"name": "demo", "unknown": 1},
    ],
    ids=[
        "label-value",
        "label-key",
        "finalizers-string",
        "finalizer-name",
        "annotation-value",
        "annotations-size",
        "unknown-field",
    ],
)
def test_class_5_metadata_the_server_refuses_is_refused(metadata: dict[str, Any]) -> None:
    document = a_job().build()
    document["metadata"] = metadata
    with pytest.raises(InvalidJobError, match="metadata"):
        parse_job(document)


@pytest.mark.parametrize(
    "change",
    [
        lambda spec: spec.update(sharing=None),
        lambda spec: spec.update(runPolicy=None),
        lambda spec: spec["members"][0].update(gpu=None),
        lambda spec: spec.update(runPolicy={"backoffLimit": 5.0}),
        lambda spec: spec["members"][0].update(steps=20.0),
    ],
    ids=["sharing-null", "run-policy-null", "gpu-null", "backoff-5.0", "steps-20.0"],
)
def test_class_5_what_the_server_prunes_or_reads_as_an_integer_is_accepted(change: Any) -> None:
    document = a_job().build()
    change(document["spec"])
    job = parse_job(document)
    assert job.spec.run_policy.backoff_limit in (3, 5)


def test_class_5_validate_refuses_what_kubectl_apply_cannot_store(tmp_path: Path) -> None:
    document = a_job().member(command=["python", "-c", "x" * 4000], args=["y" * 4000] * 7)
    for index in (1,):
        document.member(index, command=["python", "-c", "x" * 4000], args=["y" * 4000] * 7)
    document.document["metadata"]["annotations"] = {"note": "z" * 200_000}
    path = tmp_path / "big.yaml"
    path.write_text(json.dumps(document.build()))
    out = io.StringIO()
    assert validate_files([str(path)], out) == 1
    assert "too large for kubectl apply" in out.getvalue()


# -- 6. user-written kopf bookkeeping -------------------------------------------------------


def test_class_6_kopf_bookkeeping_written_by_a_user_is_just_metadata() -> None:
    document = a_job().build()
    document["metadata"]["annotations"] = {"cotrain.dev/last-handled-configuration": "{not json"}
    document["metadata"]["finalizers"] = ["cotrain.dev/finalizer"]
    decision = decide(_stored(document), [], NODES, NOW)
    assert decision.phase == "Pending"
    assert [c["kind"] for c in decision.create] == ["Pod"]


# -- properties -----------------------------------------------------------------------------


@settings(max_examples=1000, deadline=None, database=None)
@given(document=st.one_of(job_documents(), JUNK))
def test_validation_raises_nothing_but_invalid_job_error(document: Any) -> None:
    violations = []
    try:
        parse_job(document)
    except InvalidJobError as error:
        violations = error.violations
        assert violations, "an InvalidJobError names at least one violation"
    assert all(isinstance(v.path, str) and v.message for v in violations)


POD_PHASES = st.sampled_from(["Pending", "Running", "Succeeded", "Failed", "Unknown", None, 3])
TERMINATED = st.fixed_dictionaries(
    {},
    optional={
        "exitCode": st.one_of(st.integers(-1, 300), JUNK),
        "reason": st.one_of(st.sampled_from(["OOMKilled", "Error", "Completed"]), JUNK),
        "message": JUNK,
    },
)
REPORT = st.fixed_dictionaries(
    {},
    optional={
        "phase": st.one_of(
            st.sampled_from(["Running", "Succeeded", "Failed", "Restarting", "Pending"]), JUNK
        ),
        "restarts": st.one_of(st.integers(0, 5), JUNK),
        "step": st.one_of(st.integers(0, 10**9), JUNK),
        "totalSteps": st.one_of(st.integers(0, 10**9), JUNK),
        "loss": st.one_of(st.floats(allow_nan=False), JUNK),
        "reason": st.one_of(st.sampled_from(["GPUOutOfMemory", "CoTenantFault", "Error"]), JUNK),
        "exitCode": JUNK,
        "gpuMemoryBytes": JUNK,
    },
)


@st.composite
def observed(draw: st.DrawFn, body: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    """The job with a status as reporters may have written it, and pods as a kubelet left them:
    the operator's creations so far, in any phase, with any container states."""
    body = json.loads(json.dumps(body))
    status: dict[str, Any] = {}
    if draw(st.booleans()):
        names = [m.get("name") for m in body["spec"]["members"] if isinstance(m, dict)]
        status["members"] = {n: draw(REPORT) for n in names if isinstance(n, str)}
    if draw(st.booleans()):
        status["phase"] = draw(st.sampled_from(["Pending", "Running", "Succeeded", "Failed"]))
        status["startTime"] = draw(st.sampled_from(["2026-12-01T11:00:00Z", "not a time", 5]))
        status["completionTime"] = draw(st.sampled_from(["2026-12-01T11:30:00Z", None]))
    if draw(st.integers(0, 5)) == 0:
        status = draw(st.dictionaries(st.sampled_from(["members", "conditions", "phase"]), JUNK))
    body["status"] = status
    pods = []
    for child in decide(body, [], NODES, NOW).create:
        if child["kind"] != "Pod" or not draw(st.booleans()):
            continue
        pod = json.loads(json.dumps(child))
        pod["metadata"]["creationTimestamp"] = "2026-12-01T11:00:00Z"
        pod["status"] = {"phase": draw(POD_PHASES)}
        if draw(st.booleans()):
            state = {"terminated": draw(TERMINATED)} if draw(st.booleans()) else {"running": {}}
            pod["status"]["containerStatuses"] = [{"name": "trainer", "state": state}]
        if draw(st.integers(0, 5)) == 0:
            pod["metadata"]["deletionTimestamp"] = "2026-12-01T11:59:00Z"
        if draw(st.integers(0, 8)) == 0:
            pod["metadata"]["labels"]["cotrain.dev/attempt"] = draw(JUNK.map(str))
            pod["metadata"]["annotations"]["cotrain.dev/restarts"] = draw(JUNK.map(json.dumps))
        pods.append(pod)
    return body, pods


@settings(
    max_examples=500,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(data=st.data(), document=job_documents(), later=st.integers(0, 10**6))
def test_decide_never_raises_nor_takes_long_on_any_job_it_may_see(
    data: st.DataObject, document: dict[str, Any], later: int
) -> None:
    try:
        parse_job(document)
    except InvalidJobError:
        body = _stored(document) if isinstance(document.get("metadata"), dict) else None
        if body is not None:  # an invalid object that slipped past the API server
            assert decide(body, [], NODES, NOW).phase == "Failed"
        return
    body, pods = data.draw(observed(_stored(document)))
    started = time.thread_time()
    decision = decide(body, pods, NODES, NOW + timedelta(seconds=later))
    assert time.thread_time() - started < DECIDE_BUDGET_SECONDS
    assert decision.phase in (None, "Pending", "Running", "Succeeded", "Failed", "Suspended")
    json.dumps(decision.status_patch)  # what is patched is JSON
