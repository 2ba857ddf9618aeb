"""The statistics of a run, in one list: what ``vpstudy analyze`` computes and writes, what the
report says about each, and which figure draws it.

Each :class:`Statistic` names its table function (:mod:`vpstudy.stats.tables`), what it needs
(the run alone, the dataset's trace annotations, or annotated image regions; and p̄ per step at
which layers, which the run's store policy may not keep: :mod:`vpstudy.storage`), how its headline
rows are read at the analysis layer, its report lines and findings, and the figure of
:mod:`vpstudy.figures` that draws it. :func:`vpstudy.analysis.analyze`, :mod:`vpstudy.report`
and :func:`vpstudy.figures.write_figures` iterate :func:`statistics`; adding a statistic is its
table function plus one entry in :data:`STATISTICS`.

Files: ``RUN/analysis/<name>.csv`` per statistic (:meth:`Statistic.read` reads one back), and
``stats.json`` with every table under ``tables.<name>`` and the headline rows under
``headline.<key>``. Definitions: docs/design.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from ..annotations import StepAnnotation
from ..runs import Run
from .attribution import attribution_agreement_table, relevant_shift_curve, relevant_shift_table
from .tables import (
    AnalysisError,
    AnalysisSettings,
    correlation_table,
    layer_similarity,
    localization_table,
    mass_contrast_table,
    never_activated_table,
    recorded_layers,
    scores_note,
    step_dependence_curve,
    step_dependence_table,
    think_contrast_table,
)
from .text import fmt_ci, fmt_num, fmt_p, fmt_pct

Needs = Literal["run", "annotations", "regions"]
TEXT_MASS_NOTABLE = 0.05  # mean visual mass of text-only steps the report calls "still carries" (VLMs: ~0)
ScoreNeed = Literal["none", "analysis layer", "a layer", "two layers"]
Headline = dict[str, Any]  # the ``headline`` block of stats.json: key -> list of row dicts


@dataclass(frozen=True)
class StatContext:
    """What a statistic is computed from.

    Attributes:
        run: the opened run.
        layer: the analysis layer (a recorded text-layer index).
        settings: resampling settings shared by every table.
        annotations: the dataset's per-step annotations (None when the dataset has none).
    """

    run: Run
    layer: int
    settings: AnalysisSettings = AnalysisSettings()
    annotations: Sequence[StepAnnotation] | None = None

    @property
    def has_regions(self) -> bool:
        """Whether some annotated step refers to an image region."""
        return self.annotations is not None and any(a.region for a in self.annotations)


@dataclass(frozen=True)
class Statistic:
    """One statistic of a run.

    Attributes:
        name: the table's name: ``RUN/analysis/<name>.csv`` and ``stats.json`` ``tables.<name>``.
        compute: the table from a :class:`StatContext` (one of :mod:`vpstudy.stats.tables`).
        needs: ``"run"`` (the run alone), ``"annotations"`` (the dataset's trace annotations) or
            ``"regions"`` (annotations that refer to image regions).
        when: for a statistic that needs something else (e.g. arrays only some runs hold), whether
            a context has it; replaces ``needs`` when given.
        scores: the p̄ per step it reads: ``"none"`` (the steps table and ``max_scores`` only: every
            store policy), ``"analysis layer"``, ``"a layer"`` (computed at every layer whose p̄ the
            run keeps, one at least) or ``"two layers"``.
        headline: the rows the report leads with, from the table and the analysis layer, as
            ``{headline key: rows}`` (None: not in the headline).
        lines: the report's lines for this statistic, from the ``headline`` block of stats.json.
        findings: plain sentences read off the same block.
        figure: the name of the :mod:`vpstudy.figures` figure that draws it (None: none does).
        index: the name of the table's index, written as the CSV's first column (None: no index).
        labels: columns holding labels that look like numbers or NA (``"0.0010"``, an empty
            dataset name), read back as strings.
    """

    name: str
    compute: Callable[[StatContext], pd.DataFrame]
    needs: Needs = "run"
    when: Callable[[StatContext], bool] | None = None
    scores: ScoreNeed = "none"
    headline: Callable[[pd.DataFrame, int], dict[str, pd.DataFrame]] | None = None
    lines: Callable[[Headline], list[str]] | None = None
    findings: Callable[[Headline], list[str]] | None = None
    figure: str | None = None
    index: str | None = None
    labels: tuple[str, ...] = field(default=())

    def available(self, context: StatContext) -> bool:
        """Whether ``context`` has what this statistic needs (:attr:`when`, else :attr:`needs`;
        and the p̄ of :attr:`scores`)."""
        return self.inputs_present(context) and self.scores_note(context) is None

    def inputs_present(self, context: StatContext) -> bool:
        """Whether ``context`` has the inputs besides p̄ (:attr:`when`, else :attr:`needs`)."""
        if self.when is not None:
            return bool(self.when(context))
        if self.needs == "annotations":
            return context.annotations is not None
        if self.needs == "regions":
            return context.has_regions
        return True

    def scores_note(self, context: StatContext) -> str | None:
        """One line saying that this statistic needs p̄ the run does not keep and what to record
        instead (:func:`~vpstudy.stats.tables.scores_note`); None when it has what it needs."""
        what, run = self.name.replace("_", " "), context.run
        if self.scores == "analysis layer":
            return scores_note(run, what, [context.layer])
        if self.scores == "a layer":  # computed wherever p̄ is kept; with none kept, the analysis layer is the fix
            return scores_note(run, what, [context.layer]) if not run.score_layers else None
        if self.scores == "two layers":
            return scores_note(run, what, recorded_layers(run), at_least=2)
        return None

    def csv_path(self, folder: str | Path) -> Path:
        """``folder/<name>.csv``."""
        return Path(folder) / f"{self.name}.csv"

    def write(self, table: pd.DataFrame, folder: str | Path) -> Path:
        """Write ``table`` to :meth:`csv_path` (with its index when :attr:`index` is set)."""
        path = self.csv_path(folder)
        table.to_csv(path, index=self.index is not None)
        return path

    def records(self, table: pd.DataFrame) -> list[dict[str, Any]]:
        """The table as row dicts (``stats.json``), its index as the first column when it has one."""
        return (table.reset_index() if self.index is not None else table).to_dict(orient="records")

    def read(self, folder: str | Path) -> pd.DataFrame | None:
        """The table as :meth:`write` wrote it into ``folder`` (None when the CSV is absent).

        Label columns come back as strings (an empty dataset name as ``""``), numbers as
        numbers with empty cells as NaN, and the index (if any) as the index.

        Raises:
            AnalysisError: the CSV exists but cannot be read (the message names it).
        """
        path = self.csv_path(folder)
        if not path.is_file():
            return None
        try:
            header = list(pd.read_csv(path, nrows=0).columns)
            labels = [c for c in self.labels if c in header]
            na = {c: ["", "NaN", "nan"] for c in header if c not in labels}
            table = pd.read_csv(path, dtype=dict.fromkeys(labels, str), keep_default_na=False, na_values=na)
        except (OSError, ValueError) as e:
            raise AnalysisError(
                f"{path}: cannot be read as the {self.name} table ({e}); rerun vpstudy analyze"
            ) from None
        if self.index is not None:
            if self.index not in table.columns:
                raise AnalysisError(f"{path}: no '{self.index}' column; rerun vpstudy analyze")
            table = table.set_index(self.index)
        return table


# -- headline readers -------------------------------------------------------------------------


def at_layer(table: pd.DataFrame, layer: int, key: str) -> dict[str, pd.DataFrame]:
    """``{key: the rows of table at layer}``."""
    return {key: table[table["layer"] == layer]}


def _localization_headline(table: pd.DataFrame, layer: int) -> dict[str, pd.DataFrame]:
    """The analysis layer's row, and the row of the best-localizing layer."""
    best = table.loc[[table["localization"].idxmax()]]
    return {"localization": table[table["layer"] == layer], "localization_best": best}


# -- report text --------------------------------------------------------------------------------


def _correlation_lines(h: Headline) -> list[str]:
    return [
        f"mass vs active count at δ={row['delta']}: Pearson r {fmt_ci(row, 'pearson')} "
        f"(p {fmt_p(row['pearson_p'])}), Spearman ρ {fmt_ci(row, 'spearman')} (p {fmt_p(row['spearman_p'])})"
        for row in h.get("correlations", [])
    ]


def _correlation_findings(h: Headline) -> list[str]:
    rows = h.get("correlations", [])
    corr = [r for r in rows if r["pearson"] is not None]
    if not corr:
        return []
    positive = [r["delta"] for r in corr if (r["pearson_low"] or 0) > 0 and (r["pearson_p"] or 1) < 0.05]
    other = [r["delta"] for r in rows if r["delta"] not in positive]
    best = max(corr, key=lambda r: r["pearson"])
    return [
        f"Steps with more visual mass use more visual tokens at δ ∈ {{{', '.join(positive) or 'none'}}} "
        "(Pearson r's interval above 0, permutation p < 0.05)"
        + (f"; not shown at δ ∈ {{{', '.join(other)}}}" if other else "")
        + f". The strongest is r = {fmt_ci(best, 'pearson', 2)} at δ={best['delta']}; "
        "the paper reports 0.82–0.95 on Qwen3-VL-4B-Thinking."
    ]


def _never_lines(h: Headline) -> list[str]:
    return [
        f"never activated at δ={row['delta']} ({row['dataset']}): {fmt_pct(row, 'never_activated')} of visual tokens"
        for row in h.get("never_activated", [])
    ]


def _never_findings(h: Headline) -> list[str]:
    never = h.get("never_activated", [])
    some = [r for r in never if (r["never_activated_low"] or 0) > 0]
    none = [r["delta"] for r in never if r["never_activated_high"] == 0]
    if not some:
        return []
    return [
        "Some visual tokens are never activated over a whole trace: "
        + "; ".join(f"{fmt_pct(r, 'never_activated')} at δ={r['delta']}" for r in some)
        + (f". At δ ∈ {{{', '.join(none)}}} every token is active at some step." if none else ".")
    ]


def _dependence_lines(h: Headline) -> list[str]:
    return [
        f"top-{100 * row['top_k_fraction']:.0f}% set Jaccard: "
        f"consecutive steps {fmt_ci(row, 'jaccard_consecutive')}, against step 0 {fmt_ci(row, 'jaccard_vs_step0')}"
        for row in h.get("step_dependence", [])
    ]


def _dependence_findings(h: Headline) -> list[str]:
    return [
        f"The top-{100 * r['top_k_fraction']:.0f}% visual set changes from step to step: it overlaps the "
        f"previous step's by Jaccard {fmt_ci(r, 'jaccard_consecutive', 2)} and step 0's by "
        f"{fmt_ci(r, 'jaccard_vs_step0', 2)}, where two random sets of that size overlap by "
        f"{fmt_num(r.get('jaccard_chance'), 2)}."
        for r in h.get("step_dependence", [])
    ]


def _contrast_lines(h: Headline) -> list[str]:
    return [
        f"mass on image-reading vs text-only steps: {fmt_num(row['mass_reading'])} vs "
        f"{fmt_num(row['mass_text'])}, ratio {fmt_ci(row, 'ratio', 2)}, AUC {fmt_ci(row, 'auc')}"
        for row in h.get("mass_contrast", [])
    ]


def _contrast_findings(h: Headline) -> list[str]:
    out = []
    for r in h.get("mass_contrast", []):
        more = (r["auc_low"] or 0) > 0.5
        text_mass = r["mass_text"]
        if text_mass is not None and text_mass >= TEXT_MASS_NOTABLE:
            tail = (f", but text-only steps still carry a mean mass of {fmt_num(text_mass, 2)}: in large VLMs text "
                    "steps carry almost none")  # fmt: skip
        else:
            tail = f"; text-only steps carry almost none (mean {fmt_num(text_mass, 4)}), as in large VLMs"
        out.append(
            f"Image-reading steps carry {'more' if more else 'no clearly different'} visual mass than "
            f"text-only steps (ratio {fmt_ci(r, 'ratio', 2)}, AUC {fmt_ci(r, 'auc', 2)}){tail}."
        )
    return out


def _localization_lines(h: Headline) -> list[str]:
    return [
        f"localization {label} ({row['layer']}): {fmt_ci(row, 'localization')} of {row['steps']} steps "
        f"vs chance {fmt_num(row['chance'])}"
        for key, label in (("localization", "at the analysis layer"), ("localization_best", "at its best layer"))
        for row in h.get(key, [])
    ]


def _localization_findings(h: Headline) -> list[str]:
    return [
        f"At layer {r['layer']} the most-attended visual token lies in the region the predicted token refers "
        f"to on {fmt_ci(r, 'localization', 2)} of the steps whose token refers to one "
        f"(chance {fmt_num(r['chance'], 3)})."
        for key in ("localization", "localization_best")
        for r in h.get(key, [])
    ]


def _shift_lines(h: Headline) -> list[str]:
    return [
        f"relevant set shift at layer {row['layer']}: the prefill's top-k set covers {fmt_ci(row, 'coverage')} of "
        f"what a decode step's own top-k set holds; below half on {fmt_pct(row, 'shifted_share')} of the steps"
        for row in h.get("relevant_shift", [])
    ]


def _shift_findings(h: Headline) -> list[str]:
    return [
        f"The relevant visual set moves along the trace: a set chosen once at the prefill holds "
        f"{fmt_ci(r, 'coverage', 2)} of the attention a decode step's own set of that size holds, and less "
        f"than half of it on {fmt_pct(r, 'shifted_share')} of the decode steps (layer {r['layer']})."
        for r in h.get("relevant_shift", [])
    ]


def _attribution_lines(h: Headline) -> list[str]:
    return [
        f"attention vs attribution at layer {row['layer']}: Spearman ρ {fmt_ci(row, 'spearman')}, top-k "
        f"Jaccard {fmt_ci(row, 'top_k_jaccard')} (random sets {fmt_num(row['jaccard_chance'])})"
        for row in h.get("attribution_agreement", [])
    ]


def _has_attribution(context: StatContext) -> bool:
    from ..attribution import load_attribution

    return any(load_attribution(context.run, s) is not None for s in context.run.sample_ids[:1])


# -- the registry ---------------------------------------------------------------------------------


def _think_lines(h: Headline) -> list[str]:
    return [
        f"mass on <think> vs answer steps: {fmt_num(row['mass_think'])} vs {fmt_num(row['mass_answer'])} "
        f"({row['think_steps']} vs {row['answer_steps']} steps), ratio {fmt_ci(row, 'ratio', 2)}, "
        f"AUC {fmt_ci(row, 'auc')}"
        for row in h.get("think_contrast", [])
    ]


def _has_think_steps(context: StatContext) -> bool:
    from ..annotations import has_think_steps

    return has_think_steps(context.run)


def _similarity_frame(context: StatContext) -> pd.DataFrame:
    """:func:`~vpstudy.stats.tables.layer_similarity` as an [L, L] frame: index ``layer``, one
    column per layer (its index as a string)."""
    layers, matrix = layer_similarity(context.run)
    return pd.DataFrame(matrix, index=pd.Index(layers, name="layer"), columns=[str(x) for x in layers])


STATISTICS: tuple[Statistic, ...] = (
    Statistic(
        "correlations",
        lambda c: correlation_table(c.run, c.settings),
        headline=lambda t, layer: at_layer(t, layer, "correlations"),
        lines=_correlation_lines,
        findings=_correlation_findings,
        figure="mass_vs_active",
        labels=("delta",),
    ),
    Statistic(
        "never_activated",
        lambda c: never_activated_table(c.run, c.settings),
        headline=lambda t, layer: at_layer(t, layer, "never_activated"),
        lines=_never_lines,
        findings=_never_findings,
        figure="never_activated",
        labels=("dataset", "delta"),
    ),
    Statistic(
        "step_dependence",
        lambda c: step_dependence_table(c.run, c.settings),
        scores="a layer",
        headline=lambda t, layer: at_layer(t, layer, "step_dependence"),
        lines=_dependence_lines,
        findings=_dependence_findings,
    ),
    Statistic(
        "step_dependence_curve",
        lambda c: step_dependence_curve(c.run, c.layer, c.settings.top_k_fraction),
        scores="analysis layer",
    ),
    Statistic("layer_similarity", _similarity_frame, scores="two layers", figure="layer_similarity", index="layer"),
    Statistic(
        "mass_contrast",
        lambda c: mass_contrast_table(c.run, c.annotations or (), c.settings),
        needs="annotations",
        headline=lambda t, layer: at_layer(t, layer, "mass_contrast"),
        lines=_contrast_lines,
        findings=_contrast_findings,
    ),
    Statistic(
        "think_contrast",
        lambda c: think_contrast_table(c.run, c.settings),
        when=_has_think_steps,
        headline=lambda t, layer: at_layer(t, layer, "think_contrast"),
        lines=_think_lines,
    ),
    Statistic(
        "localization",
        lambda c: localization_table(c.run, c.annotations or (), c.settings),
        needs="regions",
        scores="a layer",
        headline=_localization_headline,
        lines=_localization_lines,
        findings=_localization_findings,
    ),
    Statistic(
        "relevant_shift",
        lambda c: relevant_shift_table(c.run, c.settings),
        scores="a layer",
        headline=lambda t, layer: at_layer(t, layer, "relevant_shift"),
        lines=_shift_lines,
        findings=_shift_findings,
        figure="relevant_shift",
    ),
    Statistic(
        "relevant_shift_curve", lambda c: relevant_shift_curve(c.run, c.layer, c.settings), scores="analysis layer"
    ),
    Statistic(
        "attribution_agreement",
        lambda c: attribution_agreement_table(c.run, c.settings),
        when=_has_attribution,
        scores="a layer",
        headline=lambda t, layer: at_layer(t, layer, "attribution_agreement"),
        lines=_attribution_lines,
        figure="attribution_agreement",
    ),
)
"""Every statistic, in the order analyze computes them and stats.json and the report list them."""


def statistics() -> tuple[Statistic, ...]:
    """The registered statistics, in order (read at call time, so a test may extend the tuple)."""
    return STATISTICS


def get_statistic(name: str) -> Statistic:
    """The statistic called ``name``.

    Raises:
        AnalysisError: no statistic has that name (the message lists them).
    """
    for statistic in statistics():
        if statistic.name == name:
            return statistic
    raise AnalysisError(f"no statistic {name!r} (known: {', '.join(s.name for s in statistics())})")


def by_need(need: Needs) -> list[Statistic]:
    """The statistics that need ``need`` (e.g. ``"annotations"``), in order."""
    return [s for s in statistics() if s.needs == need]


def describe(names: Sequence[str], joiner: str = " and ") -> str:
    """Statistic names as words for a message: ``mass_contrast`` -> ``mass contrast``; the last
    two joined by ``joiner``, the others by commas."""
    words = [n.replace("_", " ") for n in names]
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + joiner + words[-1]
