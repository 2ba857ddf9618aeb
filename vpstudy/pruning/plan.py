"""A named pruning configuration: what ``vpstudy evaluate --method NAME --set k=v`` builds.

``NAME`` is a method of :data:`~vpstudy.pruning.registry.METHODS`, several joined by ``+``
(composed, e.g. ``fastv+visionpulse``), or ``dense`` (no pruning). Settings are ``key=value``
strings converted to the field's type; with several methods, prefix the key with the method
(``fastv.layer=2``). A fitted :class:`~vpstudy.rules.BudgetRule` goes to VisionPulse.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ..rules import BudgetRule
from .methods import PruningError, PruningMethod, VisionPulse
from .registry import DENSE, METHODS, make_method


@dataclass
class PruningPlan:
    """Methods to install together, under one label (used in run manifests and tables)."""

    name: str
    methods: list[PruningMethod]

    def description(self) -> dict[str, Any]:
        """JSON-able: the label and each method with its settings (a rule by name only)."""
        out = []
        for method in self.methods:
            settings = {f.name: getattr(method, f.name) for f in fields(method) if f.init}
            if isinstance(settings.get("rule"), BudgetRule):
                settings["rule"] = settings["rule"].name or settings["rule"].signal
            out.append(
                {"method": method.name, **{k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}}
            )
        return {"name": self.name, "methods": out}

    def rule_json(self) -> dict[str, Any] | None:
        """The fitted budget rule in use (for the manifest), if any."""
        for method in self.methods:
            rule = getattr(method, "rule", None)
            if isinstance(rule, BudgetRule) and rule.model is not None:
                return rule.to_json()
        return None


def _convert(method: str, key: str, annotation: object, text: str) -> Any:
    # annotation: the dataclass field's type, a string under postponed evaluation (else a type)
    kind = str(annotation)
    try:
        if "tuple" in kind:
            return tuple(int(x) for x in text.replace(",", " ").split())
        if kind.startswith("bool"):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            return float(text)
        if kind.startswith("str"):
            return text
    except ValueError:
        raise PruningError(f"{method}: setting {key}={text!r} is not a valid {kind}") from None
    raise PruningError(f"{method}: setting {key} cannot be set from the command line")


def parse_settings(pairs: list[str]) -> dict[str, str]:
    """``["ratio=0.05", "fastv.layer=2"]`` -> ``{"ratio": "0.05", "fastv.layer": "2"}``."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise PruningError(f"setting {pair!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


def build_plan(
    name: str, settings: dict[str, str] | None = None, *, rule: BudgetRule | None = None, label: str | None = None
) -> PruningPlan | None:
    """The plan for ``--method name --set ...`` (None for ``dense``); one-line errors for an
    unknown method or setting, a value of the wrong type, or a rule given to no VisionPulse."""
    settings = dict(settings or {})
    if name == DENSE:
        if settings or rule is not None:
            raise PruningError("dense takes no settings and no budget rule")
        return None
    names = name.split("+")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise PruningError(f"unknown pruning method {unknown[0]!r} (known: {DENSE}, {', '.join(METHODS)}; join with +)")
    methods = []
    for method_name in names:
        prefix = f"{method_name}."
        mine = {k[len(prefix) :]: v for k, v in settings.items() if k.startswith(prefix)}
        if len(names) == 1:
            mine |= {k: v for k, v in settings.items() if "." not in k}
        types = {f.name: f.type for f in fields(METHODS[method_name]) if f.init}
        unknown_keys = sorted(set(mine) - set(types))
        if unknown_keys:
            raise PruningError(
                f"{method_name}: unknown setting(s) {', '.join(unknown_keys)} (known: {', '.join(sorted(types))})"
            )
        values = {k: _convert(method_name, k, types[k], v) for k, v in mine.items()}
        if method_name == VisionPulse.name and rule is not None:
            values["rule"] = rule
        methods.append(make_method(method_name, **values))
    leftover = [k for k in settings if "." in k and k.split(".", 1)[0] not in names]
    if leftover or (len(names) > 1 and any("." not in k for k in settings)):
        bad = leftover or [k for k in settings if "." not in k]
        raise PruningError(
            f"setting(s) {', '.join(bad)} name no method of {name} "
            f"(prefix them, e.g. {names[0]}.{bad[0].split('.')[-1]})"
        )
    if rule is not None and VisionPulse.name not in names:
        raise PruningError(f"a budget rule was given but {name} has no visionpulse to use it")
    return PruningPlan(label or name, methods)
