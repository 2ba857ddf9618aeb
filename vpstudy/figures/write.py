"""``vpstudy figures``: every figure of every run, plus the latency and accuracy figures, into
one directory (:func:`write_figures`).

Per run, in order: the activation figure of each chosen sample, the figure of every statistic
of :mod:`vpstudy.stats.registry` that names one (:data:`STATISTIC_FIGURES`), and the budget
dynamics of each chosen sample. The inputs are checked before anything is written; an input
that is absent (a run's dataset or image, the benchmark results, a comparison table) is a skip;
a run directory that does not exist, an output path that is a file or cannot be written, or a
malformed table or result is a one-line :class:`FigureInputError` (a malformed run or rule: the
run store's or the rule's own one-line error). A figure that needs p̄ at a layer the run's store
policy did not keep (:mod:`vpstudy.storage`: activation overlays, layer similarity, the relevant
set's shift) is skipped with one line saying what to record instead.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from ..analysis import current_analysis, default_layer
from ..annotations import AnnotationError
from ..bench.results import ResultFileError, load_latency_results
from ..datasets import DatasetError
from ..rules import BudgetRule
from ..runs import Run, open_run
from ..stats import check_layer, check_run
from ..stats.registry import StatContext, statistics
from ..stats.tables import MissingScoresError, scores_note
from .accuracy import fig_accuracy_vs_retention, load_comparisons
from .budget import budget_rules, fig_budget_dynamics, top_p_note
from .common import (
    FigureInputError,
    FigureReport,
    default_sample,
    os_reason,
    run_image,
    sample_row,
    save_figure,
    spatial_grid,
)
from .evidence import fig_attribution_agreement, fig_relevant_shift
from .latency import DEFAULT_BENCH_DIR, fig_latency
from .layers import fig_layer_similarity
from .never_activated import fig_never_activated
from .overlays import fig_mass_over_steps, sample_regions
from .scatter import fig_mass_vs_active


def _layer_similarity(run: Run, layer: int) -> Figure:
    """:func:`fig_layer_similarity` (every layer; ``layer`` is not used)."""
    return fig_layer_similarity(run)


STATISTIC_FIGURES: dict[str, Callable[[Run, int], Figure]] = {
    "mass_vs_active": fig_mass_vs_active,
    "never_activated": fig_never_activated,
    "layer_similarity": _layer_similarity,
    "relevant_shift": fig_relevant_shift,
    "attribution_agreement": fig_attribution_agreement,
}
"""The figure a statistic names (``Statistic.figure``) -> how to draw it from a run at a layer."""


NO_RUN_GIVEN = "run figures skipped: no run given"


class _Skip(Exception):
    """A figure that cannot be drawn because an input is absent; the message says which."""


Job = tuple[str, Callable[[], Figure]]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "x"


def _run_labels(paths: Sequence[Path]) -> list[str]:
    """File-name prefix of each run: its directory name, made unique when several share it."""
    if len(paths) <= 1:
        return [""] * len(paths)
    names = [_safe(p.name) for p in paths]
    if len(set(names)) < len(names):
        names = [_safe(f"{p.parent.name}-{p.name}") for p in paths]
    if len(set(names)) < len(names):
        names = [f"{i}-{n}" for i, n in enumerate(names)]
    return [f"{n}-" for n in names]


def _draw_mass_over_steps(run: Run, sample_id: str, layer: int, notes: list[str]) -> Figure:
    """:func:`fig_mass_over_steps` of one sample with the annotated regions of its steps, or a
    skip when its image or layout is absent."""
    where = f"mass_over_steps of {run.path} (sample {sample_id}) skipped"
    missing = scores_note(run, "its activation overlays", [layer])
    if missing is not None:
        raise _Skip(f"{where}: {missing.removeprefix(f'{run.path}: ')}")
    sample = sample_row(run, sample_id)
    grid = sample.get("grid_shape")
    if spatial_grid(grid, int(sample["n_visual"])) is None:
        shown = [int(d) for d in grid] if isinstance(grid, Sequence | np.ndarray) else grid
        raise _Skip(f"{where}: grid shape {shown} does not lay its visual tokens out on one image")
    try:
        image = run_image(run, sample_id)
    except DatasetError as e:
        raise _Skip(f"{where}: image not available ({e})") from None
    try:
        regions = sample_regions(run, sample_id)
    except (DatasetError, AnnotationError) as e:
        notes.append(f"mass_over_steps of {run.path} (sample {sample_id}): regions not outlined ({e})")
        regions = {}
    return fig_mass_over_steps(run, sample_id, image, layer=layer, regions=regions)


def _run_jobs(
    run: Run,
    prefix: str,
    layer: int | None,
    fitted: BudgetRule | None,
    samples: Sequence[str] | None,
    report: FigureReport,
) -> list[Job]:
    """The figures of one run, in figure order; the report collects what is left out."""
    check_run(run)
    layer = check_layer(run, layer) if layer is not None else default_layer(run)
    _, stale = current_analysis(run)
    if stale:
        report.notes.append(
            f"{stale}: its figures computed their statistics from the run instead "
            "(rerun vpstudy analyze to refresh the analysis)"
        )
    if samples is None:
        chosen, suffix = [default_sample(run)], {}
    else:
        known = set(run.sample_ids)
        chosen = [s for s in samples if s in known]
        report.skipped += [
            f"per-sample figures of {run.path}: no sample {s!r} in this run" for s in samples if s not in known
        ]
        suffix = {s: f"-{_safe(s)}" for s in chosen}
    jobs: list[Job] = [
        (f"{prefix}mass_over_steps{suffix.get(s, '')}", partial(_draw_mass_over_steps, run, s, layer, report.notes))
        for s in chosen
    ]
    for statistic in statistics():
        if statistic.figure is None:
            continue
        if statistic.when is not None and not statistic.when(StatContext(run, layer)):
            report.skipped.append(f"{prefix}{statistic.figure} skipped: the run lacks what {statistic.name} needs")
            continue
        missing = statistic.scores_note(StatContext(run, layer))
        if missing is not None:
            report.skipped.append(f"{prefix}{statistic.figure} skipped: {missing}")
            continue
        if statistic.figure not in STATISTIC_FIGURES:
            raise KeyError(
                f"statistic {statistic.name!r} names figure {statistic.figure!r}, which "
                "vpstudy.figures.STATISTIC_FIGURES does not draw"
            )
        jobs.append((f"{prefix}{statistic.figure}", partial(STATISTIC_FIGURES[statistic.figure], run, layer)))
    if run.manifest.get("method"):
        report.skipped.append(
            f"budget_dynamics of {run.path} skipped: it needs a dense run, this one was pruned "
            f"({run.manifest['method']})"
        )
    else:
        # at the fitted rule's layer (its anchor) when the run recorded it, else the analysis layer
        rule_layer = fitted.layer if fitted is not None else None
        at = rule_layer if rule_layer is not None and rule_layer in run.manifest["layers"] else layer
        rules = budget_rules(run, at, fitted, report.skipped)
        if (missing := top_p_note(run, at)) is not None:
            report.notes.append(f"{prefix}budget_dynamics drawn without top-p: {missing}")
        jobs += [
            (f"{prefix}budget_dynamics{suffix.get(s, '')}", partial(fig_budget_dynamics, run, s, at, rules=rules))
            for s in chosen
        ]
    return jobs


def _latency_jobs(bench_dir: str | Path | None, notes: list[str]) -> list[Job]:
    if bench_dir is None:
        notes.append("latency skipped: no benchmark results directory given")
        return []
    if not Path(bench_dir).is_dir():
        notes.append(f"latency skipped: benchmark results directory {bench_dir} not found")
        return []
    try:
        results = load_latency_results(bench_dir)
    except ResultFileError as e:
        raise FigureInputError(str(e)) from None
    if not results:
        notes.append(f'latency skipped: no latency results (JSON with "kind": "latency") in {bench_dir}')
    names = ["latency"] if len(results) == 1 else [f"latency-{_safe(r.path.stem)}" for r in results]
    return [(name, partial(fig_latency, result)) for name, result in zip(names, results, strict=True)]


def _comparison_jobs(comparisons: Sequence[str | Path], notes: list[str]) -> list[Job]:
    present = [Path(p) for p in comparisons if Path(p).is_file()]
    notes += [f"accuracy_vs_retention: comparison table {p} not found" for p in comparisons if not Path(p).is_file()]
    table = load_comparisons(present)
    if table.empty:
        notes.append("accuracy_vs_retention skipped: no evaluation comparison table (comparison.csv) with rows given")
        return []
    return [("accuracy_vs_retention", partial(fig_accuracy_vs_retention, table))]


def _check_out(out: Path) -> None:
    """Refuse an output path that exists and is not a directory (before anything is drawn)."""
    if out.exists() and not out.is_dir():
        raise FigureInputError(f"{out}: exists and is not a directory (the figures need an output directory)")


def _prepare_out(out: Path) -> None:
    """Create ``out`` and check that a file can be written there.

    Raises:
        FigureInputError: the directory cannot be created or written (read-only, a parent that
            is a file, ...).
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".vpstudy-write-check-", dir=out)
        os.close(handle)
        os.unlink(probe)
    except OSError as e:
        raise FigureInputError(f"{out}: cannot write figures there ({os_reason(e)})") from None


