"""``vpstudy analyze RUN``: the paper's statistics of a recorded run, written to ``RUN/analysis/``.

Files (one CSV per statistic of :mod:`vpstudy.stats.registry`, whose tables are those of
:mod:`vpstudy.stats.tables`):

- ``stats.json``: settings, the analysis layer, a headline block at that layer, every table
  as records, and what was skipped and why;
- ``correlations.csv`` (layer × δ: Pearson and Spearman r of mass vs. active count, bootstrap
  CI over samples, permutation p), ``never_activated.csv`` (dataset × layer × δ),
  ``step_dependence.csv`` (per layer) and ``step_dependence_curve.csv`` (per step, analysis
  layer), ``layer_similarity.csv`` (L × L), and, where the dataset annotates its traces,
  ``mass_contrast.csv`` and ``localization.csv``.

The *analysis layer* is the recorded layer at VisionPulse's relative anchor depth (17 of 36)
unless one is given: with every layer recorded it is the anchor itself. It is also where the
default store policy keeps p̄ per step (:mod:`vpstudy.storage`); statistics that need p̄ at a
layer the run did not keep are skipped with one line saying what to record instead. The figures read these
files back when they are current (:func:`current_analysis`). Definitions: docs/design.md.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .annotations import AnnotationError, has_annotations, step_annotations
from .datasets import DatasetError, load_dataset
from .runs import Run, open_run
from .stats.registry import StatContext, by_need, describe, get_statistic, statistics
from .stats.tables import AnalysisError, AnalysisSettings, check_arrays, check_layer, check_run, recorded_layers
from .storage import analysis_layer

ANALYSIS_DIR = "analysis"


def default_layer(run: Run) -> int:
    """The recorded layer nearest to the anchor depth of a model with ``max(layers) + 1`` layers
    (:func:`vpstudy.storage.analysis_layer`: the layer the default store policy keeps p̄ at)."""
    return analysis_layer(recorded_layers(run))


def json_safe(value: Any) -> Any:
    """JSON-safe copy of nested dicts/lists: NaN and infinities -> None, numpy scalars -> Python."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _records(table: pd.DataFrame) -> list[dict[str, Any]]:
    return json_safe(table.to_dict(orient="records"))


