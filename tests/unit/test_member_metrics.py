"""The per-member series: set from the members' validated reports, one phase at 1 and the others
at 0, a value left out when a member stops reporting it, and every series of a job gone with
the job (or with a member no longer in it). The Grafana dashboard asks only for series the
operator serves."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import REGISTRY

from cotrain_operator import metrics
from cotrain_operator.api.models import read_member_report

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "cotrain-dashboard.json"


def value(name: str, member: str, job: str = "j", **labels: str) -> float | None:
    return REGISTRY.get_sample_value(
        name, {"namespace": "ns", "job": job, "member": member, **labels}
    )


def test_a_jobs_members_are_exported_and_removed_with_the_job() -> None:
    series = metrics.MemberSeries()
    torch = {
        "phase": "Running",
        "step": 5,
        "totalSteps": 20,
        "loss": 0.5,
        "samplesPerSecond": 80.0,
        "gpuMemoryBytes": 2**30,
        "gpuMemoryPeakBytes": 2**31,
        "restarts": 1,
    }
    tf = {"phase": "Pending", "restarts": 0, "loss": "not a number"}
    series.update("ns", "j", {"torch": read_member_report(torch), "tf": read_member_report(tf)})
    assert value("cotrain_member_step", "torch") == 5
    assert value("cotrain_member_total_steps", "torch") == 20
    assert value("cotrain_member_loss", "torch") == 0.5
    assert value("cotrain_member_samples_per_second", "torch") == 80
    assert value("cotrain_member_gpu_memory_bytes", "torch") == 2**30
    assert value("cotrain_member_gpu_memory_peak_bytes", "torch") == 2**31
    assert value("cotrain_member_restarts", "torch") == 1
    assert value("cotrain_member_phase", "torch", phase="Running") == 1
    assert value("cotrain_member_phase", "torch", phase="Failed") == 0
    assert value("cotrain_member_loss", "tf") is None  # a report that does not validate: no series
    assert value("cotrain_member_phase", "tf", phase="Pending") == 1

    torch |= {"phase": "Succeeded", "step": 20}
    del torch["samplesPerSecond"]
    series.update("ns", "j", {"torch": read_member_report(torch)})
    assert value("cotrain_member_step", "torch") == 20
    assert value("cotrain_member_phase", "torch", phase="Succeeded") == 1
    assert value("cotrain_member_phase", "torch", phase="Running") == 0
    assert value("cotrain_member_samples_per_second", "torch") is None
    assert value("cotrain_member_restarts", "tf") is None  # tf is no member any more

    series.update("ns", "other", {"torch": read_member_report({"step": 1})})
    series.forget("ns", "j")
    for name in metrics.MEMBER_VALUES:
        assert value(f"cotrain_member_{name}", "torch") is None
    for phase in metrics.MEMBER_PHASES:
        assert value("cotrain_member_phase", "torch", phase=phase) is None
    assert value("cotrain_member_step", "torch", job="other") == 1  # another job's stay
    series.forget("ns", "other")


def served() -> set[str]:
    names = set()
    for metric in REGISTRY.collect():
        names.add(metric.name)
        if metric.type == "counter":
            names.add(f"{metric.name}_total")
        if metric.type == "histogram":
            names |= {f"{metric.name}_{suffix}" for suffix in ("bucket", "sum", "count")}
    return names


def test_every_dashboard_query_asks_for_series_the_operator_serves() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queries += [
        v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"
    ]
    asked = {name for q in queries for name in re.findall(r"\b(cotrain_[a-z_]+)", q)}
    assert asked, queries
    assert asked <= served(), asked - served()
    # Every per-member series and the operator's own are on the dashboard.
    assert {f"cotrain_member_{n}" for n in metrics.MEMBER_VALUES} | {
        "cotrain_member_phase"
    } <= asked
