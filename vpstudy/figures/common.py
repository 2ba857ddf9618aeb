"""What every figure shares: the error, the report of :func:`~vpstudy.figures.write_figures`,
saving, the per-sample look-ups, the token-grid layout and reading ``RUN/analysis/`` back.

Figures are built without pyplot (``matplotlib.figure.Figure``), so the interactive backend of
a notebook is left alone. Steps, layers and δ: docs/design.md.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from PIL import Image

from ..analysis import ANALYSIS_DIR, current_analysis
from ..datasets import DatasetError, load_dataset
from ..errors import VpstudyError
from ..runs import Run
from ..stats import AnalysisError
from ..stats.registry import get_statistic

DPI = 150
MIN_DEFAULT_STEPS = 12  # the default sample is the first correct one with at least this many steps


class FigureInputError(VpstudyError):
    """An input of a figure (a run, a result file, a table, the output directory) that cannot be
    used; the message names it."""


@dataclass
class FigureReport:
    """What :func:`~vpstudy.figures.write_figures` did.

    Attributes:
        written: every file written (PNG and PDF), in figure order.
        skipped: one message per figure (or part of one) left out because an input is absent.
        notes: what else the reader should know, e.g. an analysis older than its run whose
            tables the figures recomputed instead of reading.
    """

    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def os_reason(error: OSError) -> str:
    """An OSError as a short reason (``Permission denied``), without the path it repeats."""
    return error.strerror or errno.errorcode.get(error.errno or 0, "") or str(error)


def save_figure(figure: Figure, stem: str | Path) -> list[Path]:
    """Save ``figure`` as ``<stem>.png`` (at :data:`DPI`) and ``<stem>.pdf``; returns both paths.

    Raises:
        FigureInputError: a file cannot be written (read-only directory, disk full, ...).
    """
    stem = Path(stem)
    paths = [stem.with_name(f"{stem.name}.png"), stem.with_name(f"{stem.name}.pdf")]
    for path in paths:
        try:
            figure.savefig(path, dpi=DPI)
        except OSError as e:
            raise FigureInputError(f"{path}: cannot be written ({os_reason(e)})") from None
    return paths


def token_label(text: Any) -> str:
    """A generated token as shown in a title: quoted, newlines visible, no mathtext."""
    if not isinstance(text, str):
        return "?"
    return "“" + text.replace("\n", "\\n").replace("$", r"\$") + "”"


def sample_row(run: Run, sample_id: str) -> pd.Series:
    """The ``samples.parquet`` row of ``sample_id``.

    Raises:
        AnalysisError: the run has no such sample.
    """
    rows = run.samples[run.samples["sample_id"] == sample_id]
    if rows.empty:
        raise AnalysisError(f"{run.path}: no sample {sample_id!r} in this run")
    return rows.iloc[0]


def sample_steps(run: Run, sample_id: str, layer: int) -> pd.DataFrame:
    """The steps rows of one sample at one layer, ordered by step."""
    sample_row(run, sample_id)
    table = run.steps[(run.steps["sample_id"] == sample_id) & (run.steps["layer"] == layer)]
    return table.sort_values("step").reset_index(drop=True)


def default_sample(run: Run, min_steps: int = MIN_DEFAULT_STEPS) -> str:
    """The sample the per-sample figures show by default: the first correct one with at least
    ``min_steps`` steps, else the first one."""
    samples = run.samples
    if samples.empty:
        raise AnalysisError(f"{run.path}: the run holds no recorded samples")
    correct = samples["correct"].eq(True) if "correct" in samples else pd.Series(False, index=samples.index)
    good = samples[correct & (samples["steps"] >= min_steps)]
    return str((good if len(good) else samples)["sample_id"].iloc[0])


def run_image(run: Run, sample_id: str) -> Image.Image:
    """The image of ``sample_id``, from the dataset the run was recorded from (its manifest).

    Raises:
        DatasetError: the manifest names no dataset, or the dataset, the example or its image is
            missing or unreadable.
    """
    path = (run.manifest.get("dataset") or {}).get("path")
    if not path:
        raise DatasetError(f"{run.path}: the run's manifest names no dataset")
    example = next((e for e in load_dataset(path) if e.id == sample_id), None)
    if example is None:
        raise DatasetError(f"{path}: no example with id {sample_id!r}")
    return example.image()


def spatial_grid(grid_shape: Sequence[int] | None, n_visual: int) -> tuple[int, int] | None:
    """``(h, w)`` of a grid that lays the ``n_visual`` tokens out on one image, else None.

    Leading 1s are dropped (Qwen's ``[1, h, w]``); a 1-D layout (LLaVA-OneVision AnyRes), several
    frames or crops (``[t > 1, h, w]``) or a grid whose size is not ``n_visual`` give None.
    """
    try:
        dims = [int(d) for d in grid_shape]  # type: ignore[union-attr]
    except (TypeError, ValueError):  # None, NaN: no layout recorded
        return None
    while len(dims) > 2 and dims[0] == 1:
        dims = dims[1:]
    if len(dims) != 2 or dims[0] * dims[1] != n_visual:
        return None
    return dims[0], dims[1]


@dataclass(frozen=True)
class AnalysisTable:
    """A table read back from ``RUN/analysis/`` (see :func:`analysis_table`).

    Attributes:
        table: the table as :meth:`vpstudy.stats.registry.Statistic.read` gives it.
        path: the CSV it came from.
        level: coverage of its intervals (``settings.level`` of ``stats.json``, e.g. 0.95).
    """

    table: pd.DataFrame
    path: Path
    level: float


def note_source(figure: Figure, read: AnalysisTable, what: str) -> None:
    """Say under ``figure`` (right-aligned, small, inside its layout) that ``what`` was read from
    ``read``'s CSV, named relative to its run's parent directory (``run/analysis/x.csv``)."""
    shown = Path(*read.path.parts[-3:]) if len(read.path.parts) >= 3 else read.path
    figure.supxlabel(f"{what} read from {shown} (vpstudy analyze)", x=0.99, ha="right", fontsize=7, color="0.4")


def analysis_table(run: Run, name: str, columns: Sequence[str] = ()) -> AnalysisTable | None:
    """The statistic ``name`` as ``vpstudy analyze`` wrote it for ``run``, or None to recompute.

    None when ``RUN/analysis/stats.json`` or ``<name>.csv`` is absent, or when the analysis is
    older than the run (:func:`vpstudy.analysis.current_analysis`); the figures then compute
    the table themselves.

    Args:
        run: the opened run.
        name: a statistic of :mod:`vpstudy.stats.registry` (e.g. ``"correlations"``).
        columns: columns the figure reads from it.

    Raises:
        AnalysisError: ``stats.json`` or the CSV exists but cannot be read.
        FigureInputError: the CSV lacks one of ``columns``.
    """
    result, _stale = current_analysis(run)
    if result is None:
        return None
    statistic = get_statistic(name)
    folder = run.path / ANALYSIS_DIR
    table = statistic.read(folder)
    if table is None:
        return None
    path = statistic.csv_path(folder)
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise FigureInputError(f"{path}: lacks column(s) {', '.join(missing)}; rerun vpstudy analyze")
    level = float((result.get("settings") or {}).get("level", 0.95))
    return AnalysisTable(table, path, level)
