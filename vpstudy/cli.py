"""The ``vpstudy`` command line.

Every command turns a user mistake into one line on stderr (``vpstudy <command>: error: ...``)
and exit status 2: every :class:`~vpstudy.errors.VpstudyError` (bad input or settings), and
OS errors (permission denied, a read-only or full disk, a path below a file) with what to do.
Settings, paths and inputs are checked before anything is written, and existing runs are
never damaged. Ctrl-C prints one line (for ``record`` and ``evaluate``: the committed samples
are intact and rerunning the same command resumes) and exits with status 130.

``record`` and ``evaluate`` also run as ranks of ``torchrun --nproc-per-node N -m vpstudy ...`` or
``accelerate launch --num_processes N -m vpstudy ...`` (:mod:`vpstudy.distributed`): each rank
records its shard on its own GPU (``--device cuda`` is ``cuda:LOCAL_RANK``), rank 0 merges and
alone prints the summary.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from .argtypes import (
    device,
    layer_list,
    non_negative,
    non_negative_number,
    positive,
    positive_number,
    ratio,
    resamples,  # fmt: skip
    seed,
    share,
    threshold,
)
from .attribution import AttributionError
from .bench.latency import add_arguments as add_bench_arguments
from .benchmarks import REGISTRY as BENCHMARKS
from .datasets import DatasetError
from .errors import VpstudyError, VpstudyWarning, os_error_message
from .pruning.methods import PruningError
from .pruning.registry import METHODS
from .recorder import DEFAULT_THRESHOLDS
from .rules import BudgetRuleError
from .scoring import SCORERS

DATA_HELP = ("dataset: .jsonl, .parquet, a save_to_disk directory, or a Hugging Face id org/name[:config]:split "
             "(e.g. lmms-lab/ChartQA:test)")
BENCHMARK_HELP = (f"read --data with this benchmark's adapter ({', '.join(sorted(BENCHMARKS))}); default: recognised "
                  "from the hub id or the columns")


def _store_policy(args: argparse.Namespace):  # -> StorePolicy
    """``record``/``evaluate``: the store policy of ``--store``, ``--score-layers`` and
    ``--chunk-steps`` (a one-line StorePolicyError before anything is loaded)."""
    from .storage import StorePolicy

    return StorePolicy(args.store, tuple(args.score_layers or ()), args.chunk_steps)


def _record(args: argparse.Namespace) -> str:
    from .collect import RecordSettings, record_dataset, summary_line
    store = _store_policy(args)
    dataset = _checked_inputs(args)
    model, processor = _load_model(args)
    settings = RecordSettings(
        layers=args.layers,
        thresholds=args.thresholds,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        cache=args.cache,
        sampling=_sampling(args, model),
        repeats=args.repeats,
        store=store,
    )
    run = record_dataset(model, processor, dataset, args.out, settings, model_path=str(args.model),
                         progress=not args.no_progress, estimate_size=True)  # fmt: skip
    return summary_line(run)


def _checked_inputs(args: argparse.Namespace):  # -> VisionDataset
    """``record``/``evaluate``: check the model directory (or that a hub id can be read), the
    launch (a world size that matches existing shards), the sampling flags, the output path,
    the dataset and that its images exist, before the model is loaded or anything is written;
    return the dataset."""
    from .datasets import load_dataset
    from .distributed import check_world_size, launch
    from .loading import check_model_dir
    from .runs import check_output_path
    from .sampling import SamplingError

    check_model_dir(args.model)
    if not (args.command == "evaluate" and args.method == "all"):  # there, each row's run is checked as it starts
        check_world_size(args.out, launch().world_size)
    if args.repeats > 1 and not _samples(args):
        raise SamplingError(f"--repeats {args.repeats} decodes each example {args.repeats} times, and greedy decoding "
                            "makes the repeats identical; add --sample or --paper-sampling")  # fmt: skip
    if args.device_map is not None and args.device != "cpu":
        from .loading import ModelLoadError

        raise ModelLoadError(f"--device-map {args.device_map} places the model on the devices itself; leave out "
                             f"--device {args.device}")  # fmt: skip
    check_output_path(args.out, run=not (args.command == "evaluate" and args.method == "all"))  # else: runs in it
    dataset = load_dataset(args.data, limit=args.limit, benchmark=args.benchmark)
    if hasattr(dataset, "check_images"):
        dataset.check_images()
    return dataset


def _samples(args: argparse.Namespace) -> bool:
    """Whether the decoding flags ask for sampling."""
    return bool(args.sample or args.paper_sampling or any(v is not None for v in (args.temperature, args.top_p,
                                                                                   args.top_k)))  # fmt: skip


def _sampling(args: argparse.Namespace, model):  # -> Sampling | None
    """The sampling settings of ``record``/``evaluate``: None (greedy) unless asked; the paper's
    preset with ``--paper-sampling``, else the model's generation config; then the given flags."""
    from dataclasses import replace

    from .sampling import Sampling

    if not _samples(args):
        return None
    base = Sampling.paper() if args.paper_sampling else Sampling.from_generation_config(model.generation_config)
    given = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p), ("top_k", args.top_k))
             if v is not None}  # fmt: skip
    return replace(base, **given)


