"""Value rules attached to dataclass fields, and the one check that reads them.

``params.yaml``'s sections (``pipeline.params``) and the calibrators' settings
(``pipeline.quant.calibrators``) declare what a field allows in its metadata:
``choice(...)``, ``bounds(...)`` or ``non_empty()``. ``problem`` says what is
wrong with a value in words a user can act on; the params parser prefixes the
key (``profile.percentile.percent``), a settings object its field name.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


def choice(*allowed: str) -> dict[str, Any]:
    return {"choices": allowed}


def bounds(low: float | None = None, high: float | None = None, low_open: bool = False) -> dict[str, Any]:
    return {"low": low, "high": high, "low_open": low_open}


def non_empty() -> dict[str, Any]:
    return {"non_empty": True}


def problem(value: Any, metadata: Mapping[str, Any]) -> str | None:
    """What breaks the field's rule ("is out of range; allowed: > 0.0"), or None when ``value`` keeps it."""
    if value is None:
        return None
    if metadata.get("non_empty") and not value.strip():
        return "is empty; allowed: a non-empty string"
    if "choices" in metadata and value not in metadata["choices"]:
        return f"is not allowed; allowed: {', '.join(metadata['choices'])}"
    low, high = metadata.get("low"), metadata.get("high")
    if low is not None and (value <= low if metadata.get("low_open") else value < low):
        return f"is out of range; allowed: {f'> {low}' if metadata.get('low_open') else f'>= {low}'}"
    if high is not None and value > high:
        return f"is out of range; allowed: <= {high}"
    return None


class CheckedSettings:
    """Mixin for frozen settings dataclasses: their fields' rules are checked once, when they are made."""

    def __post_init__(self) -> None:
        check_fields(self)


def check_fields(instance: Any) -> None:
    """Raise ValueError naming the first field of a dataclass instance whose value breaks its rule."""
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        broken = problem(value, field.metadata)
        if broken is not None:
            raise ValueError(f"{type(instance).__name__}.{field.name}: value {value!r} {broken}")
