"""``vpstudy demo``: the main job on the shipped organism, end to end on CPU.

record (the shipped organism on its evaluation set) → analyze → fit a budget rule, its anchor
layer chosen from the data (``--layer auto``) → the paper's budget ablation at that anchor →
evaluate every pruning method on the same samples at 5% and 10% (anchored methods at the chosen
anchor) → figures → ``report.md``. Everything goes under one output directory::

    OUT/run/                 the dense recorded run (resumes if rerun), with run/analysis/
    OUT/budget_rule.json     the fitted rule (its anchor and the evidence for it)
    OUT/ablation/            the ablation's rows (one run each), ablation.csv / .md / .json
    OUT/compare/             one run per pruning method (+ eval.json), comparison.csv / .md
    OUT/figures/             PNG + PDF
    OUT/report.md            findings with their intervals, the rule, the ablation, the comparison, the figures
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from .stats.tables import AnalysisSettings

DEMO_DELTA = "1/Nv"  # the organism has 64 visual tokens: every absolute δ of the paper's grid is below 1/N_v


@dataclass(frozen=True)
class DemoSettings:
    """What the demo runs. ``samples`` examples of the shipped evaluation set are recorded with
    greedy decoding of up to ``max_new_tokens`` tokens, ``batch_size`` at a time."""

    family: str = "llava"
    version: str = "v2"  # which shipped organism (vpstudy.organism.shipped.VERSIONS)
    samples: int = 128
    max_new_tokens: int = 48
    batch_size: int = 32
    attribution_samples: int = 32  # samples whose steps get a captum attribution (agreement with attention)
    delta: str = DEMO_DELTA
    analysis: AnalysisSettings = field(default_factory=AnalysisSettings)


@dataclass
class DemoResult:
    """Where :func:`run_demo` wrote its results: the dense run's directory, the fitted rule's JSON,
    ``report.md``, the figure files written, why any figure or statistic was skipped, and the
    run's summary line."""

    run: Path
    rule: Path
    report: Path
    figures: list[Path]
    skipped: list[str]
    summary: str


def _paper_depth_variants(n_layers: int, chosen: int) -> list:
    """VisionPulse ≤5% and its static control at the paper's relative anchor depth (17 of 36),
    when the anchor chosen from the data is another layer: does the anchor's depth matter?"""
    from .evaluation import PlannedRun
    from .rules import anchor_layer

    paper = anchor_layer(n_layers)
    if paper == chosen:
        return []
    settings = {"tau": "0.1", "b_min": "0.01", "b_max": "0.05", "anchor": str(paper)}
    return [
        PlannedRun(
            f"visionpulse-5-anchor{paper}", "visionpulse", settings, display=f"VisionPulse ≤5% at layer {paper}"
        ),
        PlannedRun(
            f"static_topk-5-anchor{paper}",
            "static_topk",
            {"ratio": "0.05", "anchor": str(paper)},
            display=f"static top-5% at layer {paper}",
            group="prefill",
        ),
    ]


