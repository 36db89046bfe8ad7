"""Declarative routing conditions: typed, parsed once from YAML, never evaluated as code.

A route's ``match`` maps a DICOM keyword (or ``calling_ae_title``) to a condition:

* a scalar: equality (numbers compare numerically; a multi-valued attribute such as
  ImageType equals ``"ORIGINAL\\PRIMARY"`` when its joined value does);
* a list: any of;
* ``{regex: "..."}``: Python regular expression, searched in the (joined) value;
* ``{min: a, max: b}``: numeric range, inclusive, either bound optional;
* ``{present: true|false}``: the attribute is present and non-empty, or not;
* ``{contains: x}`` or ``{contains: [x, y]}``: one of the values of a multi-valued
  attribute equals x (or any of the list);
* ``{not: <condition>}``: the negation of another condition.

UID-valued attributes (SOPClassUID, ...) match by UID or by the UID's registered name,
so ``SOPClassUID: Nuclear Medicine Image Storage`` works.

Besides DICOM keywords, two derived keys: ``calling_ae_title`` (who sent the series) and
``image_plane`` (``axial``, ``coronal``, ``sagittal`` or ``oblique``, from
ImageOrientationPatient with the 30 degree tolerance head-CT gantry tilt needs; empty
when the series has no orientation, e.g. a radiograph).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

SPECIAL_KEYS = frozenset({"calling_ae_title", "image_plane"})


class RuleError(Exception):
    """A route's match block is malformed; ``problems`` are 'Key: why' strings."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True)
class Condition:
    """One keyword and what its value must satisfy."""

    keyword: str
    kind: str  # equals | any_of | regex | range | present | contains | not
    values: tuple[Any, ...] = ()
    pattern: re.Pattern[str] | None = None
    minimum: float | None = None
    maximum: float | None = None
    present: bool = True
    inner: Condition | None = None

    def describe(self) -> str:
        if self.kind == "equals":
            return f"{self.keyword} == {self.values[0]!r}"
        if self.kind == "any_of":
            return f"{self.keyword} in {list(self.values)!r}"
        if self.kind == "regex":
            assert self.pattern is not None
            return f"{self.keyword} ~ /{self.pattern.pattern}/"
        if self.kind == "range":
            return f"{self.minimum} <= {self.keyword} <= {self.maximum}"
        if self.kind == "present":
            return f"{self.keyword} {'present' if self.present else 'absent'}"
        if self.kind == "contains":
            return f"{self.keyword} contains one of {list(self.values)!r}"
        assert self.inner is not None
        return f"not ({self.inner.describe()})"


@dataclass(frozen=True)
class MatchResult:
    matched: bool
    reasons: tuple[str, ...]


def _parse_one(keyword: str, spec: Any, problems: list[str]) -> Condition | None:
    if isinstance(spec, list):
        if not spec or not all(isinstance(v, str | int | float) for v in spec):
            problems.append(f"{keyword}: any-of list must be non-empty strings/numbers")
            return None
        return Condition(keyword, "any_of", tuple(spec))
    if isinstance(spec, str | int | float) and not isinstance(spec, bool):
        return Condition(keyword, "equals", (spec,))
    if not isinstance(spec, dict) or len(spec) == 0:
        problems.append(f"{keyword}: unsupported condition {spec!r}")
        return None
    keys = set(spec)
    if keys == {"regex"}:
        try:
            return Condition(keyword, "regex", pattern=re.compile(str(spec["regex"])))
        except re.error as exc:
            problems.append(f"{keyword}: invalid regex: {exc}")
            return None
    if keys <= {"min", "max"}:
        bounds = {}
        for k in keys:
            v = spec[k]
            if isinstance(v, bool) or not isinstance(v, int | float):
                problems.append(f"{keyword}: {k} must be a number, got {v!r}")
                return None
            bounds[k] = float(v)
        return Condition(keyword, "range", minimum=bounds.get("min"), maximum=bounds.get("max"))
    if keys == {"present"}:
        if not isinstance(spec["present"], bool):
            problems.append(f"{keyword}: present must be true or false")
            return None
        return Condition(keyword, "present", present=spec["present"])
    if keys == {"contains"}:
        v = spec["contains"]
        values = tuple(v) if isinstance(v, list) else (v,)
        return Condition(keyword, "contains", values)
    if keys == {"not"}:
        inner = _parse_one(keyword, spec["not"], problems)
        return None if inner is None else Condition(keyword, "not", inner=inner)
    problems.append(f"{keyword}: unknown condition keys {sorted(keys)!r} "
                    "(use regex, min/max, present, contains or not)")
    return None