def _load_model(args: argparse.Namespace):  # -> tuple[model, processor]
    """``record``/``evaluate``: load ``--model`` with ``--dtype`` on ``--device`` (under a launcher,
    ``cuda`` is the rank's own ``cuda:LOCAL_RANK``), or placed by ``--device-map`` (each rank of a
    node on its own GPUs)."""
    from .devices import rank_max_memory
    from .distributed import launch
    from .loading import load

    info = launch()
    if args.device_map is not None:
        max_memory = rank_max_memory(info.local_rank, info.local_world_size) if info.distributed else None
        return load(args.model, dtype=args.dtype, device_map=args.device_map, max_memory=max_memory)
    device = f"cuda:{info.local_rank}" if info.distributed and args.device == "cuda" else args.device
    return load(args.model, dtype=args.dtype, device=device)


def _analysis_settings(args: argparse.Namespace):  # -> AnalysisSettings
    from .stats.tables import AnalysisSettings

    return AnalysisSettings(n_boot=args.n_boot, n_perm=args.n_perm, seed=args.seed)


def _analyze(args: argparse.Namespace) -> str:
    from .analysis import analyze
    from .report import headline_lines
    from .runs import check_output_path

    if args.data is not None and not Path(args.data).exists():
        raise DatasetError(f"--data {args.data}: no such file or directory (the dataset with trace annotations)")
    if Path(args.run_dir).is_dir():
        check_output_path(Path(args.run_dir) / "analysis", option="RUN")
    result = analyze(args.run_dir, data=args.data, layer=args.layer, settings=_analysis_settings(args))
    lines = headline_lines(result)
    notes = [f"note: {s}" for s in result["skipped"]]
    return "\n".join([*lines, *notes, f"written to {Path(args.run_dir) / 'analysis'}"])


def _fit_budget(args: argparse.Namespace) -> str:
    from .report import rule_lines
    from .runs import check_output_path, open_run
    from .stats.fit import anchor_layers, fit_budget

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise BudgetRuleError(f"{out}: exists; pass --overwrite to replace it")
    check_output_path(out, kind="file")
    if args.b_min is not None and args.b_max is not None and args.b_min > args.b_max:
        raise BudgetRuleError(f"--b-min {args.b_min:g} is above --b-max {args.b_max:g}; the clamps need b_min <= b_max")
    run = open_run(args.run_dir)
    layer = args.layer if args.layer == "auto" else int(args.layer)
    if layer == "auto":
        anchor_layers(run)  # the one line saying what to record, before the localization evidence is read
    localization = _layer_localization(run, args.data) if layer == "auto" else None
    rule = fit_budget(run, layer=layer, delta=args.delta, signal=args.signal, holdout=args.holdout, seed=args.seed,
                      b_min=args.b_min, b_max=args.b_max, anchor_budget=args.anchor_budget,
                      localization=localization)  # fmt: skip
    rule.save(out)
    return "\n".join([*rule_lines(rule), f"rule written to {out} (load it with vpstudy.BudgetRule.load)"])


