"""Label selectors: matching tables, canonical equality, kubectl notation and parse errors."""

from __future__ import annotations

import re
from typing import Any

import pytest

from trellis.model.selector import EVERYTHING, LabelSelector, Operator, Requirement

APP_A = {"app": "a"}
APP_B_PROD = {"app": "b", "env": "prod"}
NONE: dict[str, str] = {}


def ml(**labels: str) -> dict[str, Any]:
    return {"matchLabels": labels}


def me(key: str, operator: str, *values: str) -> dict[str, Any]:
    return {
        "matchExpressions": [
            {"key": key, "operator": operator, **({"values": list(values)} if values else {})}
        ]
    }


@pytest.mark.parametrize(
    ("selector", "labels", "matches"),
    [
        ({}, NONE, True),
        ({}, APP_A, True),
        ({"matchLabels": {}, "matchExpressions": []}, APP_A, True),
        (ml(app="a"), APP_A, True),
        (ml(app="a"), APP_B_PROD, False),
        (ml(app="a"), NONE, False),
        (ml(app="b", env="prod"), APP_B_PROD, True),
        (ml(app="b", env="dev"), APP_B_PROD, False),
        (me("app", "In", "a", "b"), APP_A, True),
        (me("app", "In", "a", "b"), APP_B_PROD, True),
        (me("app", "In", "c"), APP_A, False),
        (me("app", "In", "a"), NONE, False),
        (me("app", "NotIn", "a"), APP_A, False),
        (me("app", "NotIn", "a"), APP_B_PROD, True),
        (me("app", "NotIn", "a"), NONE, True),  # a missing key is "not in" anything
        (me("env", "Exists"), APP_B_PROD, True),
        (me("env", "Exists"), APP_A, False),
        (me("env", "DoesNotExist"), APP_A, True),
        (me("env", "DoesNotExist"), APP_B_PROD, False),
        (me("env", "DoesNotExist"), NONE, True),
        ({**ml(app="b"), **me("env", "In", "prod")}, APP_B_PROD, True),  # matchLabels AND expressions
        ({**ml(app="a"), **me("env", "Exists")}, APP_A, False),
        (
            {
                "matchExpressions": [
                    {"key": "app", "operator": "In", "values": ["a", "b"]},
                    {"key": "env", "operator": "DoesNotExist"},
                ]
            },
            APP_A,
            True,
        ),
        ({"matchLabels": {"empty": ""}}, {"empty": ""}, True),
        ({"matchLabels": {"empty": ""}}, NONE, False),
    ],
)
def test_matches(selector: dict[str, Any], labels: dict[str, str], matches: bool) -> None:
    assert LabelSelector.from_json(selector).matches(labels) is matches


def test_written_differently_but_equal() -> None:
    """Equal selectors share one address set, so equal meaning must be equal values."""
    a = LabelSelector.from_json(ml(app="a", env="prod"))
    b = LabelSelector.from_json(
        {
            "matchExpressions": [{"key": "env", "operator": "In", "values": ["prod"]}],
            "matchLabels": {"app": "a"},
        }
    )
    c = LabelSelector.from_json(
        {
            "matchExpressions": [
                {"key": "app", "operator": "In", "values": ["a", "a"]},
                {"key": "env", "operator": "In", "values": ["prod"]},
            ]
        }
    )
    assert a == b == c and hash(a) == hash(b)
    assert LabelSelector.from_json({}) == LabelSelector.from_json({"matchLabels": None}) == EVERYTHING


def test_kubectl_notation() -> None:
    selector = LabelSelector.from_json(
        {
            "matchLabels": {"app": "a"},
            "matchExpressions": [
                {"key": "tier", "operator": "NotIn", "values": ["y", "x"]},
                {"key": "legacy", "operator": "DoesNotExist"},
                {"key": "env", "operator": "Exists"},
                {"key": "zone", "operator": "In", "values": ["b", "a"]},
            ],
        }
    )
    assert str(selector) == "app=a,env,!legacy,tier notin (x,y),zone in (a,b)"
    assert str(EVERYTHING) == "*"
    assert LabelSelector.of(app="a") == LabelSelector((Requirement("app", Operator.IN, ("a",)),))


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        ([], ": a label selector must be an object, not list"),
        ({"matchLabel": {}}, ".matchLabel: not a field of a label selector"),
        ({"matchLabels": ["a"]}, ".matchLabels: must be an object of label values"),
        ({"matchLabels": {"app": 1}}, ".matchLabels.app: a label needs a non-empty key and a string value"),
        ({"matchExpressions": {}}, ".matchExpressions: must be a list"),
        (
            me("app", "in", "a"),
            ".matchExpressions[0].operator: 'in' is not one of In, NotIn, Exists, DoesNotExist",
        ),
        (me("app", "In"), ".matchExpressions[0].values: must be non-empty for In"),
        (me("app", "NotIn"), ".matchExpressions[0].values: must be non-empty for NotIn"),
        (me("app", "Exists", "a"), ".matchExpressions[0].values: must be empty for Exists"),
        (
            {"matchExpressions": [{"operator": "Exists"}]},
            ".matchExpressions[0].key: must be a non-empty string",
        ),
        (
            {"matchExpressions": [{"key": "a", "operator": "In", "values": [1]}]},
            ".matchExpressions[0].values: must be a list of strings",
        ),
    ],
)
def test_parse_errors_name_the_field(selector: Any, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        LabelSelector.from_json(selector)