def parse_conditions(match: Any) -> tuple[Condition, ...]:
    """Parse a route's ``match`` mapping; raise RuleError listing every problem."""
    if match is None:
        raise RuleError(["(match): missing; a route must say what it matches"])
    if not isinstance(match, dict) or not match:
        raise RuleError(["(match): expected a non-empty mapping of keyword to condition"])
    problems: list[str] = []
    conditions: list[Condition] = []
    for keyword, spec in match.items():
        keyword = str(keyword)
        if keyword not in SPECIAL_KEYS and tag_for_keyword(keyword) is None:
            problems.append(f"{keyword}: not a DICOM keyword (nor one of {sorted(SPECIAL_KEYS)})")
            continue
        cond = _parse_one(keyword, spec, problems)
        if cond is not None:
            conditions.append(cond)
    if problems:
        raise RuleError(problems)
    return tuple(conditions)


def header_values(ds: Dataset, keywords: Sequence[str]) -> dict[str, Any]:
    """Extract the attributes rules look at, as plain JSON-friendly values.

    Stored in the ledger at ingest so routing (and the rule tester) never re-reads files.
    """
    out: dict[str, Any] = {}
    for kw in keywords:
        if kw in SPECIAL_KEYS or kw not in ds:
            continue
        value = ds[kw].value
        if value is None or value == "":
            out[kw] = None
        elif isinstance(value, MultiValue | list | tuple):
            out[kw] = [_plain(v) for v in value]
        elif isinstance(value, bytes | Sequence) and not isinstance(value, str):
            continue  # sequences and binary data are not routable
        else:
            out[kw] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    return str(value).strip()


def _candidates(keyword: str, value: Any) -> list[str]:
    """String forms a value may match as: itself, and for UIDs also their names."""
    text = "\\".join(str(v) for v in value) if isinstance(value, list) else str(value)
    out = [text]
    if keyword not in SPECIAL_KEYS and dictionary_VR(keyword) == "UI":
        name = UID(text).name
        if name and name != text:
            out.append(name)
    return out


def _as_float(value: Any) -> float | None:
    try:
        return float(value[0] if isinstance(value, list) else value)
    except (TypeError, ValueError, IndexError):
        return None


def _test(cond: Condition, attrs: Mapping[str, Any]) -> bool:
    value = attrs.get(cond.keyword)
    empty = value is None or value == "" or value == []
    if cond.kind == "present":
        return (not empty) == cond.present
    if cond.kind == "not":
        assert cond.inner is not None
        return not _test(cond.inner, attrs)
    if empty:
        return False
    if cond.kind in ("equals", "any_of"):
        cands = _candidates(cond.keyword, value)
        number = _as_float(value) if not isinstance(value, list) else None
        for expected in cond.values:
            if isinstance(expected, int | float) and number is not None:
                if float(expected) == number:
                    return True
            elif str(expected) in cands:
                return True
        return False
    if cond.kind == "regex":
        assert cond.pattern is not None
        return any(cond.pattern.search(c) for c in _candidates(cond.keyword, value))
    if cond.kind == "range":
        number = _as_float(value)
        if number is None:
            return False
        return (cond.minimum is None or number >= cond.minimum) and (
            cond.maximum is None or number <= cond.maximum)
    if cond.kind == "contains":
        items = [str(v) for v in value] if isinstance(value, list) else [str(value)]
        return any(str(expected) in items for expected in cond.values)
    raise AssertionError(cond.kind)


def image_plane(orientation: Any) -> str:
    """The ``image_plane`` routing key from an ImageOrientationPatient value."""
    from dicomnode.imaging.geometry import plane_of

    try:
        values = [float(v) for v in orientation]
        return str(plane_of(values)) if len(values) == 6 else ""
    except (TypeError, ValueError, ZeroDivisionError):
        return ""


def evaluate(conditions: Sequence[Condition], attrs: Mapping[str, Any]) -> MatchResult:
    """All conditions must hold; the reasons say which did and which did not, and why."""
    if "image_plane" not in attrs and any(c.keyword == "image_plane" for c in conditions):
        attrs = {**attrs, "image_plane": image_plane(attrs.get("ImageOrientationPatient"))}
    reasons: list[str] = []
    matched = True
    for cond in conditions:
        ok = _test(cond, attrs)
        shown = attrs.get(cond.keyword, "(absent)")
        reasons.append(f"{'ok' if ok else 'no'}: {cond.describe()} (value {shown!r})")
        matched = matched and ok
    return MatchResult(matched, tuple(reasons))