def write_figures(
    runs: Sequence[str | Path] | str | Path,
    out: str | Path,
    *,
    layer: int | None = None,
    rule: str | Path | None = None,
    bench_dir: str | Path | None = DEFAULT_BENCH_DIR,
    comparisons: Sequence[str | Path] = (),
    samples: Sequence[str] | None = None,
    progress: bool = True,
) -> FigureReport:
    """Draw every figure for every run, plus the latency and accuracy figures, into ``out``.

    The runs (and their ``analysis/stats.json``), the rule, the comparison tables and the
    latency results are checked before the output directory is created or a file written. A
    figure of a statistic reads its table from ``RUN/analysis/`` when that is current.

    Args:
        runs: run directories (each must exist); with several, file names start with the run
            directory's name.
        out: output directory (created); each figure is ``<name>.png`` and ``<name>.pdf``.
        layer: layer of the per-layer figures (default: :func:`vpstudy.analysis.default_layer`).
        rule: a fitted budget rule JSON, added to the budget dynamics figure.
        bench_dir: directory of benchmark JSON files (:func:`~vpstudy.bench.results.load_latency_results`).
        comparisons: evaluation ``comparison.csv`` files (:func:`~vpstudy.figures.load_comparisons`).
        samples: samples of the per-sample figures (names get ``-<sample id>``); default one per
            run, :func:`~vpstudy.figures.default_sample`.
        progress: show a progress bar.

    Returns:
        The files written; one message per figure (or part of one) left out because an input
        is absent: the run's dataset or image, a sample, the rule file, the benchmark results,
        a comparison table; and notes (e.g. an analysis older than its run, not read). Nothing
        is written outside ``out``.

    Raises:
        FigureInputError: a run directory that does not exist, ``out`` that is a file or cannot
            be written, a malformed comparison table or latency result.
        RunStoreError / AnalysisError / BudgetRuleError: a run, analysis or rule file that exists
            but is malformed (e.g. an empty run), or a ``layer`` the run did not record.
    """
    out = Path(out)
    _check_out(out)
    paths = [Path(runs)] if isinstance(runs, str | Path) else [Path(r) for r in runs]
    missing = [p for p in paths if not p.is_dir()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FigureInputError(f"{missing[0]}: no such run directory{more}")
    report = FigureReport()
    fitted = None
    if rule is not None:
        if Path(rule).is_file():
            fitted = BudgetRule.load(rule)
        else:
            report.skipped.append(f"budget_dynamics: budget rule {rule} not found; only the paper's rule is drawn")
    jobs: list[Job] = []
    for path, prefix in zip(paths, _run_labels(paths), strict=True):
        jobs += _run_jobs(open_run(path), prefix, layer, fitted, samples, report)
    if not paths:
        report.skipped.append(NO_RUN_GIVEN)
    jobs += _latency_jobs(bench_dir, report.skipped)
    jobs += _comparison_jobs(comparisons, report.skipped)
    _prepare_out(out)
    for name, draw in tqdm(jobs, desc="figures", unit="figure", disable=not progress):
        try:
            figure = draw()
        except _Skip as e:
            report.skipped.append(str(e))
            continue
        except MissingScoresError as e:  # a figure's own need for p̄ at a layer the run did not keep
            report.skipped.append(f"{name} skipped: {e}")
            continue
        report.written += save_figure(figure, out / name)
    return report
