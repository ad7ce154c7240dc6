"""Kubernetes quantities parse exactly as the API server reads them."""

from __future__ import annotations

from decimal import Decimal

import pytest

from cotrain_operator.api.quantity import parse_quantity, quantity_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4Gi", Decimal(4 * 2**30)),
        ("512Mi", Decimal(512 * 2**20)),
        ("1.5Gi", Decimal(3 * 2**29)),
        ("500M", Decimal(500 * 10**6)),
        ("100m", Decimal("0.1")),
        ("2", Decimal(2)),
        (2, Decimal(2)),
        ("1e3", Decimal(1000)),
        ("1E-3", Decimal("0.001")),
        ("+1k", Decimal(1000)),
        (".5Ki", Decimal(512)),
    ],
)
def test_parses(text: str | int, expected: Decimal) -> None:
    assert parse_quantity(text) == expected


@pytest.mark.parametrize("text", ["4GB", "lots", "", "1.2.3", "Gi", "4 Gi", "0x10"])
def test_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="is not a quantity"):
        parse_quantity(text)


def test_refuses_booleans() -> None:
    with pytest.raises(ValueError, match="not a quantity"):
        parse_quantity(True)


def test_bytes_round_up_like_kubernetes() -> None:
    assert quantity_bytes("1.5") == 2
    assert quantity_bytes("1Ki") == 1024
    assert quantity_bytes("100m") == 1
