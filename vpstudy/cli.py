"""The ``vpstudy`` command line.

Every command turns a bad input into one line on stderr (``vpstudy <command>: error: ...``)
and exit status 2, without touching existing runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .datasets import DatasetError
from .families import UnsupportedFamilyError
from .loading import ModelLoadError
from .processing import InputError
from .recorder import DEFAULT_THRESHOLDS, RecorderError
from .runs import RunStoreError

USER_ERRORS = (DatasetError, UnsupportedFamilyError, ModelLoadError, InputError, RecorderError, RunStoreError)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _layers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer indices like '0,1,5', got {text!r}") from None


def _record(args: argparse.Namespace) -> str:
    from .collect import RecordSettings, record_dataset, summary_line
    from .datasets import load_dataset
    from .loading import load

    dataset = load_dataset(args.data, limit=args.limit)
    model, processor = load(args.model, dtype=args.dtype, device=args.device)
    settings = RecordSettings(
        layers=args.layers,
        thresholds=args.thresholds,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    run = record_dataset(model, processor, dataset, args.out, settings, model_path=str(args.model))
    return summary_line(run)


def _demo(args: argparse.Namespace) -> str:
    """Interim main job until the trained organism ships: record a tiny random model."""
    from .collect import RecordSettings, record_dataset, summary_line
    from .datasets import load_dataset
    from .loading import load
    from .testing import make_tiny, make_tiny_dataset

    out = Path(args.out)
    model_dir = make_tiny(args.family, out / "model", seed=0)
    data = make_tiny_dataset(out / "data", n=args.samples, seed=0)
    model, processor = load(model_dir)
    settings = RecordSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    run = record_dataset(model, processor, load_dataset(data), out / "run", settings, model_path=str(model_dir))
    return (
        summary_line(run)
        + f"\nrun written to {run.path} (open it with vpstudy.open_run('{run.path}'));"
        + " the demo uses a tiny random model until the trained organism ships"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vpstudy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    rec = sub.add_parser("record", help="decode a dataset and record per-step visual attention into a run")
    rec.add_argument("--model", required=True, help="model directory (save_pretrained form)")
    rec.add_argument("--data", required=True, help="dataset: .jsonl, .parquet, or a save_to_disk directory")
    rec.add_argument("--out", required=True, help="run directory (created; an existing run resumes)")
    rec.add_argument("--layers", type=_layers, default=None, help="text layers to record, e.g. '0,5,17' (default: all)")
    rec.add_argument("--thresholds", nargs="+", default=list(DEFAULT_THRESHOLDS), help="activity thresholds δ")
    rec.add_argument("--max-new-tokens", type=_positive, default=64)
    rec.add_argument("--batch-size", type=_positive, default=1)
    rec.add_argument("--limit", type=_positive, default=None, help="record only the first N examples")
    rec.add_argument("--seed", type=int, default=0, help="torch seed (decoding is greedy; recorded)")
    rec.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    rec.add_argument("--device", default="cpu")
    rec.set_defaults(run=_record)

    demo = sub.add_parser("demo", help="the main job on the embedded default (see README)")
    demo.add_argument("--out", default="runs/demo", help="where the demo writes (default: runs/demo)")
    demo.add_argument("--family", default="qwen2_vl", help="family of the tiny model (default: qwen2_vl)")
    demo.add_argument("--samples", type=_positive, default=16)
    demo.add_argument("--max-new-tokens", type=_positive, default=24)
    demo.add_argument("--batch-size", type=_positive, default=4)
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        message = args.run(args)
    except USER_ERRORS as err:
        print(f"vpstudy {args.command}: error: {err}", file=sys.stderr)
        return 2
    print(f"{message}\n({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
