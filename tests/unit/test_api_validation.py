"""The API's validation: examples pass, each invalid spec is refused naming its field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cotrain_operator.api import InvalidJobError, parse_job
from cotrain_operator.api.rules import RULES
from cotrain_operator.api.validation import check_rules
from tests.fixtures.invalid_jobs import INVALID_CASES, InvalidCase
from tests.fixtures.jobs import a_job

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def test_there_are_enough_examples_and_cases() -> None:
    assert len(EXAMPLES) >= 3
    assert len(INVALID_CASES) >= 25
    assert len({case.id for case in INVALID_CASES}) == len(INVALID_CASES)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_is_valid(path: Path) -> None:
    job = parse_job(yaml.safe_load(path.read_text()))
    assert job.metadata.name == path.stem


def test_examples_cover_every_sharing_mode_and_a_mixed_same_gpu_job() -> None:
    jobs = [parse_job(yaml.safe_load(p.read_text())) for p in EXAMPLES]
    modes = {job.spec.sharing.mode.value for job in jobs}
    assert modes == {"Auto", "Exclusive", "TimeSlicing", "MPS", "MIG"}
    assert any(
        job.spec.placement.strategy.value == "SameGPU"
        and {m.framework.value for m in job.spec.members} == {"PyTorch", "TensorFlow"}
        for job in jobs
    )


@pytest.mark.parametrize("case", INVALID_CASES, ids=[c.id for c in INVALID_CASES])
def test_invalid_spec_is_refused_naming_the_field(case: InvalidCase) -> None:
    with pytest.raises(InvalidJobError) as raised:
        parse_job(case.document)
    paths = [v.path for v in raised.value.violations]
    assert case.path in paths, f"{case.id}: got {raised.value.violations}"
    message = next(v.message for v in raised.value.violations if v.path == case.path)
    assert case.fragment in message, f"{case.id}: {message!r}"


def test_every_cross_field_rule_has_a_failing_case() -> None:
    triggered = set()
    for case in INVALID_CASES:
        try:
            parse_job(case.document)
        except InvalidJobError as error:
            triggered.update(v.message for v in error.violations)
    untested = [rule.message for rule in RULES if rule.message not in triggered]
    assert not untested


def test_defaults_are_applied_by_the_model() -> None:
    job = parse_job(a_job().build())
    spec = job.spec
    assert spec.run_policy.backoff_limit == 3
    assert spec.run_policy.suspend is False
    assert spec.success_policy.value == "AllMembers"
    assert spec.members[0].learning_rate == pytest.approx(0.001)


def test_members_are_immutable_once_the_job_started() -> None:
    old = a_job().build()
    old["status"] = {"startTime": "2026-11-22T00:00:00Z"}
    new = a_job().member(steps=99).build()
    with pytest.raises(InvalidJobError, match=r"spec.members cannot change"):
        parse_job(new, old=old)
    # Before the job starts the same change is fine.
    old_unstarted = a_job().build()
    assert parse_job(new, old=old_unstarted).spec.members[0].steps == 99


def test_sharing_is_immutable_once_the_job_started() -> None:
    old = a_job().build()
    old["status"] = {"startTime": "2026-11-22T00:00:00Z"}
    with pytest.raises(InvalidJobError, match=r"spec.sharing cannot change"):
        parse_job(a_job().sharing(mode="Exclusive").build(), old=old)


def test_one_document_with_many_problems_reports_each() -> None:
    document = a_job().member(framework="Jax").sharing(mode="Nope").build()
    with pytest.raises(InvalidJobError) as raised:
        parse_job(document)
    paths = {v.path for v in raised.value.violations}
    assert {"spec.members[0].framework", "spec.sharing.mode"} <= paths


def test_rules_pass_on_a_valid_job() -> None:
    assert check_rules(parse_job(a_job().build())) == []
