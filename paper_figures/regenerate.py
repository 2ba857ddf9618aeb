"""Regenerate the project's figures from saved runs and result files; never runs a model.

For every run (default: ``runs/demo/run`` when it exists) it draws the activation figure (mass
over steps with activation maps on the image), mass vs. active count, never-activated ratios,
layer similarity and budget dynamics, reading the statistics from ``RUN/analysis/`` when
``vpstudy analyze`` wrote them; from the benchmark results directory the dense vs. sparse latency
figure; from evaluation comparison tables the accuracy/length vs. retention figure (default:
``runs/demo/compare/comparison.csv`` and ``runs/demo/budget_rule.json`` when they exist). Each
figure is written as PNG and PDF (see :func:`vpstudy.figures.write_figures`). An absent default
input is reported as a skip; a run named on the command line that does not exist, or a malformed
input, is a one-line error (exit status 2).

    python paper_figures/regenerate.py [RUN ...] [--out paper_figures/figures] [--rule RULE.json]
        [--bench bench/results] [--comparison CSV ...] [--layer L]

Default paths are relative to the repository root, so the script can be started from anywhere.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from vpstudy.errors import VpstudyError
from vpstudy.figures import NO_RUN_GIVEN, write_figures

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUN = ROOT / "runs" / "demo" / "run"
DEFAULT_RULE = ROOT / "runs" / "demo" / "budget_rule.json"
DEFAULT_COMPARISON = ROOT / "runs" / "demo" / "compare" / "comparison.csv"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", metavar="RUN", help=f"run directories (default: {DEFAULT_RUN})")
    parser.add_argument("--out", type=Path, default=ROOT / "paper_figures" / "figures", help="output directory")
    parser.add_argument("--rule", type=Path, default=None,
                        help=f"fitted budget rule JSON for the budget figure (default: {DEFAULT_RULE} if it exists)")
    parser.add_argument("--bench", type=Path, default=ROOT / "bench" / "results", help="benchmark results directory")
    parser.add_argument("--comparison", type=Path, nargs="*", default=None, metavar="CSV",
                        help=f"evaluation comparison tables (default: {DEFAULT_COMPARISON} if it exists)")  # fmt: skip
    parser.add_argument("--layer", type=int, default=None,
                        help="layer of the per-layer figures (default: the anchor depth)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Draw the figures; 0 on success, 2 (one line on stderr) on bad input."""
    args = parse_args(argv)
    runs = args.runs or ([DEFAULT_RUN] if DEFAULT_RUN.is_dir() else [])  # named runs must exist
    rule = args.rule if args.rule is not None or not DEFAULT_RULE.is_file() else DEFAULT_RULE
    comparisons = args.comparison if args.comparison is not None else [p for p in (DEFAULT_COMPARISON,) if p.is_file()]
    try:
        report = write_figures(runs, args.out, layer=args.layer, rule=rule, bench_dir=args.bench,
                               comparisons=comparisons, progress=not args.no_progress)  # fmt: skip
    except VpstudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    skipped = [f"run figures skipped: default run {DEFAULT_RUN} not found (run `vpstudy demo`, or name runs)"
               if message == NO_RUN_GIVEN else message for message in report.skipped]  # fmt: skip
    for path in report.written:
        print(f"wrote {path}")
    for message in skipped:
        print(f"skipped: {message}")
    for message in report.notes:
        print(f"note: {message}")
    print(f"{len(report.written)} files in {args.out}, {len(skipped)} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
