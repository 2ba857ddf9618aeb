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
from .organism.model import OrganismError
from .processing import InputError
from .recorder import DEFAULT_THRESHOLDS, RecorderError
from .runs import RunStoreError

USER_ERRORS = (OrganismError, DatasetError, UnsupportedFamilyError, ModelLoadError, InputError, RecorderError, RunStoreError)


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
    """Record the shipped organism on its evaluation set (analysis, pruning and figures join it
    as those issues land)."""
    from .collect import RecordSettings, record_dataset, summary_line
    from .datasets import load_dataset
    from .loading import load
    from .organism.shipped import eval_set_path, organism_dir

    model_dir = organism_dir(args.family)
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"{model_dir}: no shipped organism of family {args.family!r} (see data/README.md)")
    model, processor = load(model_dir)
    dataset = load_dataset(eval_set_path(), limit=args.samples)
    settings = RecordSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    run = record_dataset(model, processor, dataset, Path(args.out) / "run", settings, model_path=str(model_dir))
    return summary_line(run) + f"\nrun written to {run.path} (open it with vpstudy.open_run('{run.path}'))"


def _train_organism(args: argparse.Namespace) -> str:
    from .organism.model import Architecture
    from .organism.train import TrainSettings, train

    settings = TrainSettings(
        family=args.family, seed=args.seed, steps=args.steps, batch_size=args.batch_size, threads=args.threads,
        eval_every=args.eval_every, probe_weight=args.probe_weight, lr=args.lr,
        arch=Architecture(text_layers=args.text_layers, text_hidden=args.text_hidden),
    )  # fmt: skip
    manifest = train(settings, args.out, overwrite=args.overwrite)
    val = manifest["final_validation"]
    return (
        f"trained {args.family} organism ({manifest['parameters']:,} parameters, {settings.steps} steps) in "
        f"{manifest['wall_time_s'] / 60:.1f} min; validation answer accuracy {val['answer_acc']:.3f}, "
        f"trace accuracy {val['trace_acc']:.3f}; saved to {args.out} (log: {args.out}/train_log.csv)"
    )


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (``vpstudy <command>: error: ...``), exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vpstudy", description=__doc__.splitlines()[0])
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

    org = sub.add_parser("train-organism", help="train the model organism from scratch on CPU (see data/README.md)")
    org.add_argument("--family", required=True, help="organism family: llava or qwen2_vl")
    org.add_argument("--out", required=True, help="output directory (refuses one holding a different model)")
    org.add_argument("--seed", type=int, required=True, help="seed of weights and training data (an integer)")
    org.add_argument("--steps", type=_positive, default=6000, help="optimizer steps (default: 6000)")
    org.add_argument("--batch-size", type=_positive, default=32)
    org.add_argument("--threads", type=_positive, default=1,
                     help="torch CPU threads (default: 1; part of what makes a run reproducible)")
    org.add_argument("--eval-every", type=_positive, default=250, help="decode the validation set every N steps")
    org.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default: 1e-3)")
    org.add_argument("--probe-weight", type=float, default=1.0,
                     help="weight of the training-only patch probe loss on the vision features (default: 1)")
    org.add_argument("--text-layers", type=_positive, default=4)
    org.add_argument("--text-hidden", type=_positive, default=128)
    org.add_argument("--overwrite", action="store_true", help="replace an output directory holding another model")
    org.set_defaults(run=_train_organism)

    demo = sub.add_parser("demo", help="the main job on the embedded default (see README)")
    demo.add_argument("--out", default="runs/demo", help="where the demo writes (default: runs/demo)")
    demo.add_argument("--family", default="llava", help="which shipped organism: llava (default) or qwen2_vl")
    demo.add_argument("--samples", type=_positive, default=128, help="evaluation examples to record (default: 128)")
    demo.add_argument("--max-new-tokens", type=_positive, default=48)
    demo.add_argument("--batch-size", type=_positive, default=32)
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
