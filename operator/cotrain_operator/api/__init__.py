"""The CoTrainJob API: models, cross-field rules, validation and the generated CRD.

Pure and framework-free: both the operator and the trainer (`cotrain` CLI) import it.
"""

from cotrain_operator.api.models import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    BuiltinModel,
    Condition,
    ConditionStatus,
    CoTrainJob,
    CoTrainJobSpec,
    CoTrainJobStatus,
    Framework,
    JobPhase,
    Member,
    MemberPhase,
    MemberStatus,
    PlacementStrategy,
    SharingMode,
    SuccessPolicy,
    dump,
)
from cotrain_operator.api.validation import InvalidJobError, Violation, parse_job

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "BuiltinModel",
    "CoTrainJob",
    "CoTrainJobSpec",
    "CoTrainJobStatus",
    "Condition",
    "ConditionStatus",
    "Framework",
    "InvalidJobError",
    "JobPhase",
    "Member",
    "MemberPhase",
    "MemberStatus",
    "PlacementStrategy",
    "SharingMode",
    "SuccessPolicy",
    "Violation",
    "dump",
    "parse_job",
]
