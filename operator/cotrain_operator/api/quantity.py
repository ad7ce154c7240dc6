"""Kubernetes resource quantities ("4Gi", "500M", 1024) as a pydantic type.

Owns parsing quantities into exact numbers and the int-or-string schema the CRD needs. Used by
the API models for `gpu.memory` and `resources`, and by the operator and trainer to compare
memory budgets in bytes.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

# The grammar of k8s.io/apimachinery/pkg/api/resource (a decimal number followed by a binary SI
# suffix, a decimal SI suffix or a decimal exponent), with bounds of our own: no minus sign (no
# amount of memory or CPU a CoTrainJob asks for can be negative), at most 19 integer and 9
# fraction digits, and a decimal exponent of at most two digits. The API server's parser rounds
# every quantity to nano units with arbitrary precision: an exponent such as 1e99999999 makes it
# build a number of a hundred million digits, which takes minutes and hundreds of MB per request.
# The schema's pattern refuses such a value, and every CEL rule that parses a quantity first
# checks the same pattern (the API server runs CEL even on values that failed their pattern).
QUANTITY_PATTERN = (
    r"^\+?(([0-9]{1,19}(\.[0-9]{0,9})?)|(\.[0-9]{1,9}))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?[0-9]{1,2}))?$"
)
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)
_SUFFIX_RE = re.compile(r"^(.*?)([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?$")

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal(10**3),
    "M": Decimal(10**6),
    "G": Decimal(10**9),
    "T": Decimal(10**12),
    "P": Decimal(10**15),
    "E": Decimal(10**18),
}

MAX_QUANTITY_LENGTH = 32
# The largest amount Kubernetes keeps exactly: its int64 limit. The API server caps larger
# binary-SI amounts to it and keeps larger decimal ones, which a pod's scheduling arithmetic then
# saturates; the API's rules (rules.py) refuse any amount above it.
MAX_QUANTITY = 2**63 - 1
QUANTITY_HINT = "use a Kubernetes quantity such as 8Gi, 512Mi or 2"


def parse_quantity(value: str | int | float) -> Decimal:
    """The value of a quantity as the API server holds it (binary-SI amounts capped at
    MAX_QUANTITY); ValueError naming the expected form. Bounded work for any input: the pattern
    limits the digits and the exponent."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a quantity; {QUANTITY_HINT}")
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(str(value))
    text = value
    if len(text) > MAX_QUANTITY_LENGTH or not _QUANTITY_RE.fullmatch(text):
        raise ValueError(f"{value!r} is not a quantity; {QUANTITY_HINT}")
    match = _SUFFIX_RE.fullmatch(text)
    assert match is not None  # the pattern above already matched
    number, suffix = match.group(1), match.group(2) or ""
    try:
        base = Decimal(number)
    except InvalidOperation as error:  # pragma: no cover - the pattern rules this out
        raise ValueError(f"{value!r} is not a quantity; {QUANTITY_HINT}") from error
    if suffix in _BINARY:
        # The API server caps binary-SI amounts at its int64 limit rather than refusing them.
        return min(base * _BINARY[suffix], Decimal(MAX_QUANTITY))
    elif suffix in _DECIMAL:
        amount = base * _DECIMAL[suffix]
    elif suffix:
        amount = base.scaleb(int(suffix[1:]))
    else:
        amount = base
    return amount


def quantity_bytes(value: str | int) -> int:
    """A memory quantity in whole bytes (rounded up, as Kubernetes does)."""
    exact = parse_quantity(value)
    whole = int(exact)
    return whole if whole == exact else whole + 1


class _QuantityAnnotation:
    """Validates a quantity, keeps the user's spelling, and renders as int-or-string."""

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        def validate(value: Any) -> str | int:
            if isinstance(value, bool) or not isinstance(value, str | int):
                raise PydanticCustomError(
                    "quantity_type",
                    "must be a quantity string or integer; {hint}",
                    {"hint": QUANTITY_HINT},
                )
            try:
                amount = parse_quantity(value)
            except ValueError:
                raise PydanticCustomError(
                    "quantity",
                    "'{value}' is not a quantity; {hint}",
                    {"value": value, "hint": QUANTITY_HINT},
                ) from None
            if amount < 0:
                raise PydanticCustomError(
                    "quantity_negative",
                    "'{value}' is negative; a resource amount must be >= 0",
                    {"value": value},
                )
            return value

        return core_schema.no_info_plain_validator_function(
            validate, serialization=core_schema.plain_serializer_function_ser_schema(lambda v: v)
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "minimum": 0,
            # Bounds the cost the API server estimates for CEL rules over quantities.
            "maxLength": MAX_QUANTITY_LENGTH,
            "x-kubernetes-int-or-string": True,
        }


Quantity = Annotated[str | int, _QuantityAnnotation]