def run_demo(
    out: str | Path, settings: DemoSettings = DemoSettings(), *, progress: bool = True, command: str = "vpstudy demo"
) -> DemoResult:
    """Run the whole pipeline into ``out`` (see the module docstring)."""
    from .ablation import run_ablation
    from .analysis import analyze
    from .attribution import attribute_run
    from .collect import RecordSettings, record_dataset, summary_line
    from .datasets import load_dataset
    from .evaluation import compare
    from .figures import write_figures
    from .loading import ModelLoadError, load
    from .organism.shipped import eval_set_path, organism_dir
    from .report import render_report
    from .rules import BudgetRuleError
    from .stats.fit import fit_budget
    from .storage import StorePolicy

    out = Path(out)
    model_dir = organism_dir(settings.family, settings.version)
    data = eval_set_path(settings.version)
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"{model_dir}: no shipped organism of family {settings.family!r} (see data/README.md)")

    def say(message: str) -> None:
        if progress:
            print(message, flush=True)

    say(f"[1/7] record {settings.samples} examples with {model_dir}")
    model, processor = load(model_dir)
    dataset = load_dataset(data, limit=settings.samples)
    # --store full: the anchor is chosen from p̄ at every layer, and localization is measured at each
    record = RecordSettings(max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
                            store=StorePolicy.full())  # fmt: skip
    run = record_dataset(model, processor, dataset, out / "run", record, model_path=str(model_dir), progress=progress)
    summary = summary_line(run)

    say(f"[2/7] attribute the first {settings.attribution_samples} samples' steps to the visual tokens (captum)")
    attribute_run(run, model, processor, dataset, limit=settings.attribution_samples, progress=progress)
    say("[3/7] analyze")
    result = analyze(run, settings=settings.analysis, progress=progress)
    layer = result["analysis_layer"]

    say(f"[4/7] fit a budget rule, δ={settings.delta}, its anchor layer chosen from the data")
    localization = {int(r["layer"]): float(r["localization"]) for r in result["tables"].get("localization", [])}
    rule = fit_budget(
        run, layer="auto", delta=settings.delta, seed=settings.analysis.seed, localization=localization or None
    )
    rule_path = rule.save(out / "budget_rule.json")
    anchor = rule.layer
    if anchor is None:  # fit_budget(layer="auto") always chooses one
        raise BudgetRuleError(f"{rule_path}: the fitted budget rule has no anchor layer")

    say(f"[5/7] the paper's budget ablation at anchor layer {anchor}")
    _, verdict = run_ablation(
        model,
        processor,
        dataset,
        out / "ablation",
        rule,
        settings=record,
        dense=run,
        model_path=str(model_dir),
        progress=progress,
    )
    ablation = (out / "ablation" / "ablation.md").read_text(encoding="utf-8")

    say(f"[6/7] evaluate every pruning method on the same samples at 5% and 10% (anchored at layer {anchor})")
    n_layers = model.config.get_text_config().num_hidden_layers
    table = compare(
        model,
        processor,
        dataset,
        out / "compare",
        settings=record,
        rule=rule,
        dense=run,
        anchor=anchor,
        extra=_paper_depth_variants(n_layers, anchor),
        model_path=str(model_dir),
        progress=progress,
    )

    say("[7/7] figures and report")
    figures = write_figures(
        [run.path],
        out / "figures",
        layer=layer,
        rule=rule_path,
        progress=progress,
        comparisons=[out / "compare" / "comparison.csv"],
    )
    report_path = out / "report.md"
    commands = [
        command,
        "# or step by step:",
        f"vpstudy record --model {model_dir} --data {data} --limit {settings.samples} "
        f"--max-new-tokens {settings.max_new_tokens} --batch-size {settings.batch_size} --store full "
        f"--out {out / 'run'}",
        f"vpstudy attribute {out / 'run'} --model {model_dir} --limit {settings.attribution_samples}",
        f"vpstudy analyze {out / 'run'} --n-boot {settings.analysis.n_boot} --n-perm {settings.analysis.n_perm}",
        f"vpstudy fit-budget {out / 'run'} --layer auto --delta {shlex.quote(settings.delta)} "
        f"--out {rule_path} --overwrite",
        f"vpstudy ablation --model {model_dir} --data {data} --limit {settings.samples} --rule {rule_path} "
        f"--max-new-tokens {settings.max_new_tokens} --batch-size {settings.batch_size} --dense {out / 'run'} "
        f"--out {out / 'ablation'}",
        f"vpstudy evaluate --model {model_dir} --data {data} --limit {settings.samples} --method all "
        f"--rule {rule_path} --anchor {anchor} --max-new-tokens {settings.max_new_tokens} "
        f"--batch-size {settings.batch_size} --out {out / 'compare'}   # records its own dense row",
        f"vpstudy figures {out / 'run'} --out {out / 'figures'} --rule {rule_path} "
        f"--comparison {out / 'compare' / 'comparison.csv'}",
    ]
    text = render_report(
        title=f"vpstudy demo: the shipped {settings.family} organism ({settings.version})",
        result=result,
        rule=rule,
        figures=figures.written,
        skipped=[*result["skipped"], *figures.skipped],
        out=report_path,
        commands=commands,
        summary=summary,
        comparison=table,
        ablation=ablation,
    )
    report_path.write_text(text, encoding="utf-8")
    return DemoResult(
        run.path, rule_path, report_path, list(figures.written), [*result["skipped"], *figures.skipped], summary
    )
