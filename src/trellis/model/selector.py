"""Kubernetes label selectors (`metav1.LabelSelector`) as canonical values.

A selector is a conjunction of requirements; `matchLabels` entries are `In` requirements of one
value, exactly as the API machinery converts them. Requirements are kept sorted and their values
deduplicated, so two selectors that are written differently but say the same thing (`{app: a}`
and `app In [a]`) are equal: the policy calculation names one address set per distinct selector,
and equal selectors must share it.

Empty versus missing is decided by the object that holds the selector, not here: an empty
selector (no requirements) matches every label set, and whether a missing field means "all",
"none" or "the policy's own namespace" is spelled out by each caller (see `model/k8s.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Operator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


@dataclass(frozen=True, order=True)
class Requirement:
    key: str
    operator: Operator
    values: tuple[str, ...] = ()
    """Sorted and deduplicated; non-empty for In and NotIn, empty for Exists and DoesNotExist."""

    def matches(self, labels: Mapping[str, str]) -> bool:
        match self.operator:
            case Operator.IN:
                return labels.get(self.key) in self.values
            case Operator.NOT_IN:
                # a label set without the key is "not in" any values (as apimachinery's labels.Selector)
                return labels.get(self.key) not in self.values
            case Operator.EXISTS:
                return self.key in labels
            case Operator.DOES_NOT_EXIST:
                return self.key not in labels

    def __str__(self) -> str:
        match self.operator:
            case Operator.IN if len(self.values) == 1:
                return f"{self.key}={self.values[0]}"
            case Operator.IN | Operator.NOT_IN:
                word = "in" if self.operator is Operator.IN else "notin"
                return f"{self.key} {word} ({','.join(self.values)})"
            case Operator.EXISTS:
                return self.key
            case Operator.DOES_NOT_EXIST:
                return f"!{self.key}"


@dataclass(frozen=True, order=True)
class LabelSelector:
    requirements: tuple[Requirement, ...] = ()
    """Sorted and deduplicated; all must hold. None at all: the selector matches everything."""

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(requirement.matches(labels) for requirement in self.requirements)

    @property
    def is_empty(self) -> bool:
        return not self.requirements

    def __str__(self) -> str:
        """kubectl's notation (`app=a,tier in (x,y),!legacy`); `*` for the empty selector."""
        return ",".join(str(r) for r in self.requirements) or "*"

    @classmethod
    def of(cls, requirements: tuple[Requirement, ...] = (), **labels: str) -> LabelSelector:
        """A canonical selector from requirements and `matchLabels`-style keyword labels."""
        every = {*requirements, *(Requirement(k, Operator.IN, (v,)) for k, v in labels.items())}
        return cls(tuple(sorted(every)))

    @classmethod
    def from_json(cls, value: Any) -> LabelSelector:
        """Parse a `metav1.LabelSelector`.

        A ValueError's message continues the caller's field path: it starts with the offending
        field relative to the selector (`.matchExpressions[1].operator: ...`), or with `:` when
        the selector itself is wrong.
        """
        if not isinstance(value, Mapping):
            raise ValueError(f": a label selector must be an object, not {type(value).__name__}")
        unknown = set(value) - {"matchLabels", "matchExpressions"}
        if unknown:
            raise ValueError(f".{sorted(unknown)[0]}: not a field of a label selector")
        match_labels = {} if value.get("matchLabels") is None else value["matchLabels"]
        if not isinstance(match_labels, Mapping):
            raise ValueError(".matchLabels: must be an object of label values")
        labels: dict[str, str] = {}
        for key, label in match_labels.items():
            if not key or not isinstance(label, str):
                raise ValueError(f".matchLabels.{key}: a label needs a non-empty key and a string value")
            labels[key] = label
        expressions = [] if value.get("matchExpressions") is None else value["matchExpressions"]
        if not isinstance(expressions, list):
            raise ValueError(".matchExpressions: must be a list")
        requirements = tuple(
            _requirement(expression, f".matchExpressions[{i}]") for i, expression in enumerate(expressions)
        )
        return cls.of(requirements, **labels)


def _requirement(value: Any, where: str) -> Requirement:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: must be an object with key, operator and values")
    key = value.get("key")
    if not isinstance(key, str) or not key:
        raise ValueError(f"{where}.key: must be a non-empty string")
    try:
        operator = Operator(str(value.get("operator")))
    except ValueError:
        raise ValueError(
            f"{where}.operator: {value.get('operator')!r} is not one of {', '.join(Operator)}"
        ) from None
    values = [] if value.get("values") is None else value["values"]
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{where}.values: must be a list of strings")
    if operator in (Operator.IN, Operator.NOT_IN) and not values:
        raise ValueError(f"{where}.values: must be non-empty for {operator}")
    if operator in (Operator.EXISTS, Operator.DOES_NOT_EXIST) and values:
        raise ValueError(f"{where}.values: must be empty for {operator}")
    return Requirement(key, operator, tuple(sorted(set(values))))


EVERYTHING = LabelSelector()
"""The empty selector: matches every label set."""
