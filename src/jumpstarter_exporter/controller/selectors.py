"""Kubernetes-style label selectors, as upstream clients send them in ``--selector``.

Grammar (comma-separated requirements, all must hold): ``k=v`` / ``k==v``, ``k!=v``,
``k in (a,b)``, ``k notin (a,b)``, ``k`` (exists), ``!k`` (does not exist). Pure functions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from jumpstarter_exporter._proto.jumpstarter.v1 import kubernetes_pb2


class SelectorError(ValueError):
    """A selector that does not parse; the message names the offending part."""


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str  # In, NotIn, Exists, DoesNotExist
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "Exists":
            return self.key in labels
        if self.operator == "DoesNotExist":
            return self.key not in labels
        if self.operator == "In":
            return labels.get(self.key) in self.values
        # NotIn, like Kubernetes: a missing key satisfies "!=" and "notin".
        return labels.get(self.key) not in self.values


_KEY = r"[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?"
_VALUE = r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_SET = re.compile(rf"^\s*(?P<key>{_KEY})\s+(?P<op>in|notin)\s*\((?P<values>[^)]*)\)\s*$")
_EQ = re.compile(rf"^\s*(?P<key>{_KEY})\s*(?P<op>==|=|!=)\s*(?P<value>{_VALUE})\s*$")
_EXISTS = re.compile(rf"^\s*(?P<neg>!)?\s*(?P<key>{_KEY})\s*$")


def _split(text: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p for p in parts if p.strip()]


def parse(text: str) -> tuple[Requirement, ...]:
    requirements = []
    for part in _split(text or ""):
        if m := _SET.match(part):
            values = tuple(v.strip() for v in m["values"].split(",") if v.strip())
            if not values:
                raise SelectorError(f"selector {part.strip()!r}: empty value set")
            op = "In" if m["op"] == "in" else "NotIn"
            requirements.append(Requirement(m["key"], op, values))
        elif m := _EQ.match(part):
            op = "NotIn" if m["op"] == "!=" else "In"
            requirements.append(Requirement(m["key"], op, (m["value"],)))
        elif m := _EXISTS.match(part):
            requirements.append(Requirement(m["key"], "DoesNotExist" if m["neg"] else "Exists"))
        else:
            raise SelectorError(f"selector {part.strip()!r} is not k=v, k!=v, k in (…), k or !k")
    return tuple(requirements)


def matches(requirements: tuple[Requirement, ...], labels: Mapping[str, str]) -> bool:
    return all(r.matches(labels) for r in requirements)


def to_proto(requirements: tuple[Requirement, ...]) -> kubernetes_pb2.LabelSelector:
    """Equality requirements become match_labels, the rest match_expressions (k8s style)."""
    selector = kubernetes_pb2.LabelSelector()
    for r in requirements:
        if r.operator == "In" and len(r.values) == 1 and r.key not in selector.match_labels:
            selector.match_labels[r.key] = r.values[0]
        else:
            selector.match_expressions.add(key=r.key, operator=r.operator, values=r.values)
    return selector


def from_proto(selector: kubernetes_pb2.LabelSelector) -> str:
    """A LabelSelector message as selector text (the form leases store)."""
    parts = [f"{k}={v}" for k, v in sorted(selector.match_labels.items())]
    for expr in selector.match_expressions:
        values = ",".join(expr.values)
        parts.append(
            {
                "In": f"{expr.key} in ({values})",
                "NotIn": f"{expr.key} notin ({values})",
                "Exists": expr.key,
                "DoesNotExist": f"!{expr.key}",
            }.get(expr.operator, f"{expr.key} {expr.operator} ({values})")
        )
    return ",".join(parts)
