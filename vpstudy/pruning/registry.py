"""The one list of pruning methods: what the command line, the evaluation, the report and the
tests iterate.

A method module registers its class with :func:`register` (``@register`` above the dataclass);
``vpstudy.pruning.methods`` imports every module, so importing the package fills
:data:`METHODS` in registration order. Each class says how it appears in the comparison of
``vpstudy evaluate --method all`` (:meth:`~vpstudy.pruning.methods.base.PruningMethod.comparison`),
as :class:`Entry` rows; :func:`comparison_entries` collects them.

Adding a method is one new module in ``vpstudy/pruning/methods/`` (and its line in that
package's ``__init__``): CONTRIBUTING.md, "Add a pruning method".
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .methods.base import PruningMethod

METHODS: dict[str, type[PruningMethod]] = {}
DENSE = "dense"
COMPARISON_BUDGETS = (0.05, 0.10)  # per-step budgets of the comparison (the paper's ≤5% and ≤10%)

M = TypeVar("M", bound="type[PruningMethod]")


def register(cls: M) -> M:
    """Class decorator: add a method class to :data:`METHODS` under its ``name``."""
    name = cls.name
    if not name or name == DENSE or "+" in name or "." in name:
        raise ValueError(f"{cls.__name__}: a method needs a name other than {DENSE!r}, without '+' or '.'")
    if name in METHODS and METHODS[name] is not cls:
        raise ValueError(f"pruning method {name!r} is registered twice ({METHODS[name].__name__}, {cls.__name__})")
    METHODS[name] = cls
    return cls


def set_order(names: tuple[str, ...]) -> None:
    """Put :data:`METHODS` in the order ``names`` (methods not named keep their order, after)."""
    ordered = {name: METHODS[name] for name in names if name in METHODS}
    rest = {name: cls for name, cls in METHODS.items() if name not in ordered}
    METHODS.clear()
    METHODS.update(ordered | rest)


def make_method(name: str, **settings: Any) -> PruningMethod:
    """A method by name with settings (e.g. ``make_method("topk", ratio=0.05)``); a one-line
    :class:`~vpstudy.pruning.methods.base.PruningError` for an unknown name or setting."""
    from .methods.base import PruningError

    cls = METHODS.get(name)
    if cls is None:
        raise PruningError(f"unknown pruning method {name!r} (known: {', '.join(METHODS)})")
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise PruningError(f"{name}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return cls(**settings)


@dataclass(frozen=True)
class Entry:
    """One row of the comparison.

    Attributes:
        label: the row's name and run directory (``topk-5``).
        method: the method spec for :func:`~vpstudy.pruning.plan.build_plan` (``topk``,
            ``fastv+visionpulse``, or ``dense``).
        settings: ``--set`` values (strings, as on the command line).
        display: how the report names the row (``fixed top-K, 5%``).
        group: ``dense``, ``step-wise``, ``prefill``, ``encoder`` or ``reference``.
        budget: the per-step budget the row targets (a share of N_v), None if it has none.
        use_rule: give the fitted budget rule to the method (VisionPulse).
        ratio_from: the label of an earlier row whose mean kept fraction becomes this row's
            ``ratio`` (the random control of the same mean budget).
        anchor_setting: the setting that holds the row's anchor layer, if it has one (so a
            comparison at another anchor can move it).
    """

    label: str
    method: str
    settings: dict[str, str] = field(default_factory=dict)
    display: str = ""
    group: str = "step-wise"
    budget: float | None = None
    use_rule: bool = False
    ratio_from: str | None = None
    anchor_setting: str | None = None


def pct(budget: float) -> str:
    """``0.05`` -> ``"5"`` (labels)."""
    return f"{100 * budget:g}"


def ratio_entry(method: str, budget: float, display: str, **fields: Any) -> Entry:
    """The comparison row ``<method>-<pct>`` of a method run with ``ratio`` = ``budget`` (the
    common shape of a method's :meth:`comparison`); ``fields`` set the other :class:`Entry` fields."""
    return Entry(f"{method}-{pct(budget)}", method, {"ratio": str(budget)}, display, budget=budget, **fields)


def comparison_entries(
    n_layers: int,
    *,
    budgets: tuple[float, ...] = COMPARISON_BUDGETS,
    fitted_rule: bool = False,
    methods: tuple[str, ...] | None = None,
) -> list[Entry]:
    """Every row of the comparison: dense, then each registered method's rows at each budget (in
    registration order; a label already present is not repeated), then the fitted VisionPulse
    rule's row if ``fitted_rule``. ``methods`` restricts the rows to those methods."""
    import vpstudy.pruning.methods  # noqa: F401  (registers every method)

    entries = [Entry(DENSE, DENSE, display="dense (all visual tokens)", group="dense")]
    if fitted_rule:
        entries.append(
            Entry(
                "visionpulse-fitted",
                "visionpulse",
                display="VisionPulse, fitted rule",
                use_rule=True,
                anchor_setting="anchor",
            )
        )
    for name, cls in METHODS.items():
        if methods is not None and name not in methods:
            continue
        for budget in budgets:
            entries += cls.comparison(budget, n_layers)
    seen: set[str] = set()
    unique = []
    for entry in entries:
        if entry.label not in seen:
            seen.add(entry.label)
            unique.append(entry)
    return unique


def display_name(label: str, entries: list[Entry]) -> str:
    """The display name of ``label`` among ``entries`` (the label itself if unknown)."""
    return next((e.display for e in entries if e.label == label and e.display), label)