def anchor_choice(text: str) -> str | int:
    """``auto`` or a layer index (argparse type of ``fit-budget --layer``)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a layer index or 'auto', got {text!r}") from None


def _layer_localization(run, data: str | None) -> dict[int, float] | None:
    """Localization per layer where the run's dataset annotates its traces (for the evidence of
    ``--layer auto``); None without annotations."""
    from .analysis import resolve_dataset
    from .annotations import has_annotations, step_annotations
    from .stats.tables import AnalysisSettings, localization_table

    dataset, _ = resolve_dataset(run, data)
    if dataset is None or not has_annotations(dataset):
        return None
    table = localization_table(run, step_annotations(run, dataset), AnalysisSettings(n_boot=20))
    return {int(r["layer"]): float(r["localization"]) for r in table.to_dict(orient="records")}


def _figures(args: argparse.Namespace) -> str:
    from .figures import write_figures

    report = write_figures(args.runs, args.out, layer=args.layer, rule=args.rule, bench_dir=args.bench,
                           comparisons=args.comparison)  # fmt: skip
    lines = [f"wrote {p}" for p in report.written] + [f"skipped: {s}" for s in report.skipped]
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines + [f"{len(report.written)} files in {args.out}, {len(report.skipped)} figures skipped"])


def _evaluate(args: argparse.Namespace) -> str:
    from .collect import RecordSettings
    from .evaluation import compare, evaluate
    from .pruning.plan import build_plan, parse_settings
    from .rules import BudgetRule
    from .runs import open_run
    from .scoring import get_scorer

    if args.method == "all" and args.set:
        raise PruningError("--set does not apply to --method all")
    rule = BudgetRule.load(args.rule) if args.rule else None
    scorer = get_scorer(args.scorer) if args.scorer else None  # None: the benchmark's scorer, else exact match
    plan = None if args.method == "all" else build_plan(args.method, parse_settings(args.set), rule=rule)
    dense = open_run(args.dense) if args.dense else None
    store = _store_policy(args)
    dataset = _checked_inputs(args)
    if dense is not None and hasattr(dataset, "fingerprint"):
        from .collect import dataset_difference
        from .runs import RunStoreError

        other = dataset_difference(dense.manifest, {"path": str(dataset.path), "fingerprint": dataset.fingerprint()})
        if other:
            raise RunStoreError(f"--dense {args.dense}: was recorded from {other}; pass a dense run of this dataset")
    model, processor = _load_model(args)
    settings = RecordSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                              cache=args.cache, sampling=_sampling(args, model), repeats=args.repeats,
                              store=store)  # fmt: skip
    if args.method == "all":
        table = compare(model, processor, dataset, args.out, settings=settings, rule=rule, scorer=scorer,
                        budgets=tuple(args.budgets), anchor=args.anchor, model_path=str(args.model),
                        progress=not args.no_progress)  # fmt: skip
        table_file = Path(args.out) / "comparison.csv"
        return (Path(args.out) / "comparison.md").read_text() + f"table: {table_file} ({len(table)} methods)"
    result = evaluate(model, processor, dataset, args.out, plan, settings=settings, scorer=scorer, dense=dense,
                      model_path=str(args.model), progress=not args.no_progress)  # fmt: skip
    low, high = result["accuracy_ci95"]
    accuracy = (result.get("judge") or "no scored sample" if result["accuracy"] is None
                else f"accuracy {result['accuracy']:.3f} (95% CI {low:.3f}-{high:.3f})")  # fmt: skip
    line = (f"{result['method']['name']}: {accuracy}, mean kept visual {100 * result['kept_fraction']['mean']:.1f}% "
            f"per step, mean length {result['mean_length']:.1f}")  # fmt: skip
    if "agreement" in result:
        line += f", same answer as dense {100 * result['agreement']:.1f}%"
    return line + f"\nrun and eval.json written to {args.out}"


def _demo(args: argparse.Namespace) -> str:
    """Record → analyze → fit budget → figures → report.md on the shipped organism."""
    from .demo import DemoSettings, run_demo
    from .runs import check_output_path

    check_output_path(args.out)
    settings = DemoSettings(family=args.family, version=args.organism, samples=args.samples,
                            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                            analysis=_analysis_settings(args))  # fmt: skip
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
    sizes = (("text_layers", args.text_layers), ("text_hidden", args.text_hidden))
    arch = replace(base.architecture, **{k: v for k, v in sizes if v is not None})
    settings = recipe_settings(args.recipe, args.family, seed=args.seed, arch=arch, **given)
    manifest = train(settings, args.out, overwrite=args.overwrite)
    val = manifest["final_validation"]
    return (
        f"trained {args.family} organism ({manifest['parameters']:,} parameters, {settings.steps} steps) in "
        f"{manifest['wall_time_s'] / 60:.1f} min; validation answer accuracy {val['answer_acc']:.3f}, "
        f"trace accuracy {val['trace_acc']:.3f}; saved to {args.out} (log: {args.out}/train_log.csv)"
    )


def _ablation(args: argparse.Namespace) -> str:
    """VisionPulse's budget ablation: dynamic vs fixed budgets at the same mean."""
    from .ablation import run_ablation
    from .collect import RecordSettings
    from .datasets import load_dataset
    from .loading import check_model_dir, load
    from .rules import BudgetRule
    from .runs import check_output_path, open_run

    rule = BudgetRule.load(args.rule)
    dense = open_run(args.dense) if args.dense else None
    check_model_dir(args.model)
    check_output_path(args.out, run=False)
    dataset = load_dataset(args.data, limit=args.limit)
    model, processor = load(args.model, dtype=args.dtype, device=args.device)
    settings = RecordSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                              cache=args.cache)  # fmt: skip
    table, verdict = run_ablation(model, processor, dataset, args.out, rule, settings=settings, dense=dense,
                                  model_path=str(args.model), progress=not args.no_progress)  # fmt: skip
    return (Path(args.out) / "ablation.md").read_text(encoding="utf-8").strip() + f"\ntables: {args.out}/ablation.csv"


