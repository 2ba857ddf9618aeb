"""The ``vpstudy`` command line.

Every command turns a bad input into one line on stderr (``vpstudy <command>: error: ...``)
and exit status 2, without touching existing runs.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .annotations import AnnotationError
from .bench.latency import BenchError
from .bench.latency import add_arguments as add_bench_arguments
from .argtypes import layer_list, positive
from .rules import BudgetRuleError
from .datasets import DatasetError
from .families import UnsupportedFamilyError
from .loading import ModelLoadError
from .organism.model import OrganismError
from .pruning.methods import PruningError
from .scoring import ScoringError
from .processing import InputError
from .recorder import DEFAULT_THRESHOLDS, RecorderError
from .runs import RunStoreError
from .stats.tables import AnalysisError

USER_ERRORS = (OrganismError, DatasetError, UnsupportedFamilyError, ModelLoadError, InputError, RecorderError,
               RunStoreError, AnalysisError, AnnotationError, BudgetRuleError, PruningError, ScoringError,
               BenchError)  # fmt: skip


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


def _analysis_settings(args: argparse.Namespace):  # -> AnalysisSettings
    from .stats.tables import AnalysisSettings

    return AnalysisSettings(n_boot=args.n_boot, n_perm=args.n_perm, seed=args.seed)


def _analyze(args: argparse.Namespace) -> str:
    from .analysis import analyze
    from .report import headline_lines

    result = analyze(args.run_dir, data=args.data, layer=args.layer, settings=_analysis_settings(args))
    lines = headline_lines(result)
    return "\n".join([*lines, *(f"note: {s}" for s in result["skipped"]), f"written to {Path(args.run_dir) / 'analysis'}"])


def _fit_budget(args: argparse.Namespace) -> str:
    from .stats.fit import fit_budget
    from .report import rule_lines
    from .runs import open_run

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise BudgetRuleError(f"{out}: exists; pass --overwrite to replace it")
    rule = fit_budget(open_run(args.run_dir), layer=args.layer, delta=args.delta, signal=args.signal,
                      holdout=args.holdout, seed=args.seed, b_min=args.b_min, b_max=args.b_max)  # fmt: skip
    rule.save(out)
    return "\n".join([*rule_lines(rule), f"rule written to {out} (load it with vpstudy.budget.BudgetRule.load)"])


def _figures(args: argparse.Namespace) -> str:
    from .figures import write_figures

    report = write_figures(args.runs, args.out, layer=args.layer, rule=args.rule, bench_dir=args.bench,
                           comparisons=args.comparison)  # fmt: skip
    lines = [f"wrote {p}" for p in report.written] + [f"skipped: {s}" for s in report.skipped]
    return "\n".join(lines + [f"{len(report.written)} files in {args.out}, {len(report.skipped)} figures skipped"])


def _evaluate(args: argparse.Namespace) -> str:
    from .rules import BudgetRule
    from .collect import RecordSettings
    from .datasets import load_dataset
    from .evaluation import compare, evaluate
    from .loading import load
    from .pruning.plan import build_plan, parse_settings
    from .runs import open_run
    from .scoring import get_scorer

    rule = BudgetRule.load(args.rule) if args.rule else None
    scorer = get_scorer(args.scorer)
    plan = None if args.method == "all" else build_plan(args.method, parse_settings(args.set), rule=rule)
    dense = open_run(args.dense) if args.dense else None
    dataset = load_dataset(args.data, limit=args.limit)
    model, processor = load(args.model, dtype=args.dtype, device=args.device)
    settings = RecordSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed)
    if args.method == "all":
        if args.set:
            raise PruningError("--set does not apply to --method all")
        table = compare(model, processor, dataset, args.out, settings=settings, rule=rule, scorer=scorer,
                        budget=args.budget, model_path=str(args.model))  # fmt: skip
        return (Path(args.out) / "comparison.md").read_text() + f"table: {Path(args.out) / 'comparison.csv'} ({len(table)} methods)"
    result = evaluate(model, processor, dataset, args.out, plan, settings=settings, scorer=scorer, dense=dense,
                      model_path=str(args.model))  # fmt: skip
    line = (f"{result['method']['name']}: accuracy {result['accuracy']:.3f} (95% CI {result['accuracy_ci95'][0]:.3f}-"
            f"{result['accuracy_ci95'][1]:.3f}), mean kept visual {100 * result['kept_fraction']['mean']:.1f}% per step, "
            f"mean length {result['mean_length']:.1f}")  # fmt: skip
    if "agreement" in result:
        line += f", same answer as dense {100 * result['agreement']:.1f}%"
    return line + f"\nrun and eval.json written to {args.out}"


def _demo(args: argparse.Namespace) -> str:
    """record → analyze → fit budget → figures → report.md on the shipped organism."""
    from .demo import DemoSettings, run_demo

    settings = DemoSettings(family=args.family, samples=args.samples, max_new_tokens=args.max_new_tokens,
                            batch_size=args.batch_size, analysis=_analysis_settings(args))  # fmt: skip
    result = run_demo(args.out, settings, command="vpstudy " + shlex.join(args.argv))
    return (
        f"{result.summary}\nreport: {result.report} ({len(result.figures)} figure files, "
        f"{len(result.skipped)} items not produced: see the report)\nrun: {result.run}, budget rule: {result.rule}"
    )


def _train_organism(args: argparse.Namespace) -> str:
    from dataclasses import replace

    from .organism.model import check_family
    from .organism.train import recipe_settings, train

    check_family(args.family)
    base = recipe_settings(args.recipe, args.family)
    given = {k: v for k, v in vars(args).items()
             if k in ("steps", "batch_size", "threads", "eval_every", "probe_weight", "lr", "text_mass_weight",
                      "init_from") and v is not None}  # fmt: skip
    arch = replace(base.arch, **{k: v for k, v in (("text_layers", args.text_layers), ("text_hidden", args.text_hidden))
                                 if v is not None})  # fmt: skip
    settings = recipe_settings(args.recipe, args.family, seed=args.seed, arch=arch, **given)
    manifest = train(settings, args.out, overwrite=args.overwrite)
    val = manifest["final_validation"]
    return (
        f"trained {args.family} organism ({manifest['parameters']:,} parameters, {settings.steps} steps) in "
        f"{manifest['wall_time_s'] / 60:.1f} min; validation answer accuracy {val['answer_acc']:.3f}, "
        f"trace accuracy {val['trace_acc']:.3f}; saved to {args.out} (log: {args.out}/train_log.csv)"
    )


def _bench(args: argparse.Namespace) -> str:
    """The latency benchmark (paper Figure 5): dense vs VisionPulse prefill and decode time."""
    from .bench.latency import merge_command, protocol_from_args, run

    if args.merge:
        result, path = merge_command(args)
        return f"{len(result['rows'])} timed runs of {len(args.merge)} latency results joined into {path}"
    protocol = protocol_from_args(args)
    result, path = run(args, protocol, argv=args.argv, command="vpstudy " + shlex.join(args.argv),
                       progress=not args.no_progress)  # fmt: skip
    contexts = ", ".join(f"{n:,}" for n in protocol.visual_tokens)
    return (f"latency of {', '.join(protocol.methods)} at N_v {contexts} on {result['device']['name']} "
            f"({len(result['rows'])} timed runs) written to {path}; draw it with "
            f"`vpstudy figures RUN... --out DIR --bench {path.parent}`")  # fmt: skip


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (``vpstudy <command>: error: ...``), exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _decoding_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    """How a dataset is decoded: the same flags for ``record`` and ``evaluate``."""
    parser.add_argument("--max-new-tokens", type=positive, default=64)
    parser.add_argument("--batch-size", type=positive, default=1)
    parser.add_argument("--limit", type=positive, default=None, help=f"{verb} only the first N examples")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")


def _resampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n-boot", type=positive, default=1000, help="bootstrap replicates (resampling samples)")
    parser.add_argument("--n-perm", type=positive, default=1000, help="permutations of the correlation p-values")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resampling")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vpstudy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    rec = sub.add_parser("record", help="decode a dataset and record per-step visual attention into a run")
    rec.add_argument("--model", required=True, help="model directory (save_pretrained form)")
    rec.add_argument("--data", required=True, help="dataset: .jsonl, .parquet, or a save_to_disk directory")
    rec.add_argument("--out", required=True, help="run directory (created; an existing run resumes)")
    rec.add_argument("--layers", type=layer_list, default=None, help="text layers to record, e.g. '0,5,17' (default: all)")
    rec.add_argument("--thresholds", nargs="+", default=list(DEFAULT_THRESHOLDS), help="activity thresholds δ")
    _decoding_arguments(rec, "record")
    rec.add_argument("--seed", type=int, default=0, help="torch seed (decoding is greedy; recorded)")
    rec.set_defaults(run=_record)

    org = sub.add_parser("train-organism", help="train the model organism from scratch on CPU (see data/README.md)")
    org.add_argument("--family", required=True, help="organism family: llava or qwen2_vl")
    org.add_argument("--out", required=True, help="output directory (refuses one holding a different model)")
    org.add_argument("--seed", type=int, required=True, help="seed of weights and training data (an integer)")
    org.add_argument("--recipe", default="v1", choices=["v1", "v2"],
                     help="v1: 64 visual tokens, the five v1 question types (the first shipped organisms); v2: 256 "
                          "visual tokens, 8 text layers, text-only arithmetic stretches, the visual-mass lever "
                          "(default: v1)")
    org.add_argument("--steps", type=positive, default=None, help="optimizer steps (default: v1 6000, v2 3000)")
    org.add_argument("--batch-size", type=positive, default=None, help="examples per step (default: 32)")
    org.add_argument("--threads", type=positive, default=None,
                     help="torch CPU threads (default: v1 1, v2 2; part of what makes a run reproducible)")
    org.add_argument("--eval-every", type=positive, default=None, help="decode the validation set every N steps (250)")
    org.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate (default: 1e-3)")
    org.add_argument("--probe-weight", type=float, default=None,
                     help="weight of the training-only patch probe loss on the vision features (default: 1)")
    org.add_argument("--text-mass-weight", type=float, default=None,
                     help="weight of the training-only visual-mass lever on text-only rows (default: v1 0, v2 1)")
    org.add_argument("--init-from", default=None,
                     help="warm-start the text model from this organism directory (e.g. data/organism-llava)")
    org.add_argument("--text-layers", type=positive, default=None,
                     help="text decoder layers (default: the shipped organism's: llava 6, qwen2_vl 4)")
    org.add_argument("--text-hidden", type=positive, default=None, help="text width (default: 128)")
    org.add_argument("--overwrite", action="store_true", help="replace an output directory holding another model")
    org.set_defaults(run=_train_organism)

    ana = sub.add_parser("analyze", help="statistics of a recorded run with uncertainty, into RUN/analysis/")
    ana.add_argument("run_dir", metavar="RUN", help="run directory written by `vpstudy record`")
    ana.add_argument("--data", default=None, help="dataset with trace annotations (default: the run's own dataset)")
    ana.add_argument("--layer", type=int, default=None, help="analysis layer of the headline (default: anchor depth)")
    _resampling_arguments(ana)
    ana.set_defaults(run=_analyze)

    fit = sub.add_parser("fit-budget", help="fit a budget rule (signal -> keep ratio) from a recorded run")
    fit.add_argument("run_dir", metavar="RUN", help="run directory written by `vpstudy record`")
    fit.add_argument("--layer", type=int, required=True, help="anchor layer: where the signal is read")
    fit.add_argument("--delta", required=True, help="activity threshold δ of the target N_act (e.g. 0.001 or 1/Nv)")
    fit.add_argument("--out", required=True, help="rule JSON to write (refuses an existing file unless --overwrite)")
    fit.add_argument("--signal", default="mass", help="mass (default), max_head_mass or max_head_mass@tau=<τ>")
    fit.add_argument("--holdout", type=float, default=0.3, help="share of samples held out to test the rule")
    fit.add_argument("--seed", type=int, default=0, help="seed of the train/held-out split")
    fit.add_argument("--b-min", type=float, default=None, help="lower clamp of the keep ratio (default: fitted)")
    fit.add_argument("--b-max", type=float, default=None, help="upper clamp of the keep ratio (default: fitted)")
    fit.add_argument("--overwrite", action="store_true")
    fit.set_defaults(run=_fit_budget)

    figs = sub.add_parser("figures", help="draw every figure from saved runs and results (no model is run)")
    figs.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    figs.add_argument("--out", required=True, help="output directory for PNG and PDF files")
    figs.add_argument("--layer", type=int, default=None, help="layer of the per-layer figures (default: anchor depth)")
    figs.add_argument("--rule", default=None, help="a fitted budget rule to add to the budget dynamics figure")
    figs.add_argument("--bench", default="bench/results", help="benchmark results directory (latency figure)")
    figs.add_argument("--comparison", nargs="*", default=[], help="evaluation comparison CSVs (accuracy figure)")
    figs.set_defaults(run=_figures)

    ev = sub.add_parser("evaluate", help="decode a dataset with a pruning method; run + eval.json (or --method all)")
    ev.add_argument("--model", required=True, help="model directory (save_pretrained form)")
    ev.add_argument("--data", required=True, help="dataset: .jsonl, .parquet, or a save_to_disk directory")
    ev.add_argument("--method", required=True,
                    help="dense, a method (visionpulse, topk, topp, random, fastv, pyramiddrop, static_topk), "
                         "several joined by + (fastv+visionpulse), or all (the full comparison)")
    ev.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="method settings, e.g. tau=0.4 b_max=0.1 (prefix with the method when composing: fastv.layer=2)")
    ev.add_argument("--rule", default=None, help="a fitted budget rule (JSON) for visionpulse")
    ev.add_argument("--out", required=True, help="run directory (for --method all: a directory of runs)")
    ev.add_argument("--dense", default=None, help="a dense run of the same samples, for agreement and the paired Δ")
    ev.add_argument("--scorer", default="exact_match",
                    help="answer scoring: exact_match, multiple_choice, numeric_tolerance, relaxed_accuracy")
    ev.add_argument("--budget", type=float, default=0.05, help="--method all: visual-token budget of the fixed methods")
    _decoding_arguments(ev, "evaluate")
    ev.add_argument("--seed", type=int, default=0, help="seed of random methods (decoding is greedy)")
    ev.set_defaults(run=_evaluate)

    demo = sub.add_parser("demo", help="the main job on the embedded default (see README)")
    demo.add_argument("--out", default="runs/demo", help="where the demo writes (default: runs/demo)")
    demo.add_argument("--family", default="llava", help="which shipped organism: llava (default) or qwen2_vl")
    demo.add_argument("--samples", type=positive, default=128, help="evaluation examples to record (default: 128)")
    demo.add_argument("--max-new-tokens", type=positive, default=48)
    demo.add_argument("--batch-size", type=positive, default=32)
    _resampling_arguments(demo)
    demo.set_defaults(run=_demo)

    bench = sub.add_parser("bench", help="prefill/decode latency of VisionPulse vs dense (paper Figure 5)",
                           description="Prefill and decode latency of VisionPulse (physical mode) vs dense decoding at "
                                       "long visual contexts, with a memory roofline (bench/README.md). Defaults: the "
                                       "GPU protocol on CUDA, a scaled-down one on CPU (--device cpu).")  # fmt: skip
    add_bench_arguments(bench)
    bench.set_defaults(run=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
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
