"""Reading YAML manifests the way kubectl reads them.

Owns the YAML-to-JSON step of `kubectl apply -f`: kubectl parses YAML with go-yaml v2's YAML 1.1
rules (`y`, `yes`, `on` are booleans; `1e3` and `08` are numbers; `0o17` and `0x1f` integers;
`1:30` and timestamps stay strings) and sends the result as JSON, so a document means the same
thing to `cotrain validate` and `cotrain run` as to the API server. PyYAML's defaults differ on
each of those. Called by the `cotrain` CLI; tests compare it with kubectl itself.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

import yaml

# go-yaml v2 resolve.go: the plain scalars with a fixed meaning.
_TRUE = ["y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"]
_FALSE = ["n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF"]
_BOOLEANS = {**dict.fromkeys(_TRUE, True), **dict.fromkeys(_FALSE, False)}
_NULLS = {"", "~", "null", "Null", "NULL"}
_SPECIAL_FLOATS = {
    **dict.fromkeys([".nan", ".NaN", ".NAN"], math.nan),
    **dict.fromkeys([".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF"], math.inf),
    **dict.fromkeys(["-.inf", "-.Inf", "-.INF"], -math.inf),
}
_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
# strconv.ParseInt(s, 0, 64): an optional sign, then 0x/0o/0b prefixed digits, a leading-0
# octal number, or a decimal one.
_GO_INT = re.compile(r"[-+]?(0[xX][0-9a-fA-F]+|0[oO][0-7]+|0[bB][01]+|0[0-7]*|[1-9][0-9]*)")
_INT64 = 2**63
_UINT64 = 2**64
# Go's ParseFloat returns an error (not infinity) for values beyond float64.
_FLOAT64_MAX = 1.7976931348623157e308


class ManifestError(ValueError):
    """A document kubectl could not turn into JSON."""


def _go_int(text: str) -> int | None:
    if not _GO_INT.fullmatch(text):
        return None
    sign = -1 if text.startswith("-") else 1
    digits = text.lstrip("+-")
    lowered = digits.lower()
    if lowered.startswith("0x"):
        value = int(digits[2:], 16)
    elif lowered.startswith("0o"):
        value = int(digits[2:], 8)
    elif lowered.startswith("0b"):
        value = int(digits[2:], 2)
    elif len(digits) > 1 and digits.startswith("0"):
        value = int(digits, 8)
    else:
        value = int(digits)
    value *= sign
    # ParseInt fits int64; ParseUint takes the rest of uint64 (unsigned only).
    if -_INT64 <= value < _INT64 or (sign == 1 and not text.startswith("+") and value < _UINT64):
        return value
    return None


def _float_or_text(number: str, text: str) -> float | str:
    if not _FLOAT.fullmatch(number):
        return text
    value = float(number)
    # Out of float64's range ParseFloat fails, and go-yaml keeps the text.
    return value if abs(value) <= _FLOAT64_MAX else text


def resolve_plain(text: str) -> Any:
    """The value go-yaml v2 gives an untagged plain scalar."""
    if text in _BOOLEANS:
        return _BOOLEANS[text]
    if text in _NULLS:
        return None
    if text in _SPECIAL_FLOATS:
        return _SPECIAL_FLOATS[text]
    if not text or text[0] not in "+-.0123456789":
        return text
    if text[0] == ".":
        # go-yaml tries strconv.ParseFloat on the text as it is (no underscores removed).
        return _float_or_text(text, text)
    plain = text.replace("_", "")
    number = _go_int(plain)
    if number is not None:
        return number
    if _FLOAT.fullmatch(plain):
        return _float_or_text(plain, text)
    if plain.startswith(("0b", "-0b")):
        body = plain.removeprefix("-").removeprefix("0b")
        if body and set(body) <= {"0", "1"}:
            value = int(body, 2) * (-1 if plain.startswith("-") else 1)
            if -_INT64 <= value < _INT64:
                return value
    return text


class KubectlLoader(yaml.SafeLoader):
    """A SafeLoader whose untagged plain scalars resolve as go-yaml v2 resolves them."""


def _construct_plain(loader: KubectlLoader, node: yaml.ScalarNode) -> Any:
    if node.style is None and node.tag == "tag:yaml.org,2002:go-plain":
        return resolve_plain(node.value)
    return loader.construct_scalar(node)


# Every plain scalar gets our tag; quoted scalars stay strings.
KubectlLoader.yaml_implicit_resolvers = {}
KubectlLoader.add_implicit_resolver("tag:yaml.org,2002:go-plain", re.compile(r"(?s).*"), None)
KubectlLoader.add_implicit_resolver("tag:yaml.org,2002:merge", re.compile(r"^<<$"), ["<"])
KubectlLoader.add_constructor("tag:yaml.org,2002:go-plain", _construct_plain)


def _as_json(value: Any, path: str) -> Any:
    """What sigs.k8s.io/yaml makes of a decoded YAML value on the way to JSON: keys become
    strings, integers beyond int64 become floats, and NaN or infinity cannot be sent at all."""
    if isinstance(value, dict):
        return {_json_key(k): _as_json(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_as_json(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ManifestError(f"{path}: {value} cannot be written as JSON; quote it or fix it")
        return value
    if isinstance(value, bytes):
        raise ManifestError(f"{path}: binary data cannot be written as JSON")
    if isinstance(value, int) and not isinstance(value, bool) and value >= _INT64:
        return float(value)  # an unsigned 64-bit YAML integer goes to JSON as a float64
    return value


def _json_key(key: Any) -> str:
    if isinstance(key, bool):
        return "true" if key else "false"
    if key is None:
        return "null"
    if isinstance(key, float) and key.is_integer():
        return str(int(key))
    return str(key)


def load_all(text: str) -> Iterator[Any]:
    """Every non-empty document of a YAML stream, as kubectl would send it (JSON values)."""
    for index, document in enumerate(yaml.load_all(text, Loader=KubectlLoader)):
        if document is not None:
            yield _as_json(document, f"document {index + 1}")