def run_counts(run: Run) -> dict[str, Any]:
    """What an analysis rests on, as stats.json records it: ``samples`` (count), ``steps``
    (generated steps over all samples, each counted once however many layers were recorded)
    and ``layers`` (the recorded layer indices)."""
    return {
        "samples": len(run.samples),
        "steps": int(run.steps.groupby("sample_id").size().sum() // len(recorded_layers(run))),
        "layers": recorded_layers(run),
    }


def resolve_dataset(run: Run, data: str | Path | None) -> tuple[Any, str | None]:
    """The dataset whose annotations apply to ``run`` (``data`` or the run's own), or
    ``(None, why not)``."""
    path = Path(data) if data is not None else Path(run.manifest.get("dataset", {}).get("path", ""))
    annotated = [s.name for s in (*by_need("annotations"), *by_need("regions"))]
    if not str(path) or not path.exists():
        return None, f"dataset {path} not found: annotated statistics ({describe(annotated, ', ')}) skipped"
    try:
        dataset = load_dataset(path)
    except DatasetError as e:
        if data is not None:
            raise
        return None, f"dataset {path} cannot be read ({e}): annotated statistics skipped"
    if not has_annotations(dataset):
        return None, (
            f"dataset {path} has no trace annotations (trace, token_reads_image): {describe(annotated)} skipped"
        )
    return dataset, None


def analyze(
    run: Run | str | Path,
    *,
    data: str | Path | None = None,
    layer: int | None = None,
    settings: AnalysisSettings = AnalysisSettings(),
    progress: bool = True,
) -> dict[str, Any]:
    """Compute every statistic of the module docstring and write them to ``RUN/analysis/``.

    Args:
        run: an opened run or its directory.
        data: dataset with trace annotations (default: the dataset the run was recorded from).
        layer: analysis layer for the headline block (default: :func:`default_layer`).
        settings: resampling settings.
        progress: show a progress bar.

    Returns:
        The content of ``stats.json``.

    Raises:
        AnalysisError: an empty run, NaN records, a layer that was not recorded.
    """
    run = run if isinstance(run, Run) else open_run(run)
    check_run(run)
    layer = check_layer(run, layer) if layer is not None else default_layer(run)
    check_arrays(run)
    dataset, skipped = resolve_dataset(run, data)
    notes = [skipped] if skipped else []
    annotations = None
    if dataset is not None:
        try:
            annotations = step_annotations(run, dataset)
        except AnnotationError as e:
            if data is not None:
                raise
            notes.append(f"annotations of {dataset.path} do not fit this run ({e}): annotated statistics skipped")
    context = StatContext(run, layer, settings, annotations)
    if annotations is not None and not context.has_regions:
        names = describe([s.name for s in by_need("regions")])
        notes.append(f"dataset {dataset.path} gives no image regions (token_boxes): {names} skipped")

    chosen = [s for s in statistics() if s.available(context)]
    notes += scores_notes(context)
    tables: dict[str, pd.DataFrame] = {}
    for statistic in tqdm(chosen, desc=f"analyze {run.path.name}", unit="table", disable=not progress):
        tables[statistic.name] = statistic.compute(context)

    result = {
        "run": str(run.path),
        "model": run.manifest.get("model"),
        "dataset": str(dataset.path) if dataset is not None else None,
        **run_counts(run),
        "analysis_layer": layer,
        "settings": asdict(settings),
        "skipped": notes,
        "headline": headline(tables, layer),
        "tables": {name: json_safe(get_statistic(name).records(t)) for name, t in tables.items()},
    }
    _write(run.path / ANALYSIS_DIR, result, tables)
    return result


def scores_notes(context: StatContext) -> list[str]:
    """One line per reason, for the statistics whose inputs the context has but whose p̄ the run
    did not keep (their names joined, then what they need and what to record instead)."""
    by_reason: dict[str, list[str]] = {}
    for statistic in statistics():
        note = statistic.scores_note(context) if statistic.inputs_present(context) else None
        if note is not None:
            what = statistic.name.replace("_", " ")
            head, _, reason = note.partition(f"{what} needs ")
            by_reason.setdefault(f"{head}\0{reason}", []).append(statistic.name)
    notes = []
    for key, names in by_reason.items():
        head, reason = key.split("\0")
        verb = "needs" if len(names) == 1 else "need"
        notes.append(f"{head}{describe(names)} {verb} {reason}; skipped")
    return notes


def headline(tables: dict[str, pd.DataFrame], layer: int) -> dict[str, Any]:
    """The numbers a report leads with, at the analysis layer: for every statistic of the
    registry that has a headline and a table here, its headline rows under their keys."""
    out: dict[str, Any] = {"layer": layer}
    for statistic in statistics():
        if statistic.headline is not None and statistic.name in tables:
            out |= {key: _records(rows) for key, rows in statistic.headline(tables[statistic.name], layer).items()}
    return json_safe(out)


def _write(folder: Path, result: dict[str, Any], tables: dict[str, pd.DataFrame]) -> None:
    """Write into a temporary sibling and swap it in, so a failure leaves the old analysis whole."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, table in tables.items():
        get_statistic(name).write(table, tmp)
    (tmp / "stats.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def load_analysis(run_path: str | Path) -> dict[str, Any]:
    """``RUN/analysis/stats.json`` as written by :func:`analyze`."""
    return json.loads((Path(run_path) / ANALYSIS_DIR / "stats.json").read_text(encoding="utf-8"))


def current_analysis(run: Run) -> tuple[dict[str, Any] | None, str | None]:
    """``RUN/analysis/stats.json`` if it was computed on the run as it is now, else why not.

    Returns:
        ``(stats.json content, None)`` when the analysis exists and its sample count, step
        count and recorded layers (:func:`run_counts`) are the run's; ``(None, None)`` when
        there is no analysis; ``(None, reason)`` when it is older than the run (e.g. the run
        was resumed with more samples since).

    Raises:
        AnalysisError: ``stats.json`` exists but cannot be read as JSON.
    """
    path = run.path / ANALYSIS_DIR / "stats.json"
    if not path.is_file():
        return None, None
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AnalysisError(f"{path}: cannot be read as JSON ({e}); rerun vpstudy analyze") from None
    if not isinstance(result, dict):
        raise AnalysisError(f"{path}: not an analysis (a JSON object); rerun vpstudy analyze")
    now = run_counts(run)
    differ = [f"{key} {result.get(key)} vs {value} now" for key, value in now.items() if result.get(key) != value]
    if differ:
        return None, f"{path.parent} is older than the run ({'; '.join(differ)})"
    return result, None