def _attribute(args: argparse.Namespace) -> str:
    """Captum attribution of every recorded step to the visual tokens, into the run."""
    from .analysis import resolve_dataset
    from .attribution import AttributionSettings, attribute_run
    from .loading import load
    from .runs import open_run

    settings = AttributionSettings(method=args.method, n_steps=args.n_steps)
    run = open_run(args.run_dir)
    dataset, note = resolve_dataset(run, args.data)
    if dataset is None:
        raise AttributionError(f"{args.run_dir}: {note or 'its dataset cannot be found'}; pass --data")
    model, processor = load(args.model, device=args.device)
    done = attribute_run(run, model, processor, dataset, settings, limit=args.limit, progress=not args.no_progress)
    return (f"{done} samples attributed ({settings.method}) into {args.run_dir}/arrays/*/attribution.npy; compare "
            f"them with attention: vpstudy analyze {args.run_dir}")


def _train_pruner(args: argparse.Namespace) -> str:
    """Train LearnPruner's pruning module on an organism (the VLM frozen)."""
    from .organism.pruner_training import PrunerTrainSettings, train_pruner

    settings = PrunerTrainSettings(keep=args.keep, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                   seed=args.seed, threads=args.threads)  # fmt: skip
    record = train_pruner(args.model, settings, out=args.out, progress=not args.no_progress)
    curve = record["loss"]
    head, tail = curve[: max(1, len(curve) // 10)], curve[-max(1, len(curve) // 10) :]
    return (f"pruning module trained in {record['wall_time_s'] / 60:.1f} min: trace loss {sum(head) / len(head):.3f} "
            f"(first tenth of the steps) -> {sum(tail) / len(tail):.3f} (last tenth); saved to "
            f"{args.out or args.model}/learnpruner.safetensors")


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


class _HelpFormatter(argparse.HelpFormatter):
    """Help that shows every option's default (unless its text already says it) and keeps
    multi-line descriptions and epilogs (example command lines) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.required or "default" in text.lower()
                or action.default is argparse.SUPPRESS):  # fmt: skip
            return text
        if action.nargs == 0:  # a flag (store_true, help, version)
            return text
        default = action.default
        if isinstance(default, list | tuple):
            default = " ".join(map(str, default)) or None
        shown = "none" if default is None else default
        return f"{text} (default: {str(shown).replace('%', '%%')})"


# one example command line per command, shown under its --help
EXAMPLES = {
    "record": "vpstudy record --model data/organism-llava --data data/organism-eval/data.jsonl --out runs/a --limit 16",
    "train-organism": "vpstudy train-organism --family llava --out runs/organism --seed 0",
    "analyze": "vpstudy analyze runs/a --n-boot 1000 --n-perm 1000",
    "fit-budget": "vpstudy fit-budget runs/a --layer 3 --delta 1/Nv --out runs/a/rule.json",
    "figures": "vpstudy figures runs/a --out runs/a/figures --rule runs/a/rule.json",
    "evaluate": "vpstudy evaluate --model data/organism-llava --data data/organism-eval/data.jsonl --limit 32 "
                "--method visionpulse --set tau=0.1 b_max=0.05 --out runs/pulse",
    "ablation": "vpstudy ablation --model data/organism-llava --data data/organism-eval/data.jsonl --limit 32 "
                "--rule runs/a/rule.json --out runs/ablation",
    "attribute": "vpstudy attribute runs/a --model data/organism-llava --limit 8",
    "train-pruner": "vpstudy train-pruner --model data/organism-llava --steps 300",
    "demo": "vpstudy demo --out runs/demo --samples 32",
    "bench": "vpstudy bench --device cpu --visual-tokens 1024",
}
DESCRIPTION = """Step-dependent visual evidence in vision-language models: record per-step attention to the
image's tokens into a run, analyze it, fit budget rules, prune visual tokens and evaluate.

typical session:
  vpstudy record --model DIR --data DATA --out RUN        decode a dataset, record attention into RUN
  vpstudy analyze RUN                                     statistics with intervals -> RUN/analysis/
  vpstudy fit-budget RUN --layer L --delta D --out R.json fit a budget rule from RUN
  vpstudy evaluate --model DIR --data DATA --method all --out DIR   compare pruning methods
  vpstudy figures RUN --out FIGS                          every figure from saved results
Run `vpstudy COMMAND --help` for a command's options, defaults and an example."""


def _decoding_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    """How a dataset is decoded: the same flags for ``record`` and ``evaluate``."""
    parser.add_argument("--max-new-tokens", type=positive, default=64,
                        help="tokens generated per example at most (greedy; stops earlier at EOS)")
    parser.add_argument("--batch-size", type=positive, default=1, help="examples decoded together (left-padded)")
    parser.add_argument("--limit", type=positive, default=None,
                        help=f"{verb} only the first N examples (default: all; a rerun with another limit resumes)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="parameter dtype of the model")
    parser.add_argument("--device", type=device, default="cpu", help="cpu, cuda, cuda:N or mps (checked to exist)")
    parser.add_argument("--cache", default="auto", choices=["auto", "static", "dynamic"],
                        help="KV cache of the decoding: static (preallocated, written in place), dynamic (grows "
                             "by concatenation every step), or auto (default: static where it is read exactly, "
                             "recorded in the manifest)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in a captured log)")


def _real_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``record``/``evaluate``: placement over several devices, sampling and repeats."""
    from .devices import DEVICE_MAPS

    parser.add_argument("--device-map", default=None, choices=DEVICE_MAPS,
                        help="spread the model over this process's devices with transformers' own placement "
                             "(from_pretrained(device_map=...)), for a model larger than one device; replaces "
                             "--device (default: none, the whole model on --device)")
    parser.add_argument("--sample", action="store_true",
                        help="sample instead of greedy decoding, each sample from its own stream seeded by --seed "
                             "and its id; temperature, top-p and top-k from the model's generation config unless "
                             "given")
    parser.add_argument("--paper-sampling", action="store_true",
                        help="sample as the paper ran Qwen3-VL-Thinking: temperature 0.7, top-p 0.8, top-k 20 (the "
                             "flags below override a value)")
    parser.add_argument("--temperature", type=positive_number, default=None,
                        help="sampling temperature (implies --sample)")
    parser.add_argument("--top-p", type=ratio, default=None, help="nucleus sampling mass in (0, 1] (implies --sample)")
    parser.add_argument("--top-k", type=non_negative, default=None,
                        help="sample among the k likeliest tokens, 0: all (implies --sample)")
    parser.add_argument("--repeats", type=positive, default=1,
                        help="decode each example N times (needs sampling), stored as samples <id>#r<k>; eval.json "
                             "reports accuracy over repeats with an interval that resamples the examples")


def _store_arguments(parser: argparse.ArgumentParser) -> None:
    """``record``/``evaluate``: what a sample keeps (vpstudy.storage)."""
    from .storage import DEFAULT_CHUNK_STEPS, DEFAULT_STORE, STORE_POLICIES

    parser.add_argument("--store", default=DEFAULT_STORE, choices=STORE_POLICIES,
                        help="what each sample keeps: analysis (default: the steps table and never-activated maxima "
                             "at every recorded layer, p̄ per step only at the analysis layer and --score-layers), "
                             "full (p̄ per step at every recorded layer), scalars (no per-step p̄)")
    parser.add_argument("--score-layers", type=layer_list, default=None,
                        help="--store analysis: also keep p̄ per step at these recorded layers, e.g. '5,20' (for "
                             "layer similarity, localization per layer, fit-budget --layer auto)")
    parser.add_argument("--chunk-steps", type=positive, default=DEFAULT_CHUNK_STEPS,
                        help="steps whose values wait on the device before they are moved off it and written "
                             f"(default {DEFAULT_CHUNK_STEPS}; changes no value, only memory)")


def _resampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n-boot", type=resamples, default=1000,
                        help="bootstrap replicates, resampling samples (at least 20)")
    parser.add_argument("--n-perm", type=resamples, default=1000,
                        help="permutations of the correlation p-values (at least 20)")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the resampling")


def build_parser() -> argparse.ArgumentParser:
    """The ``vpstudy`` argument parser: one subcommand per command, each with its handler as
    ``args.run`` (set by ``set_defaults``), defaults shown in ``--help`` and an example epilog."""
    parser = _Parser(prog="vpstudy", description=DESCRIPTION, formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    rec = sub.add_parser("record", help="decode a dataset and record per-step visual attention into a run")
    rec.add_argument("--model", required=True, help="model directory (save_pretrained form) or a hub name org/name")
    rec.add_argument("--data", required=True, help=DATA_HELP)
    rec.add_argument("--benchmark", default=None, help=BENCHMARK_HELP)
    rec.add_argument("--out", required=True, help="run directory (created; an existing run resumes)")
    rec.add_argument("--layers", type=layer_list, default=None,
                     help="text layers to record, e.g. '0,5,17' (default: all)")
    rec.add_argument("--thresholds", nargs="+", type=threshold, default=list(DEFAULT_THRESHOLDS),
                     help="activity thresholds δ: numbers >= 0 or k/Nv")
    _decoding_arguments(rec, "record")
    _real_model_arguments(rec)
    _store_arguments(rec)
    rec.add_argument("--seed", type=seed, default=0,
                     help="run seed: torch seed before decoding; with sampling, each sample's stream is seeded from "
                          "it and the sample id")
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
    org.add_argument("--eval-every", type=positive, default=None,
                     help="decode the validation set every N steps (default: 250)")
    org.add_argument("--lr", type=positive_number, default=None, help="peak AdamW learning rate (default: 1e-3)")
    org.add_argument("--probe-weight", type=non_negative_number, default=None,
                     help="weight of the training-only patch probe loss on the vision features (default: 1)")
    org.add_argument("--text-mass-weight", type=non_negative_number, default=None,
                     help="weight of the training-only visual-mass lever on text-only rows (default: v1 0, v2 1)")
    org.add_argument("--init-from", default=None,
                     help="warm-start the text model from this organism directory, e.g. data/organism-llava "
                          "(default: from scratch)")
    org.add_argument("--text-layers", type=positive, default=None,
                     help="text decoder layers (default: the shipped organism's: llava 6, qwen2_vl 4)")
    org.add_argument("--text-hidden", type=positive, default=None, help="text width (default: 128)")
    org.add_argument("--overwrite", action="store_true", help="replace an output directory holding another model")
    org.set_defaults(run=_train_organism)

    ana = sub.add_parser("analyze", help="statistics of a recorded run with uncertainty, into RUN/analysis/")
    ana.add_argument("run_dir", metavar="RUN", help="run directory written by `vpstudy record`")
    ana.add_argument("--data", default=None, help="dataset with trace annotations (default: the run's own dataset)")
    ana.add_argument("--layer", type=int, default=None,
                     help="analysis layer of the headline (default: the recorded layer at the anchor depth)")
    _resampling_arguments(ana)
    ana.set_defaults(run=_analyze)

    fit = sub.add_parser("fit-budget", help="fit a budget rule (signal -> keep ratio) from a recorded run")
    fit.add_argument("run_dir", metavar="RUN", help="run directory written by `vpstudy record`")
    fit.add_argument("--layer", type=anchor_choice, required=True,
                     help="anchor layer where the signal is read, or auto: chosen on the training split as the "
                          "shallowest layer whose top-K set keeps the largest share of the deeper layers' attention")
    fit.add_argument("--anchor-budget", type=ratio, default=0.05,
                     help="--layer auto: the K of the criterion, as a share of N_v")
    fit.add_argument("--data", default=None,
                     help="--layer auto: the run's dataset, for localization per layer beside the choice "
                          "(default: the path in the run's manifest, if annotated)")
    fit.add_argument("--delta", type=threshold, required=True,
                     help="activity threshold δ of the target N_act (e.g. 0.001 or 1/Nv)")
    fit.add_argument("--out", required=True, help="rule JSON to write (refuses an existing file unless --overwrite)")
    fit.add_argument("--signal", default="mass", help="mass (default), max_head_mass or max_head_mass@tau=<τ>")
    fit.add_argument("--holdout", type=share, default=0.3,
                     help="share of samples held out to test the rule, strictly between 0 and 1")
    fit.add_argument("--seed", type=seed, default=0, help="seed of the train/held-out split")
    fit.add_argument("--b-min", type=ratio, default=None,
                     help="lower clamp of the keep ratio, in (0, 1] (default: fitted)")
    fit.add_argument("--b-max", type=ratio, default=None,
                     help="upper clamp of the keep ratio, in (0, 1] (default: fitted)")
    fit.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    fit.set_defaults(run=_fit_budget)

    figs = sub.add_parser("figures", help="draw every figure from saved runs and results (no model is run)")
    figs.add_argument("runs", nargs="+", metavar="RUN",
                      help="run directories (each must exist; statistics are read from RUN/analysis/ when current)")
    figs.add_argument("--out", required=True, help="output directory for PNG and PDF files")
    figs.add_argument("--layer", type=int, default=None, help="layer of the per-layer figures (default: anchor depth)")
    figs.add_argument("--rule", default=None, help="a fitted budget rule to add to the budget dynamics figure")
    figs.add_argument("--bench", default="bench/results", help="benchmark results directory (latency figure)")
    figs.add_argument("--comparison", nargs="*", default=[], help="evaluation comparison CSVs (accuracy figure)")
    figs.set_defaults(run=_figures)

    ev = sub.add_parser("evaluate", help="decode a dataset with a pruning method; run + eval.json (or --method all)")
    ev.add_argument("--model", required=True, help="model directory (save_pretrained form) or a hub name org/name")
    ev.add_argument("--data", required=True, help=DATA_HELP)
    ev.add_argument("--benchmark", default=None, help=BENCHMARK_HELP)
    ev.add_argument("--method", required=True,
                    help=f"dense, a method ({', '.join(METHODS)}), several joined by + (fastv+visionpulse), "
                         "or all (the full comparison)")
    ev.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="method settings, e.g. tau=0.4 b_max=0.1 (prefix with the method when composing: "
                         "fastv.layer=2)")
    ev.add_argument("--rule", default=None, help="a fitted budget rule (JSON) for visionpulse (default: the paper's)")
    ev.add_argument("--out", required=True, help="run directory (for --method all: a directory of runs)")
    ev.add_argument("--dense", default=None,
                    help="a dense run of the same samples, for agreement and the paired Δ (default: none)")
    ev.add_argument("--scorer", default=None,
                    help=f"answer scoring: {', '.join(SCORERS)} (default: the benchmark's scorer, else exact_match)")
    ev.add_argument("--anchor", type=int, default=None,
                    help="--method all: the anchor layer of every anchored method (default: each method's own; "
                         "e.g. the layer of a rule fitted with --layer auto)")
    ev.add_argument("--budgets", type=ratio, nargs="+", default=[0.05, 0.10],
                    help="--method all: per-step visual-token budgets of the comparison (default: 0.05 0.1)")
    _decoding_arguments(ev, "evaluate")
    _real_model_arguments(ev)
    _store_arguments(ev)
    ev.add_argument("--seed", type=seed, default=0,
                    help="seed of random methods; with sampling, each sample's stream is seeded from it and the "
                         "sample id")
    ev.set_defaults(run=_evaluate)

    abl = sub.add_parser("ablation", help="the paper's budget ablation: dynamic vs fixed budgets at the same mean")
    abl.add_argument("--model", required=True, help="model directory (save_pretrained form)")
    abl.add_argument("--data", required=True, help="dataset: .jsonl, .parquet, a save_to_disk directory or a hub id")
    abl.add_argument("--rule", required=True, help="a fitted budget rule (vpstudy fit-budget; its layer is the anchor)")
    abl.add_argument("--out", required=True, help="directory of the rows' runs and ablation.csv/.md")
    abl.add_argument("--dense", default=None, help="an existing dense recording of the same samples, as the dense row")
    _decoding_arguments(abl, "ablate")
    abl.add_argument("--seed", type=seed, default=0, help="seed of the random row (decoding is greedy)")
    abl.set_defaults(run=_ablation)

    att = sub.add_parser("attribute", help="captum attribution of each recorded step to the visual tokens, into RUN")
    att.add_argument("run_dir", metavar="RUN", help="a dense recording (vpstudy record)")
    att.add_argument("--model", required=True, help="the model the run was recorded with")
    att.add_argument("--data", default=None, help="the run's dataset (default: the path in its manifest)")
    att.add_argument("--method", default="grad_x_activation", choices=["grad_x_activation", "integrated_gradients"],
                     help="captum attribution of the generated token's logit to the visual features")
    att.add_argument("--n-steps", type=positive, default=16, help="integration points of integrated_gradients")
    att.add_argument("--limit", type=positive, default=None, help="attribute only the first N samples not yet done")
    att.add_argument("--device", type=device, default="cpu", help="cpu, cuda, cuda:N or mps")
    att.add_argument("--no-progress", action="store_true", help="no progress bar")
    att.set_defaults(run=_attribute)

    tp = sub.add_parser("train-pruner", help="train LearnPruner's pruning module on an organism (VLM frozen)")
    tp.add_argument("--model", required=True, help="an organism directory (the module is saved beside it)")
    tp.add_argument("--out", default=None, help="where to save the module (default: the organism's directory)")
    tp.add_argument("--keep", type=share, default=0.15,
                    help="share of visual tokens the training mask keeps (LearnPruner's stage-1 budget R1)")
    tp.add_argument("--steps", type=positive, default=300, help="optimizer steps")
    tp.add_argument("--batch-size", type=positive, default=16, help="examples per step")
    tp.add_argument("--lr", type=positive_number, default=5e-4, help="AdamW learning rate")
    tp.add_argument("--seed", type=seed, default=0, help="seed of the module and the training data")
    tp.add_argument("--threads", type=positive, default=1, help="torch CPU threads")
    tp.add_argument("--no-progress", action="store_true", help="no progress bar")
    tp.set_defaults(run=_train_pruner)

    demo = sub.add_parser("demo", help="the main job on the embedded default (see README)")
    demo.add_argument("--out", default="runs/demo", help="where the demo writes (default: runs/demo)")
    demo.add_argument("--family", default="llava", help="which shipped organism: llava (default) or qwen2_vl")
    demo.add_argument("--organism", default="v2", choices=["v1", "v2"],
                      help="organism version: v2 (256 visual tokens, 8 layers) or v1 (64 tokens, the first one)")
    demo.add_argument("--samples", type=positive, default=128, help="evaluation examples to record (default: 128)")
    demo.add_argument("--max-new-tokens", type=positive, default=48, help="tokens generated per example at most")
    demo.add_argument("--batch-size", type=positive, default=32, help="examples decoded together")
    _resampling_arguments(demo)
    demo.set_defaults(run=_demo)

    bench = sub.add_parser("bench", help="prefill/decode latency of VisionPulse vs dense (paper Figure 5)",
                           description="Prefill and decode latency of VisionPulse (physical mode) vs dense decoding at "
                                       "long visual contexts, with a memory roofline (bench/README.md). Defaults: the "
                                       "GPU protocol on CUDA, a scaled-down one on CPU (--device cpu).")  # fmt: skip
    add_bench_arguments(bench)
    bench.set_defaults(run=_bench)

    for action in sub._choices_actions:  # every command: its one-line help as description, defaults, an example
        command = sub.choices[action.dest]
        command.formatter_class = _HelpFormatter
        command.description = command.description or action.help
        if action.dest in EXAMPLES:
            command.epilog = f"example:\n  {EXAMPLES[action.dest]}"
    return parser


# host memory, and a device's (torch.OutOfMemoryError derives from RuntimeError, not MemoryError)
_OUT_OF_MEMORY: tuple[type[BaseException], ...] = (MemoryError, torch.OutOfMemoryError)


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _kept_outputs(args: argparse.Namespace) -> str:
    """For ``record``/``evaluate``: what an interrupted or failed command left intact, and that a
    rerun of the same command resumes (empty for other commands)."""
    from .distributed import shards_root
    from .runs import committed_count

    def count(run: Path) -> int:  # the run and, under a launcher, its shards
        shards = shards_root(run)
        return committed_count(run) + (sum(committed_count(d) for d in shards.iterdir()) if shards.is_dir() else 0)

    if args.command not in ("record", "evaluate") or not hasattr(args, "out"):
        return ""
    out = Path(args.out)
    several = args.command == "evaluate" and args.method == "all"
    try:
        done = (sum(count(d) for d in out.iterdir() if d.is_dir()) if out.is_dir() else 0) if several else count(out)
    except OSError:
        return ""
    where = f"the runs under {out}" if several else str(out)
    if not done:
        return f"nothing was committed to {where} yet"
    samples = f"1 sample committed to {where} is" if done == 1 else f"{done} samples committed to {where} are"
    return f"the {samples} intact; rerun the same command to resume"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``vpstudy`` command; returns the exit status (0, 2 for a user mistake, 130 on Ctrl-C)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    prefix = f"vpstudy {args.command}"
    start = time.perf_counter()
    show = warnings.showwarning

    def show_one_line(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001, ANN202
        if issubclass(category, VpstudyWarning):
            print(f"{prefix}: warning: {_one_line(str(message))}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_one_line
            message = args.run(args)
    except VpstudyError as err:
        print(f"{prefix}: error: {_one_line(str(err))}", file=sys.stderr)
        return 2
    except OSError as err:
        kept = _kept_outputs(args)
        print(f"{prefix}: error: {_one_line(os_error_message(err))}{'; ' + kept if kept else ''}", file=sys.stderr)
        return 2
    except _OUT_OF_MEMORY as err:
        kept = _kept_outputs(args)
        hint = "lower --batch-size or --max-new-tokens" if hasattr(args, "batch_size") else "free some memory"
        print(f"{prefix}: error: out of memory ({_one_line(str(err))[:200] or type(err).__name__}): {hint}"
              f"{'; ' + kept if kept else ''}", file=sys.stderr)  # fmt: skip
        return 2
    except KeyboardInterrupt:
        kept = _kept_outputs(args)
        print(f"{prefix}: interrupted (Ctrl-C){'; ' + kept if kept else ''}", file=sys.stderr)
        return 130
    if _main_rank():  # under a launcher, rank 0 alone reports the merged result
        print(f"{message}\n({time.perf_counter() - start:.1f} s)")
    return 0


def _main_rank() -> bool:
    """Whether this process is rank 0 of its launch (or not launched)."""
    from .distributed import launch

    try:
        return launch().main
    except VpstudyError:
        return True


if __name__ == "__main__":
    sys.exit(main())
