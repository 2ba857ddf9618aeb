"""Regenerate the project's figures from saved runs and result files; never runs a model.

For every run (default: ``runs/demo/run`` when it exists) it draws the activation figure (mass
over steps with overlays on the image), mass vs. active count, never-activated ratios, budget
dynamics and layer similarity; from the benchmark results directory the dense vs. sparse latency
figure; from evaluation comparison tables the accuracy/length vs. retention figure. Each figure
is written as PNG and PDF (see :func:`vpstudy.figures.write_figures`); an absent input is
reported as a skip.

    python paper_figures/regenerate.py [RUN ...] [--out paper_figures/figures] [--rule RULE.json]
        [--bench bench/results] [--comparison CSV ...] [--layer L]

Default paths are relative to the repository root, so the script can be started from anywhere.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from vpstudy.rules import BudgetRuleError
from vpstudy.figures import FigureInputError, write_figures
from vpstudy.runs import RunStoreError
from vpstudy.stats import AnalysisError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUN = ROOT / "runs" / "demo" / "run"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", metavar="RUN", help=f"run directories (default: {DEFAULT_RUN})")
    parser.add_argument("--out", type=Path, default=ROOT / "paper_figures" / "figures", help="output directory")
    parser.add_argument("--rule", type=Path, default=None, help="fitted budget rule JSON for the budget figure")
    parser.add_argument("--bench", type=Path, default=ROOT / "bench" / "results", help="benchmark results directory")
    parser.add_argument("--comparison", type=Path, nargs="*", default=[], metavar="CSV",
                        help="evaluation comparison tables (comparison.csv)")  # fmt: skip
    parser.add_argument("--layer", type=int, default=None, help="layer of the per-layer figures (default: anchor depth)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    runs = args.runs or [DEFAULT_RUN]  # a missing default run is reported as a skip
    try:
        report = write_figures(runs, args.out, layer=args.layer, rule=args.rule, bench_dir=args.bench,
                               comparisons=args.comparison, progress=not args.no_progress)  # fmt: skip
    except (RunStoreError, AnalysisError, BudgetRuleError, FigureInputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in report.written:
        print(f"wrote {path}")
    for message in report.skipped:
        print(f"skipped: {message}")
    print(f"{len(report.written)} files in {args.out}, {len(report.skipped)} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
