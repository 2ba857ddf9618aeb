"""``vpstudy analyze RUN``: the paper's statistics of a recorded run, written to ``RUN/analysis/``.

Files (the tables are those of :mod:`vpstudy.stats.tables`, one CSV each):

- ``stats.json``: settings, the analysis layer, a headline block at that layer, every table
  as records, and what was skipped and why;
- ``correlations.csv`` (layer × δ: Pearson and Spearman r of mass vs. active count, bootstrap
  CI over samples, permutation p), ``never_activated.csv`` (dataset × layer × δ),
  ``step_dependence.csv`` (per layer) and ``step_dependence_curve.csv`` (per step, analysis
  layer), ``layer_similarity.csv`` (L × L), and, where the dataset annotates its traces,
  ``mass_contrast.csv`` and ``localization.csv``.

The *analysis layer* is the recorded layer at VisionPulse's relative anchor depth (17 of 36)
unless one is given: with every layer recorded it is the anchor itself.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .annotations import AnnotationError, has_annotations, step_annotations
from .rules import anchor_layer
from .datasets import DatasetError, load_dataset
from .runs import Run, open_run
from .stats.tables import (
    AnalysisSettings,
    check_arrays,
    check_layer,
    check_run,
    correlation_table,
    layer_similarity,
    localization_table,
    mass_contrast_table,
    never_activated_table,
    recorded_layers,
    step_dependence_curve,
    step_dependence_table,
)

ANALYSIS_DIR = "analysis"


def default_layer(run: Run) -> int:
    """The recorded layer nearest to the anchor depth of a model with ``max(layers) + 1`` layers."""
    layers = recorded_layers(run)
    target = anchor_layer(max(layers) + 1)
    return min(layers, key=lambda layer: (abs(layer - target), layer))


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


def resolve_dataset(run: Run, data: str | Path | None) -> tuple[Any, str | None]:
    """The dataset whose annotations apply to ``run`` (``data`` or the run's own), or
    ``(None, why not)``."""
    path = Path(data) if data is not None else Path(run.manifest.get("dataset", {}).get("path", ""))
    if not str(path) or not path.exists():
        return None, f"dataset {path} not found: annotated statistics (mass contrast, localization) skipped"
    try:
        dataset = load_dataset(path)
    except DatasetError as e:
        if data is not None:
            raise
        return None, f"dataset {path} cannot be read ({e}): annotated statistics skipped"
    if not has_annotations(dataset):
        return None, f"dataset {path} has no trace annotations (trace, token_reads_image): mass contrast and localization skipped"  # fmt: skip
    return dataset, None


def analyze(run: Run | str | Path, *, data: str | Path | None = None, layer: int | None = None,
            settings: AnalysisSettings = AnalysisSettings(), progress: bool = True) -> dict[str, Any]:  # fmt: skip
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
    has_regions = annotations is not None and any(a.region for a in annotations)
    if annotations is not None and not has_regions:
        notes.append(f"dataset {dataset.path} gives no image regions (token_boxes): localization skipped")

    tasks: list[tuple[str, Callable[[], Any]]] = [
        ("correlations", lambda: correlation_table(run, settings)),
        ("never_activated", lambda: never_activated_table(run, settings)),
        ("step_dependence", lambda: step_dependence_table(run, settings)),
        ("step_dependence_curve", lambda: step_dependence_curve(run, layer, settings.top_k_fraction)),
        ("layer_similarity", lambda: layer_similarity(run)),
    ]
    if annotations is not None:
        tasks.append(("mass_contrast", lambda: mass_contrast_table(run, annotations, settings)))
    if has_regions:
        tasks.append(("localization", lambda: localization_table(run, annotations, settings)))

    tables: dict[str, pd.DataFrame] = {}
    for name, compute in tqdm(tasks, desc=f"analyze {run.path.name}", unit="table", disable=not progress):
        if name == "layer_similarity":
            layers, matrix = compute()
            tables[name] = pd.DataFrame(matrix, index=pd.Index(layers, name="layer"), columns=[str(x) for x in layers])
        else:
            tables[name] = compute()

    result = {
        "run": str(run.path),
        "model": run.manifest.get("model"),
        "dataset": str(dataset.path) if dataset is not None else None,
        "samples": len(run.samples),
        "steps": int(run.steps.groupby("sample_id").size().sum() // len(recorded_layers(run))),
        "layers": recorded_layers(run),
        "analysis_layer": layer,
        "settings": asdict(settings),
        "skipped": notes,
        "headline": headline(tables, layer),
        "tables": {
            name: (_records(t.reset_index()) if name == "layer_similarity" else _records(t)) for name, t in tables.items()
        },
    }
    _write(run.path / ANALYSIS_DIR, result, tables)
    return result


def headline(tables: dict[str, pd.DataFrame], layer: int) -> dict[str, Any]:
    """The numbers a report leads with, at the analysis layer."""
    out: dict[str, Any] = {"layer": layer}
    corr = tables["correlations"]
    out["correlations"] = _records(corr[corr["layer"] == layer])
    never = tables["never_activated"]
    out["never_activated"] = _records(never[never["layer"] == layer])
    dep = tables["step_dependence"]
    out["step_dependence"] = _records(dep[dep["layer"] == layer])
    if "mass_contrast" in tables:
        contrast = tables["mass_contrast"]
        out["mass_contrast"] = _records(contrast[contrast["layer"] == layer])
    if "localization" in tables:
        loc = tables["localization"]
        out["localization"] = _records(loc[loc["layer"] == layer])
        out["localization_best"] = _records(loc.loc[[loc["localization"].idxmax()]])
    return json_safe(out)


def _write(folder: Path, result: dict[str, Any], tables: dict[str, pd.DataFrame]) -> None:
    """Write into a temporary sibling and swap it in, so a failure leaves the old analysis whole."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, table in tables.items():
        table.to_csv(tmp / f"{name}.csv", index=name == "layer_similarity")
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
